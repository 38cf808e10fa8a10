"""What the chat page does, independent of its layout: streaming an answer, Stop, Retry, Continue, votes.

web.py lays the page out and wires each component's events to these methods.
"""
from __future__ import annotations

import logging
import time
from contextlib import aclosing
from datetime import datetime
from typing import AsyncIterator, Optional

from ..params import GenerationParams
from .web_client import (NO_WORKER, WORKER_GONE, ControllerClient, ServeError, default_system_prompt,
                         generate_stream, until_set)
from .web_state import (CLEAR, CLEAR_WAIT_S, EMPTY_NOTE, STOP, VOTES, Session, Streams, WebConfig,
                        append_log, build_payload, error_note, message_at, no_worker_message, vote_record)

log = logging.getLogger("bayling.serve.web")

NEW, REGENERATE, CONTINUE = "new", "regenerate", "continue"
# Continue: the conversation with the cut-off answer, then this turn (never shown); the reply is appended.
CONTINUE_INSTRUCTION = "Continue your previous answer exactly where it stopped, without repeating any of it."
BUSY_NOTE = "An answer is still coming: press **Stop** first, or wait for it. Your message is still in the box."
VOTE_KINDS = {True: "upvote", False: "downvote", "Flag": "flag"}  # gr.LikeData.liked -> log type


def key_of(request, panel: str) -> tuple[str, str]:
    return (getattr(request, "session_hash", None) or "anonymous", panel)


class ChatService:
    """One method per thing a visitor can do; streaming methods yield after each change to the session."""

    def __init__(self, config: WebConfig) -> None:
        self.config = config
        self.controller = ControllerClient(config.controller_url)
        self.streams = Streams()

    # ---- models ----------------------------------------------------------------------------------------------

    async def models(self) -> list[str]:
        return await self.controller.list_models()

    async def system_for(self, model: Optional[str]) -> str:
        """The chosen model's default system prompt, to prefill the editable box."""
        if not model:
            return ""
        try:
            return await default_system_prompt(await self.controller.worker_address(model)) or ""
        except ServeError:
            return ""

    async def _pick_model(self, session: Session, model: Optional[str]) -> str:
        """The model to ask: the picked one, else (the picker was emptied while no worker was up) the
        conversation's own model or the first one served now."""
        if model:
            return model
        models = await self.controller.list_models()  # a ServeError here (controller down) says more
        if not models:
            raise ServeError(no_worker_message(self.controller.url), NO_WORKER)
        session.workers_changed = True  # the picker shows the model chosen here
        return session.model if session.model in models else models[0]

    # ---- answering -------------------------------------------------------------------------------------------

    async def answer(self, key: tuple[str, str], session: Session, model: Optional[str], system: Optional[str],
                     params: GenerationParams, mode: str = NEW) -> AsyncIterator[Session]:
        """Stream an answer into the session: a new one, another version of the last one, or its continuation."""
        token = self.streams.start(key)
        if token is None:
            session.notice = BUSY_NOTE
            yield session
            return
        try:  # however this ends (also closed by Gradio mid-stream), the panel must be freed
            session.notice, session.context_note, session.pending = "", "", True
            session.system = system if system and system.strip() else None
            session.params = {"temperature": params.temperature, "top_p": params.top_p,
                              "max_new_tokens": params.max_new_tokens}
            session.updated = time.time()
            yield session  # the user's message and the pending bubble appear at once
            state = _Reply(session, mode)
            try:
                # The whole request (controller lookup, connect, every read) runs inside until_set, so Stop
                # ends it at once even when the worker is frozen before sending headers; closing the
                # generator closes the HTTP stream, which is what makes the worker abort the request.
                async with aclosing(self._stream(session, model, params, state)) as steps:
                    async for _ in until_set(token.stopped, steps):
                        session.pending = False
                        yield session
            except ServeError as e:
                if not token.reason:  # after Stop or Clear a broken stream is expected, not news
                    state.fail(str(e))
                    if e.kind in (WORKER_GONE, NO_WORKER):
                        session.workers_changed = True
                        await self._forget_dead_workers()
            except Exception as e:  # a bug must still end in a message, not a spinner
                log.exception("answering failed")
                state.fail(f"the web server failed: {type(e).__name__}: {e}")
            session.pending = False
            state.finish(stopped=token.reason == STOP)
            if token.reason != CLEAR:  # Clear draws the empty chat itself, after this returns
                yield session
        finally:
            session.pending = False
            self.streams.finish(key, token)

    async def _stream(self, session: Session, model: Optional[str], params: GenerationParams,
                      state: "_Reply") -> AsyncIterator[None]:
        model = await self._pick_model(session, model)
        session.model = model
        address = await self.controller.worker_address(model)
        messages = session.messages + ([{"role": "user", "content": CONTINUE_INSTRUCTION}]
                                       if state.mode == CONTINUE else [])
        if state.mode == REGENERATE:
            messages = messages[:-1]  # the answer being redone is not part of the question
        payload = build_payload(model, messages, session.system, params)
        async with generate_stream(address, payload, self.config.timeout_s) as chunks:
            async for chunk in chunks:
                session.context_note = chunk.notice
                if state.update(chunk.text, chunk.usage, chunk.finish_reason):
                    yield

    async def _forget_dead_workers(self) -> None:
        try:
            await self.controller.refresh()  # the controller drops dead workers now instead of in 90 s
        except ServeError:
            pass

    async def stop(self, key: tuple[str, str]) -> None:
        """Stop the panel's answer; what was streamed so far stays, marked stopped."""
        await self.streams.stop(key, STOP)

    async def clear(self, key: tuple[str, str]) -> None:
        """End the panel's answer (if any) and wait until it has drawn its last output."""
        await self.streams.stop(key, CLEAR, wait_s=CLEAR_WAIT_S)

    def busy(self, key: tuple[str, str]) -> bool:
        return self.streams.busy(key)

    # ---- votes -----------------------------------------------------------------------------------------------

    def vote(self, key: tuple[str, str], session: Session, shown_index: int, liked: object, comment: str,
             ip: Optional[str]) -> str:
        """Log a vote on one answer, once: the same vote again logs nothing, a different one replaces it."""
        index = answer_at(session, shown_index)
        if liked in ("", None) and index is not None:  # the same icon clicked again: Gradio un-marks it
            return "Your vote stays logged; pick another one to change it."
        kind = VOTE_KINDS.get(liked if isinstance(liked, (bool, str)) else None)
        if kind not in VOTES or index is None:
            return "Votes are for the model's answers."
        if self.busy(key) and index == len(session.messages) - 1:
            return "Wait until the answer is finished to vote on it."
        version = session.messages[index].setdefault("versions", [{"content": session.messages[index]["content"],
                                                                   "stats": {}}])
        current = version[session.messages[index].get("current", len(version) - 1)]
        comment = (comment or "").strip()
        if current.get("vote") == kind and current.get("comment", "") == comment:
            return f"Your {kind} on this answer is already logged."
        now = datetime.now()
        append_log(self.config.log_dir, vote_record(kind, session, index, ip, now, comment, current.get("vote")), now)
        replaced = current.get("vote")
        current["vote"], current["comment"] = kind, comment
        return f"Thanks: your {kind} is logged" + (f" (it replaces your {replaced})." if replaced else ".")


def answer_at(session: Session, shown_index: int) -> Optional[int]:
    """The answer a click on the chat's message at shown_index means (a note under it counts as it)."""
    for j in range(shown_index, -1, -1):
        i = message_at(session, j)
        if i is not None:
            return i if session.messages[i]["role"] == "assistant" else None
    return None


class _Reply:
    """The answer being streamed into session.messages, with its stats (time to first token, tokens/s)."""

    def __init__(self, session: Session, mode: str) -> None:
        self.session, self.mode = session, mode
        self.t0 = time.monotonic()
        self.t_first: Optional[float] = None
        self.t_last = self.t0
        self.tokens: Optional[int] = None
        self.finish_reason: Optional[str] = None
        self.error = ""
        self.message: Optional[dict] = None  # the assistant message being written
        self.base = ""  # Continue: the text the new words are appended to
        self.previous = -1  # Regenerate: the version to fall back to if the new one fails

    def update(self, text: str, usage: dict, finish_reason: Optional[str]) -> bool:
        """Take one chunk (cumulative text); True when the chat must be redrawn."""
        now = time.monotonic()
        if usage.get("completion_tokens") is not None:
            self.tokens = int(usage["completion_tokens"])
        self.finish_reason = finish_reason or self.finish_reason
        if not text and self.message is None:
            return False  # keep the pending bubble until the first words
        if self.t_first is None:
            self.t_first = now
            self._open()
        self.t_last = now
        self._set(self.base + text, self.stats())
        return True

    def _open(self) -> None:
        messages = self.session.messages
        if self.mode == NEW or not messages or messages[-1]["role"] != "assistant":
            self.message = {"role": "assistant", "content": "", "stats": {}, "versions": [], "current": 0}
            messages.append(self.message)
            self.message["versions"].append({"content": "", "stats": {}})
            return
        self.message = messages[-1]
        self.message.setdefault("versions", [{"content": self.message["content"],
                                              "stats": self.message.get("stats") or {}}])
        self.previous = self.message.get("current", len(self.message["versions"]) - 1)
        if self.mode == CONTINUE:
            self.base = self.message["content"]
            self.earlier = dict(self.message.get("stats") or {})
        else:  # REGENERATE: a new version; the earlier ones stay browsable
            self.message["versions"].append({"content": "", "stats": {}})
            self.message["current"] = len(self.message["versions"]) - 1

    def _set(self, content: str, stats: dict) -> None:
        m = self.message
        m["content"], m["stats"] = content, stats
        version = m["versions"][m["current"]]
        version["content"], version["stats"] = content, stats

    def stats(self, finish: Optional[str] = None) -> dict:
        tokens = self.tokens
        stats: dict = {"tokens": tokens, "finish": finish or self.finish_reason}
        if self.t_first is not None:
            stats["ttft_s"] = round(self.t_first - self.t0, 3)
            # Decoding speed: tokens after the first over the time since the first arrived.
            if tokens and tokens > 1 and self.t_last > self.t_first:
                stats["tokens_per_s"] = round((tokens - 1) / (self.t_last - self.t_first), 2)
        if self.mode == CONTINUE and getattr(self, "earlier", None):
            stats["tokens"] = (self.earlier.get("tokens") or 0) + (tokens or 0)
        return stats

    def fail(self, message: str) -> None:
        self.error = message

    def finish(self, stopped: bool) -> None:
        """Mark how the answer ended: stopped, failed, finished, or cut off by the length limit."""
        session = self.session
        if self.message is None:  # not a word arrived
            why = self.error or ("stopped before the first words" if stopped else "")
            if why and self.mode == NEW and session.messages and session.messages[-1]["role"] == "user":
                session.messages[-1]["failed"] = why  # shown with a Retry; never sent again
            elif self.error:
                session.notice = error_note(self.error)
            elif not stopped:
                session.notice = EMPTY_NOTE
            return
        finish = "stopped" if stopped else ("error" if self.error else None)
        self._set(self.message["content"], self.stats(finish))
        if self.error:
            session.notice = error_note(self.error)
        if not self.message["content"].strip() and self.mode == REGENERATE and self.previous >= 0:
            self.message["versions"].pop()
            self.message["current"] = self.previous
            version = self.message["versions"][self.previous]
            self.message["content"], self.message["stats"] = version["content"], version["stats"]
        session.updated = time.time()
