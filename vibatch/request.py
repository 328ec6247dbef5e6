"""The core's job request, validated before anything is created."""
from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import BadJobId, MissingWorkdir, ResourceRequestError, UnknownUser

# Slurm 123 / 123_4, Grid Engine 123.4, PBS 123.server / 123[4].server, HTCondor 12.0
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+:\[\]-]{0,127}$")
_SYSTEM_DIRS = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root",
                "/run", "/sbin", "/sys", "/usr", "/var", "/tmp"}
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


def parse_memory_mb(text: str) -> int:
    """'512', '512M', '2G', '2GiB', '1048576K' -> MiB (a bare number is MiB)."""
    m = _MEMORY.match(str(text))
    if not m:
        raise ResourceRequestError(f"invalid memory amount {text!r}: use e.g. 512M or 2G")
    value, unit = int(m.group(1)), m.group(2).upper()
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    mb = int(value * factor)
    if mb <= 0:
        raise ResourceRequestError(f"invalid memory amount {text!r}: must be at least 1 MiB")
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


@dataclass(frozen=True)
class JobUser:
    name: str
    uid: int
    gid: int
    home: str


def resolve_user(user: str) -> JobUser:
    """A name or a numeric uid, resolved from the host's user database."""
    try:
        pw = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
    except (KeyError, ValueError):
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


def make_request(job_id: str, user: str, cores: int, memory_mb: int, image: Optional[str],
                 workdir: str, walltime_s: Optional[int] = None,
                 cpus: Optional[Sequence[int]] = None, queue: Optional[str] = None,
                 account: Optional[str] = None) -> JobRequest:
    check_job_id(job_id)
    juser = resolve_user(user)
    if not isinstance(cores, int) or cores < 1:
        raise ResourceRequestError(f"invalid core count {cores!r}: must be at least 1")
    if cpus is not None and len(set(cpus)) != cores:
        raise ResourceRequestError(f"the batch system gave {len(set(cpus))} CPU ids "
                                   f"({','.join(map(str, cpus))}) for {cores} cores")
    if walltime_s is not None and walltime_s <= 0:
        raise ResourceRequestError(f"invalid walltime {walltime_s!r}: must be positive")
    if not os.path.isabs(workdir):
        raise MissingWorkdir(f"working directory {workdir!r} is not an absolute path")
    workdir = os.path.normpath(workdir)
    if not os.path.isdir(workdir):
        raise MissingWorkdir(f"working directory {workdir} does not exist")
    top = "/" + workdir.strip("/").split("/", 1)[0]
    if workdir in _SYSTEM_DIRS or top in ("/proc", "/sys", "/dev"):
        raise MissingWorkdir(f"working directory {workdir} cannot be shared into a VM: it is a "
                             "system directory the guest needs for itself")
    return JobRequest(job_id, juser, cores, memory_mb, image or None, workdir, walltime_s,
                      tuple(sorted(set(cpus))) if cpus is not None else None,
                      queue or None, account or None)
