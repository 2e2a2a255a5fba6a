"""Durable file replacement: the one rule every writer of a run's files follows.

`atomic_write(path, write)` writes to a temporary file in the same folder, flushes and fsyncs it, gives
it the mode a plain `open()` would (the umask's), renames it over `path` and fsyncs the folder, so a
reader (or a resumed run) only ever sees the old file or the complete new one. A failure, a full disk
or a Ctrl-C included, leaves the old file intact and no temporary file behind, and raises a
`CrossmatchError` (or `WriteInterrupted`, a KeyboardInterrupt) naming the file. A killed process leaves
its temporary file behind: `remove_orphans` clears them when the next run starts.

Reading the user's files has one rule too: `open_regular` opens only a regular file (a FIFO, a device or a
socket is refused at once, never waited on or read forever), and `read_bytes` reads one whole under a size
cap (`data.max_annotation_bytes` for dataset files).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from crossmatch.errors import CrossmatchError, DataError

TMP_MARK = ".tmp"  # temporary names are ".{name}.tmp{pid}" in the target's folder


class DiskFullError(CrossmatchError):
    """A write failed because the disk (or the user's quota) is full."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace `path` by what `write(binary_file)` writes, atomically and durably (a symlink's target is
    replaced, and the link kept).

    Raises:
        DiskFullError: the disk is full (the previous file is intact).
        WriteInterrupted: Ctrl-C (SIGINT) during the write (the previous file is intact).
        CrossmatchError: any other OS error while writing (the previous file is intact).
    """
    path = Path(path)
    if path.is_symlink():  # write the file it points to; the link stays
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    except RuntimeError as err:  # torch.save turns a failed write, or a Ctrl-C in it, into a RuntimeError
        cause = _behind(err, (OSError, KeyboardInterrupt))
        if isinstance(cause, KeyboardInterrupt):
            raise WriteInterrupted(f"interrupted while writing {path} (the previous file is intact)") from err
        if cause is not None:
            raise _write_error(path, cause) from err
        if _disk_full(tmp.parent):
            raise DiskFullError(f"cannot write {path}: the disk is full (the previous file is intact)") from err
        raise
    except KeyboardInterrupt as err:
        raise WriteInterrupted(f"interrupted while writing {path} (the previous file is intact)") from err
    finally:
        with contextlib.suppress(OSError):  # e.g. the folder could not be created
            tmp.unlink(missing_ok=True)
    return path


class WriteInterrupted(KeyboardInterrupt):
    """Ctrl-C arrived while a file was being replaced; its message names the file (left intact)."""


def _write_error(path: Path, err: OSError) -> CrossmatchError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"cannot write {path}: the disk is full (the previous file is intact)")
    return CrossmatchError(f"cannot write {path}: {err.strerror or err}")


def _behind(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The exception of one of `kinds` that `err` was raised from or while handling (torch's C++ writer
    chains the error of the Python file it writes to as the context of its RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def check_writable(path: str | Path, what: str) -> Path:
    """Fail early, before any long work, when `path` cannot be written: creates its folder and a probe
    file there (a folder that is read-only, a path through a file, a folder given as `path`).

    Raises:
        CrossmatchError: naming `what` (e.g. "--json") and the path.
    """
    path = Path(path)
    if path.is_dir():
        raise CrossmatchError(f"{what} {path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise CrossmatchError(f"cannot write {what} {path}: {err.strerror or err}") from err
    return path


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20  # under 1 MB free


def write_text(path: str | Path, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temporary files that an interrupted `atomic_write` left in `folder` (a killed process
    never reaches its cleanup). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for p in folder.glob(f".*{TMP_MARK}*") if p.is_file()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


# ---- reading the user's files ---------------------------------------------------------------------------

GIB = 1 << 30
MAX_ANNOTATION_BYTES = GIB  # default of data.max_annotation_bytes: the most a file read whole may hold


def open_regular(path: str | Path, what: str) -> BinaryIO:
    """Open a user's file for binary reading, refusing at once anything but a regular file: a FIFO would
    block the open (or the first read) forever, and /dev/zero or /dev/urandom never end. The open itself
    does not block (O_NONBLOCK, which has no effect on a regular file).

    Raises:
        DataError: naming `what` (e.g. "dataset file", "--image") and the path: missing, not a regular file
            (a folder, a FIFO, a device), or unreadable.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as err:
        raise DataError(f"{what} not found: {path}") from err
    except OSError as err:
        raise DataError(f"cannot read {what} {path}: {err.strerror or err}") from err
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise DataError(f"cannot read {what} {path}: Is a directory")
        raise DataError(f"{what} {path} is {_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def read_bytes(path: str | Path, what: str, max_bytes: int = MAX_ANNOTATION_BYTES, key: str = "") -> bytes:
    """The whole of a regular file (see `open_regular`), refused without reading it when it holds more than
    `max_bytes` (`key` names the setting that raises the cap, e.g. "data.max_annotation_bytes").

    Raises:
        DataError: as `open_regular`, or the file is larger than `max_bytes`.
    """
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""  # + 1: a file that grew meanwhile
        if size > max_bytes or len(data) > max_bytes:
            setting = f", more than {key}={max_bytes}" if key else f", more than {max_bytes}"
            raise DataError(f"{what} {path} holds {max(size, len(data))} bytes{setting}")
    return data
