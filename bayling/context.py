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
    for start in starts:
        trial = Conversation(conv.template, conv.system, messages[start:])
        prompt = trial.prompt_for_reply(tokenizer)
        ids = encode_prompt(tokenizer, prompt)
        if len(ids) <= budget:
            return FittedPrompt(prompt, ids, start)
    raise PromptTooLongError(
        f"the last message and system prompt take {len(ids)} tokens but only {budget} fit in the "
        f"{context_len}-token context window with room for the answer; shorten the message or lower max_new_tokens")
