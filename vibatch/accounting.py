"""One JSON line per finished job, appended under an exclusive lock."""
from __future__ import annotations

import fcntl
import json
import os
import time

from .errors import LockTimeout

LOCK_TIMEOUT_S = 10.0


def append(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:  # held for one short write by others; released by close
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"could not lock {path} within {LOCK_TIMEOUT_S:g} s") from None
                time.sleep(0.005)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str) -> list[dict]:
    try:
        with open(path, "rb") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
