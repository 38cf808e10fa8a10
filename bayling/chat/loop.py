"""The chat loop: commands, history and streaming one answer per user turn."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..context import fit_conversation
from ..generation import default_engine, generate_stream
from ..tokens import PromptTooLongError
from ..loading import LoadedModel
from ..output import StreamChunk
from ..params import GenerationParams
from ..templates import ASSISTANT, USER, Conversation, params_for_template
from .io import ChatIO

HELP = ("commands: !!exit, !!reset (or q), !!remove, !!regen, !!save FILE, !!load FILE, !!system TEXT; "
        "an empty line or Ctrl-D exits; Ctrl-C stops an answer")


@dataclass
class ChatSession:
    """A model, its conversation and the sampling settings, independent of any display."""

    loaded: LoadedModel
    conv: Conversation
    params: GenerationParams
    debug: bool = False
    last_stats: dict = field(default_factory=dict)
    engine: Any = None  # built once from the engine flags; None = a default one, built at the first answer

    def reply(self, chatio: ChatIO) -> Optional[StreamChunk]:
        """Stream an answer to the conversation so far and append it to the history."""
        tok = self.loaded.tokenizer
        if self.engine is None:
            self.engine = default_engine(self.loaded.model, tok, self.params, self.loaded.context_len)
        fitted = fit_conversation(self.conv, tok, self.engine.context_len, self.params.max_new_tokens)
        if fitted.notice:
            chatio.info(fitted.notice)
        if self.debug:
            chatio.info(f"[prompt]\n{fitted.prompt}")
        params = params_for_template(self.params, self.conv.template, tok)
        stream = generate_stream(self.loaded.model, tok, fitted.input_ids, params, engine=self.engine)
        last, interrupted = None, False
        start = time.perf_counter()
        first_at = None
        chatio.begin_answer()
        try:
            for last in stream:
                first_at = first_at or time.perf_counter()
                chatio.show(last)
        except KeyboardInterrupt:  # Ctrl-C: stop this answer, keep the session
            interrupted = True
        finally:
            stream.close()
            chatio.end_answer(last, interrupted)
        elapsed = time.perf_counter() - start
        text = last.text if last else ""
        self.conv.add(ASSISTANT, text)
        if last is not None:
            decode_s = max(elapsed - ((first_at or start) - start), 1e-9)
            self.last_stats = {"completion_tokens": last.completion_tokens, "seconds": round(elapsed, 3),
                               "tokens_per_s": round(last.completion_tokens / max(elapsed, 1e-9), 2),
                               "decode_tokens_per_s": round(max(last.completion_tokens - 1, 0) / decode_s, 2),
                               "finish_reason": last.finish_reason}
            if self.debug:
                chatio.info(f"[stats] {json.dumps(self.last_stats)}")
        return last


def _drop_last_answer(conv: Conversation) -> bool:
    if conv.messages and conv.messages[-1].role == ASSISTANT:
        conv.messages.pop()
        return True
    return False


def handle_command(session: ChatSession, line: str, chatio: ChatIO) -> Optional[str]:
    """Run a !! command (or upstream's 'q'). Returns 'exit', 'regen', 'handled' or None (not a command)."""
    conv = session.conv
    if line == "q" or line == "!!reset":
        conv.messages.clear()
        chatio.info("history cleared")
        return "handled"
    if not line.startswith("!!"):
        return None
    cmd, _, arg = line[2:].partition(" ")
    arg = arg.strip()
    if cmd == "exit":
        return "exit"
    if cmd == "remove":
        _drop_last_answer(conv)
        if conv.messages and conv.messages[-1].role == USER:
            conv.messages.pop()
            chatio.info("removed the last turn")
        else:
            chatio.info("nothing to remove")
        return "handled"
    if cmd == "regen":
        if not _drop_last_answer(conv) and not (conv.messages and conv.messages[-1].role == USER):
            chatio.info("nothing to regenerate")
            return "handled"
        return "regen"
    if cmd == "save":
        if not arg:
            chatio.info("usage: !!save FILE")
            return "handled"
        try:
            Path(arg).write_text(json.dumps(conv.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
        except OSError as e:
            chatio.info(f"could not save to {arg}: {e.strerror or e}")
            return "handled"
        chatio.info(f"saved {len(conv.messages)} messages to {arg}")
        return "handled"
    if cmd == "load":
        try:
            loaded = Conversation.from_dict(json.loads(Path(arg).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            chatio.info(f"could not load {arg or '(no file given)'}: {e}")
            return "handled"
        session.conv = loaded
        chatio.info(f"loaded {len(loaded.messages)} messages (template {loaded.template.name}) from {arg}")
        return "handled"
    if cmd == "system":
        conv.system = arg or None
        chatio.info("system prompt set" if arg else "system prompt reset to the template's default")
        return "handled"
    chatio.info(f"unknown command !!{cmd}; {HELP}")
    return "handled"


def chat_loop(session: ChatSession, chatio: ChatIO) -> None:
    """Read turns until exit; each user turn gets a streamed answer."""
    while True:
        try:
            line = chatio.read_user()
        except KeyboardInterrupt:
            chatio.info("(Ctrl-C at the prompt: type !!exit or press Ctrl-D to quit)")
            continue
        if line is None or not line.strip():
            break
        line = line.strip() if line.strip().startswith("!!") or line.strip() == "q" else line
        action = None if getattr(chatio, "text_only", False) else handle_command(session, line, chatio)
        if action == "exit":
            break
        if action == "handled":
            continue
        if action != "regen":
            session.conv.add(USER, line)
        try:
            session.reply(chatio)
        except PromptTooLongError as e:
            if session.conv.messages and session.conv.messages[-1].role == USER:
                session.conv.messages.pop()
            chatio.info(f"error: {e}")
