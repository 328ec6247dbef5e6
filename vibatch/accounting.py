"""One JSON line per finished job, appended under an exclusive lock."""
from __future__ import annotations

import json
import os

from .errors import LockTimeout
from .util import flock_within

LOCK_TIMEOUT_S = 10.0


def append(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if not flock_within(fd, LOCK_TIMEOUT_S):  # others hold it for one short write
            raise LockTimeout(f"could not lock {path} within {LOCK_TIMEOUT_S:g} s")
        os.write(fd, line)  # the lock is released by close
        os.fsync(fd)
    finally:
        os.close(fd)


TAIL_BYTES = 1 << 20


def contains(path: str, record_id: str) -> bool:
    """Whether one of the file's last lines (its last MiB) is the record ``record_id``: a rerun
    of an epilogue killed between its append and its next step comes within seconds."""
    needle = f'"record_id": "{record_id}"'.encode()
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            return needle in f.read()
    except FileNotFoundError:
        return False
