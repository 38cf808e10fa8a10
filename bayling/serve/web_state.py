"""The chat page's state and plain logic, free of Gradio: sessions, requests, vote logs, streams.

Kept apart from web.py (the Gradio layout and handlers) so each reads in one sitting and the
logic can be tested without building a page.
"""
from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..params import GenerationParams
from ..translation import LANGUAGES, translation_instruction  # noqa: F401 (the page's names for them)
from .web_client import DEFAULT_READ_TIMEOUT_S

CHAT, TRANSLATE = "chat", "translate"
VOTES = ("upvote", "downvote", "flag")
STOPPED_NOTE = "*(stopped)*"
EMPTY_NOTE = "*(the model ended its answer without any text; try Regenerate)*"
REFINE_EXAMPLES = ["Make it more formal.", "Make it shorter.", "Use simpler words.", "换一种更口语化的说法。"]
# No web fonts: the page must look right on machines without internet access.
THEME_FONT = ["system-ui", "-apple-system", "Segoe UI", "Noto Sans", "PingFang SC", "sans-serif"]
CSS = """
#bayling-title h1 { margin-bottom: 0; }
.vote-status { min-height: 1.5em; font-size: 0.9em; opacity: 0.8; }
"""


@dataclass(frozen=True)
class WebConfig:
    """What the page needs to know about the serving stack."""

    controller_url: str = "http://127.0.0.1:21001"
    log_dir: str = "logs"
    timeout_s: float = DEFAULT_READ_TIMEOUT_S  # longest silence from a worker before the page gives up
    concurrency: int = 16  # answers streamed at once across all visitors
    title: str = "BayLing"


@dataclass
class Session:
    """One panel's conversation in one browser tab. `messages` is what the model sees; `notice` is shown only."""

    messages: list[dict] = field(default_factory=list)
    notice: str = ""  # an error or "(stopped)"
    context_note: str = ""  # the worker left old messages out to fit the context window
    model: str = ""
    system: Optional[str] = None
    params: dict = field(default_factory=dict)
    workers_changed: bool = False  # a worker vanished: the model list needs a refresh


# ---- pure helpers -------------------------------------------------------------------------------------------

def read_params(temperature: float, top_p: float, max_new_tokens: float) -> GenerationParams:
    """The sampling controls as validated GenerationParams (sliders hand over floats)."""
    return GenerationParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))


def build_payload(model: str, messages: list[dict], system: Optional[str], params: GenerationParams) -> dict:
    """The worker_generate_stream request: the worker renders `messages` with the model's own template."""
    return {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "system": system if system and system.strip() else None,  # None = the template's default
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "echo": False,
    }


def no_worker_message(controller_url: str) -> str:
    return (f"no model worker is registered with the controller at {controller_url}; start one with "
            f"`python model_worker.py --controller-address {controller_url}`, then press ↻")


def error_note(message: str) -> str:
    return f"⚠️ **Error:** {message}"


def render_chat(session: Session) -> list[dict]:
    """What the Chatbot shows: the conversation, then the notes (context window, error, stopped) if any."""
    shown = [{"role": m["role"], "content": m["content"]} for m in session.messages]
    for note in (session.context_note and f"*{session.context_note}*", session.notice):
        if note:
            shown.append({"role": "assistant", "content": note})
    return shown


def log_path(log_dir: str | Path, day: datetime) -> Path:
    """One JSONL file per day, e.g. logs/2024-05-01-conv.json."""
    return Path(log_dir) / f"{day:%Y-%m-%d}-conv.json"


def vote_record(kind: str, session: Session, ip: Optional[str], now: datetime) -> dict:
    """One log line: what was voted on, with everything needed to replay it."""
    if kind not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {kind!r}")
    record = {"tstamp": round(now.timestamp(), 3), "type": kind, "model": session.model,
              "state": {"system": session.system, "messages": [dict(m) for m in session.messages],
                        "params": dict(session.params)}}
    if ip:
        record["ip"] = ip
    return record


_LOG_LOCK = threading.Lock()  # Gradio runs sync handlers in threads; one line must not interleave with another


def append_log(log_dir: str | Path, record: dict, now: datetime) -> Path:
    """Append one JSON line to today's log file; returns its path."""
    path = log_path(log_dir, now)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOG_LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def drop_empty_reply(session: Session) -> bool:
    """Remove a trailing answer with no text; True if the conversation now ends with a real answer."""
    if session.messages and session.messages[-1]["role"] == "assistant" and not session.messages[-1]["content"].strip():
        session.messages.pop()
    return bool(session.messages) and session.messages[-1]["role"] == "assistant"


# ---- streaming ----------------------------------------------------------------------------------------------

STOP, CLEAR = "stop", "clear"
CLEAR_WAIT_S = 3.0


class StreamToken:
    """One answer being streamed; `reason` says why it was ended early (stop or clear)."""

    def __init__(self) -> None:
        self.reason = ""
        self.stopped = asyncio.Event()  # set by Stop/Clear: the stream leaves its read at once
        self.done = asyncio.Event()  # set by the stream when it has written its last output


class Streams:
    """The answer each (browser tab, panel) is streaming, so that Stop and Clear can end it.

    The streaming handler stays the only writer of its chat: Stop just signals it, and it draws
    '(stopped)' itself. (Gradio's `cancels=` races the cancelled event's last output against the
    Stop handler's, and can leave an 'Error' badge on the chat.) Everything runs on Gradio's event loop.
    """

    def __init__(self) -> None:
        self._active: dict[tuple[str, str], StreamToken] = {}

    def start(self, key: tuple[str, str]) -> Optional[StreamToken]:
        """A token for a new answer, or None while this panel is still streaming one."""
        if key in self._active:
            return None
        token = self._active[key] = StreamToken()
        return token

    async def stop(self, key: tuple[str, str], reason: str = STOP, wait_s: float = 0.0) -> bool:
        """Signal the panel's answer to end; with wait_s, wait until it has drawn its last output."""
        token = self._active.get(key)
        if token is None:
            return False
        token.reason = token.reason or reason
        token.stopped.set()
        if wait_s:
            try:
                await asyncio.wait_for(token.done.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
        return True

    def busy(self, key: tuple[str, str]) -> bool:
        return key in self._active

    def finish(self, key: tuple[str, str], token: StreamToken) -> None:
        if self._active.get(key) is token:
            del self._active[key]
        token.done.set()
