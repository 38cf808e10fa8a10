"""OpenAI request bodies -> our worker's requests: strict types, refused features named, limits applied.

Where OpenAI's documentation and vLLM agree, so do we: a wrong type or an unsupported feature is a
400 that names the field, never silently ignored (`user`, `metadata` and `store` are ignored, as
they change nothing about the answer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from fastchat.constants import ErrorCode

from .protocol import RequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
# Passed to the worker as they are; the worker validates their values.
PASSED_PARAMS = ("temperature", "top_p", "top_k", "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
                 "presence_penalty", "frequency_penalty")
UNSUPPORTED = ("tools", "functions", "function_call", "audio", "prediction", "web_search_options")


def _bad(message: str, code: int = ErrorCode.VALIDATION_TYPE_ERROR) -> RequestError:
    return RequestError(code, message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _optional(body: dict, key: str, check: Any, what: str) -> Any:
    value = body.get(key)
    if value is not None and not check(value):
        raise _bad(f"'{key}' must be {what}, got {value!r:.80}")
    return value


@dataclass
class OpenAIRequest:
    """What one OpenAI request asks for: the worker payload of choice 0, and how to answer."""

    chat: bool
    model: str
    payload: dict
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # top N alternatives per token, None = off
    seed: Optional[int] = None

    def payload_for(self, index: int) -> dict:
        """Choice `index`'s worker request: its own seed (seed + index) when a seed is given."""
        if self.seed is None:
            return self.payload
        return {**self.payload, "seed": self.seed + index}


def _refuse_unsupported(body: dict, chat: bool) -> None:
    named = [k for k in UNSUPPORTED if body.get(k) not in (None, [], {})]
    if body.get("tool_choice") not in (None, "none"):
        named.append("tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        named.append("response_format (only {\"type\": \"text\"})")
    if not chat and body.get("suffix") not in (None, ""):
        named.append("suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        named.append("best_of")
    if named:
        raise _bad(f"not supported by this server: {', '.join(named)}", ErrorCode.PARAM_OUT_OF_RANGE)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{where}: only text content parts are supported, got {kind!r:.40}",
                           ErrorCode.PARAM_OUT_OF_RANGE)
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}: a text part's 'text' must be a string, got {part.get('text')!r:.40}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}]")})
    return out


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise _bad("prompt lists (several prompts, or token ids) are not supported: send one string per request",
                   ErrorCode.PARAM_OUT_OF_RANGE)
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string")
    return prompt


def parse_openai(body: dict, chat: bool) -> OpenAIRequest:
    """Validate an OpenAI chat or completions body; RequestError (a 400) names what is wrong."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' (a string) is required")
    _refuse_unsupported(body, chat)
    n = _optional(body, "n", lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer from 1 to {MAX_N}") or 1
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false") or False
    options = _optional(body, "stream_options", lambda v: isinstance(v, dict), "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad(f"'stream_options.include_usage' must be true or false, got {include_usage!r:.40}")
    if options and not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true")
    seed = _optional(body, "seed", _is_int, "an integer")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= 1):
        raise _bad(f"'max_tokens' must be an integer >= 1, got {max_tokens!r:.40}", ErrorCode.PARAM_OUT_OF_RANGE)
    for key in ("presence_penalty", "frequency_penalty"):
        _optional(body, key, lambda v: _is_number(v) and -2 <= v <= 2, "a number from -2 to 2")
    for key in ("temperature", "top_p", "repetition_penalty"):
        _optional(body, key, _is_number, "a finite number")
    bias = _optional(body, "logit_bias", lambda v: isinstance(v, dict), "an object {token id: bias}")
    for token, value in (bias or {}).items():
        if not (isinstance(token, str) and token.isdigit()) or not (_is_number(value) and -100 <= value <= 100):
            raise _bad(f"'logit_bias' maps token ids (strings of digits) to numbers from -100 to 100, "
                       f"got {token!r:.20}: {value!r:.20}", ErrorCode.PARAM_OUT_OF_RANGE)

    if chat:
        want = _optional(body, "logprobs", lambda v: isinstance(v, bool), "true or false") or False
        top = _optional(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS,
                        f"an integer from 0 to {MAX_TOP_LOGPROBS}")
        if top is not None and not want:
            raise _bad("'top_logprobs' needs 'logprobs': true")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _optional(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= MAX_COMPLETION_LOGPROBS,
                             f"an integer from 0 to {MAX_COMPLETION_LOGPROBS}")
        _optional(body, "echo", lambda v: isinstance(v, bool), "true or false")

    payload: dict = {"model": model}
    for key in PASSED_PARAMS:
        if body.get(key) is not None:
            payload[key] = body[key]
    if bias:
        payload["logit_bias"] = bias
    if max_tokens is not None:
        payload["max_new_tokens"] = max_tokens
    if logprobs is not None:
        payload["logprobs"] = logprobs
    if seed is not None:
        payload["seed"] = seed
    if chat:
        payload["messages"] = _messages(body)
    else:
        payload["prompt"] = _prompt(body)
        payload["echo"] = body.get("echo") or False
    return OpenAIRequest(chat, model, payload, n, stream, include_usage, logprobs, seed)


def chat_logprobs(worker_logprobs: Optional[dict], start: int) -> list[dict]:
    """FastChat's cumulative logprobs (tokens, token_logprobs, top_logprobs) from `start` as OpenAI's chat
    `logprobs.content` entries."""
    if not worker_logprobs:
        return []
    tokens = worker_logprobs.get("tokens") or []
    values = worker_logprobs.get("token_logprobs") or []
    tops = worker_logprobs.get("top_logprobs") or []
    out = []
    for i in range(start, min(len(tokens), len(values))):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append({"token": tokens[i], "logprob": values[i], "bytes": list(tokens[i].encode("utf-8", "replace")),
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}
                                     for t, lp in top.items()]})
    return out


def completion_logprobs(worker_logprobs: Optional[dict], start: int) -> Optional[dict]:
    """The same, from `start`, in /v1/completions' shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    if not worker_logprobs:
        return None
    return {key: list((worker_logprobs.get(key) or [])[start:])
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
