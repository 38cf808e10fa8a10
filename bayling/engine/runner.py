"""What the engine needs from a model backend: run a batch of token chunks, hand back logits.

The engine (scheduler, KV budget, batched sampler, per-sequence output handling) is written once;
a runner is the only backend-specific part. Two implementations: TorchRunner (transformers) and
LlamaCppRunner (llama.cpp through llama-cpp-python). Nothing in here imports torch or llama_cpp.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

CPU_KV_SHARE = 0.125  # the KV budget on a CPU when none is asked for: this share of RAM


@dataclass(frozen=True)
class Chunk:
    """Tokens of one sequence to feed this step.

    A prefill chunk has many tokens, a decode chunk one. `start` is the sequence's position of
    tokens[0] (= how many of its tokens the runner already holds in its KV cache).
    """

    seq_id: int
    tokens: Sequence[int]
    start: int


class Runner(Protocol):
    """A model backend. Single-threaded: only the engine's stepping thread calls it."""

    vocab_size: int  # width of the logits rows run() returns
    context_len: int  # the longest sequence in tokens (the model's window, or less where the KV layout caps it)
    sampler: Any  # a sampler.Sampler for the array kind run() returns (torch tensors, numpy arrays)

    def run(self, chunks: Sequence[Chunk]) -> Any:
        """Feed every chunk (one forward where the backend can), keeping each sequence's KV.

        Returns float32 logits [len(chunks), vocab_size] for the LAST token of each chunk, of the
        kind `sampler` takes (TorchRunner: a tensor on the model's device; LlamaCppRunner: a numpy
        array that may view the backend's own buffer, valid until the next run()).
        """

    def free(self, seq_id: int) -> None:
        """Forget a sequence's KV (finished, aborted or failed). Unknown ids are ignored."""

    def fork(self, src_seq_id: int, dst_seq_id: int) -> None:
        """Give dst a copy of src's KV (n > 1 samples of one prompt share one prefill)."""

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token of one sequence costs (layers x 2 x kv heads x head dim x dtype)."""

    def kv_capacity_tokens(self) -> int:
        """Tokens (summed over sequences) the KV budget holds; the engine admits within it."""


def ram_bytes() -> int:
    """Physical memory of this machine (8 GiB where the OS will not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
