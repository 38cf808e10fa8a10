"""The model worker: FastChat's worker protocol over the batching engine, plus controller registration.

This module holds the worker's flags and the Worker (engine, request preparation, registration);
bayling/serve/worker_app.py holds its HTTP routes, health, metrics and the SIGTERM drain.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import requests
from fastapi import Request
from fastchat.constants import WORKER_HEART_BEAT_INTERVAL, ErrorCode

from ..tokens import encode_prompt
from ..loading import LoadedModel
from ..output import StreamChunk
from ..templates import choose_template
from ..engine.core import DEFAULT_MAX_NUM_SEQS as DEFAULT_MAX_BATCH
from ..engine.driver import EngineThread, build_engine
from .limits import Limits, add_limit_args, check_limits, check_text, limits_from, read_body
from .metrics import ServeMetrics
from .protocol import Prepared, RequestError, canonical_prompt, error_payload, fastchat_conv, parse_body, \
    prepare_request
from .supervise import DEFAULT_DRAIN_S

log = logging.getLogger("bayling.serve.worker")

HEART_BEAT_INTERVAL_S = WORKER_HEART_BEAT_INTERVAL  # FastChat's value; FASTCHAT_WORKER_HEART_BEAT_INTERVAL overrides
CONTROLLER_TIMEOUT_S = 5
DISCONNECT_POLL_S = 0.2  # how soon a request notices that its client left
DEFAULT_PORT = 21002
DEFAULT_CONTROLLER = "http://localhost:21001"
# Templating, tokenizing and fitting a request run on these threads, never on the event loop.
PREPARE_THREADS = 4


@dataclass
class WorkerConfig:
    """The worker's flags (besides the model flags)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    worker_address: Optional[str] = None  # what the controller calls; default http://{host}:{port}
    controller_address: str = DEFAULT_CONTROLLER
    model_names: Optional[list[str]] = None
    conv_template: Optional[str] = None
    limit_worker_concurrency: int = DEFAULT_MAX_BATCH  # the engine's --max-num-seqs
    stream_interval: int = 2
    max_num_batched_tokens: Optional[int] = None
    kv_cache_memory: Optional[int] = None
    gpu_memory_utilization: Optional[float] = None
    no_register: bool = False
    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    limits: Limits = field(default_factory=Limits)
    drain_s: float = DEFAULT_DRAIN_S  # on SIGTERM, how long in-flight requests may run on

    @property
    def address(self) -> str:
        return (self.worker_address or f"http://{self.host}:{self.port}").rstrip("/")


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The flags of FastChat's model_worker that ours shares, plus request limits and the drain period."""
    g = parser.add_argument_group("worker")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=DEFAULT_PORT)
    g.add_argument("--worker-address", default=None, help="address the controller uses (default http://HOST:PORT)")
    g.add_argument("--controller-address", default=DEFAULT_CONTROLLER)
    g.add_argument("--model-names", type=lambda s: [n for n in s.split(",") if n], default=None,
                   help="comma-separated names to serve the model under (default: the model's name)")
    g.add_argument("--conv-template", default=None, help="BayLing, BayLing-3 or tokenizer (default: by model name)")
    g.add_argument("--limit-worker-concurrency", type=int, default=DEFAULT_MAX_BATCH,
                   help="most requests decoded together; more wait in a queue")
    g.add_argument("--stream-interval", type=int, default=2, help="send a chunk every N tokens")
    g.add_argument("--no-register", action="store_true", help="do not register with the controller")
    g.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_S,
                   help=f"on SIGTERM, let in-flight requests finish for up to this many seconds, then abort them "
                        f"with an error (default {DEFAULT_DRAIN_S:g})")
    add_limit_args(parser)


def worker_config_from(ns: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(host=ns.host, port=ns.port, worker_address=ns.worker_address,
                        controller_address=ns.controller_address.rstrip("/"), model_names=ns.model_names,
                        conv_template=ns.conv_template,
                        limit_worker_concurrency=getattr(ns, "max_num_seqs", None) or ns.limit_worker_concurrency,
                        stream_interval=ns.stream_interval, no_register=ns.no_register,
                        max_num_batched_tokens=getattr(ns, "max_num_batched_tokens", None),
                        kv_cache_memory=getattr(ns, "kv_cache_memory", None),
                        gpu_memory_utilization=getattr(ns, "gpu_memory_utilization", None),
                        limits=limits_from(ns), drain_s=ns.drain_timeout)


class Worker:
    """One loaded model behind the engine, known to the controller by its address."""

    def __init__(self, lm: LoadedModel, config: WorkerConfig) -> None:
        if config.limit_worker_concurrency < 1:
            raise ValueError(f"--limit-worker-concurrency must be >= 1, got {config.limit_worker_concurrency}")
        self.lm, self.config = lm, config
        self.template = choose_template(lm.name, config.conv_template)
        self.model_names = config.model_names or [lm.name]
        self.engine = EngineThread(build_engine(
            lm.model, lm.tokenizer, context_len=lm.context_len, max_num_seqs=config.limit_worker_concurrency,
            max_num_batched_tokens=config.max_num_batched_tokens, kv_cache_memory=config.kv_cache_memory,
            gpu_memory_utilization=config.gpu_memory_utilization))
        self.context_len = self.engine.engine.context_len  # what a conversation is fitted to
        self.conv, self.conv_problem = fastchat_conv(self.template, lm.tokenizer)
        if self.conv_problem:
            log.warning("%s; FastChat's OpenAI server cannot be used with this model, "
                        "use `python -m bayling.serve.openai_api` instead", self.conv_problem)
        self.metrics = ServeMetrics("bayling_worker", self.engine.status)
        self.draining = False  # set on SIGTERM: no new requests, in-flight ones finish or are cut off
        self._inflight: set[asyncio.Queue] = set()
        self._pool = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare")
        self._stop = threading.Event()
        self._heart_beat: Optional[threading.Thread] = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        if not self.config.no_register:
            self._heart_beat = threading.Thread(target=self._heart_beat_loop, name="heart-beat", daemon=True)
            self._heart_beat.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def status(self) -> dict:
        return {"model_names": self.model_names, "speed": 1, "queue_length": self.engine.queue_length,
                "worker_id": self.config.worker_id, "batching": self.engine.status()}

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def fail_inflight(self, error: BaseException) -> int:
        """End every in-flight request with `error` (its engine slot is freed as its stream ends)."""
        for queue in list(self._inflight):
            queue.put_nowait(error)
        return len(self._inflight)

    def register(self) -> bool:
        """Tell the controller about this worker; False (logged) when it cannot be reached."""
        data = {"worker_name": self.config.address, "check_heart_beat": True,
                "worker_status": self.status(), "multimodal": False}
        try:
            r = requests.post(self.config.controller_address + "/register_worker", json=data,
                              timeout=CONTROLLER_TIMEOUT_S)
            r.raise_for_status()
        except requests.RequestException as e:
            log.warning("cannot register with the controller at %s: %s", self.config.controller_address, e)
            return False
        log.info("registered %s as %s with %s", self.model_names, self.config.address,
                 self.config.controller_address)
        return True

    def _heart_beat_loop(self) -> None:
        registered = self.register()
        while not self._stop.wait(HEART_BEAT_INTERVAL_S if registered else min(HEART_BEAT_INTERVAL_S, 5)):
            if self.draining:
                continue  # let the controller forget us
            if not registered:
                registered = self.register()
                continue
            try:
                r = requests.post(self.config.controller_address + "/receive_heart_beat",
                                  json={"worker_name": self.config.address,
                                        "queue_length": self.engine.queue_length},
                                  timeout=CONTROLLER_TIMEOUT_S)
                if not r.json().get("exist", False):  # the controller restarted or dropped us
                    registered = self.register()
            except (requests.RequestException, ValueError) as e:
                log.warning("heart beat to %s failed: %s", self.config.controller_address, e)

    # --- requests ----------------------------------------------------------------------------
    def prepare_body(self, body: bytes) -> Prepared:
        """Parse, check and tokenize a generate request (blocking: runs on a prepare thread)."""
        data = parse_body(body)
        check_text(data)
        check_limits(data, self.config.limits)
        if isinstance(data.get("prompt"), str):  # FastChat's OpenAI server renders history as given
            data["prompt"] = canonical_prompt(self.template, data["prompt"])
        return prepare_request(data, self.template, self.lm.tokenizer, self.context_len)

    async def prepare(self, request: Request) -> Prepared:
        """Read (bounded) and prepare a request off the event loop."""
        body = await read_body(request, self.config.limits.max_request_bytes)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.prepare_body, body)

    async def stream(self, prepared: Prepared, request: Optional[Request] = None) -> AsyncIterator[StreamChunk]:
        """Run one request on the engine; abort it as soon as its client disconnects."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:  # called on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        if prepared.params.n != 1:
            raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, "the worker answers n=1 per request; "
                               "send n requests (as FastChat's OpenAI server does)")
        handle = self.engine.submit(prepared.input_ids, prepared.params, sink, prepared.prompt_text,
                                    self.config.stream_interval)
        self._inflight.add(queue)
        next_poll = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = None
                # Polled by the clock, not only when idle: a non-streaming request never writes until
                # its end, so only this notices that its client left while tokens keep coming.
                if request is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return
                if event is None:
                    continue
                while not queue.empty() and not isinstance(event, BaseException):
                    event = queue.get_nowait()  # text is cumulative: only the newest chunk matters
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._inflight.discard(queue)
            handle.abort()  # no-op when finished; frees the slot when the client went away

    def logprobs_payload(self, chunk: StreamChunk, prepared: Prepared) -> dict:
        """FastChat's cumulative `logprobs` (text_offset, tokens, token_logprobs, top_logprobs) when asked."""
        if prepared.params.logprobs is None:
            return {}
        tok = self.lm.tokenizer
        entries = chunk.logprobs or ()
        tokens = [tok.decode([e.token_id]) for e in entries]
        token_logprobs: list = [e.logprob for e in entries]
        top: list = [{tok.decode([t]): v for t, v in e.top} for e in entries]
        if prepared.params.echo:  # the prompt's own logprobs are not computed (logits of the last position only)
            prompt = [tok.decode([t]) for t in prepared.input_ids]
            tokens, token_logprobs, top = prompt + tokens, [None] * len(prompt) + token_logprobs, \
                [{}] * len(prompt) + top
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"logprobs": {"text_offset": offsets, "tokens": tokens, "token_logprobs": token_logprobs,
                             "top_logprobs": top}}

    def count_tokens_body(self, body: bytes) -> dict:
        data = parse_body(body)
        check_text(data)
        check_limits(data, self.config.limits)
        if not isinstance(data.get("prompt"), str):
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "count_token needs 'prompt' (a string)")
        return {"count": len(encode_prompt(self.lm.tokenizer, data["prompt"])), "error_code": 0}

    async def count_tokens(self, request: Request) -> dict:
        body = await read_body(request, self.config.limits.max_request_bytes)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.count_tokens_body, body)


def error_reply(e: BaseException) -> dict:
    """Any failure as FastChat's error JSON: a message, never a stack trace."""
    if isinstance(e, RequestError):
        return error_payload(e.code, e.message)
    code = ErrorCode.INTERNAL_ERROR
    if type(e).__name__ == "OutOfMemoryError":
        code = ErrorCode.CUDA_OUT_OF_MEMORY
    log.error("request failed: %s: %s", type(e).__name__, e)
    return error_payload(code, f"the model worker failed: {type(e).__name__}: {e}")


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m bayling.serve.worker` (the checkout's model_worker.py calls this)."""
    import sys

    from ..loading import add_model_args, load_model, model_args_from
    from .supervise import watch_parent
    from .worker_app import run_worker

    parser = argparse.ArgumentParser(description="BayLing model worker (FastChat protocol, batched decoding)")
    add_model_args(parser)
    add_worker_args(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    watch_parent()
    try:
        config = worker_config_from(ns)
        if config.limit_worker_concurrency < 1:
            raise ValueError(f"--limit-worker-concurrency must be >= 1, got {config.limit_worker_concurrency}")
        args = model_args_from(ns)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # The model loads while the server already answers (/health 503), so supervisors can tell
    # "loading" from "dead"; a load error ends the process with the message.
    sys.exit(run_worker(lambda: load_model(args), config))


if __name__ == "__main__":
    main()
