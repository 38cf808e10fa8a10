"""Terminal displays for the chat loop: the loop drives, a ChatIO only reads and shows."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional, TextIO

from ..output import StreamChunk

USER_LABEL, ASSISTANT_LABEL = "USER", "ASSISTANT"
RICH_REDRAW_S = 1 / 15  # re-rendering Markdown costs O(text): cap the frame rate


class ChatIO:
    """Read a user turn; show an answer as it streams; show notices."""

    def read_user(self) -> Optional[str]:
        """The next user turn, or None to end the session."""
        raise NotImplementedError

    def begin_answer(self) -> None:
        pass

    def show(self, chunk: StreamChunk) -> None:
        raise NotImplementedError

    def end_answer(self, last: Optional[StreamChunk], interrupted: bool) -> None:
        pass

    def info(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class SimpleChatIO(ChatIO):
    """Plain input() and print(); --multiline reads until Ctrl-D."""

    def __init__(self, multiline: bool = False, out: TextIO = sys.stdout) -> None:
        self.multiline = multiline
        self.out = out

    def read_user(self) -> Optional[str]:
        try:
            first = input(f"{USER_LABEL}: ")
        except EOFError:
            return None
        if not self.multiline:
            return first
        lines = [first]
        while True:
            try:
                lines.append(input())
            except EOFError:
                break
        return "\n".join(lines).strip() or None

    def begin_answer(self) -> None:
        self.out.write(f"{ASSISTANT_LABEL}: ")
        self.out.flush()

    def show(self, chunk: StreamChunk) -> None:
        self.out.write(chunk.delta)
        self.out.flush()

    def end_answer(self, last: Optional[StreamChunk], interrupted: bool) -> None:
        self.out.write(" [stopped]\n" if interrupted else "\n")
        self.out.flush()


class RichChatIO(ChatIO):
    """prompt_toolkit input with history; the answer is re-rendered as Markdown while it streams."""

    def __init__(self, multiline: bool = False) -> None:
        from rich.console import Console

        self.console = Console()
        self.multiline = multiline
        self._live = None
        self._session = None
        if sys.stdin.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import InMemoryHistory

            self._session = PromptSession(history=InMemoryHistory())

    def read_user(self) -> Optional[str]:
        try:
            if self._session is None:  # not a terminal (piped input): plain lines
                return input(f"{USER_LABEL}: ")
            hint = " (Esc then Enter to send)" if self.multiline else ""
            self.console.print(f"[bold]{USER_LABEL}[/bold]{hint}:")
            return self._session.prompt("> ", multiline=self.multiline)
        except EOFError:
            return None

    def begin_answer(self) -> None:
        from rich.live import Live

        self.console.print(f"[bold]{ASSISTANT_LABEL}[/bold]:")
        # No refresh thread: a Ctrl-C landing mid-refresh would leave a half-drawn frame behind.
        self._live = Live(console=self.console, auto_refresh=False, vertical_overflow="visible")
        self._live.start()
        self._last_draw = 0.0

    def show(self, chunk: StreamChunk) -> None:
        from rich.markdown import Markdown

        now = time.monotonic()
        if now - self._last_draw < RICH_REDRAW_S:
            return
        self._last_draw = now
        # Markdown needs the whole text: a list or code block changes how earlier lines render.
        self._live.update(Markdown(chunk.text), refresh=True)

    def end_answer(self, last: Optional[StreamChunk], interrupted: bool) -> None:
        if self._live is not None:
            if last is not None:
                from rich.markdown import Markdown

                self._live.update(Markdown(last.text), refresh=True)
            self._live.stop()
            self._live = None
        if interrupted:
            self.console.print("[dim]\\[stopped][/dim]")

    def info(self, text: str) -> None:
        from rich.markup import escape

        self.console.print(f"[dim]{escape(text)}[/dim]", highlight=False)


MAX_TURN_CHARS = 1_000_000


class ProgrammaticChatIO(ChatIO):
    """For scripts: one turn per stdin line, plain text or one JSON value (string or {"content": ...}).

    A plain-text turn gets its answer as plain text and a newline; a JSON turn gets one JSON line
    {"role", "content", "finish_reason", "usage"}. A JSON turn is always text for the model, never a
    `!!` command: commands are plain lines or an explicit {"command": "!!save FILE"}. A turn that
    cannot be used (malformed JSON, an unknown shape, over MAX_TURN_CHARS) gets one {"error": ...}
    line and the session goes on. Notices go to stderr so stdout stays parseable.
    """

    def __init__(self, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
        self.inp, self.out = inp, out
        self._json_turn = False
        self.text_only = False  # the last turn must not be read as a command

    def _error(self, message: str) -> None:
        self.out.write(json.dumps({"error": message}, ensure_ascii=False) + "\n")
        self.out.flush()

    def read_user(self) -> Optional[str]:
        while True:
            line = self.inp.readline()
            if not line:
                return None
            text = line.rstrip("\n")
            if len(text) > MAX_TURN_CHARS:
                self._error(f"turn of {len(text)} characters is longer than {MAX_TURN_CHARS}; skipped")
                continue
            self._json_turn = text.lstrip().startswith(("{", '"', "["))
            self.text_only = self._json_turn
            if not self._json_turn:
                return text
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                self._error(f"malformed JSON turn ({e}); skipped")
                continue
            if isinstance(value, dict) and set(value) == {"command"} and isinstance(value["command"], str):
                self._json_turn = self.text_only = False
                return value["command"]
            if isinstance(value, dict) and isinstance(value.get("content", value.get("message")), str):
                return value.get("content", value.get("message"))
            if isinstance(value, str):
                return value
            self._error('a JSON turn must be a string, {"content": "..."} or {"command": "!!..."}; skipped')

    def show(self, chunk: StreamChunk) -> None:
        if not self._json_turn:
            self.out.write(chunk.delta)
            self.out.flush()

    def end_answer(self, last: Optional[StreamChunk], interrupted: bool) -> None:
        if self._json_turn:
            record = {"role": "assistant", "content": last.text if last else "",
                      "finish_reason": last.finish_reason if last else "abort",
                      "usage": last.usage if last else None}
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            self.out.write("\n")
        self.out.flush()


def make_chatio(style: str, multiline: bool = False) -> ChatIO:
    """The display for --style simple|rich|programmatic."""
    if style == "simple":
        return SimpleChatIO(multiline)
    if style == "rich":
        return RichChatIO(multiline)
    if style == "programmatic":
        return ProgrammaticChatIO()
    raise ValueError(f"unknown --style {style!r}; choose simple, rich or programmatic")
