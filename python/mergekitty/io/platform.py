"""The operating-system calls of the output transaction, with a portable form of each.

Linux and macOS take ``flock``, ``pread``/``pwrite``, a directory ``fsync`` and (Linux) the atomic
``renameat2(RENAME_EXCHANGE)``; Windows takes ``msvcrt.locking``, seek + read/write, no directory
sync (a directory cannot be opened as a file there) and the two-rename replacement
(output.py). ``MERGEKITTY_PORTABLE_IO=1`` makes Linux take the portable forms too, so their
tests run here; the native module reads the same switch (rust/src/platform).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from functools import cache
from pathlib import Path

WINDOWS = sys.platform == "win32"


@cache
def portable() -> bool:
    """Whether the portable forms are used: on Windows, or when the switch asks for them."""
    return WINDOWS or os.environ.get("MERGEKITTY_PORTABLE_IO", "") not in ("", "0")


def lock_now(fd: int) -> None:
    """Take an exclusive lock on the open file ``fd`` at once; BlockingIOError when another
    process holds it. The system releases it when the process dies."""
    if WINDOWS:
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined,unused-ignore]
        except OSError as exc:
            raise BlockingIOError(errno.EAGAIN, "locked by another process") from exc
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def read_at(fd: int, size: int, offset: int) -> bytes:
    if portable():
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)
    return os.pread(fd, size, offset)


def write_at(fd: int, data: bytes, offset: int) -> None:
    if portable():
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return
    os.pwrite(fd, data, offset)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable (nothing to do where directories cannot be opened)."""
    if WINDOWS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on ``path``'s file system."""
    return shutil.disk_usage(path).free


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the
    platform or the file system cannot (the caller then replaces with two renames)."""
    if portable() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))
