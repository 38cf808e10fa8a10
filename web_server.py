"""The BayLing chat page: a Gradio web UI over a FastChat controller and our model workers.

    python -m fastchat.serve.controller
    python model_worker.py --model-path ICTNLP/bayling-2-7b
    python web_server.py            # then open http://127.0.0.1:7860

The same as `python -m bayling.serve.web`; every flag is described by --help.
"""
from bayling.serve.web import main

if __name__ == "__main__":
    main()
