"""Our OpenAI-compatible API: /v1/models, /v1/chat/completions and /v1/completions, streaming or not.

FastChat's own server (fastchat.serve.openai_api_server 0.2.36) works with our worker for non-streaming
requests, but every `stream: true` request fails under pydantic 2 (a TypeError in its SSE encoder, the
client gets an empty body), and it renders chat prompts itself from the worker's conv dict. This app
asks the controller for a worker like FastChat's does, then sends chat requests as `messages` (the
worker renders them with the model's exact template and fits them into the context window).

    python -m bayling.serve.openai_api --controller-address http://localhost:21001 --port 8000
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator, Optional

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastchat.constants import WORKER_API_TIMEOUT, ErrorCode

from .protocol import STREAM_DELIMITER, RequestError, parse_body

DEFAULT_PORT = 8000
CONTROLLER_TIMEOUT_S = 10.0
# Chat parameters we pass to the worker as they are; the worker validates them.
PASSED_PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos")


def _error(code: int, message: str, status: int = 400) -> JSONResponse:
    # FastChat's ErrorResponse fields plus OpenAI's error object, so either kind of client reads it.
    return JSONResponse({"object": "error", "message": message, "code": int(code),
                         "error": {"message": message, "type": "invalid_request_error", "code": int(code)}},
                        status_code=status)


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
        """The worker's NUL-delimited chunks, decoded."""
        async with self.client.stream("POST", worker + "/worker_generate_stream", json=payload) as r:
            buffer = b""
            async for raw in r.aiter_raw():
                buffer += raw
                while (end := buffer.find(STREAM_DELIMITER)) >= 0:
                    piece, buffer = buffer[:end], buffer[end + 1:]
                    if piece:
                        yield json.loads(piece)


def _worker_payload(body: dict, chat: bool) -> dict:
    """OpenAI request fields -> our worker's request (messages for chat, prompt for completions)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "'model' (a string) is required")
    if body.get("n", 1) not in (1, None):
        raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, "only n=1 is supported")
    payload: dict = {"model": model}
    for key in PASSED_PARAMS:
        if body.get(key) is not None:
            payload[key] = body[key]
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None:
        payload["max_new_tokens"] = max_tokens
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "'messages' must be a non-empty list")
        payload["messages"] = [{"role": m.get("role"), "content": _text(m.get("content"))}
                               if isinstance(m, dict) else m for m in messages]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, "'prompt' must be a string (one prompt per request)")
        payload["prompt"] = prompt
        payload["echo"] = bool(body.get("echo", False))
    return payload


def _text(content: Any) -> Any:
    """OpenAI content may be a list of parts; keep its text parts."""
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content


def _usage(chunk: dict) -> dict:
    return chunk.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


async def _sse(upstream: Upstream, worker: str, payload: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created, model = int(time.time()), payload["model"]
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: Optional[str], finish: Optional[str], usage: Optional[dict] = None, role: bool = False) -> str:
        if chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    if chat:
        yield event(None, None, role=True)
    sent = ""
    try:
        async for chunk in upstream.generate(worker, payload):
            if chunk.get("error_code", 0):
                yield f"data: {json.dumps({'error': {'message': chunk['text'], 'code': chunk['error_code']}})}\n\n"
                break
            text = chunk["text"]
            if len(text) > len(sent):
                yield event(text[len(sent):], None)
                sent = text
            if chunk.get("finish_reason"):
                yield event(None, chunk["finish_reason"], _usage(chunk) if include_usage else None)
                break
    except httpx.HTTPError as e:
        yield f"data: {json.dumps({'error': {'message': f'worker failed: {e}', 'code': ErrorCode.INTERNAL_ERROR}})}\n\n"
    yield "data: [DONE]\n\n"


def create_app(controller_address: str) -> FastAPI:
    """The OpenAI-compatible app in front of a FastChat controller."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.upstream = Upstream(controller_address)
        yield
        await app.state.upstream.client.aclose()

    app = FastAPI(title="BayLing OpenAI-compatible API", lifespan=lifespan)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        names = await request.app.state.upstream.models(refresh=True)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "bayling"}
                                           for n in names]}

    async def complete(request: Request, chat: bool) -> Response:
        upstream: Upstream = request.app.state.upstream
        try:
            body = parse_body(await request.body())
            payload = _worker_payload(body, chat)
            worker = await upstream.worker_for(payload["model"])
        except RequestError as e:
            return _error(e.code, e.message, 404 if e.code == ErrorCode.INVALID_MODEL else 400)
        except httpx.HTTPError as e:
            return _error(ErrorCode.CONTROLLER_NO_WORKER, f"controller unreachable: {e}", 503)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(upstream, worker, payload, chat, include_usage),
                                     media_type="text/event-stream")
        last: dict = {}
        try:
            async for last in upstream.generate(worker, payload):
                if last.get("error_code", 0):
                    status = 500 if last["error_code"] >= 50000 else 400
                    return _error(last["error_code"], last["text"], status)
        except httpx.HTTPError as e:
            return _error(ErrorCode.INTERNAL_ERROR, f"worker failed: {e}", 502)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        finish = last.get("finish_reason") or "stop"
        choice = ({"index": 0, "message": {"role": "assistant", "content": last.get("text", "")},
                   "finish_reason": finish} if chat else
                  {"index": 0, "text": last.get("text", ""), "logprobs": None, "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": payload["model"], "choices": [choice],
                             "usage": _usage(last)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m bayling.serve.openai_api`: serve the API until interrupted."""
    import uvicorn

    parser = argparse.ArgumentParser(description="BayLing OpenAI-compatible API server (in front of a controller)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--controller-address", default="http://localhost:21001")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.controller_address), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
