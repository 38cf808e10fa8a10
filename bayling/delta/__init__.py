"""Weight diffs: merge BASE + DELTA into a full model, or make DELTA = TARGET - BASE, in bounded memory.

BayLing-7B/13B v1.0 are released as diffs against LLaMA. `run(DeltaJob(...))` checks both inputs,
streams the arithmetic one tensor at a time into safetensors shards, and renames the finished folder
into place, so memory stays near the largest tensor and a failure leaves nothing behind.
"""
from .errors import DeltaError
from .merge import DEFAULT_MAX_SHARD_SIZE, DeltaJob, DeltaResult, run
from .pieces import combine

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "DeltaError", "DeltaJob", "DeltaResult", "combine", "run"]
