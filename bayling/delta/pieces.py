"""The arithmetic, one piece of a tensor at a time, in a few reused buffers.

Pieces bound memory whatever the model (LLaMA-13B's embedding matrix alone is 328 MB). The buffers
are reused because fresh 64 MB allocations each time either get mmapped (a page fault per 4 KB: seconds
per GB) or, once glibc raises its mmap threshold, fragment the heap (hundreds of MB of extra RSS).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .shards import WeightSource

CHUNK_BYTES = 64 << 20  # one piece of the widest operand: large enough that syscalls cost nothing
# Upstream's arithmetic: both operands cast to fp16, added (or subtracted) in fp16.
OUT_DTYPE = torch.float16


class BufferPool:
    """Byte buffers of CHUNK_BYTES, handed out and given back (thread-safe: the writer gives back)."""

    def __init__(self) -> None:
        self.nbytes = CHUNK_BYTES
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.nbytes:  # a strided .bin tensor is read whole: not pooled
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            if self._free:
                return self._free.pop()
        return torch.empty(self.nbytes, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.nbytes:
            with self._lock:
                self._free.append(buf)


def combine(a: torch.Tensor, b: torch.Tensor, subtract: bool) -> torch.Tensor:
    """fp16(a) + fp16(b), or fp16(a) - fp16(b); reuses a's buffer when a is fp16 (callers pass fresh tensors)."""
    # torch adds fp16 on the CPU by rounding an fp32 sum, which equals the exactly rounded fp16 sum
    # (fp32 has 24 >= 2*11 + 2 bits, so double rounding cannot bite): the same bits as on a GPU.
    a = a.to(OUT_DTYPE)
    b = b.to(OUT_DTYPE)
    return a.sub_(b) if subtract else a.add_(b)


def piece_ranges(a: WeightSource, b: WeightSource, name: str) -> list[tuple[int, Optional[int]]]:
    """(start, count) pieces covering `name` in both sources; (0, None) means the whole tensor at once."""
    x, y = a.tensors[name], b.tensors[name]
    if x.stride is not None or y.stride is not None:
        return [(0, None)]
    step = CHUNK_BYTES // max(x.dtype.itemsize, y.dtype.itemsize, OUT_DTYPE.itemsize)
    return [(start, min(step, x.numel - start)) for start in range(0, x.numel, step)] or [(0, 0)]


def read_fp16(source: WeightSource, name: str, start: int, count: Optional[int],
              pool: BufferPool) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece of `name` as fp16 and the pooled buffer holding it (give the buffer back when done)."""
    info = source.tensors[name]
    raw_buf = pool.take(info.dtype.itemsize * (info.numel if count is None else count))
    raw = source.read(name, start, count, into=raw_buf)
    if raw.dtype == OUT_DTYPE:
        return raw, raw_buf
    buf = pool.take(OUT_DTYPE.itemsize * raw.numel())
    values = buf[:OUT_DTYPE.itemsize * raw.numel()].view(OUT_DTYPE).view(raw.shape)
    values.copy_(raw)  # the same rounding as .to(float16)
    pool.give(raw_buf)
    return values, buf


def compute(a: WeightSource, b: WeightSource, name: str, start: int, count: Optional[int], subtract: bool,
            pool: BufferPool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 a ± b for one piece, in a's buffer; returns (values, buffer) and gives b's buffer back."""
    x, x_buf = read_fp16(a, name, start, count, pool)
    y, y_buf = read_fp16(b, name, start, count, pool)
    values = combine(x, y, subtract)
    pool.give(y_buf)
    return values, x_buf
