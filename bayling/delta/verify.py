"""--verify: read the written folder back from disk and check it tensor by tensor against the inputs."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .errors import DeltaError
from .formats import TensorInfo, read_elements, read_tensor, safetensors_tensors
from .pieces import BufferPool, combine, compute, piece_ranges, read_fp16
from .shards import WeightSource
from ..files import file_sha256
from .writer import Shard, human_size, read_manifest

FP16_UNIT_ROUNDOFF = 2.0 ** -11  # half an fp16 ulp, relative
FP16_TINY = 2.0 ** -24  # the smallest fp16 subnormal: the absolute rounding error near zero
ROUND_TRIP_SLICE = 1 << 20


def verify_folder(folder: Path, shards: list[Shard], a: WeightSource, b: WeightSource, subtract: bool,
                  progress: bool = True) -> str:
    """Confirm OUT == a + b (or a - b) bit for bit, and for a diff that b + OUT gives a back; one-line verdict."""
    manifest = read_manifest(folder)
    total = sum(s.nbytes for s in shards)
    pool = BufferPool()
    exact = 0
    worst = 0.0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify",
              disable=None if progress else True, file=sys.stderr) as bar:
        for shard in shards:
            path = folder / shard.file
            if file_sha256(path) != manifest.get(shard.file):
                raise DeltaError(f"verification failed: {shard.file} does not match its checksum")
            _check_header(path, shard)
            infos = {t.name: t for t in safetensors_tensors(path)}
            fd = os.open(path, os.O_RDONLY)
            try:
                for spec in shard.tensors:
                    for start, count in piece_ranges(a, b, spec.name):
                        got, got_buf = _read_output(infos[spec.name], fd, start, count, pool)
                        if subtract:
                            e, w = _check_diff(a, b, spec.name, start, count, got, pool)
                            exact, worst = exact + e, max(worst, w)
                        else:
                            want, want_buf = compute(a, b, spec.name, start, count, subtract, pool)
                            _check_equal(got, want, spec.name, "sum")
                            pool.give(want_buf)
                        pool.give(got_buf)
                        bar.update(got.nbytes)
            finally:
                os.close(fd)
    n = sum(len(s.tensors) for s in shards)
    if not subtract:
        return (f"verified: all {n} tensors ({human_size(total)}) equal base + delta bit for bit; "
                "checksums match")
    return (f"verified: all {n} tensors ({human_size(total)}) equal target - base bit for bit; base + delta gives "
            f"the target back exactly for {100 * exact / max(total // 2, 1):.3f}% of values, the rest within fp16 "
            f"rounding (max error {worst:.2e}); checksums match")


def _read_output(info: TensorInfo, fd: int, start: int, count: Optional[int],
                 pool: BufferPool) -> tuple[torch.Tensor, torch.Tensor]:
    buf = pool.take(info.dtype.itemsize * (info.numel if count is None else count))
    got = read_tensor(info, fd, buf) if count is None else read_elements(info, fd, start, count, buf)
    return got, buf


def _check_equal(got: torch.Tensor, want: torch.Tensor, name: str, what: str) -> None:
    # Bit patterns, so that -0.0 != 0.0 and a NaN equals itself.
    if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        n = int((got.view(torch.int16) != want.view(torch.int16)).sum())
        raise DeltaError(f"verification failed: {name} differs from the recomputed {what} in {n} values")


def _check_diff(target_src: WeightSource, base_src: WeightSource, name: str, start: int, count: Optional[int],
                delta: torch.Tensor, pool: BufferPool) -> tuple[int, float]:
    """delta == target - base bit for bit, and base + delta within fp16 rounding of target."""
    target, t_buf = read_fp16(target_src, name, start, count, pool)
    base, b_buf = read_fp16(base_src, name, start, count, pool)
    want_buf = pool.take(delta.nbytes)
    want = want_buf[:delta.nbytes].view(torch.float16).view(delta.shape)
    _check_equal(delta, combine(want.copy_(target), base, subtract=True), name, "difference")
    exact, worst = 0, 0.0
    t, b, d = target.reshape(-1), base.reshape(-1), delta.reshape(-1)
    for i in range(0, t.numel(), ROUND_TRIP_SLICE):  # float32 temporaries stay small
        e, w = _round_trip(t[i:i + ROUND_TRIP_SLICE], b[i:i + ROUND_TRIP_SLICE], d[i:i + ROUND_TRIP_SLICE], name)
        exact, worst = exact + e, max(worst, w)
    for buf in (t_buf, b_buf, want_buf):
        pool.give(buf)
    return exact, worst


def _check_header(path: Path, shard: Shard) -> None:
    # A second, independent reader: the safetensors library must accept the file and see our tensors.
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            names = set(f.keys())
    except Exception as e:
        raise DeltaError(f"verification failed: safetensors cannot open {path.name} ({e})") from None
    if names != {t.name for t in shard.tensors}:
        raise DeltaError(f"verification failed: {path.name} holds other tensors than planned")


def _round_trip(target: torch.Tensor, base: torch.Tensor, delta: torch.Tensor, name: str) -> tuple[int, float]:
    """How many values base + delta gives back exactly, and the worst error, checked against fp16 rounding."""
    back = base + delta  # all three fp16, as a user's merge computes it
    err = (back.float() - target.float()).abs()
    # Two roundings: delta = (t - b)(1 + e1), back = (b + delta)(1 + e2), |e| <= u, plus subnormal steps.
    bound = FP16_UNIT_ROUNDOFF * ((target.float() - base.float()).abs() + back.float().abs()) * 1.01 + 2 * FP16_TINY
    if not bool((err <= bound).all()):
        raise DeltaError(f"verification failed: base + delta does not give the target back in {name} "
                         f"(error {float(err.max()):.3g}, beyond fp16 rounding)")
    exact = int((back.view(torch.int16) == target.view(torch.int16)).sum())
    return exact, float(err.max()) if err.numel() else 0.0
