"""Write a folder under a temporary name beside its destination and rename it into place only when
complete: Ctrl-C, a crash, a kill or a full disk leaves neither the destination nor the temporary folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .errors import DeltaError

DONE = b"done"
DIR_MODE = 0o777
# A watchdog in its own process group (so a terminal's Ctrl-C does not reach it): it waits for its
# stdin to close and removes the folder unless the writer said "done". This covers what no in-process
# cleanup can: SIGKILL, the OOM killer, a segfault.
JANITOR = (
    "import shutil, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "if sys.stdin.buffer.read() != b'done':\n"
    "    shutil.rmtree(sys.argv[1], ignore_errors=True)\n"
)


def check_destination(final: Path, force: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless force."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise DeltaError(f"{final} exists and is not a folder; remove it or choose another output path")
    if final.is_dir() and any(final.iterdir()) and not force:
        raise DeltaError(f"{final} is not empty; pass --force to replace it, or choose another output path")


class StagingFolder:
    """`with StagingFolder(final, force) as tmp: ...write into tmp...; stage.commit()` makes tmp become final."""

    def __init__(self, final: Path, force: bool = False):
        self.final = final
        self.force = force
        self.path: Optional[Path] = None
        self._janitor: Optional[subprocess.Popen] = None

    def __enter__(self) -> Path:
        check_destination(self.final, self.force)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        os.chmod(self.path, DIR_MODE & ~_umask())  # mkdtemp makes it private; the model is not
        try:
            self._janitor = subprocess.Popen([sys.executable, "-I", "-S", "-c", JANITOR, str(self.path)],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        return self.path

    def commit(self) -> None:
        """Rename the finished folder into place (replacing an old one when forced)."""
        assert self.path is not None
        _fsync_dir(self.path)
        old = None
        if self.final.exists():
            check_destination(self.final, self.force)  # it may have been filled while we worked
            old = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-", dir=self.final.parent))
            os.replace(self.final, old / self.final.name)
        os.replace(self.path, self.final)
        _fsync_dir(self.final.parent)
        self._release(DONE)
        self.path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self.path is not None:  # not committed: an error, Ctrl-C or SystemExit on the way
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        self._release(b"")

    def _release(self, word: bytes) -> None:
        if self._janitor is None:
            return
        try:
            self._janitor.stdin.write(word)
            self._janitor.stdin.close()
        except OSError:
            pass
        self._janitor.wait()
        self._janitor = None


def free_bytes(folder: Path) -> int:
    """Free space for the folder's filesystem, looking at its nearest existing ancestor."""
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
