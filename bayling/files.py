"""Small file utilities shared by the model cache and the delta writer."""
from __future__ import annotations

import hashlib
from pathlib import Path

HASH_CHUNK = 1 << 22  # 4 MiB: large reads, small memory


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()
