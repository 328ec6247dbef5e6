"""One JSON line per finished job, appended under an exclusive lock."""
from __future__ import annotations

import grp
import json
import os

from ..errors import ConfigError, LockTimeout
from ..util import flock_within

LOCK_TIMEOUT_S = 10.0


def append(path: str, record: dict, group: str = "") -> None:
    """``group``: the admins' group that may read the file (0640); "" keeps it root's (0600)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    gid = _gid(group)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        _narrow(fd, gid)
        if not flock_within(fd, LOCK_TIMEOUT_S):  # others hold it for one short write
            raise LockTimeout(f"could not lock {path} within {LOCK_TIMEOUT_S:g} s")
        os.write(fd, line)  # the lock is released by close
        os.fsync(fd)
    finally:
        os.close(fd)


def _gid(group: str) -> int:
    if not group:
        return 0
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"accounting_group: no group {group!r} on this host") from None


def _narrow(fd: int, gid: int) -> None:
    """Who may read it is decided here, also for a file an older vibatch made world-readable."""
    mode = 0o640 if gid else 0o600
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_gid != gid:
        os.fchown(fd, os.geteuid(), gid)
    if st.st_mode & 0o777 != mode:
        os.fchmod(fd, mode)


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
