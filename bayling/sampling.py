"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p."""
from __future__ import annotations

import torch

from .params import GenerationParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (as transformers and FastChat apply it). logits: [V], seen: [N] token ids."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def logits_to_probs(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """logits: [V] -> probabilities [V] after temperature, top-k and top-p."""
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; the best token always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample_next(logits: torch.Tensor, params: GenerationParams, seen: torch.Tensor,
                generator: torch.Generator | None = None) -> int:
    """logits: [V] for one sequence; seen: ids the repetition penalty looks at. Returns a token id."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    probs = logits_to_probs(logits, params)
    return int(torch.multinomial(probs, 1, generator=generator))
