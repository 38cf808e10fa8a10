"""Reading inputs and writing resumable outputs: one row per line, flushed as soon as it is done.

A run that is interrupted leaves a file whose complete lines are finished rows; a re-run
counts them, drops a half-written last line, and carries on from the next input row.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

PathLike = Union[str, Path]


def read_jsonl(path: PathLike) -> list[Any]:
    """All JSON values in a .jsonl file; blank lines are skipped, a bad line is a one-line error."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e.msg})") from None
    return rows


def read_lines(path: PathLike) -> list[str]:
    """Lines of a plain-text file without their line ends (a final newline adds no empty line)."""
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def one_line(text: str) -> str:
    """Keep one segment on one line: inner line breaks become spaces."""
    return " ".join(text.splitlines()).strip() if ("\n" in text or "\r" in text) else text.strip()


class ResumableWriter:
    """Appends finished rows to a file; .done says how many rows a previous run already wrote."""

    def __init__(self, path: PathLike, jsonl: bool = True) -> None:
        self.path = Path(path)
        self.jsonl = jsonl
        self.done = self._complete_rows()
        self._file = None

    def _complete_rows(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a half-written row
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
        lines = data[:keep].split(b"\n")[:-1]
        if self.jsonl:
            for n, line in enumerate(lines, 1):
                try:
                    json.loads(line)
                except ValueError:
                    raise ValueError(f"{self.path}:{n} is not a finished JSON row; "
                                     "move the file away to start over") from None
        return len(lines)

    def existing(self) -> list[Any]:
        """The rows already written (parsed JSON, or text lines)."""
        if not self.path.exists():
            return []
        return read_jsonl(self.path) if self.jsonl else read_lines(self.path)

    def write(self, row: Any) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        line = json.dumps(row, ensure_ascii=False) if self.jsonl else one_line(str(row))
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # an interrupted run must not lose rows it reported as done
        self.done += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def windows(items: list[Any], size: int, start: int = 0) -> Iterator[tuple[int, list[Any]]]:
    """(offset, items[offset:offset+size]) from start on."""
    for offset in range(start, len(items), size):
        yield offset, items[offset:offset + size]


def progress(total: int, initial: int, desc: str, enabled: bool = True, unit: str = "row") -> Any:
    """A tqdm bar on stderr; a resumed run starts at the work already done."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def check_rows_match(done: Iterable[dict], inputs: Iterable[dict], key: str, path: PathLike) -> None:
    """A resumed file must hold the same rows as the input's first rows, in order."""
    for n, (a, b) in enumerate(zip(done, inputs), 1):
        if isinstance(a, dict) and isinstance(b, dict) and a.get(key) != b.get(key):
            raise ValueError(f"{path}: row {n} has {key}={a.get(key)!r} but the input's row {n} has "
                             f"{key}={b.get(key)!r}; it was written for another input: choose another --output")
