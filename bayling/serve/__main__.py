"""`python -m bayling.serve`: controller, model worker and web page (and an OpenAI API) in one command."""
import argparse
import os
import sys
from pathlib import Path

from .launch import HOST, StackPlan, run_stack
from .supervise import DEFAULT_DRAIN_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bayling.serve",
        description="Start FastChat's controller, our model worker and the web page on loopback; Ctrl-C stops all.",
        epilog="Every other flag goes to the model worker, e.g. --model-path ICTNLP/bayling-13b-v1.1 "
               "--device cuda --conv-template BayLing --limit-worker-concurrency 16 "
               "(see python -m bayling.serve.worker -h). "
               "Without --model-path the worker serves the embedded demo model on the CPU.")
    parser.add_argument("--host", default=HOST, help="address every part listens on (default loopback only)")
    parser.add_argument("--controller-port", type=int, default=21001)
    parser.add_argument("--worker-port", type=int, default=21002)
    parser.add_argument("--web-port", type=int, default=7860)
    parser.add_argument("--no-web", action="store_true", help="do not start the web page")
    parser.add_argument("--openai-api", nargs="?", const="fastchat", choices=("fastchat", "bayling"), default=None,
                        help="also start an OpenAI-compatible API: FastChat's server (default) or ours "
                             "(bayling: also streams)")
    parser.add_argument("--openai-port", type=int, default=8000)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"),
                        help="where each process logs (and the web page writes its vote logs)")
    parser.add_argument("--api-key", default=os.environ.get("BAYLING_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on the OpenAI API (default $BAYLING_API_KEY)")
    parser.add_argument("--allowed-origins", default=None,
                        help="comma-separated origins whose pages may call our OpenAI API (CORS; default none)")
    parser.add_argument("--auth", metavar="USER:PASS", default=None, help="the web page's login")
    parser.add_argument("--restarts-per-minute", type=int, default=5,
                        help="restart a dead model worker (with backoff) at most this often, then give up")
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S,
                        help="on stop, the model worker lets in-flight answers finish for up to this many "
                             f"seconds, then ends them with an error (default {DEFAULT_DRAIN_S:g})")
    args, worker_args = parser.parse_known_args(argv)
    plan = StackPlan(host=args.host, controller_port=args.controller_port, worker_port=args.worker_port,
                     web_port=args.web_port, openai_port=args.openai_port, openai_api=args.openai_api,
                     worker_args=worker_args, log_dir=args.log_dir, web=not args.no_web,
                     api_key=args.api_key, allowed_origins=args.allowed_origins, auth=args.auth,
                     restarts_per_minute=args.restarts_per_minute, drain_s=args.drain_timeout)
    return run_stack(plan)


def run() -> None:
    """The console command `bayling-serve`."""
    sys.exit(main())


if __name__ == "__main__":
    run()
