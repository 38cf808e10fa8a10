"""Batched next-token choice: every row of a [B, V] logits tensor in one pass, each with its own params.

As TGI's heterogeneous chooser: rows with different temperature / top-k / top-p / penalties / logit
bias share one pass; greedy rows take the argmax. Sampling uses the exponential race (argmax of
p / E with E ~ Exp(1)), which draws exactly from p and lets a seeded row draw its noise from its own
generator, so its answer does not depend on which other rows share the batch. The chosen ids (and
logprobs) cross to the host once per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..params import GenerationParams
from .request import Logprob

# JSON has no -Infinity; OpenAI reports tokens that top-k/top-p removed with this floor.
LOGPROB_FLOOR = -9999.0


@dataclass
class SamplerRow:
    """One sequence's sampling state; tensors live on the logits' device, created on first use."""

    params: GenerationParams
    prompt_ids: Sequence[int]
    seed: Optional[int] = None
    generator: Optional[torch.Generator] = None
    seen: Optional[torch.Tensor] = None  # [V] bool: prompt + answer tokens (repetition penalty)
    counts: Optional[torch.Tensor] = None  # [V] answer-token counts (presence/frequency penalty)
    bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (ids, values) of logit_bias
    device: Optional[torch.device] = None  # set by prepare()

    def prepare(self, vocab: int, device: torch.device) -> None:
        if self.device is not None:
            return
        self.device = device
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
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed % 2**64)

    @torch.inference_mode()
    def record(self, token: int) -> None:
        """Note a chosen token for the penalties (a device op with a host index: no sync)."""
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1

    @torch.inference_mode()
    def fork(self, seed: Optional[int]) -> "SamplerRow":
        """A fresh row for a sibling answer of the same prompt (state cloned, own seed)."""
        row = SamplerRow(self.params, self.prompt_ids, seed)
        if self.device is not None:
            row.device, row.bias = self.device, self.bias
            row.seen = None if self.seen is None else self.seen.clone()
            row.counts = None if self.counts is None else self.counts.clone()
            if seed is not None and not self.params.greedy:
                row.generator = torch.Generator(device=self.device)
                row.generator.manual_seed(seed % 2**64)
        return row


def _column(values: list, like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)[:, None]


def _penalize(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> None:
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


def _truncate(scaled: torch.Tensor, params: Sequence[GenerationParams]) -> torch.Tensor:
    """Top-k then top-p per row (as transformers orders its warpers); removed tokens become -inf."""
    V = scaled.shape[-1]
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    if min(ks) < V:
        k = torch.tensor(ks, device=scaled.device)[:, None]
        kth = torch.topk(scaled, max(k_ for k_ in ks if k_ < V), dim=-1).values
        kth = kth.gather(1, (k.clamp(max=kth.shape[-1]) - 1))
        keep_all = k >= V
        scaled = scaled.masked_fill((scaled < kth) & ~keep_all, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        top_p = _column([p.top_p for p in params], scaled)
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scaled


@torch.inference_mode()
def sample(logits: torch.Tensor, rows: Sequence[SamplerRow]) -> list[tuple[int, Optional[Logprob]]]:
    """logits: [B, V] float for the rows' last positions. Returns (token id, logprob or None) per row."""
    B, V = logits.shape
    logits = logits.float().clone()
    for r in rows:
        r.prepare(V, logits.device)
    _penalize(logits, rows)
    # dist: the logits of the distribution each row draws from (greedy rows: after penalties only)
    dist = logits
    chosen = torch.empty(B, dtype=torch.long, device=logits.device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if greedy:
        g = torch.tensor(greedy, device=logits.device)
        chosen[g] = logits.index_select(0, g).argmax(-1)
    if drawn:
        d = torch.tensor(drawn, device=logits.device)
        params = [rows[i].params for i in drawn]
        temperature = _column([max(p.temperature, 1e-5) for p in params], logits)
        scaled = _truncate(logits.index_select(0, d) / temperature, params)
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
    n_top = max((r.params.logprobs for r in rows if r.params.logprobs is not None), default=None)
    if n_top is None:
        return [(t, None) for t in chosen.tolist()]
    logp = dist.log_softmax(-1)
    parts = [chosen.double()[:, None], logp.gather(1, chosen[:, None]).double()]
    if n_top:
        top = logp.topk(n_top, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    packed = torch.cat(parts, 1).tolist()  # the step's one host transfer
    out = []
    for r, row in zip(rows, packed):
        token = int(row[0])
        if r.params.logprobs is None:
            out.append((token, None))
            continue
        n = r.params.logprobs
        top = tuple((int(t), max(v, LOGPROB_FLOOR)) for t, v in zip(row[2:2 + n], row[2 + n_top:2 + n_top + n]))
        out.append((token, Logprob(token, max(row[1], LOGPROB_FLOOR), top)))
    return out
