"""FastChat's worker wire format: chunk encoding, error codes, and our templates as FastChat conv dicts."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from fastchat.constants import ErrorCode

from ..context import fit_conversation
from ..tokens import PromptTooLongError, check_prompt_fits, encode_prompt
from ..output import StreamChunk
from ..params import GenerationParams
from ..templates import ASSISTANT, SYSTEM, USER, Conversation, Message, Template, params_for_template

log = logging.getLogger("bayling.serve.protocol")

STREAM_DELIMITER = b"\0"

# FastChat's SeparatorStyle values (fastchat.conversation), as its OpenAI server expects them in the conv dict.
NO_COLON_SINGLE, NO_COLON_TWO, CHATML = 4, 5, 9
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"


class RequestError(Exception):
    """A request the worker refuses; becomes a FastChat error_code reply."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


def chunk_payload(chunk: StreamChunk, extra: Optional[dict] = None) -> dict:
    """The JSON object FastChat's model_worker sends for one step (same keys, same order)."""
    payload = {"text": chunk.text, "error_code": 0, "usage": chunk.usage,
               "finish_reason": chunk.finish_reason, "logprobs": None}
    if extra:
        payload.update(extra)
    return payload


def error_payload(code: int, message: str) -> dict:
    return {"text": message, "error_code": int(code)}


def encode(payload: dict) -> bytes:
    """One NUL-terminated JSON chunk, encoded exactly as FastChat's workers do."""
    return json.dumps(payload).encode() + STREAM_DELIMITER


def parse_body(body: bytes) -> dict:
    """The request JSON; malformed input is a VALIDATION_TYPE_ERROR."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR,
                           f"request body must be a JSON object, got {type(data).__name__}")
    return data


@dataclass
class Prepared:
    """A validated generation request, ready for the engine."""

    input_ids: list[int]
    prompt_text: str
    params: GenerationParams
    extra: dict  # extra keys for every chunk (the context-window notice)


def conversation_from_messages(template: Template, messages: Any, system: Any = None) -> Conversation:
    """Build a Conversation from OpenAI-style [{role, content}] (our `messages` extension)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"system must be a string, got {type(system).__name__}")
    conv = Conversation(template, system)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"each message needs a string 'content' and a 'role', got {str(m)[:80]}")
        if m.get("role") == SYSTEM:
            conv.system = m["content"]
        else:
            conv.add(m.get("role"), m["content"])
    if not conv.messages or conv.messages[-1].role != USER:
        raise ValueError("the last message must be from the user")
    return conv


def prepare_request(data: dict, template: Template, tokenizer: Any, context_len: int) -> Prepared:
    """Validate a /worker_generate(_stream) body: FastChat's `prompt`, or our `messages` extension."""
    messages = data.get("messages")
    prompt = data.get("prompt")
    try:
        # FastChat workers echo the prompt unless told otherwise; our messages extension does not.
        params = GenerationParams.from_request(data, echo=messages is None)
    except (ValueError, TypeError) as e:
        raise RequestError(ErrorCode.PARAM_OUT_OF_RANGE, f"invalid generation parameters: {e}") from None
    params = params_for_template(params, template, tokenizer)
    try:
        if messages is not None:
            conv = conversation_from_messages(template, messages, data.get("system"))
            fitted = fit_conversation(conv, tokenizer, context_len, params.max_new_tokens)
            extra = {"dropped_messages": fitted.dropped_messages, "notice": fitted.notice} \
                if fitted.dropped_messages else {}
            return Prepared(fitted.input_ids, fitted.prompt, params, extra)
        if not isinstance(prompt, str):
            raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR,
                               "request needs 'prompt' (a string) or 'messages' (a list of {role, content})")
        ids = encode_prompt(tokenizer, prompt)
        check_prompt_fits(len(ids), context_len)
        return Prepared(ids, prompt, params, {})
    except PromptTooLongError as e:
        raise RequestError(ErrorCode.CONTEXT_OVERFLOW, str(e)) from None
    except ValueError as e:
        raise RequestError(ErrorCode.VALIDATION_TYPE_ERROR, str(e)) from None


# --- our templates as FastChat conv dicts (what /worker_get_conv_template returns) ----------------

def _conv(name: str, system_template: str, system_message: str, roles: tuple[str, str], sep_style: int,
          sep: str, sep2: Optional[str] = None, stop_str: Any = None, stop_token_ids: Any = None) -> dict:
    return {"name": name, "system_template": system_template, "system_message": system_message,
            "roles": list(roles), "messages": [], "offset": 0, "sep_style": sep_style, "sep": sep, "sep2": sep2,
            "stop_str": stop_str, "stop_token_ids": stop_token_ids}


def _template_stop_ids(template: Template, tokenizer: Any) -> Optional[list[int]]:
    return list(params_for_template(GenerationParams(), template, tokenizer).stop_token_ids) or None


def _bayling_conv(template: Template, tokenizer: Any) -> dict:
    from ..templates import BAYLING_ROLES, BAYLING_SEP, BAYLING_SEP2

    return _conv("bayling", "{system_message}" + BAYLING_SEP, template.default_system or "",
                 (BAYLING_ROLES[USER], BAYLING_ROLES[ASSISTANT]), NO_COLON_TWO, BAYLING_SEP, BAYLING_SEP2 + "\n",
                 list(template.stop), _template_stop_ids(template, tokenizer))


def _bayling3_conv(template: Template, tokenizer: Any) -> dict:
    from ..templates import BAYLING3_EOT, BAYLING3_ROLES, BAYLING3_SYSTEM_FORMAT

    return _conv("bayling-3", BAYLING3_SYSTEM_FORMAT.format("{system_message}"), template.default_system or "",
                 (BAYLING3_ROLES[USER], BAYLING3_ROLES[ASSISTANT]), NO_COLON_SINGLE, BAYLING3_EOT,
                 None, list(template.stop), _template_stop_ids(template, tokenizer))


def _chatml_conv(template: Template, tokenizer: Any) -> Optional[dict]:
    """A ChatML tokenizer template (<|im_start|>role\\n...<|im_end|>\\n) as FastChat's CHATML style."""
    rendered = Conversation(template, None, [Message(USER, "x")]).prompt_for_reply(tokenizer)
    if not rendered.startswith(CHATML_START):
        return None
    head = CHATML_START + SYSTEM + "\n"
    default_system = rendered[len(head):rendered.index(CHATML_END)] if rendered.startswith(head) else ""
    return _conv("chatml", head + "{system_message}", default_system,
                 (CHATML_START + USER, CHATML_START + ASSISTANT), CHATML, CHATML_END,
                 stop_str=None, stop_token_ids=_template_stop_ids(template, tokenizer))


CONV_BUILDERS = {"BayLing": _bayling_conv, "BayLing-3": _bayling3_conv, "tokenizer": _chatml_conv}


def render_with_fastchat(conv: dict, system: Optional[str], messages: list[Message]) -> str:
    """Render messages + an open assistant turn the way FastChat's OpenAI server does."""
    from fastchat.conversation import Conversation as FCConversation, SeparatorStyle

    c = FCConversation(name=conv["name"], system_template=conv["system_template"],
                       system_message=conv["system_message"], roles=tuple(conv["roles"]), messages=[],
                       offset=conv["offset"], sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"],
                       sep2=conv["sep2"], stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"])
    if system is not None:
        c.set_system_message(system)
    for m in messages:
        c.append_message(c.roles[0] if m.role == USER else c.roles[1], m.content)
    c.append_message(c.roles[1], None)
    return c.get_prompt()


PROBES: tuple[tuple[Optional[str], tuple[tuple[str, str], ...]], ...] = (
    (None, ((USER, "Hello there"),)),
    ("You are a probe.", ((USER, "What is 1+1?"), (ASSISTANT, "2."), (USER, "And 2+2?"))),
    # Clients send text with stray whitespace and answers as they were streamed (often with a
    # leading or trailing newline); our templates strip answers (and Llama-3 every message).
    (None, ((USER, "   spaced question?   "), (ASSISTANT, "\n  an answer with spaces.\n\n"),
            (USER, "\nnext line\n"), (ASSISTANT, "   "), (USER, " last "))),
)

# FastChat renders message text as given; these re-render a prompt it built from our conv dict the way
# our own paths do (answers stripped, empty messages as open turns), so every path sends the same ids.
_BAYLING3_TURN = re.compile(r"(<\|start_header_id\|>(?:user|assistant)<\|end_header_id\|>\n\n)(.*?)<\|eot_id\|>",
                            re.DOTALL)
_BAYLING_ANSWER = re.compile(r"(### Response:\n)(.*?)</s>\n", re.DOTALL)


def _strip_turns(pattern: "re.Pattern[str]", end: str) -> Callable[[str], str]:
    def canonical(prompt: str) -> str:
        return pattern.sub(lambda m: m.group(1) + (m.group(2).strip() + end if m.group(2).strip() else ""), prompt)
    return canonical


CANONICALIZERS: dict[str, Callable[[str], str]] = {
    "BayLing": _strip_turns(_BAYLING_ANSWER, "</s>\n"),
    "BayLing-3": _strip_turns(_BAYLING3_TURN, "<|eot_id|>"),
}


def canonical_prompt(template: Template, prompt: str) -> str:
    """A prompt rendered by FastChat from our conv dict, as our own renderer writes it (else unchanged)."""
    canonical = CANONICALIZERS.get(template.name)
    return canonical(prompt) if canonical else prompt


def fastchat_conv(template: Template, tokenizer: Any) -> tuple[Optional[dict], str]:
    """Our template as a FastChat conv dict, checked by rendering probe chats both ways.

    Returns (conv, "") when FastChat reproduces our prompts exactly, else (conv or None, reason).
    """
    builder = CONV_BUILDERS.get(template.name)
    conv = builder(template, tokenizer) if builder else None
    if conv is None:
        return None, f"no FastChat separator style reproduces the {template.name!r} template of this model"
    for system, turns in PROBES:
        messages = [Message(role, content) for role, content in turns]
        ours = Conversation(template, system, messages).prompt_for_reply(tokenizer)
        theirs = canonical_prompt(template, render_with_fastchat(conv, system, messages))
        if ours != theirs:
            return conv, (f"FastChat's {conv['name']} style renders the {template.name!r} template differently "
                          f"(ours {ours[:60]!r}..., FastChat {theirs[:60]!r}...)")
    return conv, ""
