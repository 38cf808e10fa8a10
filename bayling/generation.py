"""The streaming generation engine: one prompt in, a stream of StreamChunks out."""
from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .output import FINISH_ABORT, SequenceOutput, StreamChunk
from .params import GenerationParams
from .sampling import sample_next
from .tokens import PromptTooLongError, check_prompt_fits, context_length, encode_prompt, eos_token_ids  # noqa: F401


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.inference_mode()
def generate_stream(model: Any, tokenizer: Any, prompt: Union[str, Sequence[int]], params: GenerationParams,
                    *, context_len: Optional[int] = None, cancel: Optional[threading.Event] = None,
                    generator: Optional[torch.Generator] = None) -> Iterator[StreamChunk]:
    """Yield a StreamChunk whenever visible text grows, and a last one with finish_reason set.

    Raises PromptTooLongError before any work if the prompt cannot fit. `cancel` stops the
    generation before the next token; the last chunk then has finish_reason "abort".
    """
    prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    context_len = context_len or context_length(model)
    check_prompt_fits(len(ids), context_len)
    max_new = min(params.max_new_tokens, context_len - len(ids))
    out = SequenceOutput(tokenizer, params, len(ids), max_new,
                         eos_token_ids(model, tokenizer, params.stop_token_ids), prompt_text)

    device = model_device(model)
    input_ids = torch.tensor([ids], device=device)
    # The repetition penalty looks at prompt + output: keep them in one preallocated buffer.
    seen = torch.empty(len(ids) + max_new, dtype=torch.long, device=device)
    seen[:len(ids)] = input_ids[0]
    n_seen = len(ids)

    past = None
    while True:
        if cancel is not None and cancel.is_set():
            delta = out.finish(FINISH_ABORT)
            yield out.chunk(delta)
            return
        # Only the last position's logits are needed: a long prompt would otherwise cost [S, V] floats.
        result = model(input_ids=input_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = result.past_key_values
        token = sample_next(result.logits[0, -1], params, seen[:n_seen], generator)
        seen[n_seen] = token
        n_seen += 1
        delta = out.push(token)
        if delta or out.finished:
            yield out.chunk(delta)
        if out.finished:
            return
        input_ids = torch.tensor([[token]], device=device)


def generate(model: Any, tokenizer: Any, prompt: Union[str, Sequence[int]], params: GenerationParams,
             **kwargs: Any) -> StreamChunk:
    """Run generate_stream to the end and return its last chunk."""
    last = None
    for last in generate_stream(model, tokenizer, prompt, params, **kwargs):
        pass
    assert last is not None
    return last
