"""Small shared helpers: atomic file writes and deadlines."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import tempfile
import time
from typing import Any, Iterator, Optional

import filelock

from .errors import JobError, LockTimeout


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` through a temporary file + fsync + rename."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: str, obj: Any, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode)


def read_json(path: str, default: Any = None) -> Any:
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def root_lock(path: str, timeout: float) -> filelock.FileLock:
    """A lock file only root can open: anyone who can open a lock file can flock it, and so
    stall every hook that needs it. An older, wider lock file is narrowed."""
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if st.st_mode & 0o077 and os.geteuid() == st.st_uid:
            os.chmod(path, 0o600, follow_symlinks=False)
    return filelock.FileLock(path, timeout=timeout, mode=0o600)


def private_dir(path: str, mode: int = 0o711) -> None:
    """Create ``path`` (and parents) or narrow it to ``mode``: others may pass through a state
    directory to what is theirs, never list it or create in it."""
    os.makedirs(path, mode=mode, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.geteuid() and st.st_mode & 0o7777 & ~mode:
        os.chmod(path, st.st_mode & 0o7777 & mode)


def give_to(path: str, uid: int, gid: int, mode: int) -> None:
    """Hand a root-made file (the job's agent socket) to a user: its mode first, so that at no
    moment does the user's group (or anyone) get the access the old mode gave."""
    os.chmod(path, mode)   # the path is in a root-owned directory: no symlink to follow
    os.chown(path, uid, gid)


@contextlib.contextmanager
def hold(lock: filelock.BaseFileLock, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold ``lock`` (acquired within ``timeout``, default the lock's own), or raise LockTimeout
    naming it."""
    wait = lock.timeout if timeout is None else timeout
    try:
        lock.acquire(timeout=wait)
    except filelock.Timeout:
        raise LockTimeout(f"could not lock {lock.lock_file} within {wait:g} s") from None
    try:
        yield
    finally:
        lock.release()


def flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on ``fd``, waiting at most ``seconds``; False if it timed out."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)


class Deadline:
    """A point in monotonic time; ``remaining()`` never goes below zero."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


class PhaseTimer:
    """Records how long each named phase of a hook takes, in seconds."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:   # a phase entered twice adds up
        spent = time.perf_counter() - self.start
        self.timer.phases[self.name] = round(self.timer.phases.get(self.name, 0.0) + spent, 4)


ERROR_LOG = "/var/log/vibatch/errors.log"
ERROR_LOG_MAX = 1 << 20


def log_error(what: str, exc: BaseException) -> None:
    """Keep an unexpected error's traceback for the admin (root only; never raises). The user
    sees one line; the log keeps the rest, in ``ERROR_LOG`` (rotated at 1 MiB)."""
    import traceback  # noqa: PLC0415 - only on the error path
    if os.geteuid() != 0:
        return
    text = (f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()}: {what}\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    with contextlib.suppress(OSError):
        append_log(ERROR_LOG, text, ERROR_LOG_MAX)


def append_log(path: str, text: str, max_bytes: int, mode: int = 0o600) -> None:
    """Append ``text`` (at most 64 KiB) to the log at ``path``, never through a symlink; a log
    past ``max_bytes`` is first moved to ``path``.1. Raises OSError."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if os.lstat(path).st_size > max_bytes:
            os.replace(path, path + ".1")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.write(fd, text.encode(errors="replace")[:64 * 1024])
    finally:
        os.close(fd)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise JobError(f"vibatch {what} must run as root")
