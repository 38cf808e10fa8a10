"""The worker's HTTP app: FastChat's worker routes, /health, /metrics, and the SIGTERM drain.

Routes (POST, as FastChat's clients call them): /worker_generate_stream, /worker_generate,
/worker_get_status, /count_token, /worker_get_conv_template, /model_details; and GET /health, /metrics.
Nothing here blocks the event loop: bodies are read with a size limit, parsed and tokenized on the
worker's prepare threads, and the model runs on the engine's thread.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastchat.constants import ErrorCode

from .limits import is_json
from .metrics import ABORTED, ERROR, REJECTED, RequestTrack
from .protocol import Prepared, RequestError, chunk_payload, encode
from .worker import Worker, WorkerConfig, error_reply

log = logging.getLogger("bayling.serve.worker")

FLUSH_S = 0.5  # after cutting requests off at the end of a drain, time for their error chunks to go out
SHUTDOWN_GRACE_S = 5  # then uvicorn's own wait for connections to close
NOT_JSON = "POST a JSON body with Content-Type: application/json"


def _draining_error(worker: Worker) -> RequestError:
    return RequestError(ErrorCode.ENGINE_OVERLOADED, "the model worker is shutting down and takes no new "
                                                     "requests; retry, the controller will send it elsewhere")


def _refusal(worker: Optional[Worker], request: Request, needs_body: bool = True) -> Optional[Response]:
    """Why this request cannot run now (loading, draining, not JSON), as a FastChat error reply."""
    if needs_body and not is_json(request):
        return JSONResponse(error_reply(RequestError(ErrorCode.VALIDATION_TYPE_ERROR, NOT_JSON)), status_code=415)
    if worker is None:
        return JSONResponse(error_reply(RequestError(ErrorCode.ENGINE_OVERLOADED, "the model is still loading")),
                            status_code=503)
    if worker.draining:
        return JSONResponse(error_reply(_draining_error(worker)), status_code=503)
    return None


async def _tracked(worker: Worker, prepared: Prepared, request: Request, track: RequestTrack):
    """worker.stream with metrics: first token, outcome, tokens."""
    last = None
    try:
        async for last in worker.stream(prepared, request):
            if last.completion_tokens:
                track.token()
            yield last
    except BaseException:
        track.done(ERROR if last is None or last.finish_reason is None else last.finish_reason)
        raise
    finally:
        if last is not None and last.finish_reason not in (None, "abort"):
            track.done(last.finish_reason, last.usage)
        else:
            track.done(ABORTED, last.usage if last is not None else None)


async def _stream_bytes(worker: Worker, prepared: Prepared, request: Request,
                        track: RequestTrack) -> AsyncIterator[bytes]:
    try:
        async for chunk in _tracked(worker, prepared, request, track):
            yield encode(chunk_payload(chunk, {**prepared.extra, **worker.logprobs_payload(chunk, prepared)}))
    except Exception as e:
        yield encode(error_reply(e))


async def _generate(request: Request, stream: bool) -> Response:
    """/worker_generate_stream (NUL-delimited chunks) or /worker_generate (the last chunk as one object)."""
    w: Optional[Worker] = request.app.state.worker
    if (refused := _refusal(w, request)) is not None:
        return refused
    track = w.metrics.track()
    try:
        prepared = await w.prepare(request)
    except RequestError as e:
        track.done(REJECTED)
        # HTTP 200, as FastChat's clients expect: one stream chunk, or one JSON object.
        return Response(encode(error_reply(e))) if stream else JSONResponse(error_reply(e))
    if stream:
        return StreamingResponse(_stream_bytes(w, prepared, request, track))
    try:
        last = None
        async for last in _tracked(w, prepared, request, track):
            pass
        if last is None or last.finish_reason is None:
            raise RequestError(ErrorCode.INTERNAL_ERROR, "the client disconnected")
        return JSONResponse(chunk_payload(last, {**prepared.extra, **w.logprobs_payload(last, prepared)}))
    except Exception as e:
        return JSONResponse(error_reply(e))


WorkerSource = Union[Worker, Callable[[], Worker]]


def create_app(source: WorkerSource) -> FastAPI:
    """The worker's HTTP app. `source` is a Worker, or a function that loads one (then the app answers
    /health with 503 until it has loaded; a load error ends the process)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(source, Worker):
            source.start()
            app.state.worker = source
        else:
            threading.Thread(target=_load, args=(app, source), name="load-model", daemon=True).start()
        yield
        if app.state.worker is not None:
            app.state.worker.stop()

    app = FastAPI(title="BayLing model worker", lifespan=lifespan)
    app.state.worker = None

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await _generate(request, stream=True)

    @app.post("/worker_generate")
    async def generate(request: Request) -> Response:
        return await _generate(request, stream=False)

    @app.post("/worker_get_status")
    async def get_status(request: Request) -> Response:
        w: Optional[Worker] = request.app.state.worker
        if w is None or w.draining:  # FastChat's controller drops a worker whose status is not 200
            return JSONResponse({"status": "loading" if w is None else "draining"}, status_code=503)
        return JSONResponse(w.status())

    @app.post("/count_token")
    async def count_token(request: Request) -> JSONResponse:
        w: Optional[Worker] = request.app.state.worker
        if (refused := _refusal(w, request)) is not None:
            return refused
        try:
            return JSONResponse(await w.count_tokens(request))
        except RequestError as e:
            return JSONResponse(error_reply(e))

    @app.post("/worker_get_conv_template")
    async def get_conv_template(request: Request) -> Response:
        w: Optional[Worker] = request.app.state.worker
        return _refusal(w, request, needs_body=False) or JSONResponse({"conv": w.conv})

    @app.post("/model_details")
    async def model_details(request: Request) -> Response:
        w: Optional[Worker] = request.app.state.worker
        return _refusal(w, request, needs_body=False) or JSONResponse({"context_length": w.context_len})

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        w: Optional[Worker] = request.app.state.worker
        if w is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if w.draining:
            return JSONResponse({"status": "draining", "in_flight": w.inflight}, status_code=503)
        return JSONResponse({"status": "ok", "model_names": w.model_names, "queue_length": w.engine.queue_length})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        w: Optional[Worker] = request.app.state.worker
        if w is None:
            return Response("# the model is still loading\n", media_type="text/plain", status_code=503)
        body, content_type = w.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _load(app: FastAPI, load: Callable[[], Worker]) -> None:
    try:
        worker = load()
        worker.start()
    except Exception as e:  # nothing runs yet: end the process with the reason
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    app.state.worker = worker
    log.info("model worker %s serving %s on %s", worker.config.worker_id, worker.lm.name, worker.config.address)


async def drain(worker: Worker, grace_s: float) -> None:
    """Refuse new requests, let in-flight ones finish for up to grace_s, then cut the rest off with an error."""
    worker.draining = True
    log.info("SIGTERM: draining %d in-flight request(s) for up to %.0f s", worker.inflight, grace_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while worker.inflight and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if worker.inflight:
        n = worker.fail_inflight(RequestError(
            ErrorCode.INTERNAL_ERROR, f"the model worker shut down: the request was still running "
                                      f"{grace_s:g} s after SIGTERM (--drain-timeout)"))
        log.warning("drain period over: cut off %d request(s)", n)
        await asyncio.sleep(FLUSH_S)


def run_worker(load: Callable, config: WorkerConfig) -> int:
    """Serve until SIGINT (at once) or SIGTERM (after draining). `load()` returns the LoadedModel."""
    import uvicorn

    app = create_app(lambda: Worker(load(), config))

    class Server(uvicorn.Server):
        draining: Optional[asyncio.Task] = None

        def handle_exit(self, sig: int, frame: object) -> None:
            worker: Optional[Worker] = app.state.worker
            if sig != signal.SIGTERM or worker is None or self.draining is not None:
                return super().handle_exit(sig, frame)
            # In the main thread, between two steps of the event loop: schedule the drain on it.
            self.draining = asyncio.get_event_loop().create_task(self._drain(worker, sig, frame))

        async def _drain(self, worker: Worker, sig: int, frame: object) -> None:
            await drain(worker, config.drain_s)
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                   timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    server.run()
    return 0
