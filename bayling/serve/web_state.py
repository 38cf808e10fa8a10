"""The chat page's state and plain logic, free of Gradio: sessions, requests, vote logs, streams.

Kept apart from web.py (the Gradio layout and handlers) so each reads in one sitting and the
logic can be tested without building a page.
"""
from __future__ import annotations

import asyncio
import json
import html
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

from ..params import GenerationParams
from ..translation import LANGUAGES, translation_instruction  # noqa: F401 (the page's names for them)
from .web_client import DEFAULT_READ_TIMEOUT_S
from .web_store import new_id, title_from

CHAT, TRANSLATE = "chat", "translate"
VOTES = ("upvote", "downvote", "flag")
EMPTY_NOTE = "*(the model ended its answer without any text; try Regenerate)*"
REFINE_EXAMPLES = ["Make it more formal.", "Make it shorter.", "Use simpler words.", "换一种更口语化的说法。"]
# No web fonts: the page must look right on machines without internet access.
THEME_FONT = ["system-ui", "-apple-system", "Segoe UI", "Noto Sans", "PingFang SC", "sans-serif"]
CSS = """
#bayling-title h2 { margin: 0; }
.vote-status { min-height: 1.2em; font-size: 0.9em; opacity: 0.85; }
.answer-stats { font-size: 0.8em; opacity: 0.7; }
.answer-stats.finish-length, .answer-stats.finish-stopped, .answer-stats.finish-error { opacity: 1; font-weight: 600; }
.bayling-pending i { display: inline-block; width: 0.5em; height: 0.5em; margin: 0 0.15em; border-radius: 50%;
  background: currentColor; animation: bayling-blink 1.2s infinite ease-in-out both; }
.bayling-pending i:nth-child(2) { animation-delay: 0.2s; } .bayling-pending i:nth-child(3) { animation-delay: 0.4s; }
@keyframes bayling-blink { 0%, 80%, 100% { opacity: 0.2; } 40% { opacity: 1; } }
@media (max-width: 768px) {
  #chat-chatbot { height: 52vh !important; }
  .answer-actions button, .input-row button { padding: 4px 8px; }
}
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
    """The conversation on screen in one panel of one browser tab (see web_store.py for the message shape).

    `messages` is what the model sees (failed user messages excepted); `notice` and `pending` are shown only."""

    messages: list[dict] = field(default_factory=list)
    notice: str = ""  # an error or a note for the visitor
    context_note: str = ""  # the worker left old messages out to fit the context window
    model: str = ""
    system: Optional[str] = None
    params: dict = field(default_factory=dict)
    workers_changed: bool = False  # a worker vanished: the model list needs a refresh
    pending: bool = False  # asked, no words yet: the chat shows a pending bubble
    id: str = field(default_factory=new_id)
    title: str = ""
    renamed: bool = False
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_stored(self) -> dict:
        """The JSON-able conversation that gr.BrowserState keeps."""
        first = next((m.get("shown", m["content"]) for m in self.messages if m["role"] == "user"), "")
        title = self.title if self.renamed and self.title else title_from(first)
        return {"id": self.id, "title": title, "renamed": self.renamed, "messages": [dict(m) for m in self.messages],
                "model": self.model, "system": self.system, "params": dict(self.params),
                "created": self.created, "updated": self.updated}

    @classmethod
    def from_stored(cls, conv: dict) -> "Session":
        return cls(messages=[dict(m) for m in conv["messages"]], model=conv.get("model", ""),
                   system=conv.get("system"), params=dict(conv.get("params") or {}), id=conv["id"],
                   title=conv.get("title", ""), renamed=bool(conv.get("renamed")),
                   created=conv.get("created", time.time()), updated=conv.get("updated", time.time()))


# ---- pure helpers -------------------------------------------------------------------------------------------

def read_params(temperature: float, top_p: float, max_new_tokens: float) -> GenerationParams:
    """The sampling controls as validated GenerationParams (sliders hand over floats)."""
    return GenerationParams(temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens))


def build_payload(model: str, messages: list[dict], system: Optional[str], params: GenerationParams) -> dict:
    """The worker_generate_stream request: the worker renders `messages` with the model's own template."""
    return {
        "model": model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages if not m.get("failed")],
        "system": system if system and system.strip() else None,  # None = the template's default
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_new_tokens": params.max_new_tokens,
        "echo": False,
    }


def no_worker_message(controller_url: str) -> str:
    return (f"no model worker is registered with the controller at {controller_url}; start one with "
            f"`python -m bayling.serve.worker --controller-address {controller_url}`, then press ↻")


def error_note(message: str) -> str:
    return f"⚠️ **Error:** {message}"


PENDING_HTML = ('<span class="bayling-pending" role="status" aria-label="Waiting for the answer">'
                '<i></i><i></i><i></i></span>')
FINISH_LABELS = {"stop": "finished", "length": "length limit reached", "stopped": "stopped", "error": "failed"}


def stats_line(stats: dict, version: int = 0, versions: int = 1) -> str:
    """'42 tokens · 8.1 tokens/s · first token 0.93 s · length limit reached' (HTML, drawn small)."""
    parts = []
    if stats.get("tokens") is not None:
        parts.append(f"{stats['tokens']} tokens")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tokens/s")
    if stats.get("ttft_s") is not None:
        parts.append(f"first token {stats['ttft_s']:.2f} s")
    finish = stats.get("finish")
    if finish:
        parts.append(FINISH_LABELS.get(finish, html.escape(str(finish))))
    if versions > 1:
        parts.append(f"version {version + 1} of {versions}")
    return f'<span class="answer-stats finish-{html.escape(str(finish or ""))}">{" · ".join(parts)}</span>'


def render_chat(session: Session) -> list[dict]:
    """What the Chatbot shows: each message (the user's own text, not an instruction built from it), a stats
    line under each answer, a failure note under a failed message, then the pending bubble and notes."""
    shown = []
    for i, m in enumerate(session.messages):
        if m["role"] == "user":
            shown.append({"role": "user", "content": m.get("shown", m["content"])})
            if m.get("failed"):
                shown.append({"role": "assistant", "content": error_note(f"not answered: {m['failed']} "
                                                                         "(press ↻ Retry to send it again)")})
            continue
        shown.append({"role": "assistant", "content": m["content"]})
        if m.get("stats"):
            shown.append({"role": "assistant", "content": stats_line(m["stats"], m.get("current", 0),
                                                                     len(m.get("versions") or [0]))})
    if session.pending:
        shown.append({"role": "assistant", "content": PENDING_HTML})
    for note in (session.context_note and f"*{session.context_note}*", session.notice):
        if note:
            shown.append({"role": "assistant", "content": note})
    return shown


def message_at(session: Session, shown_index: int) -> Optional[int]:
    """The index in session.messages of the message drawn at shown_index (a stats line maps to its answer)."""
    k = -1
    for i, m in enumerate(session.messages):
        k += 1
        if k == shown_index:
            return i
        if (m["role"] == "user" and m.get("failed")) or (m["role"] == "assistant" and m.get("stats")):
            k += 1
            if k == shown_index:
                return i
    return None


def log_path(log_dir: str | Path, day: datetime) -> Path:
    """One JSONL file per day, e.g. logs/2024-05-01-conv.json."""
    return Path(log_dir) / f"{day:%Y-%m-%d}-conv.json"


def vote_record(kind: str, session: Session, index: int, ip: Optional[str], now: datetime,
                comment: str = "", replaces: Optional[str] = None) -> dict:
    """One log line for a vote on the answer session.messages[index], with what is needed to replay it."""
    if kind not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {kind!r}")
    answer = session.messages[index]
    record = {"tstamp": round(now.timestamp(), 3), "type": kind, "model": session.model,
              "conversation": session.id, "answer": index, "version": answer.get("current", 0),
              "state": {"system": session.system,
                        "messages": [{"role": m["role"], "content": m["content"]}
                                     for m in session.messages[:index + 1] if not m.get("failed")],
                        "params": dict(session.params), "stats": dict(answer.get("stats") or {})}}
    if comment.strip():
        record["comment"] = comment.strip()
    if replaces:
        record["replaces"] = replaces
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
