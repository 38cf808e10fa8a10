"""Request limits shared by the worker and the OpenAI API: body size, prompt, messages, stop strings.

Every limit is a flag with a default that no ordinary request reaches; a request past one is refused
with a message that names the limit and the flag, before any model work (or any stream byte).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from fastchat.constants import ErrorCode

from .protocol import RequestError

MIB = 1 << 20
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Limits:
    """The most one request may carry."""

    max_request_bytes: int = 8 * MIB
    max_prompt_chars: int = 1_000_000  # a 128k-token window holds about half of this
    max_messages: int = 1024
    max_stop_strings: int = 16  # OpenAI allows 4
    max_stop_chars: int = 256  # each

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """--max-request-bytes, --max-prompt-chars, --max-messages, --max-stop-strings, --max-stop-chars."""
    d = Limits()
    g = parser.add_argument_group("request limits")
    g.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help=f"largest request body (default {d.max_request_bytes})")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt, or all messages together, in characters (default {d.max_prompt_chars})")
    g.add_argument("--max-messages", type=int, default=d.max_messages,
                   help=f"most messages in one chat request (default {d.max_messages})")
    g.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings,
                   help=f"most stop strings in one request (default {d.max_stop_strings})")
    g.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars,
                   help=f"longest stop string in characters (default {d.max_stop_chars})")


def limits_from(ns: argparse.Namespace) -> Limits:
    return Limits(ns.max_request_bytes, ns.max_prompt_chars, ns.max_messages, ns.max_stop_strings, ns.max_stop_chars)


class BodyTooLarge(RequestError):
    def __init__(self, limit: int) -> None:
        super().__init__(ErrorCode.PARAM_OUT_OF_RANGE,
                         f"request body is larger than {limit} bytes (--max-request-bytes)")


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (BodyTooLarge) as soon as it passes `limit` bytes, without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(part)
    return b"".join(parts)


def is_json(request: Any) -> bool:
    """Content-Type application/json (a browser cannot send it cross-origin without a CORS preflight)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == JSON_TYPE


def check_text(data: Any) -> None:
    """Refuse strings that are not Unicode text (a lone surrogate such as "\\ud800" decodes from JSON)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR,
                           f"request holds a string that is not valid Unicode text ({e.reason} "
                           f"at character {e.start})") from None


def check_limits(data: dict, limits: Limits) -> None:
    """Prompt length, message count and stop strings of a worker or OpenAI request, before any model work."""
    prompt, messages = data.get("prompt"), data.get("messages")
    if isinstance(prompt, str) and len(prompt) > limits.max_prompt_chars:
        raise RequestError(ErrorCode.CONTEXT_OVERFLOW, f"prompt is {len(prompt)} characters, more than "
                           f"{limits.max_prompt_chars} (--max-prompt-chars)")
    if isinstance(messages, list):
        if len(messages) > limits.max_messages:
            raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, f"{len(messages)} messages, more than "
                               f"{limits.max_messages} (--max-messages)")
        chars = sum(_chars(m.get("content")) for m in messages if isinstance(m, dict))
        if chars > limits.max_prompt_chars:
            raise RequestError(ErrorCode.CONTEXT_OVERFLOW, f"messages hold {chars} characters, more than "
                               f"{limits.max_prompt_chars} (--max-prompt-chars)")
    stop = data.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_strings:
        raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, f"{len(stops)} stop strings, more than "
                           f"{limits.max_stop_strings} (--max-stop-strings)")
    longest = max((len(s) for s in stops if isinstance(s, str)), default=0)
    if longest > limits.max_stop_chars:
        raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, f"a stop string of {longest} characters, more than "
                           f"{limits.max_stop_chars} (--max-stop-chars)")


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
