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
import shutil
import time
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

    def acquire(self, orphan_wait_s: float = 30.0) -> RunLock:
        """Take the lock. A holder that is dead while its lock lives on (DataLoader workers forked from a
        SIGKILLed trainer inherit the lock until they notice and exit) is waited for, up to `orphan_wait_s`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + orphan_wait_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                holder = _read_pid(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) and holder and not _alive(int(holder)):
                    if time.monotonic() < deadline:
                        time.sleep(0.2)  # the dead trainer's orphaned workers still hold the lock
                        continue
                self._refuse(err, holder)
                return self  # a file system without flock support: run unlocked rather than not at all
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _refuse(self, err: OSError, holder: str) -> None:
        """Raise for a live holder; only warn where the file system has no flock."""
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirLockedError(
                f"run dir {self.path.parent} is in use by another trainer (pid {holder or 'unknown'}); "
                "wait for it to finish or choose another --run-dir"
            ) from err
        log.warning("cannot lock %s (%s): two trainers on this run dir would not be stopped", self.path, err)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


ASIDE_NAME = ".replaced"  # `--overwrite`: the old run's files, until the new run's first checkpoint


class SetAside:
    """`train --overwrite` without losing the old run to a start that fails: the old run's files are moved
    into `RUN/.replaced/` once the new run is accepted, deleted when its first checkpoint is written
    (`discard`), and moved back if it fails before that (`restore`). A process killed in between leaves the
    folder; `recover` (at the next start, under the run lock) finishes what it was doing.

    Args:
        run_dir: the run folder.
        names: the files and folders of a run (checkpoints, logs, config) that move.
    """

    def __init__(self, run_dir: str | Path, names: tuple[str, ...]):
        self.run_dir, self.names = Path(run_dir), names
        self.folder = self.run_dir / ASIDE_NAME

    def move(self) -> SetAside:
        self.folder.mkdir()
        for name in self.names:
            if (self.run_dir / name).exists():
                os.replace(self.run_dir / name, self.folder / name)
        return self

    def restore(self) -> None:
        """Delete what the failed new run wrote and put the old run back."""
        if not self.folder.is_dir():
            return
        for name in self.names:
            _remove(self.run_dir / name)
            if (self.folder / name).exists():
                os.replace(self.folder / name, self.run_dir / name)
        shutil.rmtree(self.folder, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def recover(self) -> None:
        """A folder left by a killed `--overwrite`: discarded if the new run wrote a checkpoint, else restored."""
        if not self.folder.is_dir():
            return
        ckpts = self.run_dir / "checkpoints"
        if ckpts.is_dir() and any(ckpts.glob("*.pt")):
            log.info("removing %s: the run that replaced it had written its first checkpoint", self.folder)
            self.discard()
        else:
            log.warning("restoring the run in %s: the --overwrite that set it aside wrote no checkpoint", self.folder)
            self.restore()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
