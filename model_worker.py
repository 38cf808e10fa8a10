"""A BayLing model worker for FastChat's controller: `python model_worker.py --model-path ...`.

Speaks FastChat's worker protocol (so `python -m fastchat.serve.controller`, FastChat's OpenAI API
server and web_server.py work with it unchanged) and decodes concurrent requests in one batch.
"""
import argparse
import logging
import sys

from bayling.loading import ModelLoadError, add_model_args, load_model, model_args_from
from bayling.serve.worker import add_worker_args, run_worker, worker_config_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    add_worker_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run_worker(load_model(model_args_from(args)), worker_config_from(args))
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
