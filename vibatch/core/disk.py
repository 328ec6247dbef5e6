"""Disk space on the state filesystem, admitted per job at claim time.

A job's overlay can grow up to its image's virtual size (plus qcow2 metadata); its console log is
rotated by virtlogd and its I/O folder is a tmpfs, so the overlay is what a job can put on the
state filesystem. At claim time every job on the node records what it may still grow into
(``disk.json`` in its directory), and a new job is admitted only if the sum of what all jobs may
still grow, plus its own, fits in the free space minus ``host.reserved_disk_mb``. So jobs that
fill their disks fail (the guest sees I/O errors: ``error_policy="report"``), never the node's
filesystem. ``jobs.max_disk_gb`` refuses an image bigger than the site gives one job.
"""
from __future__ import annotations

import os

from ..config import Config
from ..errors import NoFreeSlot, ResourceRequestError
from ..util import atomic_write_json, hold, read_json, root_lock

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
    return max(0, reserved - _allocated(os.path.join(job_state_dir, "overlay.qcow2")))


def admit(cfg: Config, paths, image) -> int:
    """Record this job's reservation, or refuse it: NoFreeSlot (this node has no room now) or
    ResourceRequestError (the image is bigger than the site allows a job)."""
    need = possible_bytes(image.virtual_size)
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
