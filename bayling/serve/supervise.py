"""Children that die with their launcher, and the launcher's restart policy for a dead worker.

Two guards, because either alone has a gap: the kernel's parent-death signal (PR_SET_PDEATHSIG,
Linux only, set in the child between fork and exec) and, in our own children, a thread that exits
when the parent process is gone (it covers a launcher that is not Linux's, or a race at fork).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Callable, Optional

log = logging.getLogger("bayling.serve.supervise")

PARENT_ENV = "BAYLING_PARENT_PID"
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 1.0
# On SIGTERM the worker lets in-flight requests run on this long (--drain-timeout); the launcher,
# which stops the worker with SIGTERM, waits that long (plus a margin) before SIGKILL.
DEFAULT_DRAIN_S = 30.0


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_preexec(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: Ctrl-C's default action back, SIGKILL when the launcher dies, and exit at once if it
    already died between fork and here."""

    def preexec() -> None:
        # A launcher started in the background by a non-interactive shell (nohup, CI) inherits SIGINT
        # ignored, and so would every child; Python then never raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


def watch_parent(poll_s: float = PARENT_POLL_S) -> Optional[threading.Thread]:
    """In a child the launcher started (BAYLING_PARENT_PID set): exit as soon as the launcher is gone."""
    pid = os.environ.get(PARENT_ENV, "")
    if not pid.isdigit():
        return None
    parent = int(pid)

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                log.error("the launcher (pid %d) is gone; exiting", parent)
                os._exit(1)
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="watch-parent", daemon=True)
    thread.start()
    return thread


class RestartBudget:
    """Restart with exponential backoff, at most `per_minute` times in any 60 s."""

    def __init__(self, per_minute: int = 5, first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> None:
        self.per_minute, self.first_delay_s, self.max_delay_s = per_minute, first_delay_s, max_delay_s
        self.times: deque[float] = deque()
        self.delay_s = first_delay_s

    def next_delay(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds to wait before the next restart, or None when the budget for this minute is spent."""
        now = time.monotonic() if now is None else now
        while self.times and now - self.times[0] > 60:
            self.times.popleft()
        if len(self.times) >= self.per_minute:
            return None
        self.times.append(now)
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.max_delay_s)
        return delay

    def healthy(self) -> None:
        """The restarted child came up: the next failure starts from the first delay again."""
        self.delay_s = self.first_delay_s
