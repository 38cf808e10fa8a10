"""Prompt tokens without torch: encoding a rendered prompt, end-of-sequence ids, context checks.

The wire-protocol module and the OpenAI proxy import this, so it must never import torch.

LLaMA-1/2 SentencePiece tokenizers saved before transformers 4.31 (no `legacy` key in
tokenizer_config.json, e.g. BayLing v1) were used in training through the slow tokenizer, which
hands every text segment between special tokens to SentencePiece on its own, so each segment
gets SentencePiece's dummy-prefix piece: "...</s>\\n### Instruction:" is [..., 2, ▁, \\n, ...].
transformers 5 prepends the piece only at the very start of the text. For such tokenizers
encode_prompt rebuilds the legacy ids segment by segment (see LegacyEncoder).
"""
from __future__ import annotations

import json
import re
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

SPM_FILE = "tokenizer.model"
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


class PromptTooLongError(ValueError):
    """The prompt alone does not fit in the model's context window."""


class LegacyEncoder:
    """The slow LLaMA tokenizer's ids: split at added/special tokens, encode each segment alone."""

    def __init__(self, specials: dict[str, int], encode_segment: Callable[[str], list[int]], bos_id: Optional[int],
                 route: str) -> None:
        self.specials = specials
        self.encode_segment = encode_segment
        self.bos_id = bos_id
        self.route = route  # "sentencepiece" or "per-segment": which tokenizer encodes the text between specials
        # Longest first, so "<s>" never wins over a longer token that starts with it.
        alternatives = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pieces = self._split.split(text) if self._split else [text]
        for i, piece in enumerate(pieces):
            if i % 2:  # odd positions are the separators the split captured
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self.encode_segment(piece))
        return ids


_ENCODERS: "weakref.WeakKeyDictionary[Any, Optional[LegacyEncoder]]" = weakref.WeakKeyDictionary()


def _saved_config(tokenizer: Any) -> Optional[dict]:
    """tokenizer_config.json in the folder the tokenizer was loaded from, or None."""
    folder = getattr(tokenizer, "name_or_path", None)
    path = Path(folder) / "tokenizer_config.json" if isinstance(folder, str) and folder else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _spm_file(tokenizer: Any) -> Optional[Path]:
    init = getattr(tokenizer, "init_kwargs", None) or {}
    for candidate in (init.get("vocab_file"), getattr(tokenizer, "vocab_file", None)):
        if isinstance(candidate, str) and candidate.endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    folder = getattr(tokenizer, "name_or_path", None)
    if isinstance(folder, str) and folder and (Path(folder) / SPM_FILE).is_file():
        return Path(folder) / SPM_FILE
    return None


def needs_legacy_encoding(tokenizer: Any) -> bool:
    """A LLaMA SentencePiece tokenizer that was trained with the legacy (slow-tokenizer) ids.

    An explicit `legacy` setting wins. Without one, a saved tokenizer_config.json that transformers 5
    did not write (it adds "backend") predates the key, i.e. transformers < 4.31: BayLing v1's folders.
    A tokenizer built in memory, or re-saved by transformers 5, keeps transformers' own encoding.
    """
    if type(tokenizer).__name__ not in LLAMA_TOKENIZER_CLASSES:
        return False
    saved = _saved_config(tokenizer)
    if saved is not None and "legacy" in saved:
        return saved["legacy"] is not False
    init = getattr(tokenizer, "init_kwargs", None) or {}
    if isinstance(init.get("legacy"), bool):
        return init["legacy"]
    return saved is not None and "backend" not in saved


def _build_legacy_encoder(tokenizer: Any) -> Optional[LegacyEncoder]:
    if not needs_legacy_encoding(tokenizer):
        return None
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    specials = {token: int(i) for token, i in added.items() if token}
    bos_id = getattr(tokenizer, "bos_token_id", None)
    path = _spm_file(tokenizer)
    if path is not None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        eos = getattr(tokenizer, "eos_token", None)
        # Only trust the file if it is this tokenizer's vocabulary.
        if eos is None or sp.piece_to_id(eos) == getattr(tokenizer, "eos_token_id", None):
            return LegacyEncoder(specials, sp.encode, bos_id, "sentencepiece")
    # No tokenizer.model beside it: encode each segment alone, written with the leading space that
    # SentencePiece's dummy prefix adds (transformers' Metaspace adds "▁" only where there is none yet).
    return LegacyEncoder(specials, lambda s: tokenizer(" " + s, add_special_tokens=False)["input_ids"], bos_id,
                         "per-segment")


def legacy_encoder(tokenizer: Any) -> Optional[LegacyEncoder]:
    """The tokenizer's LegacyEncoder, or None when transformers' own encoding is the right one (cached)."""
    try:
        if tokenizer in _ENCODERS:
            return _ENCODERS[tokenizer]
    except TypeError:  # not weak-referenceable: decide every time
        return _build_legacy_encoder(tokenizer)
    encoder = _ENCODERS[tokenizer] = _build_legacy_encoder(tokenizer)
    return encoder


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids for a rendered prompt; BOS is added unless the template already wrote it."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and prompt.startswith(bos))
    encoder = legacy_encoder(tokenizer)
    if encoder is not None:
        return encoder.encode(prompt, add_bos=add_special)
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
