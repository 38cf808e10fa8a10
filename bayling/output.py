"""Per-sequence output handling shared by every generation loop: text, stops, placeholders, usage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from .deanon import deanonymize, partial_suffix_len, safe_prefix_len
from .detok import REPLACEMENT_CHAR, IncrementalDecoder
from .params import GenerationParams

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = "stop", "length", "abort"


@dataclass(frozen=True)
class StreamChunk:
    """One step of a streamed answer. text is cumulative (as FastChat's protocol sends it)."""

    text: str
    delta: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Optional[str] = None
    logprobs: Optional[tuple] = None  # engine Logprob entries of the answer so far, when asked for

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class SequenceOutput:
    """Follows one sequence token by token and decides what text may be shown and when it ends."""

    def __init__(self, tokenizer: Any, params: GenerationParams, prompt_tokens: int,
                 max_new_tokens: int, stop_token_ids: Iterable[int], prompt_text: str = "") -> None:
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = frozenset(stop_token_ids)
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self._decoder = IncrementalDecoder(tokenizer)
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self._raw_end = 0  # how much of the raw text is final (after any stop string is cut)
        self._shown_raw = 0  # how much of the raw text has been turned into shown text
        self._prefix = prompt_text if params.echo else ""
        self.text = self._prefix

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """Feed one generated token; return the newly visible text. Sets finish_reason when done."""
        if self.finished:
            return ""
        self.completion_tokens += 1
        if token_id in self.stop_token_ids and not self.params.ignore_eos:
            return self.finish(FINISH_STOP)
        delta = self._decoder.push(token_id)
        if delta and self._cut_at_stop_string(len(delta)):
            return self.finish(FINISH_STOP)
        if self.completion_tokens >= self.max_new_tokens:
            return self.finish(FINISH_LENGTH)
        return self._release(final=False) if delta else ""

    def finish(self, reason: str) -> str:
        """End the sequence (stop, length or abort) and release everything held back."""
        if self.finished:
            return ""
        if self._decoder.flush() and not self._cut_at_stop_string(len(self._decoder.text)):
            # A sequence cut off inside a multi-byte character (max tokens, abort) ends in
            # U+FFFD: show the answer without that half character.
            self._raw_end = len(self._decoder.text.rstrip(REPLACEMENT_CHAR))
        self.finish_reason = reason
        return self._release(final=True)

    def chunk(self, delta: str) -> StreamChunk:
        return StreamChunk(self.text, delta, self.prompt_tokens, self.completion_tokens, self.finish_reason)

    def _cut_at_stop_string(self, new_chars: int) -> bool:
        raw = self._decoder.text
        if self._max_stop:
            # Only the tail can hold a new match: constant work per token.
            start = max(0, len(raw) - new_chars - self._max_stop + 1)
            hits = [i for i in (raw.find(s, start) for s in self.params.stop) if i >= 0]
            if hits:
                self._raw_end = min(hits)
                return True
        self._raw_end = len(raw)
        return False

    def _release(self, final: bool) -> str:
        raw = self._decoder.text[:self._raw_end] if final else self._decoder.text
        end = len(raw) if final else self._raw_end - partial_suffix_len(raw[:self._raw_end], self.params.stop)
        piece = raw[self._shown_raw:end]
        if self.params.deanonymize:
            if not final:
                piece = piece[:safe_prefix_len(piece)]
            self._shown_raw += len(piece)
            piece = deanonymize(piece)
        else:
            self._shown_raw += len(piece)
        self.text += piece
        return piece
