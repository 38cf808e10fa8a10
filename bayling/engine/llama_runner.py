"""LlamaCppRunner: the engine's Runner on llama.cpp (through llama-cpp-python's ctypes bindings).

One llama_decode per step holds every chunk's tokens, each token tagged with its sequence's KV id
and position; logits are asked for only at each chunk's last token. The engine's sequence ids are
arbitrary ints; llama.cpp's must lie in [0, n_seq_max), so the runner keeps a map from one to the
other and recycles freed slots.

Each slot has a KV stream of its own (llama.cpp's kv_unified off), `seq_tokens` cells long. Two
reasons, both measured on the demo model: with one stream shared by all sequences every token
attends over every sequence's cells (masked), so many sequences decoded markedly slower; and where a
sequence's cells fall in a shared stream changes the order llama.cpp's vector kernels sum in, so a
sequence's greedy answer depended on what ran beside it. With a stream each, a batched answer is
token for token the answer it gets alone. The price: a sequence can hold at most seq_tokens tokens
(the runner's context_len), whatever the others use.
"""
from __future__ import annotations

import ctypes
import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .numpy_sampler import NumpySampler
from .runner import Chunk

DEFAULT_SEQ_TOKENS = 4096  # KV cells per sequence when none are asked for
KV_STREAM_ALIGN = 256  # llama.cpp rounds a stream's size up to a multiple of this
DEFAULT_MAX_SEQS = 16
DEFAULT_BATCH_TOKENS = 2048  # tokens per llama_decode call; a bigger step is split into several
F16_BYTES = 2  # llama.cpp's default K and V cache type
LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR: llama.cpp's messages below this are dropped


class LlamaCppError(RuntimeError):
    """llama.cpp refused a model, a context or a batch; the message says which and why."""


@dataclass(frozen=True)
class LlamaCppOptions:
    """How to run a GGUF file on llama.cpp."""

    seq_tokens: int = DEFAULT_SEQ_TOKENS  # KV cells of each sequence (a multiple of 256)
    max_seqs: int = DEFAULT_MAX_SEQS  # sequences alive at once (llama.cpp allows at most 256)
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    threads: Optional[int] = None  # None = every core this process may use
    gpu_layers: int = 0  # layers offloaded to a GPU (needs a CUDA/Metal build); -1 = all
    flash_attn: bool = True
    verbose: bool = False


_log_callback: Any = None  # kept alive: llama.cpp holds a raw pointer to it


def _quiet_logs(verbose: bool) -> None:
    """Route llama.cpp's log to stderr only for errors (or everything when verbose)."""
    global _log_callback
    import llama_cpp

    def log(level: int, text: bytes, _user: Any) -> None:
        if verbose or level == LOG_LEVEL_ERROR:  # CONT (5) would pass the loading progress dots
            os.write(2, text or b"")

    _log_callback = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def default_threads() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def load_llama_model(path: Path, gpu_layers: int = 0, verbose: bool = False) -> Any:
    """Load a GGUF file's weights with llama.cpp (memory-mapped); returns a llama_model pointer."""
    import llama_cpp

    _quiet_logs(verbose)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path} (not a GGUF model it supports, or a damaged file)")
    return model


def kv_bytes_per_token(model: Any) -> int:
    """K and V (f16) of every layer for one token of a loaded model (no context needed)."""
    import llama_cpp as lib

    head_dim = lib.llama_model_n_embd(model) // lib.llama_model_n_head(model)
    return lib.llama_model_n_layer(model) * 2 * lib.llama_model_n_head_kv(model) * head_dim * F16_BYTES


class _Batch:
    """A llama_batch whose arrays are numpy buffers owned here, so filling them is vectorised.

    Every token belongs to exactly one sequence: n_seq_id is all ones and seq_id[i] points at
    slot i of one int32 array.
    """

    def __init__(self, capacity: int) -> None:
        import llama_cpp

        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        seq_ptr = ctypes.POINTER(llama_cpp.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_ptr * capacity)(*[ctypes.cast(base + 4 * i, seq_ptr) for i in range(capacity)])
        self.struct = llama_cpp.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        self.struct.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = self._seq_ptrs
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))


class LlamaCppRunner:
    """The engine's Runner on a GGUF file, run by llama.cpp on the CPU (or a GPU build)."""

    def __init__(self, path: Path, options: LlamaCppOptions = LlamaCppOptions(), model: Any = None) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(path)
        self.options = options
        if not 1 <= options.max_seqs <= 256:
            raise ValueError(f"max_seqs must be between 1 and 256 (llama.cpp's limit), got {options.max_seqs}")
        if options.seq_tokens < KV_STREAM_ALIGN or options.seq_tokens % KV_STREAM_ALIGN:
            raise ValueError(f"seq_tokens must be a positive multiple of {KV_STREAM_ALIGN}, got {options.seq_tokens}")
        self.model = model if model is not None else load_llama_model(self.path, options.gpu_layers,
                                                                         options.verbose)
        self._owns_model = model is None
        threads = options.threads or default_threads()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = options.seq_tokens * options.max_seqs
        params.n_batch = options.batch_tokens
        params.n_ubatch = min(options.batch_tokens, 512)
        params.n_seq_max = options.max_seqs
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = False  # a KV stream per sequence (see the module's docstring)
        params.no_perf = True
        # Flash attention, as llama.cpp's own tools pick it on a CPU: on the demo model decode was faster
        # with it for 1 and for 16 sequences, and llama-server's lead at 16 clients came from it. It moves
        # logits (it computes in f16), so the exact reference is llama_cpp.Llama(flash_attn=True).
        params.flash_attn_type = 1 if options.flash_attn else 0
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise LlamaCppError(f"llama.cpp could not create a context of {options.max_seqs} x {options.seq_tokens} "
                                f"tokens for {self.path.name} (out of memory?); lower --kv-cache-memory")
        self._memory = llama_cpp.llama_get_memory(self.ctx)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self._n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        # the longest sequence: its stream, or the window the model was trained on if that is shorter
        self.context_len = min(int(llama_cpp.llama_model_n_ctx_train(self.model)),
                               int(llama_cpp.llama_n_ctx_seq(self.ctx)))
        # llama.cpp caps the batch at the context size; a bigger batch would abort the process
        self._batch = _Batch(int(llama_cpp.llama_n_batch(self.ctx)))
        self._slots: dict[int, int] = {}  # engine seq id -> llama.cpp seq id
        self._free_slots = list(range(options.max_seqs))  # a heap: the lowest free slot is taken first
        self._lengths: dict[int, int] = {}  # engine seq id -> tokens held in the KV cache
        self.sampler = NumpySampler()

    # --- Runner interface -------------------------------------------------------------------
    def run(self, chunks: Sequence[Chunk]) -> np.ndarray:
        """Feed all chunks (one llama_decode per batch_tokens), return last-token logits [N, vocab].

        When the step fits one llama_decode (every decode step does), the array is a view of
        llama.cpp's own logits buffer: no copy, valid until the next run().
        """
        if not chunks:
            return np.empty((0, self.vocab_size), dtype=np.float32)
        slots = [self._slot_for(c) for c in chunks]
        # llama.cpp computes a batch of several streams in one pass only for a run of consecutive slot ids
        # in increasing order; any other order is split into one pass per run. Slots are handed out
        # lowest first (so the busy ones stay a run), and the chunks are fed in slot order.
        order = sorted(range(len(chunks)), key=slots.__getitem__)
        in_order = all(i == j for i, j in enumerate(order))
        if not in_order:
            chunks, slots = [chunks[i] for i in order], [slots[i] for i in order]
        try:
            logits = self._decode_all(chunks, slots)
        except BaseException:
            for chunk, slot in zip(chunks, slots):  # no half-fed chunk stays in the cache
                self._lib.llama_memory_seq_rm(self._memory, slot, chunk.start, -1)
            raise
        for chunk in chunks:
            self._lengths[chunk.seq_id] = chunk.start + len(chunk.tokens)
        if not in_order:  # rows back in the caller's order (a copy)
            logits = logits[np.argsort(order)]
        return logits

    def free(self, seq_id: int) -> None:
        """Forget a sequence's KV and give its llama.cpp slot back."""
        slot = self._slots.pop(seq_id, None)
        self._lengths.pop(seq_id, None)
        if slot is not None:
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            heapq.heappush(self._free_slots, slot)

    def fork(self, src_seq_id: int, dst_seq_id: int) -> None:
        """dst gets a copy of src's KV cells (llama.cpp copies src's stream into dst's before the next decode)."""
        if src_seq_id not in self._slots:
            raise KeyError(f"fork from unknown sequence {src_seq_id}")
        self.free(dst_seq_id)
        dst = self._take_slot(dst_seq_id)
        self._lib.llama_memory_seq_cp(self._memory, self._slots[src_seq_id], dst, -1, -1)
        self._lengths[dst_seq_id] = self._lengths[src_seq_id]

    def kv_bytes_per_token(self) -> int:
        """K and V (f16) of every layer for one token."""
        return kv_bytes_per_token(self.model)

    def kv_capacity_tokens(self) -> int:
        """llama.cpp's context size: every sequence's stream together."""
        return self._n_ctx

    def close(self) -> None:
        """Free the context (and the model when this runner loaded it)."""
        if getattr(self, "ctx", None):
            self._lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_owns_model", False) and self.model:
            self._lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- internals --------------------------------------------------------------------------
    def _take_slot(self, seq_id: int) -> int:
        if not self._free_slots:
            raise LlamaCppError(f"all {self.options.max_seqs} llama.cpp sequences are in use; "
                                "raise --max-num-seqs or wait for requests to finish")
        slot = heapq.heappop(self._free_slots)
        self._slots[seq_id] = slot
        self._lengths[seq_id] = 0
        return slot

    def _slot_for(self, chunk: Chunk) -> int:
        if chunk.seq_id not in self._slots:
            if chunk.start != 0:
                raise ValueError(f"sequence {chunk.seq_id} is unknown to the runner but its chunk starts "
                                 f"at position {chunk.start}")
            return self._take_slot(chunk.seq_id)
        slot = self._slots[chunk.seq_id]
        held = self._lengths[chunk.seq_id]
        if chunk.start > held:
            raise ValueError(f"sequence {chunk.seq_id} holds {held} tokens; a chunk cannot start at {chunk.start}")
        if chunk.start < held:  # the engine rewinds: drop the cells past the new start
            self._lib.llama_memory_seq_rm(self._memory, slot, chunk.start, -1)
            self._lengths[chunk.seq_id] = chunk.start
        return slot

    def _decode_all(self, chunks: Sequence[Chunk], slots: list[int]) -> np.ndarray:
        b, cap = self._batch, self._batch.capacity
        if all(len(c.tokens) == 1 for c in chunks) and len(chunks) <= cap:  # a decode step: no loop per token
            n = len(chunks)
            b.token[:n] = [c.tokens[0] for c in chunks]
            b.pos[:n] = [c.start for c in chunks]
            b.seq[:n] = slots
            b.logits[:n] = 1
            self._decode(n)
            return self._logits(n)
        # Pack chunks in order into batches of <= capacity tokens (a long chunk spans several). A step
        # that needs one llama_decode returns llama.cpp's logits as they lie; a bigger one copies each
        # batch's rows out before the next llama_decode overwrites them.
        out: Optional[np.ndarray] = None
        n, rows = 0, []  # tokens in the batch; output rows whose logits it ends with
        for row, (chunk, slot) in enumerate(zip(chunks, slots)):
            tokens = np.asarray(chunk.tokens, dtype=np.int32)
            if tokens.size == 0:
                raise ValueError(f"empty chunk for sequence {chunk.seq_id}")
            done = 0
            while done < tokens.size:
                take = min(cap - n, tokens.size - done)
                self._put(n, tokens[done:done + take], chunk.start + done, slot)
                done += take
                n += take
                if done == tokens.size:
                    b.logits[n - 1] = 1
                    rows.append(row)
                if n == cap:
                    self._decode(n)
                    if out is None:
                        out = np.empty((len(chunks), self.vocab_size), dtype=np.float32)
                    out[rows] = self._logits(len(rows))
                    n, rows = 0, []
        if n:
            self._decode(n)
            if out is None:  # the whole step was this one llama_decode
                return self._logits(len(rows))
            out[rows] = self._logits(len(rows))
        return out

    def _put(self, at: int, tokens: np.ndarray, pos: int, slot: int) -> None:
        b, end = self._batch, at + tokens.size
        b.token[at:end] = tokens
        b.pos[at:end] = np.arange(pos, pos + tokens.size, dtype=np.int32)
        b.seq[at:end] = slot
        b.logits[at:end] = 0

    def _decode(self, n: int) -> None:
        self._batch.struct.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, self._batch.struct)
        if rc == 1:
            raise LlamaCppError(f"llama.cpp's KV cache ({self.options.seq_tokens} tokens per sequence) has no "
                                f"room for {n} more tokens")
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed with code {rc} on a batch of {n} tokens")

    def _logits(self, rows: int) -> np.ndarray:
        """The last decode's logits (the tokens that asked for them lie contiguously, in batch order)."""
        address = ctypes.cast(self._lib.llama_get_logits(self.ctx), ctypes.c_void_p).value
        view = np.frombuffer(_float_buffer(address, rows * self.vocab_size), dtype=np.float32)
        view.flags.writeable = False  # llama.cpp's memory: the sampler copies before it changes a row
        return view.reshape(rows, self.vocab_size)


def _float_buffer(address: int, count: int) -> Any:
    """`count` float32s at `address` as a buffer numpy can view (ctypes array types are cached per size)."""
    return _float_array_type(count).from_address(address)


_array_types: dict[int, Any] = {}


def _float_array_type(count: int) -> Any:
    kind = _array_types.get(count)
    if kind is None:
        kind = _array_types[count] = ctypes.c_float * count
    return kind
