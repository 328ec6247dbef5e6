"""The core's job request, validated before anything is created."""
from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import (BadJobId, JobError, MissingWorkdir, NodeError, ResourceRequestError,
                      UnknownImage, UnknownUser)
from ..names import valid_name

# Slurm 123 / 123_4, Grid Engine 123.4, PBS 123.server / 123[4].server, HTCondor 12.0
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+:\[\]-]{0,127}$")
# the guest mounts the working directory at the same path: never over (or under) what it needs
_SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/tmp", "/home", "/opt", "/srv",
                "/var/lib", "/var/log", "/var/cache", "/var/spool"}
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                 "/run", "/sbin", "/sys", "/usr", "/var/run", "/var/lock")
WORKDIR_MAX = 1024
TEXT_MAX = 256
_MEMORY = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def check_job_id(job_id: str) -> str:
    """Reject ids that could escape a directory or a libvirt name: '/', '..', control chars."""
    if not isinstance(job_id, str) or not job_id:
        raise BadJobId("invalid job id: it is empty")
    if "/" in job_id or ".." in job_id or any(ord(c) < 32 or ord(c) == 127 for c in job_id):
        raise BadJobId(f"invalid job id {job_id!r}: it must not contain '/', '..' or control characters")
    if not _JOB_ID.match(job_id):
        raise BadJobId(f"invalid job id {job_id!r}: use letters, digits and _ . @ + : [ ] - "
                       "(at most 128, starting with a letter or digit)")
    return job_id


def check_text(what: str, value: str, max_len: int = TEXT_MAX) -> str:
    """A user-chosen string that vibatch keeps or passes on (queue, account, user name): printable
    UTF-8 without control characters, at most ``max_len`` characters."""
    if not isinstance(value, str):
        raise JobError(f"invalid {what} {value!r}: not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JobError(f"invalid {what} {value!r}: it is not valid UTF-8") from None
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise JobError(f"invalid {what} {value!r}: it holds control characters")
    if len(value) > max_len:
        raise JobError(f"invalid {what}: longer than {max_len} characters")
    return value


def check_workdir(workdir: str) -> str:
    """The job's working directory as text: absolute, UTF-8, no control characters and no comma
    (virtiofsd's options are comma-separated), and clear of the guest's own system directories
    (the guest mounts it at the same path). Returns it normalised."""
    if not isinstance(workdir, str) or not workdir:
        raise MissingWorkdir("the job has no working directory")
    try:
        workdir.encode("utf-8")
    except UnicodeEncodeError:
        raise MissingWorkdir(f"working directory {workdir!r} is not valid UTF-8: rename it") from None
    bad = sorted({c for c in workdir if ord(c) < 32 or 127 <= ord(c) < 160 or c == ","})
    if bad:
        raise MissingWorkdir(f"working directory {workdir!r} holds {', '.join(map(repr, bad))}, "
                             "which cannot be shared into a VM: use another directory")
    if len(workdir) > WORKDIR_MAX:
        raise MissingWorkdir(f"working directory {workdir[:60]!r}... is longer than "
                             f"{WORKDIR_MAX} characters")
    if not os.path.isabs(workdir):
        raise MissingWorkdir(f"working directory {workdir!r} is not an absolute path")
    workdir = os.path.normpath(workdir)
    if workdir.startswith("//"):
        workdir = "/" + workdir.lstrip("/")
    # the literal path only: root resolving links (or testing existence) below a directory the
    # user may not enter would tell the user what is there. The share launcher walks the path
    # as the job's user, refusing links, and says "does not exist" only to whom may look.
    if workdir in _SYSTEM_DIRS or any(workdir == t or workdir.startswith(t + "/")
                                      for t in _SYSTEM_TREES):
        raise MissingWorkdir(f"working directory {workdir} cannot be shared into a VM: it is, "
                             "or is inside, a system directory the guest needs for itself")
    return workdir


def parse_memory_mb(text: str, what: str = "memory amount") -> int:
    """'512', '512M', '2G', '2GiB', '1048576K' -> MiB (a bare number is MiB)."""
    m = _MEMORY.match(str(text))
    if not m:
        raise ResourceRequestError(f"invalid {what} {text!r}: use e.g. 512M or 2G")
    value, unit = int(m.group(1)), m.group(2).upper()
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    mb = int(value * factor)
    if mb <= 0:
        raise ResourceRequestError(f"invalid {what} {text!r}: must be at least 1 MiB")
    return mb


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-2,5' -> (0, 1, 2, 5), the cpuset syntax batch systems print."""
    cpus: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                cpus.update(range(lo, hi + 1))
            else:
                cpus.add(int(part))
    except ValueError:
        raise ResourceRequestError(f"invalid CPU list {text!r}: use e.g. 0-3,8") from None
    if any(c < 0 for c in cpus):
        raise ResourceRequestError(f"invalid CPU list {text!r}: CPU ids are >= 0")
    return tuple(sorted(cpus))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int
    home: str


def resolve_user(user: str) -> JobUser:
    """A name or a numeric uid, resolved from the host's user database."""
    try:
        check_text("user name", str(user), 64)
        pw = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
    except (KeyError, ValueError, OverflowError, JobError):
        raise UnknownUser(f"user {user!r} does not exist on this host") from None
    if pw.pw_uid == 0:
        raise UnknownUser(f"user {pw.pw_name!r} is root: vibatch never runs a job as root")
    return JobUser(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir or "/")


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    user: JobUser
    cores: int
    memory_mb: int
    image: Optional[str]                     # the image or OS the job asked for (None: default)
    workdir: str
    walltime_s: Optional[int] = None
    cpus: Optional[tuple[int, ...]] = None   # exact host CPU ids given by the batch system
    queue: Optional[str] = None              # queue/partition, for its default image
    account: Optional[str] = None            # for the account's allow-list
    scratch_mb: Optional[int] = None         # scratch disk the batch system granted (MiB)
    network: Optional[str] = None            # the network mode the job asked for (network.py)
    # a group id the batch system finds the job's processes by (Grid Engine's add_grp_id):
    # QEMU gets it too (batch/gridengine.py, docs/batch/gridengine.md)
    process_gid: Optional[int] = None


def make_request(job_id: str, user: str, cores: int, memory_mb: int, image: Optional[str],
                 workdir: str, walltime_s: Optional[int] = None,
                 cpus: Optional[Sequence[int]] = None, queue: Optional[str] = None,
                 account: Optional[str] = None,
                 scratch_mb: Optional[int] = None,
                 network: Optional[str] = None,
                 process_gid: Optional[int] = None) -> JobRequest:
    """Every value here may come from the job's user: each is checked before anything is made,
    and a bad one is the job's fault (JobError), never an exception of another kind."""
    check_job_id(job_id)
    juser = resolve_user(user)
    if not _is_int(cores) or cores < 1:
        raise ResourceRequestError(f"invalid core count {cores!r}: must be at least 1")
    if not _is_int(memory_mb) or memory_mb < 1:
        raise ResourceRequestError(f"invalid memory {memory_mb!r} MiB: must be at least 1")
    if cpus is not None and not all(_is_int(c) and c >= 0 for c in cpus):
        raise ResourceRequestError(f"the batch system gave invalid CPU ids {list(cpus)!r}")
    if cpus is not None and len(set(cpus)) != cores:
        raise ResourceRequestError(f"the batch system gave {len(set(cpus))} CPU ids "
                                   f"({','.join(map(str, cpus))}) for {cores} cores")
    if scratch_mb is not None and (not _is_int(scratch_mb) or scratch_mb < 0):
        raise ResourceRequestError(f"invalid scratch size {scratch_mb!r} MiB: must be 0 or more")
    if walltime_s is not None and (not _is_int(walltime_s) or walltime_s <= 0):
        raise ResourceRequestError(f"invalid walltime {walltime_s!r}: must be positive")
    if process_gid is not None and (not _is_int(process_gid) or process_gid <= 0):
        raise NodeError(f"the batch system gave an invalid process group id {process_gid!r}")
    if image is not None and image != "" and not valid_name(image):
        raise UnknownImage(f"invalid image or OS name {image!r}: use letters, digits and . _ + - "
                           "(at most 64, starting with a letter or digit)")
    queue = check_text("queue", queue) if queue is not None else None
    account = check_text("account", account) if account is not None else None
    workdir = check_workdir(workdir)   # existence: checked as the job's user (share.py)
    return JobRequest(job_id, juser, cores, memory_mb, image or None, workdir, walltime_s,
                      tuple(sorted(set(cpus))) if cpus is not None else None,
                      queue or None, account or None, scratch_mb or None,
                      check_text("network mode", network, 16) if network else None,
                      process_gid)
