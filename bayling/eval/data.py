"""BayLing-80: the manifest of upstream's four files, fetching them, and loading them verified."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .io import read_jsonl

# The manifest ships with the package; the data goes to a per-user folder (or --data-dir / --dest,
# or $BAYLING_DATA_DIR), never into the installed package or a checkout.
MANIFEST = Path(__file__).with_name("bayling80_manifest.json")
DATA_DIR_ENV = "BAYLING_DATA_DIR"
FILE_MODE = 0o644  # readable by others, like any downloaded data set
DOWNLOAD_TIMEOUT_S = 30
# Short names users may type instead of a path: "singleturn.en" -> BayLing-80.singleturn.en.jsonl
SHORT_PREFIX, SHORT_SUFFIX = "BayLing-80.", ".jsonl"


def default_data_dir() -> Path:
    """$BAYLING_DATA_DIR, else $XDG_DATA_HOME/bayling/BayLing-80 (~/.local/share/bayling/BayLing-80)."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "bayling" / "BayLing-80"


class ChecksumError(ValueError):
    """A data file is not the published one."""


@dataclass(frozen=True)
class DataFile:
    name: str
    size: int
    sha256: str
    url: str


def load_manifest(path: Path = MANIFEST) -> list[DataFile]:
    """The four upstream files with their source URL, byte size and sha256."""
    data = json.loads(path.read_text(encoding="utf-8"))
    base = data["base_url"].rstrip("/")
    return [DataFile(f["name"], int(f["bytes"]), f["sha256"], f"{base}/{f['name']}") for f in data["files"]]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, expected: DataFile, where: str) -> None:
    """Raise ChecksumError unless data is exactly the published file."""
    digest = sha256_bytes(data)
    if len(data) != expected.size or digest != expected.sha256:
        raise ChecksumError(
            f"{where} is not the published {expected.name}: {len(data)} bytes, sha256 {digest}; "
            f"expected {expected.size} bytes, sha256 {expected.sha256}")


def _download(url: str) -> bytes:
    if url.startswith("file://"):
        return Path(url[len("file://"):]).read_bytes()
    if "://" not in url:
        return Path(url).read_bytes()
    import httpx

    response = httpx.get(url, timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=True)
    response.raise_for_status()
    return response.content


def _place_hint(f: DataFile, target: Path) -> str:
    return (f"download {f.url} elsewhere and place it at {target} "
            f"({f.size} bytes, sha256 {f.sha256}); then run fetch-data again to verify it")


def fetch_data(dest: Optional[Path] = None, base_url: Optional[str] = None, force: bool = False) -> int:
    """Download every manifest file into dest, verified; returns how many files are missing or bad."""
    dest = default_data_dir() if dest is None else dest
    dest.mkdir(parents=True, exist_ok=True)
    failures = 0
    for f in load_manifest():
        target = dest / f.name
        url = f"{base_url.rstrip('/')}/{f.name}" if base_url else f.url
        if target.exists() and not force:
            try:
                verify_bytes(target.read_bytes(), f, str(target))
                print(f"ok        {target}")
                continue
            except ChecksumError as e:
                print(f"error: {e}; refusing it: delete it or pass --force to download it again", file=sys.stderr)
                failures += 1
                continue
        try:
            data = _download(url)
        except Exception as e:  # offline, DNS, HTTP error: say exactly what to do instead
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: could not download {url} ({reason[:160]}); {_place_hint(f, target)}", file=sys.stderr)
            failures += 1
            continue
        try:
            verify_bytes(data, f, url)
        except ChecksumError as e:
            print(f"error: {e}; not saved", file=sys.stderr)
            failures += 1
            continue
        with tempfile.NamedTemporaryFile(dir=dest, prefix=f".{f.name}.", suffix=".part", delete=False) as tmp:
            tmp.write(data)
        os.chmod(tmp.name, FILE_MODE)  # NamedTemporaryFile creates it 0600
        os.replace(tmp.name, target)  # atomic: the file is complete or absent
        print(f"fetched   {target}")
    return failures


def resolve_questions(name_or_path: str, data_dir: Optional[Path] = None) -> Path:
    """A path, or a short name such as 'singleturn.en' for the fetched upstream file in data_dir."""
    data_dir = default_data_dir() if data_dir is None else data_dir
    path = Path(name_or_path)
    if path.exists() or os.sep in name_or_path or name_or_path.endswith(SHORT_SUFFIX):
        return path
    return data_dir / f"{SHORT_PREFIX}{name_or_path}{SHORT_SUFFIX}"


def load_questions(name_or_path: str, allow_modified: bool = False, data_dir: Optional[Path] = None) -> list[dict]:
    """BayLing-80-format rows. A file named like an upstream one must match its checksum."""
    path = resolve_questions(name_or_path, data_dir)
    known = {f.name: f for f in load_manifest()}
    if not path.exists():
        hint = (f" (run `python -m bayling.eval fetch-data --dest {path.parent}` to download the upstream files)"
                if path.name in known else "")
        raise FileNotFoundError(f"question file {path} does not exist{hint}")
    if path.name in known and not allow_modified:
        try:
            verify_bytes(path.read_bytes(), known[path.name], str(path))
        except ChecksumError as e:
            raise ChecksumError(f"{e}; pass --allow-modified to use it anyway") from None
    rows = read_jsonl(path)
    for n, row in enumerate(rows, 1):
        _check_question(row, f"{path}:{n}")
    return rows


def _check_question(row: Any, where: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("question_id"), int):
        raise ValueError(f"{where}: expected an object with an integer question_id")
    text = row.get("text")
    ok = isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
    if not ok:
        raise ValueError(f"{where}: text must be a string (single-turn) or a list of strings (multi-turn)")


def turns_of(row: dict) -> list[str]:
    """The user turns of a question row."""
    return [row["text"]] if isinstance(row["text"], str) else list(row["text"])
