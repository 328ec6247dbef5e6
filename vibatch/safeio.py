"""Root reading and removing what a job's user (or the guest, through a share) could have made.

- ``read_bounded``/``read_tail``: open without following a symlink, without blocking on a FIFO
  or a device, regular files only, and read at most so many bytes. Anything else reads as None.
- ``rmtree``: remove a directory tree without following symlinks, at any depth (no recursion,
  a bounded number of open descriptors), and stop if a directory is moved while it is removed.
"""
from __future__ import annotations

import ctypes
import os
import stat
from typing import Optional

from .errors import NodeError

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def _open_regular(path: str) -> Optional[int]:
    try:
        fd = os.open(path, _READ)
    except OSError:
        return None   # missing, a symlink (ELOOP), unreadable
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_bounded(path: str, limit: int) -> Optional[bytes]:
    """The first ``limit`` bytes of the regular file at ``path``, or None."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_tail(path: str, limit: int) -> Optional[bytes]:
    """The last ``limit`` bytes of the regular file at ``path``, or None."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit))
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def drop_read(fd: int, upto: int) -> bool:
    """Give back the space of bytes [0, upto) of a file that is read once, as it is written (the
    size stays, the blocks go): a job's output stream then holds only what is not yet copied,
    not all it ever printed. False where the filesystem cannot."""
    return upto <= 0 or _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                        0, upto) == 0


def rmtree(path: str) -> None:
    """Remove ``path`` (a directory, a symlink or a file; absent is fine).

    Walks down with ``openat``-style descriptors and back up through ``..``, checking that each
    parent is still the directory it came from (device and inode): a tree moved elsewhere while
    we remove it is left alone rather than followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    fd = os.open(path, _DIR)
    top = os.fstat(fd)
    chain = [(top.st_dev, top.st_ino, "")]   # the directories we are in, and their names
    try:
        while True:
            child = _next_entry(fd)
            if child is not None:
                sub = os.open(child, _DIR, dir_fd=fd)
                sst = os.fstat(sub)
                chain.append((sst.st_dev, sst.st_ino, child))
                os.close(fd)
                fd = sub
                continue
            if len(chain) == 1:
                break
            parent = os.open("..", _DIR, dir_fd=fd)
            pst = os.fstat(parent)
            dev, ino, name = chain.pop()
            os.close(fd)
            fd = parent
            if (pst.st_dev, pst.st_ino) != chain[-1][:2]:
                raise NodeError(f"a directory below {path} was moved while it was removed; "
                                "left the rest in place")
            st = os.lstat(name, dir_fd=fd)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _next_entry(fd: int) -> Optional[str]:
    """Unlink every non-directory in ``fd``; return the name of one subdirectory, if any."""
    with os.scandir(fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                pass
    return None
