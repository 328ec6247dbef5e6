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


def read(path: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
