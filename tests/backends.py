"""The two backends for end-to-end tests, and each one's own greedy reference.

    demo("llama.cpp")                       # the demo model loaded in this process (once per session)
    reference("torch").greedy(prompt, 24)   # transformers' generate on the same weights
    reference("llama.cpp").greedy(...)      # llama_cpp.Llama on the same GGUF file

A test never relies on what --backend auto means: it names the backend it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import pytest

BACKENDS = ("torch", "llama.cpp")


@dataclass(frozen=True)
class Greedy:
    """A reference greedy answer."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop": it ended with an end-of-generation token; "length": max_new_tokens ran out


@lru_cache(maxsize=None)
def demo(backend: str):
    """The demo model on that backend, loaded once per test process."""
    from bayling.loading import ModelArgs, load_model

    if backend == "llama.cpp":
        pytest.importorskip("llama_cpp")
        return load_model(ModelArgs(backend="llama.cpp"))
    return load_model(ModelArgs(device="cpu", backend="torch"))


class TransformersReference:
    """transformers' own generate() and forward pass on a loaded torch model."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded

    def ids(self, prompt: str) -> list[int]:
        return self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def greedy(self, prompt: str, max_new_tokens: int, threads: Optional[int] = None) -> Greedy:
        """Greedy answer (threads: torch's thread count while it runs, e.g. 1 as the test workers run)."""
        import torch

        ids = torch.tensor([self.ids(prompt)])
        before = torch.get_num_threads()
        torch.set_num_threads(threads or before)
        try:
            out = self.loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                             do_sample=False, pad_token_id=self.loaded.tokenizer.eos_token_id)
        finally:
            torch.set_num_threads(before)
        new = out[0, ids.shape[1]:].tolist()
        eos = self.loaded.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
        stopped = bool(new) and new[-1] in eos
        answer = new[:-1] if stopped else new
        text = self.loaded.tokenizer.decode(answer, skip_special_tokens=True)
        return Greedy(answer, text, "stop" if stopped else "length")

    def first_logprob(self, prompt: str) -> tuple[int, float]:
        """The greedy first token and its log-probability."""
        import torch

        with torch.no_grad():
            logits = self.loaded.model(torch.tensor([self.ids(prompt)])).logits[0, -1].float()
        first = int(logits.argmax())
        return first, float(logits.log_softmax(-1)[first])


class LlamaReference:
    """llama_cpp.Llama on a GGUF file: its own tokenizer, evaluation and greedy generation."""

    def __init__(self, path: Path, n_ctx: int = 2048) -> None:
        import llama_cpp

        from bayling.engine.llama_runner import default_threads

        self._lib = llama_cpp
        # the same thread count as our runner's default: the kernels then split the work alike
        # and flash attention as the runner computes attention
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=default_threads(), logits_all=False,
                                   flash_attn=True, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def ids(self, prompt: str) -> list[int]:
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)

    def greedy_ids(self, ids: Sequence[int], max_new_tokens: int, stop_at_eog: bool = True) -> Greedy:
        """Greedy answer to prompt ids (stop_at_eog=False: exactly max_new_tokens tokens)."""
        new: list[int] = []
        stopped = False
        if max_new_tokens > 0:
            for token in self.llm.generate(list(ids), temp=0.0, top_k=1, reset=True):
                if stop_at_eog and self._lib.llama_vocab_is_eog(self._vocab, token):
                    stopped = True
                    break
                new.append(int(token))
                if len(new) == max_new_tokens:
                    break
        text = self.llm.detokenize(new).decode("utf-8", "replace")
        return Greedy(new, text, "stop" if stopped else "length")

    def greedy(self, prompt: str, max_new_tokens: int, threads: Optional[int] = None) -> Greedy:
        """Greedy answer to a prompt (threads is torch's knob; llama.cpp's count is fixed above)."""
        return self.greedy_ids(self.ids(prompt), max_new_tokens)

    def first_logprob(self, prompt: str) -> tuple[int, float]:
        """The greedy first token and its log-probability."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(self.ids(prompt))  # logits_all=False: llama.cpp keeps the last token's logits only
        row = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).astype(np.float64)
        first = int(logits.argmax())
        shifted = logits - logits.max()
        return first, float(shifted[first] - np.log(np.exp(shifted).sum()))

    def close(self) -> None:
        self.llm.close()


@lru_cache(maxsize=None)
def reference(backend: str):
    """That backend's own reference on the demo model."""
    if backend == "llama.cpp":
        from bayling.demo import demo_gguf_path

        return LlamaReference(demo_gguf_path())
    return TransformersReference(demo("torch"))
