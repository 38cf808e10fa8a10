"""Prompt tokens without torch: encoding a rendered prompt, end-of-sequence ids, context checks.

The wire-protocol module and the OpenAI proxy import this, so it must never import torch.
"""
from __future__ import annotations

from typing import Any, Iterable


class PromptTooLongError(ValueError):
    """The prompt alone does not fit in the model's context window."""


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for a rendered prompt; BOS is added unless the template already wrote it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add_special)["input_ids"]


def eos_token_ids(model: Any, tokenizer: Any, extra: Iterable[int] = ()) -> set[int]:
    """Every id that ends a sequence: the tokenizer's EOS, the generation config's, and extras."""
    ids = set(extra)
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


def context_length(model: Any, default: int = 2048) -> int:
    """The model's context window, from its config."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def check_prompt_fits(n_prompt: int, context_len: int) -> None:
    """Raise PromptTooLongError unless the prompt leaves room for at least one new token."""
    if n_prompt + 1 > context_len:
        raise PromptTooLongError(
            f"prompt is {n_prompt} tokens but the model's context window is {context_len} tokens; "
            "shorten it or start a new conversation")
