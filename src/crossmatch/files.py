"""Durable file replacement: the one rule every writer of a run's files follows.

`atomic_write(path, write)` writes to a temporary file in the same folder, flushes and fsyncs it, gives
it the mode a plain `open()` would (the umask's), renames it over `path` and fsyncs the folder, so a
reader (or a resumed run) only ever sees the old file or the complete new one. A failure, a full disk
included, leaves the old file intact and no temporary file behind, and raises a `CrossmatchError`
naming the file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from crossmatch.errors import CrossmatchError

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
    """Replace `path` by what `write(binary_file)` writes, atomically and durably.

    Raises:
        DiskFullError: the disk is full (the previous file is intact).
        CrossmatchError: any other OS error while writing (the previous file is intact).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"cannot write {path}: the disk is full (the previous file is intact)") from err
        raise CrossmatchError(f"cannot write {path}: {err.strerror or err}") from err
    except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError of its C++ writer
        if _disk_full(tmp.parent):
            raise DiskFullError(f"cannot write {path}: the disk is full (the previous file is intact)") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
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
