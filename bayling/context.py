"""Fitting a conversation into the context window: keep the system prompt and the newest turns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .tokens import PromptTooLongError, encode_prompt
from .templates import USER, Conversation


@dataclass(frozen=True)
class FittedPrompt:
    prompt: str
    input_ids: list[int]
    dropped_messages: int  # how many of the oldest messages were left out

    @property
    def notice(self) -> str:
        if not self.dropped_messages:
            return ""
        return (f"[context window full: the {self.dropped_messages} oldest message(s) were left out of the prompt; "
                "the system prompt and the newest turns were kept]")


def fit_conversation(conv: Conversation, tokenizer: Any, context_len: int, max_new_tokens: int) -> FittedPrompt:
    """Render conv for a reply, dropping whole old turns until prompt + room to answer fits.

    Room to answer is max_new_tokens but at most half the window, so a long answer budget does
    not push out the whole history. Raises PromptTooLongError if even the newest user message
    alone (with the system prompt) does not fit.
    """
    budget = context_len - min(max_new_tokens, context_len // 2)
    messages = conv.messages
    # Cut only at user messages, so the history never starts with a dangling answer.
    starts = [i for i, m in enumerate(messages) if m.role == USER] or [0]
    tried: dict[int, tuple[str, list[int]]] = {}

    def fits(k: int) -> bool:  # keep messages[starts[k]:]
        if k not in tried:
            prompt = Conversation(conv.template, conv.system, messages[starts[k]:]).prompt_for_reply(tokenizer)
            tried[k] = (prompt, encode_prompt(tokenizer, prompt))
        return len(tried[k][1]) <= budget

    def fitted(k: int) -> FittedPrompt:
        return FittedPrompt(tried[k][0], tried[k][1], starts[k])

    # Linear, not quadratic, in the number of messages: one render of the whole history (it usually
    # fits), else gallop back from the newest turn and bisect, so every other render holds at most
    # about twice what fits in the window. Keeping fewer turns never makes the prompt longer.
    if fits(0):
        return fitted(0)
    good = len(starts) - 1
    if not fits(good):
        raise PromptTooLongError(
            f"the last message and system prompt take {len(tried[good][1])} tokens but only {budget} fit in the "
            f"{context_len}-token context window with room for the answer; shorten the message or lower "
            "max_new_tokens")
    bad, step = 0, 1
    while good - bad > 1:
        k = max(bad + 1, good - step)
        if fits(k):
            good, step = k, step * 2
        else:
            bad = k
            break
    while good - bad > 1:  # the first index that fits lies in (bad, good]
        k = (bad + good) // 2
        good, bad = (k, bad) if fits(k) else (good, k)
    return fitted(good)
