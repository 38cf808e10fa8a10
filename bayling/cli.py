"""Flags shared by the scripts, and turning them into values; errors print one line, not a traceback."""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Callable, NoReturn, Optional, TypeVar

from .loading import ModelLoadError, add_model_args
from .params import GenerationParams
from .templates import get_template

T = TypeVar("T")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int = 512,
                        temperature: float = 0.7) -> argparse._ArgumentGroup:
    """Sampling flags; both spellings of repetition penalty, as upstream BayLing accepts."""
    g = parser.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0, help="0 = off")
    g.add_argument("--repetition-penalty", "--repetition_penalty", dest="repetition_penalty", type=float,
                   default=1.0)
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   default=max_new_tokens)
    g.add_argument("--conv-template", default=None,
                   help="BayLing, BayLing-3 or tokenizer (default: chosen from the model name)")
    g.add_argument("--system", default=None, help="system prompt (default: the template's)")
    return g


def params_from(ns: argparse.Namespace) -> GenerationParams:
    """GenerationParams from parsed flags (validated here, once, with --conv-template)."""
    if getattr(ns, "conv_template", None):
        get_template(ns.conv_template)  # an unknown name fails before a model is loaded
    return GenerationParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                            repetition_penalty=ns.repetition_penalty, max_new_tokens=ns.max_new_tokens)


def build_parser(description: str, max_new_tokens: int = 512) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    add_generation_args(parser, max_new_tokens)
    return parser


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main; user errors become one 'error: ...' line and exit status 2."""
    try:
        code = main()
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        code = 130
    raise SystemExit(code or 0)


def run_writing_job(job: Callable[[], T], errors: type[Exception] | tuple[type[Exception], ...]) -> tuple[int, Optional[T]]:
    """Run a command whose output is written beside and renamed when complete (apply_delta, export).

    SIGTERM unwinds like Ctrl-C, so the partial output is removed on the way out. An error of
    `errors` is one 'error: ...' line; returns (exit status, the job's result or None): 0, 2, or
    130 on Ctrl-C.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return 0, job()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130, None
