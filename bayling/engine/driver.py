"""Driving the engine: stream one request in the caller's thread, or own it in a stepping thread.

`stream` serves chat and api.py (Ctrl-C or closing the iterator aborts). `EngineThread` serves the
worker: a thread steps the engine while there is work; submit/abort are thread-safe and each request's
sink receives cumulative StreamChunks (FastChat's protocol form, made here at the edge) or the error.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..output import StreamChunk
from ..params import GenerationParams
from .core import Engine
from .request import Logprob, OutputKind, Request, RequestOutput

log = logging.getLogger("bayling.engine.driver")

IDLE_WAIT_S = 0.5

Event = Union[StreamChunk, BaseException]
Sink = Callable[[Event], None]


def stream(engine: Engine, request: Request) -> Iterator[RequestOutput]:
    """Run one request to the end in this thread, yielding its outputs; closing the iterator aborts it."""
    engine.add_request(request)
    finished = False
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.request_id != request.request_id:
                    continue
                if out.error is not None:
                    finished = True
                    raise out.error
                finished = out.finished
                yield out
            if finished:
                return
    finally:
        if not finished:
            engine.abort(request.request_id)
            while engine.has_unfinished():  # let the abort free its KV before the next request
                engine.step()


def to_chunk(out: RequestOutput, delta: str = "") -> StreamChunk:
    """A cumulative RequestOutput as the StreamChunk the protocol edge sends."""
    return StreamChunk(out.text, delta, out.prompt_tokens, out.completion_tokens, out.finish_reason,
                       logprobs=out.logprobs)


class RequestHandle:
    """What EngineThread.submit returns: abort() stops the request before its next step."""

    def __init__(self, owner: "EngineThread", request_id: str) -> None:
        self._owner, self.id = owner, request_id

    def abort(self) -> None:
        self._owner.abort(self.id)


class EngineThread:
    """A thread that owns an Engine and steps it while any request is unfinished."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._pending: list[tuple[Request, Sink]] = []
        self._aborts: set[str] = set()
        self._sinks: dict[str, Sink] = {}
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "EngineThread":
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

    def submit(self, input_ids: Sequence[int], params: GenerationParams, sink: Sink, prompt_text: str = "",
               stream_interval: int = 1) -> RequestHandle:
        """Queue a request (cumulative chunks go to sink). Raises at once if it can never run."""
        request = Request(f"r{next(self._ids)}", list(input_ids), params, OutputKind.CUMULATIVE, prompt_text,
                          max(1, stream_interval))
        self.engine.check_request(request)
        with self._cond:
            self.engine.add_request(request) if self._thread is None else self._pending.append((request, sink))
            self._sinks[request.request_id] = sink
            self._cond.notify_all()
        return RequestHandle(self, request.request_id)

    def abort(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._sinks:
                self._aborts.add(request_id)
                self._cond.notify_all()

    @property
    def queue_length(self) -> int:
        """Requests held (running + waiting): what FastChat's controller dispatches on."""
        with self._cond:
            return len(self._sinks)

    def status(self) -> dict:
        return self.engine.status()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending and not self._aborts and not self.engine.has_unfinished():
                    self._cond.wait(IDLE_WAIT_S)
                if self._stop:
                    break
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, set()
            for request, sink in pending:
                try:
                    self.engine.add_request(request)
                except Exception as e:
                    self._deliver(request.request_id, e, final=True)
            for rid in aborts:
                self.engine.abort(rid)
            try:
                outputs = self.engine.step()
            except Exception as e:  # the engine fails a step's requests itself; this is a bug guard
                log.exception("engine step failed")
                outputs = []
                for rid in list(self._sinks):
                    self.engine.abort(rid)
                    self._deliver(rid, e, final=True)
            for out in outputs:
                if out.error is not None:
                    self._deliver(out.request_id, out.error, final=True)
                else:
                    self._deliver(out.request_id, to_chunk(out), final=out.finished)
        for rid in list(self._sinks):
            self._deliver(rid, RuntimeError("the model worker is shutting down"), final=True)

    def _deliver(self, request_id: str, event: Event, final: bool) -> None:
        with self._cond:
            sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is None:
            return
        try:
            sink(event)
        except Exception:  # a sink belongs to a client that may be gone; never let it stop the engine
            log.exception("sink failed")


def build_engine(model: Any, tokenizer: Any, *, context_len: Optional[int] = None, max_num_seqs: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = None, kv_cache_memory: Optional[int] = None,
                 gpu_memory_utilization: Optional[float] = None) -> Engine:
    """An Engine over the model's runner (TorchRunner, or LlamaCppRunner for a GGUF), with the engine flags."""
    from ..tokens import eos_token_ids
    from .core import DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, EngineConfig

    seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS
    config = EngineConfig(seqs, max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, seqs))
    if hasattr(model, "handle"):  # a GGUF loaded by llama.cpp (bayling/llama_loading.py)
        from ..llama_loading import build_llama_runner

        runner = build_llama_runner(model, config.max_num_seqs, config.max_num_batched_tokens, kv_cache_memory)
        return Engine(runner, tokenizer, eos_token_ids(model, tokenizer), config)
    from .torch_runner import DEFAULT_GPU_MEMORY_UTILIZATION, TorchRunner  # torch: only on this path

    runner = TorchRunner(model, context_len=context_len, kv_cache_memory=kv_cache_memory,
                         gpu_memory_utilization=gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION)
    return Engine(runner, tokenizer, eos_token_ids(model, tokenizer), config)


__all__ = ["EngineThread", "RequestHandle", "build_engine", "stream", "to_chunk", "Logprob"]
