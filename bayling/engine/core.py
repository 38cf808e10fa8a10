"""The engine: a scheduler with a KV budget, chunked prefill, batched sampling and per-sequence output.

Synchronous, no thread inside (vLLM's LLMEngine.step()): add_request / abort / step() -> outputs.
Each step admits waiting requests while max_num_seqs and the KV budget allow (a request reserves
prompt + max new tokens for each of its n answers), then feeds the runner one batch: a decode token
for every running answer plus prompt chunks of the prefilling ones, shortest remaining prompt first,
within max_num_batched_tokens. A prompt's last chunk yields its first token; n > 1 answers are
forked from that one prefill. A step that raises fails only the requests it ran; the queue goes on.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..output import FINISH_ABORT, SequenceOutput
from ..tokens import check_prompt_fits
from .request import FINISH_ERROR, BudgetError, Logprob, OutputKind, Request, RequestOutput
from .runner import Chunk, Runner
from .sampler import Sampler, SamplerRow

log = logging.getLogger("bayling.engine")

DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling limits (vLLM's flag names)."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # answers running at once
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS  # prompt-chunk + decode tokens per step

    def __post_init__(self) -> None:
        if not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens must be an integer >= --max-num-seqs "
                             f"({self.max_num_seqs}), got {self.max_num_batched_tokens!r}")


@dataclass
class EngineStats:
    """Counters the worker reports in /worker_get_status (`batching`)."""

    decode_steps: int = 0  # steps that decoded at least one answer
    decode_rows: int = 0  # sum of decode batch sizes
    shared_steps: int = 0  # decode steps that served more than one answer
    peak_batch: int = 0
    prefills: int = 0  # prompts fully prefilled
    prefill_chunks: int = 0
    tokens: int = 0  # tokens generated
    finished: int = 0
    aborted: int = 0
    errors: int = 0
    steps: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch"] = round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0
        return d


@dataclass
class _Sequence:
    """One answer in flight."""

    seq_id: int
    request: Request
    index: int
    out: SequenceOutput
    row: SamplerRow
    tokens: list[int]  # prompt + answer so far
    held: int = 0  # tokens the runner holds in its KV
    generated: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    sent_chars: int = 0  # of out.text already sent (DELTA)
    sent_tokens: int = 0
    emitted_at: int = 0  # completion_tokens when last emitted (stream_interval)

    @property
    def prefilling(self) -> bool:
        return self.held < len(self.request.prompt_ids)


@dataclass
class _Group:
    """A request: its answers (n of them once the prompt is prefilled) and its KV reservation."""

    request: Request
    reserve: int  # KV tokens per answer: prompt + max new tokens
    seqs: list[_Sequence] = field(default_factory=list)
    aborted: bool = False


class Engine:
    """Schedules requests onto a Runner and turns its logits into RequestOutputs."""

    def __init__(self, runner: Runner, tokenizer: Any, eos_ids: Iterable[int],
                 config: EngineConfig = EngineConfig()) -> None:
        self.runner, self.tokenizer, self.config = runner, tokenizer, config
        self.eos_ids = frozenset(eos_ids)
        self.stats = EngineStats()
        self._waiting: deque[_Group] = deque()
        self._running: list[_Group] = []
        self._groups: dict[str, _Group] = {}
        self._seq_ids = itertools.count(1)
        self._footprint = getattr(runner, "kv_footprint_tokens", None) or (lambda r: sum(r))
        self.sampler: Sampler = runner.sampler  # works on the array kind the runner's logits are

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raises PromptTooLongError or BudgetError at once if it can never run."""
        if request.request_id in self._groups:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        reserve = self.check_request(request)
        p = request.params
        group = _Group(request, reserve)
        group.seqs.append(self._new_sequence(request, 0, self.sampler.new_row(p, list(request.prompt_ids), p.seed)))
        self._groups[request.request_id] = group
        self._waiting.append(group)

    def check_request(self, request: Request) -> int:
        """Raise unless the request could run alone; returns its KV reservation per answer. Thread-safe."""
        ids, p = list(request.prompt_ids), request.params
        check_prompt_fits(len(ids), self.runner.context_len)
        if p.n > self.config.max_num_seqs:
            raise ValueError(f"n={p.n} answers cannot run together with --max-num-seqs {self.config.max_num_seqs}")
        reserve = len(ids) + min(p.max_new_tokens, self.runner.context_len - len(ids))
        need, capacity = self._footprint([reserve] * p.n), self.runner.kv_capacity_tokens()
        if need > capacity:
            raise BudgetError(
                f"the request needs {need} KV cache tokens ({len(ids)} prompt + {reserve - len(ids)} new, x n={p.n}) "
                f"but the KV budget holds {capacity} tokens ({self.runner.kv_bytes_per_token()} bytes each); "
                "lower max_new_tokens or n, or raise --kv-cache-memory / --gpu-memory-utilization")
        return reserve

    def abort(self, request_id: str) -> None:
        """Stop a request before the next step; its answers end with finish_reason 'abort'."""
        group = self._groups.get(request_id)
        if group is not None:
            group.aborted = True

    @property
    def context_len(self) -> int:
        """The longest sequence this engine runs, prompt and answer (conversations are fitted to it)."""
        return self.runner.context_len

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def kv_tokens_in_use(self) -> int:
        return self._footprint([g.reserve for g in self._running for _ in range(g.request.params.n)])

    def status(self) -> dict:
        return {**self.stats.as_dict(), "running": self.num_running, "waiting": self.num_waiting,
                "max_batch": self.config.max_num_seqs, "max_num_seqs": self.config.max_num_seqs,
                "max_num_batched_tokens": self.config.max_num_batched_tokens,
                "kv_tokens_in_use": self.kv_tokens_in_use(), "kv_capacity_tokens": self.runner.kv_capacity_tokens()}

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, run one batch, sample, and return what each touched answer produced."""
        outputs: list[RequestOutput] = []
        self._drop_aborted(outputs)
        self._admit()
        chunks, seqs = self._schedule()
        if not chunks:
            return outputs
        self.stats.steps += 1
        try:
            logits = self.runner.run(chunks)
            ready = [i for i, s in enumerate(seqs) if not s.prefilling or s.held + len(chunks[i].tokens)
                     >= len(s.request.prompt_ids)]
            for s, c in zip(seqs, chunks):
                s.held = c.start + len(c.tokens)
            self._count(chunks, seqs)
            rows, sample_seqs, logit_rows = [], [], []
            for i in ready:
                s = seqs[i]
                group = self._groups[s.request.request_id]
                siblings = [s]
                if s.index == 0 and not s.generated and len(group.seqs) < s.request.params.n:
                    siblings += self._fork(group, s)
                for sib in siblings:
                    sample_seqs.append(sib)
                    rows.append(sib.row)
                    logit_rows.append(i)
            if sample_seqs:
                # every row once, in order (a plain decode step): the runner's logits as they are
                whole = logit_rows == list(range(len(logits)))
                picks = self.sampler.sample(logits if whole else logits[logit_rows], rows)
                for s, (token, lp) in zip(sample_seqs, picks):
                    self._push(s, token, lp, outputs)
        except Exception as e:  # fails the requests of this step only; the rest of the queue goes on
            log.exception("engine step failed")
            self._fail({s.request.request_id for s in seqs}, e, outputs)
        return outputs

    # --- scheduling ----------------------------------------------------------------------------
    def _admit(self) -> None:
        capacity = self.runner.kv_capacity_tokens()
        while self._waiting:
            group = self._waiting[0]
            n = group.request.params.n
            running = sum(g.request.params.n for g in self._running)
            reserves = [g.reserve for g in self._running for _ in range(g.request.params.n)]
            if running + n > self.config.max_num_seqs or self._footprint(reserves + [group.reserve] * n) > capacity:
                return
            self._running.append(self._waiting.popleft())

    def _schedule(self) -> tuple[list[Chunk], list[_Sequence]]:
        chunks, seqs = [], []
        live = [s for g in self._running for s in g.seqs]
        for s in live:
            if not s.prefilling:
                chunks.append(Chunk(s.seq_id, (s.tokens[-1],), len(s.tokens) - 1))
                seqs.append(s)
        budget = self.config.max_num_batched_tokens - len(chunks)
        # Shortest remaining prompt first: a short request is not stuck behind a long prefill.
        for s in sorted((s for s in live if s.prefilling), key=lambda s: len(s.request.prompt_ids) - s.held):
            if budget <= 0:
                break
            take = min(len(s.request.prompt_ids) - s.held, budget)
            chunks.append(Chunk(s.seq_id, tuple(s.tokens[s.held:s.held + take]), s.held))
            seqs.append(s)
            budget -= take
        return chunks, seqs

    def _count(self, chunks: list[Chunk], seqs: list[_Sequence]) -> None:
        st = self.stats
        decodes = sum(1 for c, s in zip(chunks, seqs) if s.generated)
        st.prefill_chunks += sum(1 for s in seqs if not s.generated)
        st.prefills += sum(1 for s in seqs if not s.generated and not s.prefilling)
        if decodes:
            st.decode_steps += 1
            st.decode_rows += decodes
            st.shared_steps += decodes > 1
            st.peak_batch = max(st.peak_batch, decodes)

    def _fork(self, group: _Group, parent: _Sequence) -> list[_Sequence]:
        """The other n - 1 answers of a request share its prefilled prompt."""
        p = parent.request.params
        children = []
        for index in range(1, p.n):
            seed = None if p.seed is None else p.seed + index
            child = self._new_sequence(parent.request, index, parent.row.fork(seed))
            child.held = parent.held
            self.runner.fork(parent.seq_id, child.seq_id)
            group.seqs.append(child)
            children.append(child)
        return children

    def _new_sequence(self, request: Request, index: int, row: SamplerRow) -> _Sequence:
        ids, p = list(request.prompt_ids), request.params
        max_new = min(p.max_new_tokens, self.runner.context_len - len(ids))
        out = SequenceOutput(self.tokenizer, p, len(ids), max_new, self.eos_ids | set(p.stop_token_ids),
                             request.prompt_text)
        return _Sequence(next(self._seq_ids), request, index, out, row, ids)

    # --- outputs -------------------------------------------------------------------------------
    def _push(self, s: _Sequence, token: int, lp: Optional[Logprob], outputs: list[RequestOutput]) -> None:
        self.stats.tokens += 1
        s.tokens.append(token)
        s.generated.append(token)
        s.row.record(token)
        if lp is not None:
            s.logprobs.append(lp)
        s.out.push(token)
        if s.out.finished:
            self.stats.finished += 1
            self._end(s, outputs)
        elif s.request.output_kind is not OutputKind.FINAL and \
                s.out.completion_tokens - s.emitted_at >= s.request.stream_interval and \
                (len(s.out.text) > s.sent_chars or s.request.params.logprobs is not None):
            outputs.append(self._output(s))

    def _output(self, s: _Sequence, error: Optional[BaseException] = None) -> RequestOutput:
        kind = s.request.output_kind
        if kind is OutputKind.DELTA:
            text, tokens = s.out.text[s.sent_chars:], s.generated[s.sent_tokens:]
            lps = s.logprobs[s.sent_tokens:]
        else:
            text, tokens, lps = s.out.text, s.generated, s.logprobs
        s.sent_chars, s.sent_tokens, s.emitted_at = len(s.out.text), len(s.generated), s.out.completion_tokens
        return RequestOutput(s.request.request_id, s.index, text, tuple(tokens),
                             tuple(lps) if s.request.params.logprobs is not None else None,
                             s.out.prompt_tokens, s.out.completion_tokens,
                             FINISH_ERROR if error is not None else s.out.finish_reason, error)

    def _end(self, s: _Sequence, outputs: list[RequestOutput]) -> None:
        """An answer is over: free its KV, emit its last output, retire the request when all n are."""
        self.runner.free(s.seq_id)
        outputs.append(self._output(s))
        group = self._groups.get(s.request.request_id)
        if group is not None and len(group.seqs) >= s.request.params.n and all(x.out.finished for x in group.seqs):
            self._retire(group)

    def _retire(self, group: _Group) -> None:
        self._groups.pop(group.request.request_id, None)
        if group in self._running:
            self._running.remove(group)
        elif group in self._waiting:
            self._waiting.remove(group)

    def _drop_aborted(self, outputs: list[RequestOutput]) -> None:
        for group in [g for g in list(self._waiting) + self._running if g.aborted]:
            self.stats.aborted += 1
            for s in group.seqs:
                if not s.out.finished:
                    s.out.finish(FINISH_ABORT)
                    self.runner.free(s.seq_id)
                    outputs.append(self._output(s))
            self._retire(group)

    def _fail(self, request_ids: set[str], error: BaseException, outputs: list[RequestOutput]) -> None:
        for rid in request_ids:
            group = self._groups.get(rid)
            if group is None:
                continue
            self.stats.errors += 1
            for s in group.seqs:
                self.runner.free(s.seq_id)
                if not s.out.finished:
                    s.out.finish_reason = FINISH_ERROR
                    outputs.append(self._output(s, error))
            self._retire(group)
