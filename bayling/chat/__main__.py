"""`bayling-chat` / `python chat.py`: chat with a BayLing model (or the embedded demo model) in the terminal."""
from ..cli import build_parser, params_from, run_main


def main() -> None:
    parser = build_parser("Chat with a BayLing model in the terminal.")
    parser.add_argument("--style", choices=["simple", "rich", "programmatic"], default="simple",
                        help="terminal display")
    parser.add_argument("--multiline", action="store_true", help="multi-line input")
    parser.add_argument("--debug", action="store_true", help="print the prompt and tokens/s")
    args = parser.parse_args()
    params = params_from(args)  # validated before the model loads: a bad flag fails at once

    from ..engine.driver import build_engine
    from ..loading import engine_kwargs_from, load_model, model_args_from
    from ..templates import Conversation, choose_template
    from . import ChatSession, chat_loop, make_chatio
    from .loop import HELP

    chatio = make_chatio(args.style, args.multiline)
    loaded = load_model(model_args_from(args))
    template = choose_template(loaded.name, args.conv_template)
    chatio.info(f"model: {loaded.name} on {loaded.device} (template {template.name}); {HELP}")
    engine = build_engine(loaded.model, loaded.tokenizer, context_len=loaded.context_len, **engine_kwargs_from(args, params.n))
    chat_loop(ChatSession(loaded, Conversation(template, args.system), params, args.debug, engine=engine), chatio)


def run() -> None:
    """The console command."""
    run_main(main)


if __name__ == "__main__":
    run()
