"""Merge a weight diff into its base model, or make one: OUT = BASE + DELTA, or DELTA = TARGET - BASE.

    python apply_delta.py --base-model-path BASE --target-model-path OUT --delta-path DELTA
    python apply_delta.py --make-diff --base-model-path BASE --target-model-path TARGET --delta-path OUT

Paths are local folders or hub ids (inputs only). Memory stays near the largest tensor; see docs/apply_delta.md.
"""
from bayling.delta.__main__ import console, main  # noqa: F401

if __name__ == "__main__":
    console()
