"""A job's durable record on this node (``state.json``) and what can be decided from it.

The record moves through written phases. Each phase is written (atomically, fsynced) *before*
the step it names, so "phase X" means "step X may have happened; everything before it did":

    reserved   the job's directories exist and this record names their owner
    slot       the slot may be claimed                  (prologue)
    overlay    the copy-on-write disk may exist          (prologue)
    domain     the VM may have been created              (prologue)
    ready      the VM answers and the job may run        (end of the prologue)
    ending     someone (epilogue, reap, an undo) is tearing it down
    accounted  its accounting line is written; only files and the slot remain

``owner_pid``/``owner_start`` name the process acting on the job now (none while it is
``ready``: then it is the batch system's until its epilogue). A record whose owner is
alive (same pid, same start time) is never touched by anyone else; a dead owner's record is
taken over under the jobs lock (``take_over``) and finished from its phase, never guessed from a
missing file.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import psutil

from . import safeio
from .config import Config
from .errors import NodeError
from .jobdir import JobPaths
from .util import atomic_write_json, read_json

RESERVED, SLOT, OVERLAY, DOMAIN, READY, ENDING, ACCOUNTED = (
    "reserved", "slot", "overlay", "domain", "ready", "ending", "accounted")
PHASES = (RESERVED, SLOT, OVERLAY, DOMAIN, READY, ENDING, ACCOUNTED)
PREPARING = (RESERVED, SLOT, OVERLAY, DOMAIN)   # the prologue has not finished
RECORD_FILE = "record.json"                     # the accounting line, before it is appended
LAST_EXIT = "last-exit"                         # in the job's I/O folder, written by vibatch exec


def before(phase: str, other: str) -> bool:
    """``phase`` comes before ``other`` (an unknown phase counts as the first)."""
    return _index(phase) < _index(other)


def _index(phase: Any) -> int:
    return PHASES.index(phase) if phase in PHASES else 0


def same_process(pid: Any, start: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(start, (int, float)):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - start) < 1
    except psutil.Error:
        return False


def process_start(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        raise NodeError(f"process {pid} has already ended") from None


def me() -> dict:
    """The owner fields naming this process."""
    return {"owner_pid": os.getpid(), "owner_start": process_start(os.getpid())}


def owner_alive(state: dict) -> bool:
    """Someone else is acting on this record right now (never true of this process)."""
    pid = state.get("owner_pid")
    return pid != os.getpid() and same_process(pid, state.get("owner_start"))


def holder_alive(state: dict) -> bool:
    """The job's holder process (if it has one) still runs: same pid, same start time."""
    return same_process(state.get("holder_pid"), state.get("holder_start"))


def read(paths: JobPaths) -> Optional[dict]:
    """The job's record, or None if it has none. A record that cannot be parsed (never written
    by vibatch: writes are atomic) is reported as a node fault naming the file."""
    try:
        state = read_json(paths.state_file)
    except (ValueError, UnicodeDecodeError) as e:
        raise NodeError(f"{paths.state_file} is not a valid job record ({e}); "
                        "remove the job's directories by hand") from None
    except NotADirectoryError:
        return None
    if state is not None and not isinstance(state, dict):
        raise NodeError(f"{paths.state_file} is not a valid job record (not an object)")
    return state


def write(paths: JobPaths, state: dict) -> None:
    try:
        atomic_write_json(paths.state_file, state)
    except OSError as e:
        raise NodeError(f"cannot write the job record {paths.state_file}: {e.strerror}") from None


def set_phase(paths: JobPaths, state: dict, phase: str, **fields: Any) -> None:
    state.update(phase=phase, **fields)
    write(paths, state)


def job_ids(cfg: Config) -> list[str]:
    """The jobs with a directory on this node."""
    jobs_dir = os.path.join(cfg.state_dir, "jobs")
    try:
        return sorted(n for n in os.listdir(jobs_dir) if not n.startswith("."))
    except FileNotFoundError:
        return []


def records(cfg: Config) -> list[tuple[JobPaths, Optional[dict]]]:
    out = []
    for job_id in job_ids(cfg):
        paths = JobPaths.of(cfg, job_id)
        try:
            out.append((paths, read(paths)))
        except NodeError:
            out.append((paths, {"job_id": job_id, "phase": "corrupt"}))
    return out


def images_in_use(cfg: Config, unknown: str) -> dict[str, list[str]]:
    """Library versions (real directories) used by jobs on this node -> their job ids; a job
    that has not recorded its image yet counts under ``unknown``."""
    used: dict[str, list[str]] = {}
    for paths, state in records(cfg):
        used.setdefault((state or {}).get("image_dir") or unknown, []).append(paths.job_id)
    return used


def jobs_held_by(cfg: Config, pid: int) -> list[str]:
    """The jobs on this node whose holder is the running process ``pid``."""
    return [paths.job_id for paths, st in records(cfg)
            if st and st.get("holder_pid") == pid and holder_alive(st)]


def last_exit(paths: JobPaths) -> Optional[int]:
    """The last exit status ``vibatch exec`` recorded in the job's I/O folder, if any. The
    folder is the job user's: whatever is at that name (a FIFO, a symlink, a device) is read
    safely or not at all, and only a wait status (0-255) is accepted."""
    data = safeio.read_bounded(os.path.join(paths.io, LAST_EXIT), 32)
    text = data.strip() if data is not None else b""
    return int(text) if text.isdigit() and len(text) <= 3 and int(text) <= 255 else None
