"""A Hugging Face tokenizer folder as GGUF vocabulary metadata: SentencePiece (`llama`) or byte-level BPE (`gpt2`).

Facts from llama.cpp's converter: SentencePiece pieces keep their scores and types (normal, unknown, control,
unused, byte); byte-level BPE tokens are the vocab's strings in id order with merges as "left right"; added
tokens are control tokens when special, user-defined otherwise; a model vocabulary larger than the tokenizer's
is padded with unused `[PAD{id}]` tokens.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gguf import TokenType

PAD_SCORE = -1000.0  # what llama.cpp's converter gives added and padding tokens
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")


class VocabError(ValueError):
    """A tokenizer folder that cannot become a GGUF vocabulary; the message says why."""


@dataclass
class Vocab:
    """Everything the GGUF's `tokenizer.ggml.*` keys hold."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    pre: Optional[str] = None  # llama.cpp's pre-tokenizer name for gpt2 vocabularies
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos"/"eos"/"unk"/"pad" -> id
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: Optional[bool] = None  # SentencePiece's dummy prefix
    chat_template: Optional[str] = None


def read_vocab(folder: Path, vocab_size: int, config: dict) -> Vocab:
    """The folder's tokenizer as a Vocab of exactly vocab_size tokens (the model's embedding rows)."""
    tok_config = _json(folder / "tokenizer_config.json") or {}
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece(folder, tok_config)
    elif (folder / "tokenizer.json").is_file():
        vocab = _byte_level_bpe(folder / "tokenizer.json", tok_config)
    else:
        raise VocabError(f"{folder} holds neither tokenizer.model nor tokenizer.json; copy the tokenizer files in")
    if len(vocab.tokens) > vocab_size:
        raise VocabError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {vocab_size} embedding "
                         "rows; the tokenizer does not belong to this model")
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.scores.append(PAD_SCORE)
        vocab.types.append(TokenType.UNUSED)
    vocab.special_ids = _special_ids(vocab.tokens, tok_config, config)
    vocab.chat_template = _chat_template(folder, tok_config)
    return vocab


def _sentencepiece(folder: Path, tok_config: dict) -> Vocab:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                     else TokenType.NORMAL)
    for token_id, content, special in _added_tokens(folder, tok_config):
        if token_id < len(tokens):
            continue  # already a SentencePiece piece
        if token_id != len(tokens):
            raise VocabError(f"added token {content!r} has id {token_id}, but the vocabulary has {len(tokens)} "
                             "tokens: added tokens must follow it without gaps")
        tokens.append(content)
        scores.append(PAD_SCORE)
        types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    return Vocab("llama", tokens, scores, types, add_bos=bool(tok_config.get("add_bos_token", True)),
                 add_eos=bool(tok_config.get("add_eos_token", False)), add_space_prefix=_dummy_prefix(folder))


def _byte_level_bpe(path: Path, tok_config: dict) -> Vocab:
    data = _json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data.get("pre_tokenizer")):
        raise VocabError(f"{path.name} is a {model.get('type')} tokenizer without byte-level pre-tokenization; "
                         "only SentencePiece (tokenizer.model) and byte-level BPE tokenizers can be exported")
    by_id = {i: t for t, i in model["vocab"].items()}
    specials = {}
    for added in data.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        specials[added["id"]] = bool(added.get("special"))
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise VocabError(f"{path.name} has no token for {len(missing)} ids, e.g. {missing[:3]}")
    tokens = [by_id[i] for i in range(n)]
    types = [TokenType.NORMAL if i not in specials else TokenType.CONTROL if specials[i]
             else TokenType.USER_DEFINED for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    single = ((data.get("post_processor") or {}).get("single") or [{}])
    add_bos = bool(tok_config.get("add_bos_token", "SpecialToken" in single[0]))
    return Vocab("gpt2", tokens, [0.0] * n, types, merges=merges, pre=_pre_name(data.get("pre_tokenizer")),
                 add_bos=add_bos, add_eos=bool(tok_config.get("add_eos_token", False)))


def _is_byte_level(pre: Optional[dict]) -> bool:
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(_is_byte_level(p) for p in pre.get("pretokenizers") or [])
    return pre.get("type") == "ByteLevel"


# Llama 3's split, as its tokenizer.json writes it (a Split pre-tokenizer before a regex-free ByteLevel)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_name(pre: dict) -> str:
    """llama.cpp's name for the way a tokenizer.json splits text before BPE.

    llama.cpp's own converter tells splits apart by hashing a test encoding; here the pre-tokenizer's
    definition is read instead, for the splits LLaMA-architecture models use: GPT-2's regex ("gpt-2"),
    single digits then GPT-2's regex (SmolLM, "smollm"), and Llama 3's regex ("llama-bpe").
    """
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        return "llama-bpe"
    print("warning: unrecognised byte-level pre-tokenizer; llama.cpp will split text with its default rule, "
          "which may tokenize some text differently from transformers", file=sys.stderr)
    return "default"


def _added_tokens(folder: Path, tok_config: dict) -> list[tuple[int, str, bool]]:
    found: dict[int, tuple[str, bool]] = {}
    for token_id, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        found[int(token_id)] = (entry["content"], bool(entry.get("special")))
    for content, token_id in (_json(folder / "added_tokens.json") or {}).items():
        found.setdefault(int(token_id), (content, False))
    data = _json(folder / "tokenizer.json") or {}
    for added in data.get("added_tokens") or []:
        found.setdefault(added["id"], (added["content"], bool(added.get("special"))))
    return [(i, c, s) for i, (c, s) in sorted(found.items())]


def _special_ids(tokens: list[str], tok_config: dict, config: dict) -> dict[str, int]:
    index = {t: i for i, t in enumerate(tokens)}
    ids = {}
    for role in SPECIAL_ROLES:
        entry = tok_config.get(f"{role}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if content in index:
            ids[role] = index[content]
        elif isinstance(config.get(f"{role}_token_id"), int):
            ids[role] = config[f"{role}_token_id"]
    return ids


def _chat_template(folder: Path, tok_config: dict) -> Optional[str]:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _dummy_prefix(folder: Path) -> Optional[bool]:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        return bool(proto.normalizer_spec.add_dummy_prefix)
    except Exception:  # no protobuf: llama.cpp's default (a prefix space) is what LLaMA tokenizers use
        return None


def _json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VocabError(f"cannot read {path}: {e}") from None
