"""The BayLing chat page: a Gradio web UI over a FastChat controller and our model workers.

    python -m fastchat.serve.controller
    python model_worker.py --model-path ICTNLP/bayling-2-7b
    python web_server.py            # then open http://127.0.0.1:7860
"""
import argparse
from typing import Optional, Sequence

from bayling.serve.web import WebConfig, parse_auth, run_web_server
from bayling.serve.web_client import DEFAULT_READ_TIMEOUT_S


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", default="http://127.0.0.1:21001", help="the FastChat controller")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASS", default=None, help="require this login")
    parser.add_argument("--log-dir", default="logs", help="where upvote/downvote/flag logs go (one file a day)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                        help="seconds of silence from a worker before the page reports a timeout")
    parser.add_argument("--concurrency", type=int, default=16, help="answers streamed at once")
    args = parser.parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        parser.error(str(e))
    if not args.controller_url.startswith(("http://", "https://")):
        parser.error(f"--controller-url must start with http:// or https://, got {args.controller_url!r}")
    if args.timeout <= 0 or args.concurrency < 1:
        parser.error("--timeout must be > 0 and --concurrency >= 1")
    config = WebConfig(controller_url=args.controller_url, log_dir=args.log_dir, timeout_s=args.timeout,
                       concurrency=args.concurrency)
    run_web_server(config, host=args.host, port=args.port, share=args.share, auth=auth)


if __name__ == "__main__":
    main()
