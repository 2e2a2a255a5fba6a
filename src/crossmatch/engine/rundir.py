"""One writer per run directory: an exclusive `fcntl.flock` on `RUN/.lock`, held while a run trains.

Two trainers on one run dir would replace each other's checkpoints while `config.yaml` is the other's
and `metrics.jsonl` gets duplicate steps. The kernel releases a flock when its process dies, however it
dies (SIGKILL included), so a stale lock never blocks the next run; the file keeps the holder's PID
only so that a refused second trainer can name it.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from crossmatch.errors import CrossmatchError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunDirLockedError(CrossmatchError):
    """Another process holds the run directory."""


class RunLock:
    """`with RunLock(run_dir):` (or acquire()/release()) holds the run dir exclusively.

    Raises:
        RunDirLockedError: another live process holds it (the message names its PID).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLockedError(
                    f"run dir {self.path.parent} is in use by another trainer (pid {holder or 'unknown'}); "
                    "wait for it to finish or choose another --run-dir"
                ) from err
            log.warning("cannot lock %s (%s): two trainers on this run dir would not be stopped", self.path, err)
            return self  # a file system without flock support: run unlocked rather than not at all
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""
