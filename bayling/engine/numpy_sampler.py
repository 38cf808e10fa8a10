"""The sampler on numpy arrays (LlamaCppRunner): the same rules as the torch one, and no torch import.

The rules are sampler.py's. The logits arrive as a read-only view of llama.cpp's own buffer; a step
copies them only when a row changes them (penalties, logit bias) and otherwise works on small arrays:
a greedy row is one argmax, top-k and top-p sort only the candidates they keep. A drawn row inverts
its cumulative distribution with one uniform number from its generator (exact like torch's
exponential race, and a vocabulary of noise cheaper per step on a CPU). Rows are handled one by
one, which costs nothing next to a decode step for the batch sizes a CPU serves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..params import GenerationParams
from .sampler import Pick, SamplerRow, StepPlan, picks, plan_step

TOP_P_FIRST_GUESS = 64  # candidates top-p first looks at; grown x4 until they hold the mass
NEG_INF = np.float32(-np.inf)
CDF_BLOCK = 256  # a draw over many tokens sums blocks of this many, then inverts one block


@dataclass
class NumpyRow(SamplerRow):
    """A row whose arrays are numpy arrays."""

    def prepare(self, vocab: int) -> None:
        if self.prepared:
            return
        self.prepared = True
        p = self.params
        if p.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, dtype=bool)
            if len(self.prompt_ids):
                self.seen[np.asarray(self.prompt_ids, dtype=np.int64)] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = np.zeros(vocab, dtype=np.float32)
        if p.logit_bias:
            self.bias = (np.array([t for t, _ in p.logit_bias if t < vocab], dtype=np.int64),
                         np.array([b for t, b in p.logit_bias if t < vocab], dtype=np.float32))
        if self.seed is not None and not p.greedy:
            self.generator = self.new_generator(self.seed)

    def copy_array(self, array: np.ndarray) -> np.ndarray:
        return array.copy()

    def new_generator(self, seed: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(seed % 2**64))


class NumpySampler:
    """sampler.Sampler for numpy logits; rows without a seed share this sampler's generator."""

    def __init__(self, seed: Optional[int] = None) -> None:
        self._shared = np.random.default_rng(seed)

    def new_row(self, params: GenerationParams, prompt_ids: Sequence[int], seed: Optional[int]) -> NumpyRow:
        return NumpyRow(params, prompt_ids, seed)

    def sample(self, logits: np.ndarray, rows: Sequence[NumpyRow]) -> list[Pick]:
        """logits: [B, V] float32 (not written to). Returns (token id, logprob or None) per row."""
        B, V = logits.shape
        for r in rows:
            r.prepare(V)
        plain = all(r.plain for r in rows)
        if plain and all(r.params.greedy and r.params.logprobs is None for r in rows):
            return [(t, None) for t in logits.argmax(axis=1).tolist()]  # greedy as given: no copy at all
        plan = plan_step(rows, V)
        work = logits if plain else np.array(logits, dtype=np.float32)
        if not plain:
            for i, r in enumerate(rows):
                _penalize(work[i], r)
        chosen = [0] * B
        # dist: the logits of the distribution each row draws from (greedy rows: after penalties only)
        dist: list[np.ndarray] = [work[i] for i in range(B)]
        for i in plan.greedy:
            chosen[i] = int(work[i].argmax())
        for j, i in enumerate(plan.drawn):
            scaled, keep = _truncate(work[i] / np.float32(plan.temperatures[j]), plan, j)
            pick = _draw(scaled if keep is None else scaled[keep], rows[i].generator or self._shared)
            chosen[i] = pick if keep is None else int(keep[pick])
            dist[i] = scaled
        if plan.n_top is None:
            return picks(rows, chosen)
        lps, top_ids, top_lps = [0.0] * B, [()] * B, [()] * B
        for i, r in enumerate(rows):
            if r.params.logprobs is None:
                continue
            logp = _log_softmax(dist[i])
            lps[i] = float(logp[chosen[i]])
            if r.params.logprobs:
                top_ids[i] = _top(logp, r.params.logprobs)
                top_lps[i] = logp[top_ids[i]].tolist()
        return picks(rows, chosen, lps, top_ids, top_lps)


def _penalize(x: np.ndarray, r: NumpyRow) -> None:
    """Repetition (CTRL, as transformers), presence and frequency penalties and logit bias, in place."""
    p = r.params
    if r.seen is not None:
        factor = np.float32(p.repetition_penalty)
        s = x[r.seen]
        x[r.seen] = np.where(s < 0, s * factor, s / factor)
    if r.counts is not None:
        used = np.flatnonzero(r.counts)  # only answer tokens move: x - 0 - 0 is x
        x[used] = x[used] - np.float32(p.frequency_penalty) * r.counts[used] - np.float32(p.presence_penalty)
    if r.bias is not None:
        x[r.bias[0]] += r.bias[1]


def _truncate(scaled: np.ndarray, plan: StepPlan, j: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Top-k then top-p on one row (as transformers orders its warpers): (row with -inf, kept ids or None)."""
    V, k, top_p = plan.vocab, plan.top_ks[j], plan.top_ps[j]
    keep = None
    if k < V:
        kth = np.partition(scaled, V - k)[V - k]  # the k-th largest; ties with it stay, as in torch
        keep = np.flatnonzero(scaled >= kth)
    if top_p < 1.0:
        keep = _top_p(scaled, keep, top_p)
    if keep is None:
        return scaled, None
    out = np.full(V, NEG_INF, dtype=np.float32)
    out[keep] = scaled[keep]
    return out, np.sort(keep)


def _top_p(scaled: np.ndarray, among: Optional[np.ndarray], top_p: float) -> np.ndarray:
    """The smallest head of the sorted row whose mass before each kept token is < top_p."""
    probs = _softmax(scaled if among is None else scaled[among])
    ids = np.arange(scaled.size) if among is None else among
    m = min(TOP_P_FIRST_GUESS, ids.size)
    while True:
        # Only the m most likely tokens are sorted; once they hold top_p of the mass, every token past
        # them has at least that much before it and is dropped anyway.
        head = np.argpartition(-probs, m - 1)[:m] if m < ids.size else np.arange(ids.size)
        head = head[np.argsort(-probs[head], kind="stable")]
        p = probs[head]
        before = np.cumsum(p, dtype=np.float32) - p
        if m >= ids.size or before[-1] + p[-1] >= top_p:
            return ids[head[before < np.float32(top_p)]]
        m = min(4 * m, ids.size)


def _draw(logits: np.ndarray, generator: np.random.Generator) -> int:
    """An index drawn from softmax(logits) by inverting its cumulative sum at one uniform number."""
    weights = np.exp(logits - logits.max())
    n = weights.size
    if n <= 2 * CDF_BLOCK:
        return _invert(weights, generator.random() * float(weights.sum(dtype=np.float64)))
    # A cumulative sum over the whole vocabulary is slow (sequential); sum blocks (vectorised),
    # pick the block, then invert inside it.
    whole = n - n % CDF_BLOCK
    sums = weights[:whole].reshape(-1, CDF_BLOCK).sum(axis=1, dtype=np.float64)
    if whole < n:
        sums = np.append(sums, weights[whole:].sum(dtype=np.float64))
    cdf = np.cumsum(sums)
    u = generator.random() * cdf[-1]
    block = min(int(np.searchsorted(cdf, u, side="right")), cdf.size - 1)
    start = block * CDF_BLOCK
    return start + _invert(weights[start:start + CDF_BLOCK], u - (cdf[block - 1] if block else 0.0))


def _invert(weights: np.ndarray, u: float) -> int:
    """The first index whose cumulative weight passes u (never a weight-0 token, even at rounding edges)."""
    cdf = np.cumsum(weights, dtype=np.float64)
    i = int(np.searchsorted(cdf, u, side="right"))  # side="right": a weight-0 token adds nothing, so no u lands on it
    if i >= weights.size:  # u at the very end (rounding): the last token that has weight
        i = int(np.flatnonzero(weights)[-1])
    return i


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    y = x - x.max()
    return y - np.log(np.exp(y).sum())


def _top(logp: np.ndarray, n: int) -> np.ndarray:
    """Ids of the n largest values, best first."""
    n = min(n, logp.size)
    head = np.argpartition(-logp, n - 1)[:n]
    return head[np.argsort(-logp[head], kind="stable")]
