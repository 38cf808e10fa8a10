"""Sharded safetensors output, streamed tensor by tensor, with an index and a checksum manifest."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Iterable

import torch

from .errors import DeltaError
from ..files import file_sha256
from .formats import DTYPE_NAMES

SINGLE_FILE = "model.safetensors"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` checks the folder
# Everything besides the weights that a model folder needs: config, generation config, tokenizer.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "vocab.json", "merges.txt")
HEADER_ALIGN = 8  # safetensors pads its JSON header so the data starts 8-byte aligned
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    file: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2_147_483_648, '1000' -> 1000 (as --max-shard-size takes it)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise DeltaError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[Shard]:
    """Group tensors, in order, into shards of at most max_bytes (a bigger tensor gets a shard of its own)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_FILE, tuple(groups[0]))]
    return [Shard(SHARD_NAME.format(i + 1, len(groups)), tuple(g)) for i, g in enumerate(groups)]


class ShardWriter:
    """Writes one safetensors file: the header first (every shape is known up front), then each
    tensor, piece by piece, as soon as it is computed, so only the piece in hand is held in memory."""

    def __init__(self, folder: Path, shard: Shard):
        self.shard = shard
        self.path = folder / shard.file
        self._next = 0  # index of the tensor being written
        self._filled = 0  # its elements written so far
        self._digest = hashlib.sha256()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in shard.tensors:
            header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGN)
        self._file = open(self.path, "wb")
        self._put(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, values: torch.Tensor) -> None:
        """Append the next tensor, or the next piece of it (flat); tensors come in the header's order."""
        spec = self.shard.tensors[self._next]
        if name != spec.name or values.dtype != spec.dtype or self._filled + values.numel() > prod(spec.shape):
            raise AssertionError(f"{self.path.name}: expected {spec} at {self._filled}, "
                                 f"got {name} {values.dtype} {list(values.shape)}")
        self._put(memoryview(values.contiguous().view(torch.uint8).numpy().reshape(-1)))
        self._filled += values.numel()
        if self._filled == prod(spec.shape):
            self._next, self._filled = self._next + 1, 0

    def close(self) -> str:
        """Flush to disk and return the file's sha256."""
        if self._next != len(self.shard.tensors):
            raise AssertionError(f"{self.path.name}: {len(self.shard.tensors) - self._next} tensors not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Close the file if still open (after an error; the caller removes the folder)."""
        if not self._file.closed:
            self._file.close()

    def _put(self, data: memoryview | bytes) -> None:
        self._file.write(data)
        self._digest.update(data)


def write_index(folder: Path, shards: list[Shard]) -> list[str]:
    """The transformers index for a sharded checkpoint (none for a single file); returns what it wrote."""
    if len(shards) == 1:
        return []
    weight_map = {t.name: s.file for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": dict(sorted(weight_map.items()))}
    _write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return [INDEX_NAME]


def copy_side_files(source: Path, folder: Path, dtype: torch.dtype) -> list[str]:
    """Copy config, generation config and tokenizer files; the config's dtype becomes what we wrote."""
    copied = []
    for name in SIDE_FILES:
        src = source / name
        if not src.is_file():
            continue
        if name == "config.json":
            config = json.loads(src.read_text())
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = str(dtype).removeprefix("torch.")
            _write_text(folder / name, json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src, folder / name)
        copied.append(name)
    return copied


def write_manifest(folder: Path, digests: dict[str, str], others: Iterable[str]) -> None:
    """SHA256SUMS in sha256sum's format: the shards' digests (computed while writing) and the other files'."""
    digests = dict(digests)
    for name in others:
        digests[name] = file_sha256(folder / name)
    _write_text(folder / MANIFEST_NAME, "".join(f"{h}  {n}\n" for n, h in sorted(digests.items())))


def read_manifest(folder: Path) -> dict[str, str]:
    """file name -> sha256, from a folder's SHA256SUMS."""
    lines = (folder / MANIFEST_NAME).read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line.strip())}


def human_size(nbytes: float) -> str:
    """1_500_000_000 -> '1.50 GB', 300_000 -> '0.30 MB' (decimal units, as disk sizes are given)."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
