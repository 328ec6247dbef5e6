"""Disk space on the state filesystem, admitted per job at claim time.

A job's overlay can grow up to its image's virtual size (plus qcow2 metadata); its console log is
rotated by virtlogd and its I/O folder is a tmpfs, so the overlay is what a job can put on the
state filesystem. At claim time every job on the node records what it may still grow into
(``disk.json`` in its directory), and a new job is admitted only if the sum of what all jobs may
still grow, plus its own, fits in the free space minus ``host.reserved_disk_mb``. So jobs that
fill their disks fail (the guest sees I/O errors: ``error_policy="report"``), never the node's
filesystem. ``jobs.max_disk_gb`` refuses an image bigger than the site gives one job.

A job's scratch disk (``scratch.img``, mounted at ``scratch.mount`` in the guest) is a sparse
file of the size the batch system granted, formatted here with ``mkfs.ext4`` (the host never
mounts it) and removed with the job's directory. It counts in the reservation like the overlay.
"""
from __future__ import annotations

import os
from typing import Optional

from .. import proc
from ..config import Config
from ..errors import NoFreeSlot, ResourceRequestError
from ..util import atomic_write_json, hold, read_json, root_lock

MKFS = "/sbin/mkfs.ext4"
MKFS_TIMEOUT_S = 60.0
SCRATCH_LABEL = "vbscratch"       # the disk's serial and file-system label in the guest

OVERHEAD = 64 << 20          # qcow2 metadata and the rotated console logs, per job


def possible_bytes(virtual_size: int) -> int:
    return virtual_size + OVERHEAD


def _allocated(path: str) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except OSError:
        return 0


def still_to_grow(job_state_dir: str) -> int:
    """What a job on this node may still write: its reservation minus its overlay's blocks."""
    rec = read_json(os.path.join(job_state_dir, "disk.json")) or {}
    reserved = rec.get("bytes", 0) if isinstance(rec.get("bytes"), int) else 0
    return max(0, reserved - _allocated(os.path.join(job_state_dir, "overlay.qcow2"))
               - _allocated(os.path.join(job_state_dir, "scratch.img")))


def scratch_bytes(cfg: Config, granted_mb: Optional[int]) -> int:
    """The job's scratch disk: what the batch system granted, else ``scratch.default_gb``; a
    grant over ``scratch.max_gb`` is the job's fault. 0: no scratch disk."""
    limit = int(cfg.scratch.max_gb * 1024)
    if granted_mb:
        if limit and granted_mb > limit:
            raise ResourceRequestError(f"{granted_mb} MiB of scratch requested; the site gives "
                                       f"a job at most {cfg.scratch.max_gb:g} GiB "
                                       "(scratch.max_gb)")
        return granted_mb << 20
    return int(cfg.scratch.default_gb * 1024) << 20


def create_scratch(path: str, size: int, uid: int, gid: int, qemu: tuple[int, int]) -> None:
    """A sparse ext4 file system of ``size`` bytes whose root is the job user's, lent to QEMU.
    No journal: it is gone with the job."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    proc.run([MKFS, "-q", "-F", "-m", "0", "-L", SCRATCH_LABEL, "-O", "^has_journal",
              "-E", f"root_owner={uid}:{gid},lazy_itable_init=1,nodiscard", path],
             timeout=MKFS_TIMEOUT_S)
    os.chown(path, *qemu)


def admit(cfg: Config, paths, image, scratch: int = 0) -> int:
    """Record this job's reservation (its overlay's growth and its ``scratch`` bytes), or refuse
    it: NoFreeSlot (this node has no room now) or ResourceRequestError (the image is bigger than
    the site allows a job)."""
    need = possible_bytes(image.virtual_size) + scratch
    limit = cfg.jobs.max_disk_gb << 30
    if limit and image.virtual_size > limit:
        raise ResourceRequestError(f"image {image.name!r} gives a {image.virtual_size / 2**30:.1f} "
                                   f"GiB disk; the site allows at most {cfg.jobs.max_disk_gb} GiB "
                                   "per job (jobs.max_disk_gb)")
    with hold(root_lock(os.path.join(cfg.state_dir, "disk.lock"), cfg.lock_timeout_s)):
        jobs = os.path.join(cfg.state_dir, "jobs")
        others = sum(still_to_grow(os.path.join(jobs, j)) for j in os.listdir(jobs)
                     if j != paths.job_id)
        st = os.statvfs(cfg.state_dir)
        free = st.f_bavail * st.f_frsize - (cfg.host.reserved_disk_mb << 20)
        if others + need > free:
            raise NoFreeSlot(f"not enough disk space for job {paths.job_id} on "
                             f"{cfg.state_dir}: its disk may grow to {need >> 20} MiB, the jobs "
                             f"here may still grow {others >> 20} MiB, {max(0, free) >> 20} MiB "
                             "are free above host.reserved_disk_mb")
        atomic_write_json(paths.disk, {"bytes": need})
    return need
