"""Merge a weight diff into its base model, or make one: OUT = BASE + DELTA, or DELTA = TARGET - BASE.

    python apply_delta.py --base-model-path BASE --target-model-path OUT --delta-path DELTA
    python apply_delta.py --make-diff --base-model-path BASE --target-model-path TARGET --delta-path OUT

Paths are local folders or hub ids (inputs only). Memory stays near the largest tensor; see docs/apply_delta.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import run_writing_job
from . import DEFAULT_MAX_SHARD_SIZE, DeltaError, DeltaJob, run


def parse_args(argv: list[str]) -> DeltaJob:
    p = argparse.ArgumentParser(description="OUT = BASE + DELTA (or, with --make-diff, DELTA = TARGET - BASE), "
                                            "in fp16, one tensor at a time.")
    p.add_argument("--base-model-path", required=True, help="the base model (e.g. LLaMA-13B in HF format)")
    p.add_argument("--target-model-path", required=True, help="the merged model to write (the input with --make-diff)")
    p.add_argument("--delta-path", required=True, help="the weight diff (the output with --make-diff)")
    p.add_argument("--make-diff", action="store_true", help="write DELTA = TARGET - BASE instead")
    p.add_argument("--verify", action="store_true", help="read the output back and check every tensor")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="output shard size, e.g. 5GB or 2GiB")
    p.add_argument("--revision", default=None, help="hub revision for hub ids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--to-gguf", default=None, metavar="QUANT", choices=["Q4_K_M", "Q5_K_M", "Q8_0", "F16"],
                   help="then export the merged model to TARGET.gguf at this weight type (see bayling.export)")
    a = p.parse_args(argv)
    if a.to_gguf and a.make_diff:
        p.error("--to-gguf exports a merged model; it cannot go with --make-diff")
    return DeltaJob(base=a.base_model_path, target=a.target_model_path, delta=a.delta_path, make_diff=a.make_diff,
                    verify=a.verify, force=a.force, max_shard_size=a.max_shard_size, revision=a.revision,
                    progress=not a.no_progress, to_gguf=a.to_gguf)


def main(argv: list[str]) -> int:
    job = parse_args(argv)
    if job.to_gguf:
        gguf = _gguf_path(job.target)
        if gguf.exists() and not job.force:  # refuse before the long merge, not after it
            print(f"error: {gguf} already exists; pass --force to replace it", file=sys.stderr)
            return 2
    code, result = run_writing_job(lambda: run(job), DeltaError)
    if result is None:
        return code
    print(result.summary())
    if result.verdict:
        print(result.verdict)
    if job.to_gguf:
        return _export(result.folder, job)
    return 0


def _gguf_path(target: str) -> Path:
    """TARGET.gguf beside the merged folder TARGET."""
    folder = Path(target).expanduser().absolute()
    return folder.with_name(folder.name + ".gguf")


def _export(folder: Path, job: DeltaJob) -> int:
    from ..export import ExportError, ExportJob, export

    gguf = _gguf_path(str(folder))
    try:
        print(export(ExportJob(model_path=str(folder), gguf=str(gguf), quant=job.to_gguf, force=job.force)).summary())
    except ExportError as e:
        print(f"error: the merged model {folder} was written, but its GGUF export failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; the merged model {folder} was written, its GGUF was not", file=sys.stderr)
        return 130
    return 0


def console() -> None:
    """The console command `bayling-apply-delta`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console()
