"""An exclusive lock on a run directory, so that two trainers never write one run.

``out_dir/.lock`` is locked with ``flock``: the kernel releases it when the process ends, however it ends,
so a run killed with ``kill -9`` can be resumed at once and no stale lock is ever left to clean up. The file
holds the owner's pid, host and start time, for the message another trainer gets. On systems without
``fcntl`` (Windows) the lock is skipped with a warning.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from .errors import RunInUse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(out_dir):`` holds the run; a second holder gets :class:`RunInUse` at once."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            warnings.warn("no fcntl on this system: the run directory is not locked", stacklevel=2)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            raise RunInUse(f"{self.path.parent} is being trained by another process ({_describe(owner)}); wait for "
                           f"it to finish, or give this run another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(owner: str) -> str:
    try:
        info = json.loads(owner)
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"
