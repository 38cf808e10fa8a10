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
    generation_config: Any = None  # what eos_token_ids() looks for on a transformers model


def wants_llama_cpp(backend: str, model_path: Optional[str], torch_flags: Sequence[str] = ()) -> bool:
    """--backend llama.cpp; or auto on a .gguf file or the demo model, unless a torch-only flag was given."""
    if backend != "auto":
        return backend == "llama.cpp"
    # auto: a GGUF runs as it is (no de-quantized copy); a flag only transformers honours
    # (--load-4bit, --device cuda, ...) says the user wants the torch path for it.
    return not torch_flags and (model_path is None or model_path.endswith(".gguf"))


def load_gguf(path: Path, gpu_layers: int = 0) -> tuple[LlamaCppModel, Any]:
    """(model, tokenizer) for a GGUF file, both from llama.cpp."""
    from .engine.llama_runner import load_llama_model
    from .llama_tokenizer import LlamaCppTokenizer

    import llama_cpp

    handle = load_llama_model(path, gpu_layers)
    model = LlamaCppModel(path, handle, int(llama_cpp.llama_model_n_ctx_train(handle)))
    return model, LlamaCppTokenizer(handle, path.stem)


def build_llama_runner(model: LlamaCppModel, max_num_seqs: int, max_num_batched_tokens: int,
                       kv_cache_memory: Optional[int]) -> Any:
    """A LlamaCppRunner sized by the engine flags: --kv-cache-memory bytes become the context size, and
    --max-num-seqs the sequence slots (the engine never runs more sequences, n > 1 forks included;
    spare slots are not free: llama.cpp's per-step work grows with them)."""
    from .engine.llama_runner import DEFAULT_KV_TOKENS, LlamaCppOptions, LlamaCppRunner, kv_bytes_per_token

    kv_tokens = kv_cache_memory // kv_bytes_per_token(model.handle) if kv_cache_memory else DEFAULT_KV_TOKENS
    options = LlamaCppOptions(kv_tokens=max(int(kv_tokens), 256), max_seqs=max_num_seqs,
                              batch_tokens=max(max_num_batched_tokens, 512))
    return LlamaCppRunner(model.path, options, model=model.handle)
