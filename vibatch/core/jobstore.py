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

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import psutil

from .. import safeio
from ..config import Config
from ..errors import NodeError
from .jobdir import JobPaths
from ..util import atomic_write_json, read_json

RESERVED, SLOT, OVERLAY, DOMAIN, READY, ENDING, ACCOUNTED = (
    "reserved", "slot", "overlay", "domain", "ready", "ending", "accounted")
PHASES = (RESERVED, SLOT, OVERLAY, DOMAIN, READY, ENDING, ACCOUNTED)
PREPARING = (RESERVED, SLOT, OVERLAY, DOMAIN)   # the prologue has not finished
CORRUPT = "corrupt"                             # a record that could not be read (records())
RECORD_FILE = "record.json"                     # the accounting line, before it is appended
LAST_EXIT = "last-exit"                         # in the job's I/O folder, written by vibatch exec
VERSION = 2


@dataclass(frozen=True)
class JobState:
    """``state.json``: the job's record (version 2). Written only through ``Record``."""

    job_id: str
    phase: str
    version: int = VERSION
    owner_pid: Optional[int] = None        # who acts on the job now (none once it is ready)
    owner_start: Optional[float] = None
    holder_pid: Optional[int] = None       # a process whose life bounds the job's (HTCondor)
    holder_start: Optional[float] = None
    batch: Optional[str] = None            # the batch system whose job this is (reap asks it)
    batch_env: dict = field(default_factory=dict, compare=False)   # how to ask it (SLURM_CONF)
    started_at: Optional[float] = None
    ready_at: Optional[float] = None
    user: str = ""
    uid: Optional[int] = None
    gid: Optional[int] = None
    image: str = ""
    image_digest: str = ""
    image_dir: str = ""
    requested_image: Optional[str] = None
    queue: Optional[str] = None
    account: Optional[str] = None
    workdir: str = ""
    walltime_s: Optional[int] = None
    domain: str = ""
    cpus: tuple[int, ...] = ()
    memory_mb: Optional[int] = None
    image_hashed: bool = False
    accel: Optional[str] = None
    uuid: Optional[str] = None
    phases: dict = field(default_factory=dict, compare=False)   # phase name -> seconds
    ended_by: Optional[str] = None         # prologue (its undo), epilogue or reap
    ended_from: Optional[str] = None       # the phase the teardown started from
    exit_code: Optional[int] = None
    exit_signal: Optional[int] = None      # the signal that ended the job, as the batch says
    vm_end: Optional[str] = None           # destroyed | gone | never_started | unknown
    vm_cpu_time_s: Optional[float] = None
    network: Optional[str] = None          # vm.network the job's VM had
    scratch_bytes: int = 0                 # its scratch disk (0: none)
    site_shares: tuple[str, ...] = ()      # host paths shared read-only into it
    start: Optional[str] = None            # warm (restored from a template) | cold (booted)
    template: Optional[str] = None         # the template it was restored from

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["cpus"], d["site_shares"] = list(self.cpus), list(self.site_shares)
        return d

    @classmethod
    def from_json(cls, data: Any, source: str) -> "JobState":
        """The strict reader: an object of this version, known keys only, each of its type."""
        def bad(why: str) -> NodeError:
            return NodeError(f"{source} is not a valid job record ({why}); remove the job's "
                             "directories by hand")
        if not isinstance(data, dict):
            raise bad("not an object")
        if data.get("version") != VERSION:
            raise bad(f"version {data.get('version')!r}, this vibatch reads {VERSION}")
        unknown = sorted(set(data) - set(_TYPES))
        if unknown:
            raise bad("unknown keys " + ", ".join(unknown))
        for key, value in data.items():
            if not _is(value, _TYPES[key]):
                raise bad(f"{key} is {type(value).__name__}")
        if data.get("phase") not in PHASES:
            raise bad(f"phase {data.get('phase')!r}")
        return cls(**{**data, "cpus": tuple(data.get("cpus") or ()),
                      "site_shares": tuple(data.get("site_shares") or ())})


def _is(value: Any, want: str) -> bool:
    """``value`` fits the field's annotation (the few shapes JobState uses)."""
    if want.startswith("Optional["):
        return value is None or _is(value, want[len("Optional["):-1])
    if want == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if want.startswith("tuple"):
        item = want[len("tuple["):].split(",")[0]
        return isinstance(value, list) and all(_is(v, item) for v in value)
    return isinstance(value, {"str": str, "bool": bool, "dict": dict}[want])


_TYPES = {f.name: str(f.type) for f in dataclasses.fields(JobState)}


@dataclass(frozen=True)
class JobInfo:
    """``job.json`` (0644, the job user reads it): what ``vibatch exec`` needs of a ready job."""

    job_id: str
    uid: int
    gid: int
    user: str
    home: str
    workdir: str
    io_host: str           # the job's I/O folder on the host
    io_guest: str          # the same folder in the guest
    tmpdir: str = ""       # the job's scratch disk in the guest, its $TMPDIR ("": none)

    def write(self, paths: JobPaths) -> None:
        atomic_write_json(paths.info, dataclasses.asdict(self), mode=0o644)

    @classmethod
    def read(cls, paths: JobPaths) -> Optional["JobInfo"]:
        """The ready job's info, or None if it has none; anything but exactly these keys, each
        of its type, is a NodeError naming the file."""
        try:
            data = read_json(paths.info)
        except (ValueError, UnicodeDecodeError, NotADirectoryError):
            data = "unreadable"
        if data is None:
            return None
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}   # absent in an older vibatch's file
        if not isinstance(data, dict) or not set(names) - optional <= set(data) <= set(names) or \
                not all(_is(data[k], str(names[k])) for k in data):
            raise NodeError(f"{paths.info} is not a valid job info file")
        return cls(**data)


class Record:
    """A job's record as this process holds it: every change is written (atomically, fsynced)
    before the step it names, through ``set``; ``stage`` changes it for the next write only."""

    def __init__(self, paths: JobPaths, state: JobState) -> None:
        self.paths, self.state = paths, state

    def stage(self, **fields: Any) -> None:
        self.state = dataclasses.replace(self.state, **fields)

    def set(self, phase: Optional[str] = None, **fields: Any) -> None:
        self.stage(phase=phase or self.state.phase, **fields)
        write(self.paths, self.state)


def before(phase: Optional[str], other: str) -> bool:
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


def owner_alive(state: JobState) -> bool:
    """Someone else is acting on this record right now (never true of this process)."""
    return state.owner_pid != os.getpid() and same_process(state.owner_pid, state.owner_start)


def holder_alive(state: JobState) -> bool:
    """The job's holder process (if it has one) still runs: same pid, same start time."""
    return same_process(state.holder_pid, state.holder_start)


def read(paths: JobPaths) -> Optional[JobState]:
    """The job's record, or None if it has none. A record that cannot be parsed (never written
    by vibatch: writes are atomic) is reported as a node fault naming the file."""
    try:
        data = read_json(paths.state_file)
    except (ValueError, UnicodeDecodeError) as e:
        raise NodeError(f"{paths.state_file} is not a valid job record ({e}); "
                        "remove the job's directories by hand") from None
    except NotADirectoryError:
        return None
    return None if data is None else JobState.from_json(data, paths.state_file)


def write(paths: JobPaths, state: JobState) -> None:
    try:
        atomic_write_json(paths.state_file, state.to_json())
    except OSError as e:
        raise NodeError(f"cannot write the job record {paths.state_file}: {e.strerror}") from None


def job_ids(cfg: Config) -> list[str]:
    """The jobs with a directory on this node."""
    jobs_dir = os.path.join(cfg.state_dir, "jobs")
    try:
        return sorted(n for n in os.listdir(jobs_dir) if not n.startswith("."))
    except FileNotFoundError:
        return []


def records(cfg: Config) -> list[tuple[JobPaths, Optional[JobState]]]:
    """Every job directory's record (None: directories without one; phase CORRUPT: one that
    could not be read, which nobody touches)."""
    out: list[tuple[JobPaths, Optional[JobState]]] = []
    for job_id in job_ids(cfg):
        paths = JobPaths.of(cfg, job_id)
        try:
            out.append((paths, read(paths)))
        except NodeError:
            out.append((paths, JobState(job_id, CORRUPT)))
    return out


def images_in_use(cfg: Config, unknown: str) -> dict[str, list[str]]:
    """Library versions (real directories) used by jobs on this node -> their job ids; a job
    that has not recorded its image yet counts under ``unknown``."""
    used: dict[str, list[str]] = {}
    for paths, state in records(cfg):
        used.setdefault((state.image_dir if state else "") or unknown, []).append(paths.job_id)
    return used


def jobs_held_by(cfg: Config, pid: int) -> list[str]:
    """The jobs on this node whose holder is the running process ``pid``."""
    return [paths.job_id for paths, st in records(cfg)
            if st and st.holder_pid == pid and holder_alive(st)]


def last_exit(paths: JobPaths) -> Optional[int]:
    """The last exit status ``vibatch exec`` recorded in the job's I/O folder, if any. The
    folder is the job user's: whatever is at that name (a FIFO, a symlink, a device) is read
    safely or not at all, and only a wait status (0-255) is accepted."""
    data = safeio.read_bounded(os.path.join(paths.io, LAST_EXIT), 32)
    text = data.strip() if data is not None else b""
    return int(text) if text.isdigit() and len(text) <= 3 and int(text) <= 255 else None
