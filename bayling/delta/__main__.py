"""Merge a weight diff into its base model, or make one: OUT = BASE + DELTA, or DELTA = TARGET - BASE.

    python apply_delta.py --base-model-path BASE --target-model-path OUT --delta-path DELTA
    python apply_delta.py --make-diff --base-model-path BASE --target-model-path TARGET --delta-path OUT

Paths are local folders or hub ids (inputs only). Memory stays near the largest tensor; see docs/apply_delta.md.
"""
from __future__ import annotations

import argparse
import signal
import sys

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
    a = p.parse_args(argv)
    return DeltaJob(base=a.base_model_path, target=a.target_model_path, delta=a.delta_path, make_diff=a.make_diff,
                    verify=a.verify, force=a.force, max_shard_size=a.max_shard_size, revision=a.revision,
                    progress=not a.no_progress)


def main(argv: list[str]) -> int:
    # SIGTERM unwinds like Ctrl-C, so the half-written folder is removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    job = parse_args(argv)
    try:
        result = run(job)
    except DeltaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(result.summary())
    if result.verdict:
        print(result.verdict)
    return 0


def console() -> None:
    """The console command `bayling-apply-delta`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    console()
