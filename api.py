"""Ask a model one question and print the answer (plain text, or JSON with usage)."""
import json
import sys

from bayling.cli import build_parser, params_from, run_main


def main() -> None:
    parser = build_parser("Ask a BayLing model (or the demo model) one question.")
    parser.add_argument("--message", "-m", required=True, help="the question; '-' reads it from stdin")
    parser.add_argument("--json", action="store_true", help="print {text, usage, finish_reason} as JSON")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = parser.parse_args()
    params = params_from(args)

    from bayling.engine.driver import build_engine
    from bayling.loading import engine_kwargs_from, load_model, model_args_from
    from bayling.oneshot import answer, read_message
    from bayling.templates import choose_template

    message = read_message(args.message)
    loaded = load_model(model_args_from(args))
    template = choose_template(loaded.name, args.conv_template)
    show = (lambda c: print(c.delta, end="", flush=True)) if args.stream and not args.json else None
    engine = build_engine(loaded.model, loaded.tokenizer, context_len=loaded.context_len, **engine_kwargs_from(args, params.n))
    last = answer(loaded, template, message, params, args.system, on_chunk=show, engine=engine)
    if args.json:
        print(json.dumps({"text": last.text, "usage": last.usage, "finish_reason": last.finish_reason},
                         ensure_ascii=False))
    else:
        print("" if show else last.text)


if __name__ == "__main__":
    run_main(main)
