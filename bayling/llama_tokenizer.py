"""A tokenizer over llama.cpp's own vocabulary, with the slice of transformers' interface the project uses.

Building a transformers tokenizer from a GGUF file takes ~15 s (it converts the whole vocabulary in
Python) and imports torch; llama.cpp has the vocabulary loaded already. This adapter gives the
output handling (IncrementalDecoder, stop strings, templates) what it reads: __call__/encode,
decode, convert_ids_to_tokens, convert_tokens_to_ids, the special tokens, chat_template and
apply_chat_template (rendered with Jinja2 as transformers renders it). It imports no torch.
"""
from __future__ import annotations

import ctypes
import json
from datetime import datetime
from typing import Any, Optional, Sequence, Union

CHAT_TEMPLATE_KEY = b"tokenizer.chat_template"


class LlamaCppTokenizer:
    """Tokenize and detokenize with a loaded llama.cpp model's vocabulary."""

    def __init__(self, model: Any, name_or_path: str = "") -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._model = model  # a llama_model pointer; its owner keeps it alive
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.name_or_path = name_or_path
        n = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces = [llama_cpp.llama_vocab_get_text(self._vocab, i).decode("utf-8", "replace") for i in range(n)]
        self._ids = {p: i for i, p in enumerate(self._pieces)}
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        self.all_special_ids = [i for i in range(n) if llama_cpp.llama_vocab_get_attr(self._vocab, i) & control]
        self.bos_token_id = self._valid(llama_cpp.llama_vocab_bos(self._vocab))
        self.eos_token_id = self._valid(llama_cpp.llama_vocab_eos(self._vocab))
        self.pad_token_id = self._valid(llama_cpp.llama_vocab_pad(self._vocab))
        self.unk_token_id = self._ids.get("<unk>")
        self.bos_token = self._pieces[self.bos_token_id] if self.bos_token_id is not None else None
        self.eos_token = self._pieces[self.eos_token_id] if self.eos_token_id is not None else None
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template: Optional[str] = template.decode("utf-8") if template else None

    def _valid(self, token: int) -> Optional[int]:
        return int(token) if 0 <= token < len(self._pieces) else None

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    # --- text -> ids ------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special-token text (e.g. <|im_start|>) is parsed as the special token, as HF does."""
        data = text.encode("utf-8")
        size = len(data) + 8
        while True:
            buf = (self._lib.llama_token * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, size, add_special_tokens, True)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    # --- ids -> text ------------------------------------------------------------------------
    def decode(self, ids: Union[int, Sequence[int]], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False, **_: Any) -> str:
        """Text of ids; control tokens are dropped with skip_special_tokens, else written out."""
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        arr = (self._lib.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, not skip_special_tokens)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n + 1

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Union[str, list[str]]:
        """The vocabulary's piece for each id (e.g. 'Ġworld', '▁the', '<0x0A>')."""
        if isinstance(ids, int):
            return self._pieces[ids]
        return [self._pieces[i] for i in ids]

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[Optional[int], list[Optional[int]]]:
        """The id of each piece (the unknown token's id when a piece is not in the vocabulary)."""
        if isinstance(tokens, str):
            return self._ids.get(tokens, self.unk_token_id)
        return [self._ids.get(t, self.unk_token_id) for t in tokens]

    # --- chat template ----------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Union[str, list[int]]:
        """Render the GGUF's chat template with Jinja2, as transformers renders a tokenizer's template."""
        if not self.chat_template:
            raise ValueError("this model's GGUF file has no chat template; pass --conv-template")
        text = _render(self.chat_template, messages=list(conversation), add_generation_prompt=add_generation_prompt,
                       bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _raise(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


_TEMPLATES: dict[str, Any] = {}


def _render(template: str, **variables: Any) -> str:
    # The environment transformers uses for chat templates: sandboxed, trim_blocks + lstrip_blocks,
    # loop controls, raise_exception and strftime_now available to the template.
    if template not in _TEMPLATES:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        _TEMPLATES[template] = env.from_string(template)
    return _TEMPLATES[template].render(**variables)
