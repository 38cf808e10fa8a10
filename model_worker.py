"""A BayLing model worker for FastChat's controller: `python model_worker.py --model-path ...`.

Speaks FastChat's worker protocol (so `python -m fastchat.serve.controller`, FastChat's OpenAI API
server and web_server.py work with it unchanged) and decodes concurrent requests in one batch.
The same as `python -m bayling.serve.worker`; see docs/serving.md for the flags.
"""
from bayling.serve.worker import main

if __name__ == "__main__":
    main()
