"""The web page's HTTP client: FastChat's controller and our model worker, every failure one readable line."""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, TypeVar

import httpx

STREAM_DELIMITER = b"\0"
CONNECT_TIMEOUT_S = 3.0  # a live server on the LAN accepts in milliseconds; a dead one is refused at once
CONTROL_TIMEOUT_S = 10.0  # controller calls; refresh_all_workers probes every worker with a 5 s timeout
DEFAULT_READ_TIMEOUT_S = 60.0  # longest silence between two streamed chunks (queueing + prefill)
ERROR_PREVIEW_CHARS = 300

# ServeError kinds: what went wrong decides what the page does next.
CONTROLLER_DOWN = "controller_down"
NO_WORKER = "no_worker"
WORKER_GONE = "worker_gone"  # refused or dropped: ask the controller to forget it
TIMEOUT = "timeout"
WORKER_ERROR = "worker_error"  # the worker answered with error_code != 0 (prompt too long, bad params...)


class ServeError(Exception):
    """A failure to show in the page; str(e) is one line a user can act on."""

    def __init__(self, message: str, kind: str = WORKER_ERROR) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Chunk:
    """One streamed message from the worker; text is the whole answer so far."""

    text: str
    error_code: int = 0
    finish_reason: Optional[str] = None
    usage: dict = field(default_factory=dict)
    notice: str = ""  # set by our worker when old messages were left out to fit the context window


def split_stream(buffer: bytes, data: bytes) -> tuple[list[bytes], bytes]:
    """Split buffered bytes on the NUL delimiter: (complete chunks, incomplete rest)."""
    *complete, rest = (buffer + data).split(STREAM_DELIMITER)
    return [c for c in complete if c.strip()], rest


def parse_chunk(raw: bytes) -> Chunk:
    """Decode one NUL-delimited JSON chunk; a malformed one is a ServeError, not a crash."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ServeError(f"the worker sent a malformed chunk: {raw[:80]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("text", ""), str):
        raise ServeError(f"the worker sent an unexpected chunk: {str(data)[:80]}")
    return Chunk(text=data.get("text", ""), error_code=int(data.get("error_code") or 0),
                 finish_reason=data.get("finish_reason"), usage=data.get("usage") or {},
                 notice=data.get("notice") if isinstance(data.get("notice"), str) else "")


def _timeout(read_s: float) -> httpx.Timeout:
    return httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=read_s, write=read_s, pool=CONNECT_TIMEOUT_S)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


class ControllerClient:
    """Model list and worker addresses from a FastChat controller."""

    def __init__(self, url: str, timeout_s: float = CONTROL_TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    async def _post(self, path: str, body: Optional[dict] = None) -> Any:
        try:
            async with httpx.AsyncClient(timeout=_timeout(self.timeout_s)) as client:
                response = await client.post(self.url + path, json=body)
        except httpx.TimeoutException:
            raise ServeError(f"the controller at {self.url} did not answer within {self.timeout_s:g} s",
                             CONTROLLER_DOWN) from None
        except httpx.HTTPError as e:
            raise ServeError(f"cannot reach the controller at {self.url} ({_first_line(e)}); "
                             "is `python -m fastchat.serve.controller` running?", CONTROLLER_DOWN) from None
        if response.status_code != 200:
            raise ServeError(f"the controller at {self.url} answered HTTP {response.status_code} to {path}",
                             CONTROLLER_DOWN)
        try:
            return response.json() if response.content else None
        except ValueError:
            raise ServeError(f"the controller at {self.url} sent a reply that is not JSON to {path}",
                             CONTROLLER_DOWN) from None

    async def refresh(self) -> None:
        """Make the controller re-probe its workers, dropping the ones that no longer answer."""
        await self._post("/refresh_all_workers")

    async def list_models(self, refresh: bool = True) -> list[str]:
        """Names of the models some live worker serves, sorted."""
        if refresh:
            await self.refresh()
        data = await self._post("/list_models")
        return sorted(data.get("models", [])) if isinstance(data, dict) else []

    async def worker_address(self, model: str) -> str:
        """The address of a worker serving model; ServeError(NO_WORKER) when none is registered."""
        data = await self._post("/get_worker_address", {"model": model})
        address = data.get("address", "") if isinstance(data, dict) else ""
        if not address:
            raise ServeError(f"no worker serves {model!r} any more; pick another model or start "
                             f"`python -m bayling.serve.worker --controller-address {self.url}`", NO_WORKER)
        return address


async def default_system_prompt(address: str, timeout_s: float = CONTROL_TIMEOUT_S) -> Optional[str]:
    """The system prompt the worker's template uses when none is sent (None if it has none)."""
    try:
        async with httpx.AsyncClient(timeout=_timeout(timeout_s)) as client:
            response = await client.post(address.rstrip("/") + "/worker_get_conv_template")
        conv = response.json().get("conv", {}) if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    system = conv.get("system_message") if isinstance(conv, dict) else None
    return system if isinstance(system, str) else None


@asynccontextmanager
async def generate_stream(address: str, payload: dict, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
                          ) -> AsyncIterator[AsyncIterator[Chunk]]:
    """`async with generate_stream(...) as chunks: async for chunk in chunks` — leaving the block
    (finished, stopped or cancelled) closes the connection, which makes the worker abort the request."""
    url = address.rstrip("/") + "/worker_generate_stream"
    async with httpx.AsyncClient(timeout=_timeout(read_timeout_s)) as client:
        try:
            request = client.build_request("POST", url, json=payload)
            response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise _stream_error(e, address, read_timeout_s, started=False) from None
        try:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")[:ERROR_PREVIEW_CHARS]
                raise ServeError(f"the worker answered HTTP {response.status_code}: {body}")
            yield _chunks(response, address, read_timeout_s)
        finally:
            await response.aclose()


async def _chunks(response: httpx.Response, address: str, read_timeout_s: float) -> AsyncIterator[Chunk]:
    buffer, finished = b"", False
    try:
        async for data in response.aiter_raw():
            pieces, buffer = split_stream(buffer, data)
            for raw in pieces:
                chunk = parse_chunk(raw)
                if chunk.error_code:
                    raise ServeError(chunk.text.strip() or f"the worker failed (error_code {chunk.error_code})")
                finished = finished or chunk.finish_reason is not None
                yield chunk
    except httpx.HTTPError as e:
        raise _stream_error(e, address, read_timeout_s, started=True) from None
    if buffer.strip():
        yield parse_chunk(buffer)
    elif not finished:
        raise ServeError(f"the worker at {address} closed the stream before finishing the answer", WORKER_GONE)


T = TypeVar("T")


async def until_set(event: asyncio.Event, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Iterate items until event is set, even while waiting for the next one (a slow or silent worker)."""
    stopped = asyncio.ensure_future(event.wait())
    try:
        while not event.is_set():
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()  # interrupts the socket read; the caller's `async with` then closes the stream
                await asyncio.gather(step, return_exceptions=True)
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stopped.cancel()


def _stream_error(e: httpx.HTTPError, address: str, read_timeout_s: float, started: bool) -> ServeError:
    if isinstance(e, httpx.ConnectTimeout):
        return ServeError(f"the worker at {address} did not accept a connection within "
                          f"{CONNECT_TIMEOUT_S:g} s", TIMEOUT)
    if isinstance(e, httpx.TimeoutException):
        return ServeError(f"the worker at {address} sent nothing for {read_timeout_s:g} s; "
                          "the request was cancelled (is it overloaded or stuck?)", TIMEOUT)
    if started:
        return ServeError(f"the connection to the worker at {address} broke mid-answer "
                          f"({_first_line(e)}); the worker may have died", WORKER_GONE)
    return ServeError(f"cannot reach the worker at {address} ({_first_line(e)}); "
                      "it may have died", WORKER_GONE)
