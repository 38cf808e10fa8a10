"""Incremental detokenization: constant work per token, never half a character."""
from __future__ import annotations

import re
from typing import Any, Callable

REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for an incomplete UTF-8 sequence
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte-fallback pieces


class IncrementalDecoder:
    """Turns a growing list of token ids into text, emitting only complete characters.

    Each step decodes two short windows (text before the newest tokens, and with them) and
    emits the difference, so the cost per token does not grow with the length of the output.
    Decoding a window rather than single tokens keeps tokenizer-specific joins right (the
    SentencePiece leading space, byte-fallback tokens that form one character together).
    A run of byte-fallback tokens is held until it ends: the decoder judges the run as a whole,
    so a byte that reads as '@' alone becomes U+FFFD when an invalid byte follows it.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        self._token_str = getattr(tokenizer, "convert_ids_to_tokens", None)
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0  # start of the window that gives context
        self._read_offset = 0  # first token not yet turned into text

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        if self._is_byte_token(token_id):
            return ""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.ids[self._prefix_offset:])
        if len(window) > len(prefix) and not window.endswith(REPLACEMENT_CHAR):
            delta = window[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def _is_byte_token(self, token_id: int) -> bool:
        if self._token_str is None:
            return False
        piece = self._token_str(token_id)
        return isinstance(piece, str) and len(piece) == 6 and BYTE_TOKEN.match(piece) is not None

    def flush(self) -> str:
        """At the end of the stream: emit whatever is pending, even an incomplete character."""
        if self._read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        window = self._decode(self.ids[self._prefix_offset:])
        delta = window[len(prefix):]
        self._prefix_offset = self._read_offset = len(self.ids)
        self.text += delta
        return delta
