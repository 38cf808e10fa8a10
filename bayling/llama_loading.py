"""Loading a GGUF file for the llama.cpp backend: the weights stay llama.cpp's, no conversion, no torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

BACKENDS = ("auto", "torch", "llama.cpp")


@dataclass
class LlamaCppModel:
    """A GGUF model loaded by llama.cpp; build_engine turns it into a LlamaCppRunner."""

    path: Path
    handle: Any  # the llama_model pointer (memory-mapped weights)
    context_len: int
    threads: Optional[int] = None  # None = every core this process may use
    generation_config: Any = None  # what eos_token_ids() looks for on a transformers model


def wants_llama_cpp(backend: str, model_path: Optional[str], torch_flags: Sequence[str] = ()) -> bool:
    """--backend llama.cpp; or auto on a .gguf file or the demo model, unless a torch-only flag was given."""
    if backend != "auto":
        return backend == "llama.cpp"
    # auto: a GGUF runs as it is (no de-quantized copy); a flag only transformers honours
    # (--load-4bit, --device cuda, ...) says the user wants the torch path for it.
    return not torch_flags and (model_path is None or model_path.endswith(".gguf"))


def load_gguf(path: Path, gpu_layers: int = 0, threads: Optional[int] = None) -> tuple[LlamaCppModel, Any]:
    """(model, tokenizer) for a GGUF file, both from llama.cpp."""
    from .engine.llama_runner import load_llama_model
    from .llama_tokenizer import LlamaCppTokenizer

    import llama_cpp

    handle = load_llama_model(path, gpu_layers)
    model = LlamaCppModel(path, handle, int(llama_cpp.llama_model_n_ctx_train(handle)), threads)
    return model, LlamaCppTokenizer(handle, path.stem)


def seq_tokens_for(context_len: int, bytes_per_token: int, max_seqs: int, kv_cache_memory: Optional[int],
                   ram: int) -> int:
    """KV cells for each of max_seqs sequences (llama.cpp gives every sequence a stream of its own).

    --kv-cache-memory is split evenly over the sequences. Without it each gets the model's window up
    to DEFAULT_SEQ_TOKENS, shrunk to keep the whole cache within CPU_KV_SHARE of RAM (as the torch
    backend's CPU default). Streams are multiples of 256 tokens, at least 256.
    """
    from .engine.llama_runner import DEFAULT_SEQ_TOKENS, KV_STREAM_ALIGN
    from .engine.runner import CPU_KV_SHARE

    if kv_cache_memory is not None:
        if kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be > 0 bytes, got {kv_cache_memory}")
        each = kv_cache_memory // bytes_per_token // max_seqs
        if each < KV_STREAM_ALIGN:
            raise ValueError(f"--kv-cache-memory {kv_cache_memory} bytes holds {kv_cache_memory // bytes_per_token} "
                             f"tokens ({bytes_per_token} bytes each): too few for --max-num-seqs {max_seqs} sequences "
                             f"of at least {KV_STREAM_ALIGN} tokens; raise it to "
                             f"{KV_STREAM_ALIGN * max_seqs * bytes_per_token} or lower --max-num-seqs")
    else:
        wanted = min(max(context_len, KV_STREAM_ALIGN), DEFAULT_SEQ_TOKENS)
        each = min(wanted, int(ram * CPU_KV_SHARE) // bytes_per_token // max_seqs)
    return max(KV_STREAM_ALIGN, min(each, _aligned_up(context_len, KV_STREAM_ALIGN)) // KV_STREAM_ALIGN * KV_STREAM_ALIGN)


def _aligned_up(n: int, step: int) -> int:
    return -(-n // step) * step


def build_llama_runner(model: LlamaCppModel, max_num_seqs: int, max_num_batched_tokens: int,
                       kv_cache_memory: Optional[int]) -> Any:
    """A LlamaCppRunner sized by the engine flags: --max-num-seqs sequence slots (the engine never runs
    more sequences, n > 1 forks included; spare slots are not free: each holds a KV stream), each with
    its share of --kv-cache-memory (seq_tokens_for)."""
    from .engine.llama_runner import LlamaCppOptions, LlamaCppRunner, kv_bytes_per_token
    from .engine.runner import ram_bytes

    seq_tokens = seq_tokens_for(model.context_len, kv_bytes_per_token(model.handle), max_num_seqs, kv_cache_memory,
                                ram_bytes())
    options = LlamaCppOptions(seq_tokens=seq_tokens, max_seqs=max_num_seqs,
                              batch_tokens=max(max_num_batched_tokens, 512), threads=model.threads)
    return LlamaCppRunner(model.path, options, model=model.handle)
