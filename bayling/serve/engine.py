"""Continuous batching: one thread owns the model and decodes every running sequence in one step.

Each iteration admits waiting requests (a prefill each, then the new row joins the batch), runs one
batched decode step over all running rows, samples per row with that request's own params, and drops
finished or aborted rows. The rows share one left-padded KV cache: row r's tokens sit in columns
[pad[r], T) of every layer's buffer, so one attention mask and one forward serve them all.

transformers' own continuous batching (generate_batch / ContinuousBatchingManager) runs on the CPU,
but its sampling mode and repetition penalty are per manager, not per request, so it cannot serve
FastChat requests that each carry their own params; this engine can (see docs/serving.md).
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..generation import check_prompt_fits, eos_token_ids, model_device
from ..output import FINISH_ABORT, SequenceOutput, StreamChunk
from ..params import GenerationParams
from ..sampling import sample_next

log = logging.getLogger("bayling.serve.engine")

DEFAULT_MAX_BATCH = 16
KV_GROWTH = 256  # cache columns are allocated in blocks so a step rarely reallocates
IDLE_WAIT_S = 0.5

# What the engine hands a request's sink: a chunk of its answer, or the error that ended it.
Event = Union[StreamChunk, BaseException]
Sink = Callable[[Event], None]


class _BufferLayer(DynamicLayer):
    """A cache layer that writes new keys/values in place into the engine's preallocated buffer.

    keys: [B, H, T, D] view of a [B, H, capacity, D] buffer, so a decode step costs no copy of the cache.
    """

    def __init__(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
        super().__init__()
        self._kbuf, self._vbuf = kbuf, vbuf
        self.dtype, self.device = kbuf.dtype, kbuf.device
        self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        n, s = self.keys.shape[-2], key_states.shape[-2]
        assert n + s <= self._kbuf.shape[-2], "engine must grow the KV buffers before the step"
        self._kbuf[:, :, n:n + s] = key_states
        self._vbuf[:, :, n:n + s] = value_states
        self.keys, self.values = self._kbuf[:, :, :n + s], self._vbuf[:, :, :n + s]
        return self.keys, self.values


class BatchKV:
    """The running rows' shared KV cache: per layer a [B, H, capacity, D] buffer, rows right-aligned at T."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0  # T: columns in use
        self.pads: list[int] = []  # per row: leading columns that are padding

    @property
    def rows(self) -> int:
        return len(self.pads)

    def _alloc(self, like: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        capacity = (columns // KV_GROWTH + 1) * KV_GROWTH
        return like.new_zeros((rows, like.shape[1], capacity, like.shape[3]))

    def add_row(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Append one prefilled sequence (per layer [1, H, L, D]), re-aligning everyone at the new T."""
        L = keys[0].shape[-2]
        T = max(self.length, L)
        shift = T - self.length  # existing rows move right when the newcomer is longer
        for i, (kn, vn) in enumerate(zip(keys, values)):
            k = self._alloc(kn, self.rows + 1, T)
            v = self._alloc(vn, self.rows + 1, T)
            if self.rows:
                k[:self.rows, :, shift:T] = self.k[i][:, :, :self.length]
                v[:self.rows, :, shift:T] = self.v[i][:, :, :self.length]
                self.k[i], self.v[i] = k, v
            else:
                self.k.append(k)
                self.v.append(v)
            k[self.rows, :, T - L:T] = kn[0]
            v[self.rows, :, T - L:T] = vn[0]
        self.pads = [p + shift for p in self.pads] + [T - L]
        self.length = T

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only these rows (in this order) and trim columns that are padding for all of them."""
        if not keep:
            self.k, self.v, self.pads, self.length = [], [], [], 0
            return
        pads = [self.pads[r] for r in keep]
        trim = min(pads)
        new_len = self.length - trim
        index = torch.tensor(keep, device=self.k[0].device)
        for i in range(len(self.k)):
            for bufs in (self.k, self.v):
                old = bufs[i]
                new = self._alloc(old, len(keep), new_len)
                new[:, :, :new_len] = old.index_select(0, index)[:, :, trim:self.length]
                bufs[i] = new
        self.pads = [p - trim for p in pads]
        self.length = new_len

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more columns in every buffer."""
        if self.length + extra <= self.k[0].shape[-2]:
            return
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = self._alloc(old, old.shape[0], self.length + extra)
                new[:, :, :self.length] = old[:, :, :self.length]
                bufs[i] = new

    def cache(self) -> Cache:
        return Cache(layers=[_BufferLayer(k, v, self.length) for k, v in zip(self.k, self.v)])


@dataclass
class _Seq:
    id: int
    params: GenerationParams
    out: SequenceOutput
    sink: Sink
    ids: list[int]  # prompt + generated so far (the repetition penalty looks at all of it)
    last_token: int = -1
    emitted_tokens: int = 0
    emitted_text: str = ""
    cancelled: bool = False


class RequestHandle:
    """What submit() returns: abort() frees the request's slot before its next step."""

    def __init__(self, engine: "Engine", seq: _Seq) -> None:
        self._engine, self._seq = engine, seq

    @property
    def id(self) -> int:
        return self._seq.id

    def abort(self) -> None:
        if not self._seq.out.finished:
            self._seq.cancelled = True
            self._engine._wake()


@dataclass
class EngineStats:
    """Counters the worker reports in /worker_get_status."""

    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    shared_steps: int = 0  # decode steps that served more than one request
    peak_batch: int = 0  # the largest batch one decode step served
    prefills: int = 0
    tokens: int = 0
    finished: int = 0
    aborted: int = 0
    errors: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_batch"] = round(self.decode_rows / self.decode_steps, 3) if self.decode_steps else 0.0
        return d


class Engine:
    """Owns the model; decodes all running requests together. Thread-safe submit/abort."""

    def __init__(self, model: Any, tokenizer: Any, *, context_len: int, max_batch: int = DEFAULT_MAX_BATCH,
                 stream_interval: int = 1) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.context_len = context_len
        self.max_batch = max_batch
        self.stream_interval = max(1, stream_interval)
        self.device = model_device(model)
        self._eos = eos_token_ids(model, tokenizer)
        self._ids = itertools.count(1)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._prefilling = 0  # popped from the queue, not yet in the batch
        self._kv = BatchKV()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.stats = EngineStats()

    # --- the caller's side -------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bayling-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, input_ids: Sequence[int], params: GenerationParams, sink: Sink,
               prompt_text: str = "") -> RequestHandle:
        """Queue a request. Raises PromptTooLongError at once if the prompt cannot fit."""
        ids = list(input_ids)
        check_prompt_fits(len(ids), self.context_len)
        max_new = min(params.max_new_tokens, self.context_len - len(ids))
        out = SequenceOutput(self.tokenizer, params, len(ids), max_new,
                             self._eos | set(params.stop_token_ids), prompt_text)
        seq = _Seq(next(self._ids), params, out, sink, ids)
        with self._cond:
            self._waiting.append(seq)
            self._cond.notify_all()
        return RequestHandle(self, seq)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def queue_length(self) -> int:
        """Requests the worker holds (running + waiting): what FastChat's controller dispatches on."""
        return len(self._running) + self._prefilling + len(self._waiting)

    def status(self) -> dict:
        return {**self.stats.as_dict(), "running": self.running, "waiting": self.waiting,
                "max_batch": self.max_batch}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # --- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self._running:
                    self._decode_step()
            except Exception as e:  # a failed step ends every request in it, never the engine
                log.exception("engine step failed")
                self._fail_all(e)
        self._fail_all(RuntimeError("the model worker is shutting down"))

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
                self._prefilling = 1
            try:
                if seq.cancelled:
                    self._finish(seq, FINISH_ABORT)
                else:
                    self._prefill(seq)
            except Exception as e:
                log.exception("prefill failed")
                self.stats.errors += 1
                _notify(seq, e)
            finally:
                self._prefilling = 0

    @torch.inference_mode()
    def _prefill(self, seq: _Seq) -> None:
        input_ids = torch.tensor([seq.ids], device=self.device)
        result = self.model(input_ids=input_ids, use_cache=True)
        self.stats.prefills += 1
        cache = result.past_key_values
        token = self._sample(seq, result.logits[0, -1])
        if self._push(seq, token):
            return
        self._kv.add_row([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
        self._running.append(seq)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        kv, rows = self._kv, self._running
        kv.reserve(1)
        T = kv.length
        pads = torch.tensor(kv.pads, device=self.device)
        # attention_mask: [B, T+1], 0 on each row's left padding; position_ids: [B, 1]
        mask = (torch.arange(T + 1, device=self.device)[None, :] >= pads[:, None]).long()
        positions = (T - pads)[:, None]
        input_ids = torch.tensor([[s.last_token] for s in rows], device=self.device)
        result = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            past_key_values=kv.cache(), use_cache=True)
        kv.length = T + 1
        st = self.stats
        st.decode_steps += 1
        st.decode_rows += len(rows)
        st.shared_steps += len(rows) > 1
        st.peak_batch = max(st.peak_batch, len(rows))
        logits = result.logits[:, -1]  # [B, V]
        done = [self._push(seq, self._sample(seq, logits[r])) for r, seq in enumerate(rows)]
        if any(done):
            self._keep([r for r, d in enumerate(done) if not d])

    def _sample(self, seq: _Seq, logits: torch.Tensor) -> int:
        if seq.params.repetition_penalty != 1.0:
            seen = torch.tensor(seq.ids, device=logits.device)
        else:
            seen = torch.empty(0, dtype=torch.long, device=logits.device)
        return sample_next(logits, seq.params, seen)

    def _push(self, seq: _Seq, token: int) -> bool:
        """Record a sampled token, stream what is due; True when the sequence has finished."""
        self.stats.tokens += 1
        seq.ids.append(token)
        seq.last_token = token
        seq.out.push(token)
        if seq.out.finished:
            self._emit(seq)
            self.stats.finished += 1
            return True
        if seq.out.completion_tokens - seq.emitted_tokens >= self.stream_interval and seq.out.text != seq.emitted_text:
            self._emit(seq)
        return False

    def _emit(self, seq: _Seq) -> None:
        seq.emitted_tokens, seq.emitted_text = seq.out.completion_tokens, seq.out.text
        _notify(seq, seq.out.chunk(""))

    def _finish(self, seq: _Seq, reason: str) -> None:
        seq.out.finish(reason)
        if reason == FINISH_ABORT:
            self.stats.aborted += 1
        self._emit(seq)

    def _keep(self, keep: list[int]) -> None:
        self._kv.keep_rows(keep)
        self._running = [self._running[r] for r in keep]

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._running):
            for s in self._running:
                if s.cancelled:
                    self._finish(s, FINISH_ABORT)
            self._keep([r for r, s in enumerate(self._running) if not s.cancelled])

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            seqs = self._running + list(self._waiting)
            self._waiting.clear()
        self._running = []
        self._kv = BatchKV()
        for seq in seqs:
            self.stats.errors += 1
            _notify(seq, error)


def _notify(seq: _Seq, event: Event) -> None:
    try:
        seq.sink(event)
    except Exception:  # a sink belongs to a client that may be gone; never let it stop the engine
        log.exception("sink failed")
