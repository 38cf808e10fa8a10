"""TorchRunner: the Runner for transformers models (fp16/fp32, bitsandbytes 8/4-bit, accelerate device maps).

The KV cache is one slot buffer per layer, [rows, kv heads, columns, head dim]: a sequence owns a row
and its token t sits in column t. A forward takes any subset of rows; queries are left-padded so the
last query column is every row's last token (logits_to_keep=1), and a 4-D mask built here says which
columns each query sees. The rows that decode are kept as a prefix [0, B) of the buffer, so a decode
step reads the cache as a view; the buffer is permuted (one copy) only when that order breaks
(a prefill finished, a sequence left). Layer buffers are created lazily in the first forward on the
device of that layer, so an accelerate device map needs nothing special.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..tokens import context_length
from .runner import CPU_KV_SHARE, Chunk, ram_bytes
from .torch_sampler import TorchSampler

KV_GROWTH = 256  # columns are allocated in blocks so a decode step rarely reallocates
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _SlotLayer(DynamicLayer):
    """One layer's view of the runner's buffers for one forward: writes real tokens, returns the rows."""

    def __init__(self, runner: "TorchRunner", index: int) -> None:
        super().__init__()
        self.runner, self.index = runner, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return self.runner._write_and_read(self.index, key_states, value_states)


class TorchRunner:
    """Runs chunks of many sequences through a transformers causal LM, keeping their KV in slot buffers."""

    def __init__(self, model: Any, *, context_len: Optional[int] = None, kv_cache_memory: Optional[int] = None,
                 gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be > 0 bytes, got {kv_cache_memory}")
        attn = getattr(model.config, "_attn_implementation", "sdpa") or "sdpa"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"the engine needs attn_implementation 'sdpa' or 'eager' (it passes 4-D masks), "
                             f"the model uses {attn!r}")
        self.model = model
        self.device = model_device(model)
        self.sampler = TorchSampler()
        self.context_len = context_len or context_length(model)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0]) \
            if model.get_output_embeddings() is not None else int(model.config.vocab_size)
        self._bool_mask = attn == "sdpa"
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        self.kv_dtype = model.get_input_embeddings().weight.dtype
        if not self.kv_dtype.is_floating_point:
            self.kv_dtype = torch.float16
        self._capacity = self._budget_tokens(kv_cache_memory, gpu_memory_utilization)
        self._k: list[Optional[torch.Tensor]] = [None] * self.layers
        self._v: list[Optional[torch.Tensor]] = [None] * self.layers
        self._rows = 0  # allocated rows
        self._columns = 0  # allocated columns
        self._slot: dict[int, int] = {}  # seq id -> row
        self._length: dict[int, int] = {}  # seq id -> tokens held
        self._batch: Optional[dict] = None  # the forward in flight: rows, starts, lengths, width

    # --- budget --------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.kv_dtype).bits // 8

    def kv_capacity_tokens(self) -> int:
        return self._capacity

    def kv_footprint_tokens(self, reservations: Sequence[int]) -> int:
        """What the slot buffer needs for these sequences: every row is as wide as the longest."""
        return len(reservations) * max(reservations, default=0)

    def _budget_tokens(self, kv_cache_memory: Optional[int], utilization: float) -> int:
        if kv_cache_memory is not None:
            budget = kv_cache_memory
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = torch.cuda.memory_allocated(self.device)  # the weights (and anything else held)
            # Activations of one step: logits rows plus a margin for the forward's temporaries.
            activations = 2 * 2**30
            budget = int(total * utilization) - used - activations
            if budget <= 0:
                raise ValueError(f"no GPU memory left for the KV cache: {total / 2**30:.1f} GiB x "
                                 f"{utilization} - {used / 2**30:.1f} GiB of weights - 2 GiB of activations; "
                                 "raise --gpu-memory-utilization or pass --kv-cache-memory")
        else:
            budget = int(ram_bytes() * CPU_KV_SHARE)
        return max(1, budget // self.kv_bytes_per_token())

    # --- the Runner interface ------------------------------------------------------------------
    def free(self, seq_id: int) -> None:
        self._slot.pop(seq_id, None)
        self._length.pop(seq_id, None)
        if not self._slot:  # nothing left: give the memory back
            self._k = [None] * self.layers
            self._v = [None] * self.layers
            self._rows = self._columns = 0

    def fork(self, src_seq_id: int, dst_seq_id: int) -> None:
        n = self._length[src_seq_id]
        self._layout(list(self._slot) + [dst_seq_id], max(self._length.values()))
        src, dst = self._slot[src_seq_id], self._slot[dst_seq_id]
        for bufs in (self._k, self._v):
            for buf in bufs:
                if buf is not None:
                    buf[dst, :, :n] = buf[src, :, :n]
        self._length[dst_seq_id] = n

    @torch.inference_mode()
    def run(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """One forward for the decode chunks, one for the prefill chunks; logits in chunk order."""
        for c in chunks:
            if not c.tokens:
                raise ValueError(f"empty chunk for sequence {c.seq_id}")
            if c.start != self._length.get(c.seq_id, 0):
                raise ValueError(f"sequence {c.seq_id} holds {self._length.get(c.seq_id, 0)} tokens, "
                                 f"chunk starts at {c.start}")
        ids = [c.seq_id for c in chunks]
        new_row = len(self._slot) + len(chunks)
        # Decoding rows first, in their current row order: they stay the prefix [0, B), so the step
        # reads them as a view and the buffer is only permuted when that prefix changes.
        decode = sorted((i for i, c in enumerate(chunks) if len(c.tokens) == 1),
                        key=lambda i: self._slot.get(ids[i], new_row + i))
        prefill = [i for i, c in enumerate(chunks) if len(c.tokens) > 1]
        decoding = {ids[i] for i in decode}
        order = [ids[i] for i in decode] + sorted((s for s in self._slot if s not in decoding), key=self._slot.get)
        order += [s for s in ids if s not in self._slot and s not in decoding]
        self._layout(order, max([c.start + len(c.tokens) for c in chunks] + list(self._length.values())))
        out: list[Optional[torch.Tensor]] = [None] * len(chunks)
        for group in (decode, prefill):
            if group:
                logits = self._forward([chunks[i] for i in group])
                for j, i in enumerate(group):
                    out[i] = logits[j]
        for c in chunks:
            self._length[c.seq_id] = c.start + len(c.tokens)
        return torch.stack(out)  # type: ignore[arg-type]

    # --- internals -----------------------------------------------------------------------------
    def _layout(self, order: list[int], columns: int) -> None:
        """Give every sequence in `order` a row, rows in that order, and room for `columns` columns."""
        want = {s: r for r, s in enumerate(order)}
        rows = len(order)
        need_columns = min(-(-columns // KV_GROWTH) * KV_GROWTH, max(self.context_len, columns))
        same_order = all(self._slot.get(s) == r for s, r in want.items())
        if same_order and rows <= self._rows and columns <= self._columns:
            self._slot = want
            return
        new_columns = max(need_columns, columns) if columns > self._columns else self._columns
        keep = [(want[s], self._slot[s]) for s in order if s in self._slot]
        for bufs in (self._k, self._v):
            for i, old in enumerate(bufs):
                if old is None:
                    continue
                new = old.new_zeros((rows, old.shape[1], new_columns, old.shape[3]))
                if keep:
                    dst = torch.tensor([d for d, _ in keep], device=old.device)
                    src = torch.tensor([s for _, s in keep], device=old.device)
                    n = min(self._columns, new_columns)
                    new[dst, :, :n] = old[src, :, :n]
                bufs[i] = new
        self._slot, self._rows, self._columns = want, rows, new_columns

    def _forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        dev = self.device
        rows = [self._slot[c.seq_id] for c in chunks]
        lengths = [len(c.tokens) for c in chunks]
        starts = [c.start for c in chunks]
        B, S = len(chunks), max(lengths)
        T = max(s + n for s, n in zip(starts, lengths))
        input_ids = torch.zeros((B, S), dtype=torch.long)
        for b, c in enumerate(chunks):
            input_ids[b, S - lengths[b]:] = torch.tensor(list(c.tokens), dtype=torch.long)
        starts_t = torch.tensor(starts, device=dev)
        lengths_t = torch.tensor(lengths, device=dev)
        # positions: [B, S]; left padding gets negative positions, clamped to 0 (their output is unused)
        positions = (starts_t[:, None] + torch.arange(S, device=dev)[None, :] - (S - lengths_t)[:, None]).clamp(min=0)
        visible = torch.arange(T, device=dev)[None, None, :] <= positions[:, :, None]  # [B, S, T]
        mask = visible[:, None]
        if not self._bool_mask:
            mask = torch.zeros(mask.shape, dtype=self.kv_dtype, device=dev).masked_fill(
                ~mask, torch.finfo(self.kv_dtype).min)
        contiguous = rows == list(range(B))
        self._batch = {"rows": rows, "rows_t": torch.tensor(rows, device=dev), "starts": starts,
                       "starts_t": starts_t, "lengths": lengths, "S": S, "T": T, "contiguous": contiguous}
        try:
            cache = Cache(layers=[_SlotLayer(self, i) for i in range(self.layers)])
            result = self.model(input_ids=input_ids.to(dev), attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self._batch = None
        return result.logits[:, -1].float()

    def _write_and_read(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store this forward's real tokens of one layer; return the rows' keys/values [B, H, T, D]."""
        b = self._batch
        assert b is not None, "the cache is only valid inside TorchRunner.run"
        if self._k[layer] is None:
            shape = (self._rows, keys.shape[1], self._columns, keys.shape[3])
            self._k[layer] = keys.new_zeros(shape)
            self._v[layer] = values.new_zeros(shape)
        out = []
        for buf, new in ((self._k[layer], keys), (self._v[layer], values)):
            if b["S"] == 1:
                buf[b["rows_t"].to(buf.device), :, b["starts_t"].to(buf.device)] = new[:, :, 0]
            else:
                S = b["S"]
                for i, (row, start, n) in enumerate(zip(b["rows"], b["starts"], b["lengths"])):
                    buf[row, :, start:start + n] = new[i, :, S - n:]
            if b["contiguous"]:
                out.append(buf[:len(b["rows"]), :, :b["T"]])
            else:
                out.append(buf[:, :, :b["T"]].index_select(0, b["rows_t"].to(buf.device)))
        return out[0], out[1]
