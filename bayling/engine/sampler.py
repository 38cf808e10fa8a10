"""Batched next-token choice, the part every backend shares: per-row state, the plan of a step, logprobs.

As TGI's heterogeneous chooser: rows with different temperature / top-k / top-p / penalties / logit
bias share one pass; greedy rows take the argmax. A drawn row draws exactly from its distribution p
with random numbers from its own generator when it has a seed, so its answer does not depend on
which other rows share the batch (torch: the exponential race, argmax of p / E with E ~ Exp(1);
numpy: p's cumulative sum inverted at one uniform number).

The array work lives beside this module, one implementation per array kind: `torch_sampler`
(TorchRunner: tensors on the model's device) and `numpy_sampler` (LlamaCppRunner: no torch at all).
A runner names its sampler (`runner.sampler`); nothing here imports torch or numpy.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from ..params import GenerationParams
from .request import Logprob

# JSON has no -Infinity; OpenAI reports tokens that top-k/top-p removed with this floor.
LOGPROB_FLOOR = -9999.0
MIN_TEMPERATURE = 1e-5  # a drawn row's logits are divided by max(temperature, this)

Pick = tuple[int, Optional[Logprob]]  # what sample() returns per row: token id, logprob or None


@dataclass
class SamplerRow:
    """One sequence's sampling state. The array fields are the sampler's kind, made on its first step."""

    params: GenerationParams
    prompt_ids: Sequence[int]
    seed: Optional[int] = None
    prepared: bool = False
    generator: Any = None  # the row's own noise generator when it has a seed and samples
    seen: Any = None  # [V] bool: prompt + answer tokens (repetition penalty)
    counts: Any = None  # [V] float32 answer-token counts (presence/frequency penalty)
    bias: Any = None  # (ids, values) of logit_bias within the vocabulary

    @property
    def plain(self) -> bool:
        """No penalty and no bias: the logits are used as the runner gave them."""
        return self.seen is None and self.counts is None and self.bias is None

    def record(self, token: int) -> None:
        """Note a chosen token for the penalties (a host index into a device array: no sync)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    def fork(self, seed: Optional[int]) -> "SamplerRow":
        """A fresh row for a sibling answer of the same prompt (state copied, own seed)."""
        row = copy.copy(self)  # the subclass's own fields (a device) come along
        row.seed = seed
        if self.prepared:
            row.seen = None if self.seen is None else self.copy_array(self.seen)
            row.counts = None if self.counts is None else self.copy_array(self.counts)
            row.generator = self.new_generator(seed) if seed is not None and not self.params.greedy else None
        return row

    # the array kind's part
    def copy_array(self, array: Any) -> Any:
        raise NotImplementedError

    def new_generator(self, seed: int) -> Any:
        raise NotImplementedError


class Sampler(Protocol):
    """What the engine asks of a runner's sampler."""

    def new_row(self, params: GenerationParams, prompt_ids: Sequence[int], seed: Optional[int]) -> SamplerRow:
        """The sampling state of one new sequence."""

    def sample(self, logits: Any, rows: Sequence[SamplerRow]) -> list[Pick]:
        """logits: [B, V] float32 for the rows' last positions (read only). One pick per row."""


@dataclass(frozen=True)
class StepPlan:
    """Which rows of a step do what, worked out once in Python before any array op."""

    vocab: int
    greedy: list[int]  # rows that take the argmax
    drawn: list[int]  # rows that sample
    temperatures: list[float]  # per drawn row
    top_ks: list[int]  # per drawn row; vocab = off
    top_ps: list[float]  # per drawn row; 1.0 = off
    n_top: Optional[int]  # most top alternatives any row asks for; None = no row wants logprobs

    @property
    def filters_k(self) -> bool:
        return any(k < self.vocab for k in self.top_ks)

    @property
    def filters_p(self) -> bool:
        return any(p < 1.0 for p in self.top_ps)


def plan_step(rows: Sequence[SamplerRow], vocab: int) -> StepPlan:
    """Split a step's rows into greedy and drawn ones and gather the drawn rows' settings."""
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    params = [rows[i].params for i in drawn]
    n_top = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
    return StepPlan(vocab, greedy, drawn, [max(p.temperature, MIN_TEMPERATURE) for p in params],
                    [p.top_k if 0 < p.top_k < vocab else vocab for p in params], [p.top_p for p in params],
                    n_top)


def picks(rows: Sequence[SamplerRow], chosen: Sequence[int], chosen_logprob: Optional[Sequence[float]] = None,
          top_ids: Optional[Sequence[Sequence[int]]] = None,
          top_logprobs: Optional[Sequence[Sequence[float]]] = None) -> list[Pick]:
    """Host-side lists -> one (token, Logprob or None) per row; removed tokens' -inf becomes the floor."""
    if chosen_logprob is None:
        return [(int(t), None) for t in chosen]
    out: list[Pick] = []
    for j, (r, token) in enumerate(zip(rows, chosen)):
        token = int(token)
        n = r.params.logprobs
        if n is None:
            out.append((token, None))
            continue
        top = () if not n else tuple((int(t), max(float(v), LOGPROB_FLOOR))
                                     for t, v in zip(top_ids[j][:n], top_logprobs[j][:n]))
        out.append((token, Logprob(token, max(float(chosen_logprob[j]), LOGPROB_FLOOR), top)))
    return out
