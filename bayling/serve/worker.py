"""The model worker: FastChat's worker protocol over the batching engine, plus controller registration.

Endpoints (all POST, as FastChat's clients call them): /worker_generate_stream, /worker_generate,
/worker_get_status, /count_token, /worker_get_conv_template, /model_details.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastchat.constants import WORKER_HEART_BEAT_INTERVAL, ErrorCode

from ..tokens import encode_prompt
from ..loading import LoadedModel
from ..output import StreamChunk
from ..templates import choose_template
from ..engine.core import DEFAULT_MAX_NUM_SEQS as DEFAULT_MAX_BATCH
from ..engine.driver import EngineThread, build_engine
from .protocol import Prepared, RequestError, canonical_prompt, chunk_payload, encode, error_payload, fastchat_conv, \
    parse_body, prepare_request

log = logging.getLogger("bayling.serve.worker")

HEART_BEAT_INTERVAL_S = WORKER_HEART_BEAT_INTERVAL  # FastChat's value; FASTCHAT_WORKER_HEART_BEAT_INTERVAL overrides
CONTROLLER_TIMEOUT_S = 5
DISCONNECT_POLL_S = 0.2  # how soon a silent stream notices that its client left
DEFAULT_PORT = 21002
DEFAULT_CONTROLLER = "http://localhost:21001"


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

    @property
    def address(self) -> str:
        return (self.worker_address or f"http://{self.host}:{self.port}").rstrip("/")


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The flags of FastChat's model_worker that ours shares."""
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


def worker_config_from(ns: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(host=ns.host, port=ns.port, worker_address=ns.worker_address,
                        controller_address=ns.controller_address.rstrip("/"), model_names=ns.model_names,
                        conv_template=ns.conv_template,
                        limit_worker_concurrency=getattr(ns, "max_num_seqs", None) or ns.limit_worker_concurrency,
                        stream_interval=ns.stream_interval, no_register=ns.no_register,
                        max_num_batched_tokens=getattr(ns, "max_num_batched_tokens", None),
                        kv_cache_memory=getattr(ns, "kv_cache_memory", None),
                        gpu_memory_utilization=getattr(ns, "gpu_memory_utilization", None))


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
        self.conv, self.conv_problem = fastchat_conv(self.template, lm.tokenizer)
        if self.conv_problem:
            log.warning("%s; FastChat's OpenAI server cannot be used with this model, "
                        "use `python -m bayling.serve.openai_api` instead", self.conv_problem)
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

    def status(self) -> dict:
        return {"model_names": self.model_names, "speed": 1, "queue_length": self.engine.queue_length,
                "worker_id": self.config.worker_id, "batching": self.engine.status()}

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
    def prepare(self, body: bytes) -> Prepared:
        data = parse_body(body)
        if isinstance(data.get("prompt"), str):  # FastChat's OpenAI server renders history as given
            data["prompt"] = canonical_prompt(self.template, data["prompt"])
        return prepare_request(data, self.template, self.lm.tokenizer, self.lm.context_len)

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
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                while not queue.empty() and not isinstance(event, BaseException):
                    event = queue.get_nowait()  # text is cumulative: only the newest chunk matters
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
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

    def count_tokens(self, body: bytes) -> dict:
        data = parse_body(body)
        if not isinstance(data.get("prompt"), str):
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "count_token needs 'prompt' (a string)")
        return {"count": len(encode_prompt(self.lm.tokenizer, data["prompt"])), "error_code": 0}


def error_reply(e: BaseException) -> dict:
    """Any failure as FastChat's error JSON: a message, never a stack trace."""
    if isinstance(e, RequestError):
        return error_payload(e.code, e.message)
    code = ErrorCode.INTERNAL_ERROR
    if type(e).__name__ == "OutOfMemoryError":
        code = ErrorCode.CUDA_OUT_OF_MEMORY
    log.error("request failed: %s: %s", type(e).__name__, e)
    return error_payload(code, f"the model worker failed: {type(e).__name__}: {e}")


async def _stream_bytes(worker: Worker, prepared: Prepared, request: Request) -> AsyncIterator[bytes]:
    try:
        async for chunk in worker.stream(prepared, request):
            yield encode(chunk_payload(chunk, {**prepared.extra, **worker.logprobs_payload(chunk, prepared)}))
    except Exception as e:
        yield encode(error_reply(e))


def create_app(worker: Worker) -> FastAPI:
    """The worker's HTTP app; starting it starts the engine and the heart beat."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="BayLing model worker", lifespan=lifespan)
    app.state.worker = worker

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Response:
        w: Worker = request.app.state.worker
        try:
            prepared = w.prepare(await request.body())
        except RequestError as e:
            return Response(encode(error_reply(e)))
        return StreamingResponse(_stream_bytes(w, prepared, request))

    @app.post("/worker_generate")
    async def generate(request: Request) -> JSONResponse:
        w: Worker = request.app.state.worker
        try:
            prepared = w.prepare(await request.body())
            last = None
            async for last in w.stream(prepared, request):
                pass
            if last is None:
                raise RequestError(ErrorCode.INTERNAL_ERROR, "the client disconnected")
            return JSONResponse(chunk_payload(last, {**prepared.extra, **w.logprobs_payload(last, prepared)}))
        except Exception as e:
            return JSONResponse(error_reply(e))

    @app.post("/worker_get_status")
    async def get_status(request: Request) -> dict:
        return request.app.state.worker.status()

    @app.post("/count_token")
    async def count_token(request: Request) -> JSONResponse:
        try:
            return JSONResponse(request.app.state.worker.count_tokens(await request.body()))
        except RequestError as e:
            return JSONResponse(error_reply(e))

    @app.post("/worker_get_conv_template")
    async def get_conv_template(request: Request) -> dict:
        return {"conv": request.app.state.worker.conv}

    @app.post("/model_details")
    async def model_details(request: Request) -> dict:
        return {"context_length": request.app.state.worker.lm.context_len}

    return app


def run_worker(lm: LoadedModel, config: WorkerConfig) -> None:
    """Serve the worker until interrupted."""
    import uvicorn

    app = create_app(Worker(lm, config))
    log.info("model worker %s serving %s on %s", config.worker_id, lm.name, config.address)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m bayling.serve.worker` (the same as `python model_worker.py`)."""
    import sys

    from ..loading import ModelLoadError, add_model_args, load_model, model_args_from

    parser = argparse.ArgumentParser(description="BayLing model worker (FastChat protocol, batched decoding)")
    add_model_args(parser)
    add_worker_args(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        lm = load_model(model_args_from(ns))
        run_worker(lm, worker_config_from(ns))
    except (ModelLoadError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
