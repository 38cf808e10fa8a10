"""Our OpenAI-compatible API: /v1/models(/{id}), /v1/chat/completions and /v1/completions, /health, /metrics.

FastChat's own server (fastchat.serve.openai_api_server 0.2.36) fails every `stream: true` request
under pydantic 2 and renders chat prompts itself from the worker's conv dict. This app asks the
controller for a worker like FastChat's does, then sends chat requests as `messages` (the worker
renders them with the model's exact template and fits them into the context window).

Errors are honest: a bad request is a 4xx before any stream byte (the first worker chunk is awaited
before the response starts), a worker that answers outside the protocol is a 502, a client that
leaves has its requests aborted on the worker, and after a connection failure the controller is asked
to re-check its workers and the request is tried once more on another.

    python -m bayling.serve.openai_api --controller-address http://localhost:21001 --port 8000
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastchat.constants import WORKER_API_TIMEOUT, ErrorCode

from .limits import Limits, add_limit_args, check_limits, check_text, is_json, limits_from, read_body
from .metrics import ABORTED, ERROR, REJECTED, ServeMetrics
from .openai_request import OpenAIRequest, chat_logprobs, completion_logprobs, parse_openai
from .protocol import STREAM_DELIMITER, RequestError, parse_body

DEFAULT_PORT = 8000
CONTROLLER_TIMEOUT_S = 10.0
DISCONNECT_POLL_S = 0.2
API_KEY_ENV = "BAYLING_API_KEY"
RETRY_CODES = (ErrorCode.ENGINE_OVERLOADED,)  # a draining worker: another may take the request
T = TypeVar("T")


class WorkerFailure(Exception):
    """The worker answered outside the protocol (HTTP error, not JSON, a cut-off stream) or is unreachable."""

    def __init__(self, message: str, before_any_byte: bool = False) -> None:
        super().__init__(message)
        self.before_any_byte = before_any_byte


def _error(code: int, message: str, status: int = 400) -> JSONResponse:
    # FastChat's ErrorResponse fields plus OpenAI's error object, so either kind of client reads it.
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"object": "error", "message": message, "code": int(code),
                         "error": {"message": message, "type": kind, "code": int(code)}}, status_code=status)


def _status_for(code: int) -> int:
    if code == ErrorCode.INVALID_MODEL:
        return 404
    if code in RETRY_CODES:
        return 503
    return 400 if code < 50000 else 502


class Upstream:
    """The controller and its workers, as this server sees them."""

    def __init__(self, controller_address: str) -> None:
        self.controller = controller_address.rstrip("/")
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(WORKER_API_TIMEOUT, connect=CONTROLLER_TIMEOUT_S),
                                        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))

    async def _post(self, url: str, payload: Optional[dict] = None) -> Any:
        r = await self.client.post(url, json=payload, timeout=CONTROLLER_TIMEOUT_S)
        r.raise_for_status()
        return r.json() if r.content else None

    async def refresh(self) -> None:
        """Ask the controller to re-check every worker (it drops those that do not answer)."""
        with contextlib.suppress(httpx.HTTPError):
            await self._post(self.controller + "/refresh_all_workers")

    async def models(self, refresh: bool = False) -> list[str]:
        if refresh:
            await self._post(self.controller + "/refresh_all_workers")
        return sorted((await self._post(self.controller + "/list_models"))["models"])

    async def worker_for(self, model: str) -> str:
        address = (await self._post(self.controller + "/get_worker_address", {"model": model}))["address"]
        if not address:
            models = await self.models()
            raise RequestError(ErrorCode.INVALID_MODEL,
                               f"no worker serves model {model!r}; available: {', '.join(models) or 'none'}")
        return address

    async def generate(self, worker: str, payload: dict) -> AsyncIterator[dict]:
        """The worker's NUL-delimited chunks, decoded; anything outside the protocol is a WorkerFailure."""
        body = await asyncio.to_thread(json.dumps, payload) if len(payload.get("prompt", "")) > 65536 \
            else json.dumps(payload)
        sent_any = False
        try:
            async with self.client.stream("POST", worker + "/worker_generate_stream", content=body,
                                          headers={"Content-Type": "application/json"}) as r:
                if r.status_code != 200:
                    text = (await r.aread())[:200].decode("utf-8", "replace")
                    raise WorkerFailure(f"the worker at {worker} answered HTTP {r.status_code}: {text}", True)
                buffer, finished = b"", False
                async for raw in r.aiter_raw():
                    buffer += raw
                    while (end := buffer.find(STREAM_DELIMITER)) >= 0:
                        piece, buffer = buffer[:end], buffer[end + 1:]
                        if not piece.strip():
                            continue
                        try:
                            chunk = json.loads(piece)
                            assert isinstance(chunk, dict) and isinstance(chunk.get("text"), str)
                        except (ValueError, AssertionError):
                            raise WorkerFailure(f"the worker at {worker} sent something that is not the "
                                                f"protocol: {piece[:80]!r}", not sent_any) from None
                        sent_any = True
                        finished = bool(chunk.get("finish_reason") or chunk.get("error_code"))
                        yield chunk
                        if finished:
                            return
                raise WorkerFailure(f"the worker at {worker} ended its stream without finishing the answer"
                                    + (f" (trailing {buffer[:60]!r})" if buffer.strip() else ""), not sent_any)
        except httpx.HTTPError as e:
            raise WorkerFailure(f"the worker at {worker} failed: {type(e).__name__}: {e}",
                                not sent_any and isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)))


class Choice:
    """One running generation (one of n): its worker stream, with its first chunk already read."""

    def __init__(self, index: int, chunks: AsyncIterator[dict], first: dict) -> None:
        self.index, self.chunks, self.first = index, chunks, first

    async def all(self) -> AsyncIterator[dict]:
        yield self.first
        if self.first.get("finish_reason") or self.first.get("error_code"):
            return
        async for chunk in self.chunks:
            yield chunk


async def _open(upstream: Upstream, req: OpenAIRequest, index: int) -> Choice:
    """Start choice `index` and read its first chunk; one retry on another worker if the first failed to
    connect or was draining. Raises RequestError for a protocol error reply, WorkerFailure otherwise."""
    refused: Optional[Exception] = None  # why the first worker did not take it
    for attempt in (0, 1):
        try:
            worker = await upstream.worker_for(req.model)
        except RequestError as e:
            if refused is None or e.code != ErrorCode.INVALID_MODEL:
                raise
            # The model's last worker just failed or is shutting down: unavailable for now, not unknown (404).
            raise RequestError(ErrorCode.ENGINE_OVERLOADED,
                               f"no worker can take the request now: {_failure_text(refused)}") from None
        chunks = upstream.generate(worker, req.payload_for(index)).__aiter__()
        try:
            first = await chunks.__anext__()
        except WorkerFailure as e:
            await upstream.refresh()  # the next request goes to a live worker
            if attempt == 0 and e.before_any_byte:
                refused = e
                continue
            raise
        except StopAsyncIteration:
            raise WorkerFailure(f"the worker at {worker} sent nothing") from None
        code = first.get("error_code") or 0
        if code:
            if attempt == 0 and code in RETRY_CODES:
                refused = RequestError(code, first.get("text") or "the worker is busy")
                await upstream.refresh()
                continue
            raise RequestError(code, first.get("text") or "the worker refused the request")
        return Choice(index, chunks, first)
    raise AssertionError("unreachable")


async def _merged(choices: list[Choice]) -> AsyncIterator[tuple[int, Any]]:
    """(index, chunk or exception) from every choice as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for chunk in c.all():
                await queue.put((c.index, chunk))
        except Exception as e:
            await queue.put((c.index, e))
        finally:
            await queue.put((c.index, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


def _usage(chunks: list[dict]) -> dict:
    prompt = max(((c.get("usage") or {}).get("prompt_tokens", 0) for c in chunks), default=0)
    completion = sum((c.get("usage") or {}).get("completion_tokens", 0) for c in chunks)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _failure_text(e: BaseException) -> str:
    return str(e) if isinstance(e, (WorkerFailure, RequestError)) else f"{type(e).__name__}: {e}"


async def _sse(req: OpenAIRequest, choices: list[Choice], track: Any) -> AsyncIterator[str]:
    rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    kind = "chat.completion.chunk" if req.chat else "text_completion"

    def event(choices_out: list[dict], usage: Optional[dict] = None, last: bool = False) -> str:
        out: dict = {"id": rid, "object": kind, "created": created, "model": req.model, "choices": choices_out}
        if req.include_usage:
            out["usage"] = usage if last else None
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    sent = {c.index: "" for c in choices}
    logprobs_sent = {c.index: 0 for c in choices}
    finals: dict[int, dict] = {}
    if req.chat:
        yield event([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in choices])
    async for index, chunk in _merged(choices):
        if isinstance(chunk, BaseException) or chunk.get("error_code"):
            message = _failure_text(chunk) if isinstance(chunk, BaseException) else chunk["text"]
            code = ErrorCode.INTERNAL_ERROR if isinstance(chunk, BaseException) else chunk["error_code"]
            track.done(ERROR)
            yield f"data: {json.dumps({'error': {'message': message, 'code': code}}, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
            return
        text, finish = chunk["text"], chunk.get("finish_reason")
        delta = text[len(sent[index]):] if text.startswith(sent[index]) else ""
        if delta or finish:
            track.token()
            sent[index] = text
            lp: Any = None
            if req.logprobs is not None:
                if req.chat:
                    lp = {"content": chat_logprobs(chunk.get("logprobs"), logprobs_sent[index])}
                else:
                    lp = completion_logprobs(chunk.get("logprobs"), logprobs_sent[index])
                logprobs_sent[index] = len((chunk.get("logprobs") or {}).get("tokens") or [])
            finish_out = None if finish is None else ("stop" if finish == "abort" else finish)
            if req.chat:
                c = {"index": index, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                     "finish_reason": finish_out}
            else:
                c = {"index": index, "text": delta, "logprobs": lp, "finish_reason": finish_out}
            yield event([c])
        if finish:
            finals[index] = chunk
    usage = _usage(list(finals.values()))
    if req.include_usage:  # as OpenAI sends it: one more chunk, no choices
        yield event([], usage, last=True)
    track.done("stop", usage)
    yield "data: [DONE]\n\n"


def _answer(req: OpenAIRequest, finals: list[dict]) -> dict:
    rid = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    out = []
    for i, last in enumerate(finals):
        finish = last.get("finish_reason")
        finish = "stop" if finish == "abort" else finish
        if req.chat:
            lp = {"content": chat_logprobs(last.get("logprobs"), 0)} if req.logprobs is not None else None
            out.append({"index": i, "message": {"role": "assistant", "content": last.get("text", "")},
                        "logprobs": lp, "finish_reason": finish})
        else:
            lp = completion_logprobs(last.get("logprobs"), 0) if req.logprobs is not None else None
            out.append({"index": i, "text": last.get("text", ""), "logprobs": lp, "finish_reason": finish})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": req.model, "choices": out, "usage": _usage(finals)}


class ClientLeft(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_client_leaves(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`; if the client leaves first, cancel it (closing its worker streams, so the worker
    aborts) and raise ClientLeft."""
    work = asyncio.ensure_future(awaitable)
    while not work.done():
        await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        if not work.done() and await request.is_disconnected():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
            raise ClientLeft
    return work.result()


async def _finish_all(choices: list[Choice], track: Any) -> list[dict]:
    """Every choice's last chunk (a non-streaming answer); a worker's error reply raises RequestError."""
    finals: list[dict] = [{} for _ in choices]
    async for index, chunk in _merged(choices):
        if isinstance(chunk, BaseException):
            raise chunk
        if chunk.get("error_code"):
            raise RequestError(chunk["error_code"], chunk["text"])
        if chunk.get("usage", {}).get("completion_tokens"):
            track.token()
        finals[index] = chunk
    return finals


def create_app(controller_address: str, api_key: Optional[str] = None, allowed_origins: tuple[str, ...] = (),
               limits: Limits = Limits()) -> FastAPI:
    """The OpenAI-compatible app in front of a FastChat controller."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.upstream = Upstream(controller_address)
        yield
        await app.state.upstream.client.aclose()

    app = FastAPI(title="BayLing OpenAI-compatible API", lifespan=lifespan)
    metrics = ServeMetrics("bayling_api")
    if allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def unauthorized(request: Request) -> Optional[JSONResponse]:
        # A check in each /v1 route rather than an HTTP middleware: Starlette's BaseHTTPMiddleware hides
        # a client's disconnect from the route, and cancelling work when the client leaves needs it.
        if not api_key:
            return None
        given = request.headers.get("authorization", "")
        if secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return None
        return _error(ErrorCode.INVALID_AUTH_KEY, "a valid API key is required: send 'Authorization: Bearer KEY'",
                      401)

    async def model_names(request: Request) -> list[str] | JSONResponse:
        try:
            return await request.app.state.upstream.models(refresh=True)
        except (httpx.HTTPError, KeyError, ValueError) as e:
            return _error(ErrorCode.CONTROLLER_NO_WORKER, f"the controller at {controller_address} "
                                                          f"cannot be reached: {type(e).__name__}: {e}", 503)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "bayling"}

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        names = await model_names(request)
        if isinstance(names, Response):
            return names
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        names = await model_names(request)
        if isinstance(names, Response):
            return names
        if model_id not in names:
            return _error(ErrorCode.INVALID_MODEL, f"no worker serves model {model_id!r}; "
                                                   f"available: {', '.join(names) or 'none'}", 404)
        return JSONResponse(model_card(model_id))

    @app.get("/health")
    async def health(request: Request) -> Response:
        names = await model_names(request)
        if isinstance(names, Response):
            return names
        if not names:
            return _error(ErrorCode.CONTROLLER_NO_WORKER, "no model worker is registered with the controller", 503)
        return JSONResponse({"status": "ok", "models": names})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def complete(request: Request, chat: bool) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        upstream: Upstream = request.app.state.upstream
        track = metrics.track()
        if not is_json(request):
            track.done(REJECTED)
            return _error(ErrorCode.VALIDATION_TYPE_ERROR, "send the body as JSON with "
                                                           "Content-Type: application/json", 415)
        try:
            raw = await read_body(request, limits.max_request_bytes)
        except RequestError as e:
            track.done(REJECTED)
            return _error(e.code, e.message, 413)
        choices = None  # before the choices open, a refusal is the request's fault; after, the worker's
        try:
            body = await asyncio.to_thread(_parse, raw, limits) if len(raw) > 65536 else _parse(raw, limits)
            req = parse_openai(body, chat)
            choices = await _unless_client_leaves(request, asyncio.gather(*(_open(upstream, req, i)
                                                                             for i in range(req.n))))
            if req.stream:
                return StreamingResponse(_sse(req, choices, track), media_type="text/event-stream")
            finals = await _unless_client_leaves(request, _finish_all(choices, track))
        except ClientLeft:
            track.done(ABORTED)
            return Response(status_code=499)
        except RequestError as e:
            track.done(REJECTED if choices is None else ERROR)
            return _error(e.code, e.message, _status_for(e.code))
        except httpx.HTTPError as e:  # the controller's (a worker's are WorkerFailures)
            track.done(ERROR)
            return _error(ErrorCode.CONTROLLER_NO_WORKER, f"the controller at {controller_address} cannot be "
                                                          f"reached: {type(e).__name__}: {e}", 503)
        except Exception as e:
            track.done(ERROR)
            return _error(ErrorCode.INTERNAL_ERROR, _failure_text(e), 502)
        answer = _answer(req, finals)
        track.done("stop", answer["usage"])
        return JSONResponse(answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


def _parse(raw: bytes, limits: Limits) -> dict:
    body = parse_body(raw)
    check_text(body)
    check_limits(body, limits)
    return body


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m bayling.serve.openai_api`: serve the API until interrupted."""
    import uvicorn

    from .supervise import watch_parent

    parser = argparse.ArgumentParser(description="BayLing OpenAI-compatible API server (in front of a controller)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--controller-address", default="http://localhost:21001")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--allowed-origins", type=lambda s: tuple(o for o in s.split(",") if o), default=(),
                        help="comma-separated origins whose web pages may call the API (CORS); default none")
    add_limit_args(parser)
    args = parser.parse_args(argv)
    watch_parent()
    app = create_app(args.controller_address, args.api_key, args.allowed_origins, limits_from(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
