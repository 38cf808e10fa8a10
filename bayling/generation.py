"""One prompt in, a stream of StreamChunks out: the engine driven in the caller's thread (chat, api.py)."""
from __future__ import annotations

import itertools
import threading
from typing import Any, Iterator, Optional, Sequence, Union

from .engine.request import OutputKind, Request
from .output import StreamChunk
from .params import GenerationParams
from .tokens import PromptTooLongError, check_prompt_fits, context_length, encode_prompt, eos_token_ids  # noqa: F401

_ids = itertools.count(1)


def default_engine(model: Any, tokenizer: Any, params: GenerationParams, context_len: Optional[int] = None) -> Any:
    """The engine a one-user caller (chat, api.py) builds when given none: one slot per answer (on
    llama.cpp each slot holds a KV stream, so spare ones cost memory)."""
    from .engine.driver import build_engine

    return build_engine(model, tokenizer, context_len=context_len, max_num_seqs=params.n)


def generate_stream(model: Any, tokenizer: Any, prompt: Union[str, Sequence[int]], params: GenerationParams,
                    *, context_len: Optional[int] = None, engine: Any = None,
                    cancel: Optional[threading.Event] = None) -> Iterator[StreamChunk]:
    """Yield a StreamChunk whenever visible text grows, and a last one with finish_reason set.

    Raises PromptTooLongError (from the engine) before any work if the prompt cannot fit. Closing the iterator
    (Ctrl-C in chat) aborts the request; so does setting `cancel` (the last chunk then has
    finish_reason "abort"). Pass `engine` to reuse one across calls.
    """
    from .engine.driver import stream

    prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    engine = engine or default_engine(model, tokenizer, params, context_len)
    text = ""  # with echo, the first delta carries the prompt
    request = Request(f"g{next(_ids)}", ids, params, OutputKind.DELTA, prompt_text)
    for out in stream(engine, request):
        if cancel is not None and cancel.is_set():
            engine.abort(request.request_id)
        if out.index:
            continue
        text += out.text
        yield StreamChunk(text, out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason)


def generate(model: Any, tokenizer: Any, prompt: Union[str, Sequence[int]], params: GenerationParams,
             **kwargs: Any) -> StreamChunk:
    """Run generate_stream to the end and return its last chunk."""
    last = None
    for last in generate_stream(model, tokenizer, prompt, params, **kwargs):
        pass
    assert last is not None
    return last
