"""Static batching: several prompts decoded together, one forward pass per step.

Prompts are left-padded into one [B, L] batch with an attention mask and explicit position ids
(so a padded row sees the same positions as it would alone). Each row keeps its own
SequenceOutput, so stop strings, stop tokens, detokenization, de-anonymisation and usage work
exactly as in generation.generate_stream. A row that finishes leaves the batch: its slice of
the KV cache is dropped, so the remaining rows run on a smaller batch.

Nothing here is evaluation-specific; it only needs the core engine's pieces.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..generation import check_prompt_fits, context_length, encode_prompt, eos_token_ids, model_device
from ..output import SequenceOutput, StreamChunk
from ..params import GenerationParams
from ..sampling import sample_next

Prompt = Union[str, Sequence[int]]
RowDone = Callable[[int, StreamChunk], None]


def _as_params(params: Union[GenerationParams, Sequence[GenerationParams]], n: int) -> list[GenerationParams]:
    if isinstance(params, GenerationParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} GenerationParams for {n} prompts; pass one, or one per prompt")
    return params


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of ids -> input_ids [B, L] and attention_mask [B, L], padding on the left."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        mask[i, width - len(r):] = 1
    return input_ids, mask


@torch.inference_mode()
def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                   params: Union[GenerationParams, Sequence[GenerationParams]], *,
                   context_len: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   on_row_done: Optional[RowDone] = None) -> list[StreamChunk]:
    """Generate an answer for every prompt in one static batch; returns the final chunk per prompt.

    Raises PromptTooLongError (before any work) if a prompt does not fit the context window.
    on_row_done(i, chunk) is called as soon as row i finishes (for progress bars).
    """
    if not prompts:
        return []
    all_params = _as_params(params, len(prompts))
    context_len = context_len or context_length(model)
    ids = [encode_prompt(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    for row in ids:
        check_prompt_fits(len(row), context_len)
    outs = [SequenceOutput(tokenizer, p, len(r), min(p.max_new_tokens, context_len - len(r)),
                           eos_token_ids(model, tokenizer, p.stop_token_ids),
                           prompt if isinstance(prompt, str) else tokenizer.decode(prompt))
            for p, r, prompt in zip(all_params, ids, prompts)]

    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: any id works
    input_ids, mask = _left_pad(ids, pad_id, device)
    # Left padding shifts every token right; positions must count real tokens only.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # The repetition penalty looks at prompt + output of each row (as generate_stream does).
    seen = [torch.tensor(r + [0] * o.max_new_tokens, dtype=torch.long, device=device) for r, o in zip(ids, outs)]
    n_seen = [len(r) for r in ids]

    active = list(range(len(prompts)))  # batch position -> prompt index
    past = None
    while active:
        result = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       past_key_values=past, use_cache=True, logits_to_keep=1)
        past = result.past_key_values
        logits = result.logits[:, -1]  # [b, V]
        keep, next_ids = [], []
        for b, i in enumerate(active):
            token = sample_next(logits[b], all_params[i], seen[i][:n_seen[i]], generator)
            seen[i][n_seen[i]] = token
            n_seen[i] += 1
            outs[i].push(token)
            if outs[i].finished:
                if on_row_done is not None:
                    on_row_done(i, outs[i].chunk(""))
            else:
                keep.append(b)
                next_ids.append(token)
        if not keep:
            break
        if len(keep) < len(active):  # finished rows leave the batch
            index = torch.tensor(keep, dtype=torch.long, device=device)
            past.batch_select_indices(index)
            mask, position_ids = mask[index], position_ids[index]
            active = [active[b] for b in keep]
        input_ids = torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)  # [b, 1]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        position_ids = position_ids[:, -1:] + 1
    return [o.chunk("") for o in outs]


def generate_many(model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                  params: Union[GenerationParams, Sequence[GenerationParams]], *, batch_size: int = 8,
                  context_len: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  on_row_done: Optional[RowDone] = None) -> list[StreamChunk]:
    """generate_batch over consecutive groups of batch_size prompts; results in prompt order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    all_params = _as_params(params, len(prompts))
    results: list[StreamChunk] = []
    for start in range(0, len(prompts), batch_size):
        done = None if on_row_done is None else (lambda i, c, s=start: on_row_done(s + i, c))
        results += generate_batch(model, tokenizer, prompts[start:start + batch_size],
                                  all_params[start:start + batch_size], context_len=context_len,
                                  generator=generator, on_row_done=done)
    return results
