"""The sampler on torch tensors (TorchRunner): every row of a [B, V] logits tensor on the model's device.

The rules are sampler.py's; this module does the array work. The chosen ids (and logprobs) cross to
the host once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..params import GenerationParams
from .sampler import Pick, SamplerRow, StepPlan, picks, plan_step


@dataclass
class TorchRow(SamplerRow):
    """A row whose arrays are tensors on the logits' device."""

    device: Optional[torch.device] = None

    def prepare(self, vocab: int, device: torch.device) -> None:
        # Outside inference mode: record() then updates these tensors in place between steps.
        if self.prepared:
            return
        self.prepared, self.device = True, device
        p = self.params
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            if len(self.prompt_ids):
                self.seen[torch.tensor(list(self.prompt_ids), device=device)] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        if p.logit_bias:
            ids = [t for t, _ in p.logit_bias if t < vocab]
            vals = [b for t, b in p.logit_bias if t < vocab]
            self.bias = (torch.tensor(ids, dtype=torch.long, device=device),
                         torch.tensor(vals, dtype=torch.float32, device=device))
        if self.seed is not None and not p.greedy:
            self.generator = self.new_generator(self.seed)

    def copy_array(self, array: torch.Tensor) -> torch.Tensor:
        return array.clone()

    def new_generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed % 2**64)
        return generator


class TorchSampler:
    """sampler.Sampler for torch logits."""

    def new_row(self, params: GenerationParams, prompt_ids: Sequence[int], seed: Optional[int]) -> TorchRow:
        return TorchRow(params, prompt_ids, seed)

    def sample(self, logits: torch.Tensor, rows: Sequence[TorchRow]) -> list[Pick]:
        """logits: [B, V] float for the rows' last positions. Returns (token id, logprob or None) per row."""
        B, V = logits.shape
        for r in rows:
            r.prepare(V, logits.device)
        with torch.inference_mode():
            return _sample(logits.float().clone(), rows, plan_step(rows, V))


def _column(values: list, like: torch.Tensor, dtype: Any = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)[:, None]


def _penalize(logits: torch.Tensor, rows: Sequence[TorchRow]) -> None:
    """Repetition (CTRL, as transformers), presence and frequency penalties and logit bias, in place."""
    rep = [i for i, r in enumerate(rows) if r.seen is not None]
    if rep:
        idx = torch.tensor(rep, device=logits.device)
        sub = logits.index_select(0, idx)
        factor = _column([rows[i].params.repetition_penalty for i in rep], sub)
        seen = torch.stack([rows[i].seen for i in rep])
        sub = torch.where(seen, torch.where(sub < 0, sub * factor, sub / factor), sub)
        logits.index_copy_(0, idx, sub)
    pen = [i for i, r in enumerate(rows) if r.counts is not None]
    if pen:
        idx = torch.tensor(pen, device=logits.device)
        counts = torch.stack([rows[i].counts for i in pen])
        freq = _column([rows[i].params.frequency_penalty for i in pen], counts)
        pres = _column([rows[i].params.presence_penalty for i in pen], counts)
        logits.index_copy_(0, idx, logits.index_select(0, idx) - freq * counts - pres * (counts > 0))
    for i, r in enumerate(rows):
        if r.bias is not None:
            logits[i].index_add_(0, r.bias[0], r.bias[1])


def _truncate(scaled: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """Top-k then top-p per row (as transformers orders its warpers); removed tokens become -inf."""
    V = plan.vocab
    if plan.filters_k:
        ks = plan.top_ks
        k = torch.tensor(ks, device=scaled.device)[:, None]
        kth = torch.topk(scaled, max(k_ for k_ in ks if k_ < V), dim=-1).values
        kth = kth.gather(1, (k.clamp(max=kth.shape[-1]) - 1))
        keep_all = k >= V
        scaled = scaled.masked_fill((scaled < kth) & ~keep_all, float("-inf"))
    if plan.filters_p:
        top_p = _column(plan.top_ps, scaled)
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        # Rows without top-p keep everything (float32 sums can pass 1.0 before the tail).
        drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scaled


def _sample(logits: torch.Tensor, rows: Sequence[TorchRow], plan: StepPlan) -> list[Pick]:
    B, V = logits.shape
    _penalize(logits, rows)
    # dist: the logits of the distribution each row draws from (greedy rows: after penalties only)
    dist = logits
    chosen = torch.empty(B, dtype=torch.long, device=logits.device)
    if plan.greedy:
        g = torch.tensor(plan.greedy, device=logits.device)
        chosen[g] = logits.index_select(0, g).argmax(-1)
    if plan.drawn:
        drawn = plan.drawn
        d = torch.tensor(drawn, device=logits.device)
        scaled = _truncate(logits.index_select(0, d) / _column(plan.temperatures, logits), plan)
        probs = scaled.softmax(-1)
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(drawn) if rows[i].generator is None]
        if shared:
            noise[shared] = torch.empty(len(shared), V, device=logits.device).exponential_()
        for j, i in enumerate(drawn):
            if rows[i].generator is not None:
                noise[j] = torch.empty(V, device=logits.device).exponential_(generator=rows[i].generator)
        chosen[d] = (probs / noise).argmax(-1)
        dist = logits.clone()
        dist[d] = scaled
    n_top = plan.n_top
    if n_top is None:
        return picks(rows, chosen.tolist())
    logp = dist.log_softmax(-1)
    parts = [chosen.double()[:, None], logp.gather(1, chosen[:, None]).double()]
    if n_top:
        top = logp.topk(n_top, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    packed = torch.cat(parts, 1).tolist()  # the step's one host transfer
    return picks(rows, [row[0] for row in packed], [row[1] for row in packed],
                 [row[2:2 + n_top] for row in packed], [row[2 + n_top:] for row in packed])
