"""One question, one answer: the engine behind api.py."""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from .context import fit_conversation
from .generation import default_engine, generate_stream
from .loading import LoadedModel
from .output import StreamChunk
from .params import GenerationParams
from .templates import USER, Conversation, Template, params_for_template


def answer(loaded: LoadedModel, template: Template, message: str, params: GenerationParams,
           system: Optional[str] = None, on_chunk: Optional[Callable[[StreamChunk], None]] = None,
           engine: Any = None) -> StreamChunk:
    """Answer one user message; on_chunk sees every streamed chunk. Returns the last chunk."""
    engine = engine or default_engine(loaded.model, loaded.tokenizer, params, loaded.context_len)
    conv = Conversation(template, system)
    conv.add(USER, message)
    fitted = fit_conversation(conv, loaded.tokenizer, engine.context_len, params.max_new_tokens)
    params = params_for_template(params, template, loaded.tokenizer)
    last = None
    for last in generate_stream(loaded.model, loaded.tokenizer, fitted.input_ids, params, engine=engine):
        if on_chunk is not None:
            on_chunk(last)
    assert last is not None
    return last


def read_message(message: str) -> str:
    """--message TEXT, or '-' for standard input."""
    text = sys.stdin.read() if message == "-" else message
    if not text.strip():
        raise ValueError("the message is empty")
    return text.rstrip("\n")
