"""OUT = BASE + DELTA, or DELTA = TARGET - BASE: checked first, streamed piece by piece, staged atomically."""
from __future__ import annotations

import errno
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .checks import check_pair
from .errors import DeltaError
from .pieces import OUT_DTYPE, BufferPool, compute, piece_ranges
from .shards import WeightSource, locate_folder, open_source
from .staging import StagingFolder, check_destination, free_bytes
from .verify import verify_folder
from .writer import Shard, ShardWriter, TensorSpec, copy_side_files, human_size, parse_size, plan_shards, \
    write_index, write_manifest

DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class DeltaJob:
    """What apply_delta.py was asked to do. Paths are local folders or hub ids (inputs only)."""

    base: str
    target: str
    delta: str
    make_diff: bool = False  # write DELTA = TARGET - BASE instead of TARGET = BASE + DELTA
    verify: bool = False
    force: bool = False
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    revision: Optional[str] = None
    progress: bool = True
    to_gguf: Optional[str] = None  # after a merge, export TARGET.gguf at this weight type (bayling.export)


@dataclass(frozen=True)
class DeltaResult:
    folder: Path
    tensors: int
    shards: int
    nbytes: int
    seconds: float
    verdict: Optional[str] = None  # --verify's one-line verdict

    def summary(self) -> str:
        rate = self.nbytes / 1e6 / max(self.seconds, 1e-9)
        return (f"wrote {self.folder}: {self.tensors} tensors in {self.shards} shard(s), {human_size(self.nbytes)} "
                f"in {self.seconds:.1f} s ({rate:.0f} MB/s)")


def run(job: DeltaJob) -> DeltaResult:
    """Check both inputs, then write the output folder atomically; every bad input is a one-line DeltaError."""
    start = time.perf_counter()
    if job.make_diff:  # DELTA = TARGET - BASE, released with the target's config and tokenizer
        first, second, out, subtract = (job.target, "target"), (job.base, "base"), job.delta, True
    else:  # TARGET = BASE + DELTA, with the delta's config and tokenizer, as upstream does
        first, second, out, subtract = (job.base, "base"), (job.delta, "delta"), job.target, False
    out_path = Path(out).expanduser().absolute()
    max_bytes = parse_size(job.max_shard_size)
    check_destination(out_path, job.force)
    folders = [locate_folder(path, role, job.revision) for path, role in (first, second)]
    for folder, (path, role) in zip(folders, (first, second)):
        if _overlaps(folder, out_path):
            raise DeltaError(f"the output folder {out_path} overlaps the {role} folder {path}; write elsewhere")
    with open_source(folders[0], first[1]) as a, open_source(folders[1], second[1]) as b:
        check_pair(a, b)
        if a.dropped:
            print(f"note: leaving out {len(a.dropped)} derived buffers such as {a.dropped[0]} "
                  "(transformers recomputes them)", file=sys.stderr)
        shards = plan_shards((TensorSpec(n, OUT_DTYPE, t.shape) for n, t in a.tensors.items()), max_bytes)
        total = sum(s.nbytes for s in shards)
        free = free_bytes(out_path.parent)
        if free < total:
            raise DeltaError(f"not enough disk space for {out_path}: it needs {human_size(total)}, "
                             f"{human_size(free)} are free; free some space or write elsewhere")
        side_source = a.folder if subtract else b.folder
        verdict = _write(out_path, job, shards, a, b, subtract, side_source)
    return DeltaResult(out_path, sum(len(s.tensors) for s in shards), len(shards), total,
                       time.perf_counter() - start, verdict)


def _write(out: Path, job: DeltaJob, shards: list[Shard], a: WeightSource, b: WeightSource, subtract: bool,
           side_source: Path) -> Optional[str]:
    stage = StagingFolder(out, job.force)
    try:
        with stage as tmp:
            side = copy_side_files(side_source, tmp, OUT_DTYPE)
            digests = write_shards(tmp, shards, a, b, subtract, job.progress)
            write_manifest(tmp, digests, side + write_index(tmp, shards))
            verdict = verify_folder(tmp, shards, a, b, subtract, job.progress) if job.verify else None
            stage.commit()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DeltaError(f"the disk filled up while writing {out}; nothing was left behind. Free at least "
                             f"{human_size(sum(s.nbytes for s in shards))} or write elsewhere") from None
        raise DeltaError(f"cannot write {out}: {e.strerror or e}; nothing was left behind") from None
    return verdict


def write_shards(folder: Path, shards: list[Shard], a: WeightSource, b: WeightSource, subtract: bool,
                 progress: bool = True) -> dict[str, str]:
    """Compute and write every shard, one piece at a time; returns file name -> sha256."""
    # A writer thread writes (and hashes) one piece while this thread reads and adds the next: writing
    # is bound by the disk, reading and adding by memory and CPU. Three pieces are alive at most: the
    # one being written and the two operands of the next (five while converting non-fp16 inputs).
    buffers = BufferPool()
    writers: list[ShardWriter] = []
    closes = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")

    def write(writer: ShardWriter, name: str, values: torch.Tensor, buf: torch.Tensor) -> None:
        writer.write(name, values)
        buffers.give(buf)

    try:
        with tqdm(total=sum(s.nbytes for s in shards), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="diff" if subtract else "merge", disable=None if progress else True, file=sys.stderr) as bar:
            last: Optional[Future] = None
            for shard in shards:
                writers.append(ShardWriter(folder, shard))
                for spec in shard.tensors:
                    for start, count in piece_ranges(a, b, spec.name):
                        values, buf = compute(a, b, spec.name, start, count, subtract, buffers)
                        if last is not None:
                            last.result()
                        last = pool.submit(write, writers[-1], spec.name, values, buf)
                        bar.update(values.nbytes)
                        del values, buf
                closes.append((shard.file, pool.submit(writers[-1].close)))
            return {file: future.result() for file, future in closes}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for writer in writers:
            writer.abort()


def _overlaps(folder: Path, out: Path) -> bool:
    folder, out = folder.resolve(), out.resolve()
    return folder == out or folder in out.parents or out in folder.parents
