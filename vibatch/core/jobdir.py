"""Where one job's files live: the contract between prologue, ``vibatch exec`` and epilogue.

    <state_dir>/jobs/<id>/          root, 0711 (nobody else can list it)
        state.json                  the prologue's record (root, 0600)
        overlay.qcow2               the copy-on-write disk (root 0600; libvirt lends it to QEMU)
        console.log                 the serial console (virtlogd's, rotated: bounded)
        scratch.img                 the job's scratch disk, if it has one (sparse ext4; root
                                    0600, lent to QEMU like the overlay)
        disk.json                   the disk space this job may grow into (root, 0600)
        io/                         the job user's, 0700: shared into the guest for exec's output;
                                    a tmpfs of its own (size jobs.io_max_mb, nosuid,nodev,noexec)
    <run_dir>/jobs/<id>/            root, 0700 until the socket is handed over, then 0711
        agent.sock                  the job user's agent endpoint (the job user's, 0600)
        job.json                    what ``vibatch exec`` needs to know (0644)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .. import proc, safeio
from ..config import Config
from ..errors import NodeError
from .request import check_job_id

DOMAIN_PREFIX = "vibatch-"
SOCKET_PATH_MAX = 107
CONSOLE_TAIL_BYTES = 64 * 1024
IO_MAX_INODES = 65536
MOUNT_TIMEOUT_S = 30


@dataclass(frozen=True)
class JobPaths:
    job_id: str
    state: str
    run: str
    io_max_mb: int = 256

    @classmethod
    def of(cls, cfg: Config, job_id: str) -> "JobPaths":
        check_job_id(job_id)
        return cls(job_id, os.path.join(cfg.state_dir, "jobs", job_id),
                   os.path.join(cfg.run_dir, "jobs", job_id), cfg.jobs.io_max_mb)

    @property
    def domain(self) -> str:
        return DOMAIN_PREFIX + self.job_id

    @property
    def state_file(self) -> str:
        return os.path.join(self.state, "state.json")

    @property
    def overlay(self) -> str:
        return os.path.join(self.state, "overlay.qcow2")

    @property
    def console(self) -> str:
        return os.path.join(self.state, "console.log")

    @property
    def scratch(self) -> str:
        return os.path.join(self.state, "scratch.img")

    @property
    def disk(self) -> str:
        return os.path.join(self.state, "disk.json")

    @property
    def io(self) -> str:
        return os.path.join(self.state, "io")

    @property
    def socket(self) -> str:
        return os.path.join(self.run, "agent.sock")

    @property
    def info(self) -> str:
        return os.path.join(self.run, "job.json")

    def exists(self) -> bool:
        return os.path.lexists(self.state) or os.path.lexists(self.run)

    def create(self) -> None:
        if len(self.socket) > SOCKET_PATH_MAX:
            raise NodeError(f"the agent socket path {self.socket} is longer than "
                            f"{SOCKET_PATH_MAX} bytes: shorten run_dir or the job id")
        for parent in (os.path.dirname(self.state), os.path.dirname(self.run)):
            os.makedirs(parent, mode=0o711, exist_ok=True)
        os.mkdir(self.state, 0o711)
        os.mkdir(self.run, 0o700)   # 0711 once the agent socket is the job user's (lifecycle)
        os.mkdir(self.io, 0o700)
        # the I/O folder is the job's to fill: a filesystem of its own, so it fills only that
        proc.run(["mount", "-t", "tmpfs", "-o", f"size={self.io_max_mb}m,nr_inodes={IO_MAX_INODES},"
                  "mode=0700,nosuid,nodev,noexec", "vibatch-io", self.io], timeout=MOUNT_TIMEOUT_S)

    def remove(self) -> None:
        """Remove both directories; never follows a symlink a job user may have planted, at
        any depth. The I/O folder's tmpfs is detached first (its tree goes with it)."""
        if os.path.ismount(self.io):
            proc.run(["umount", "--lazy", self.io], timeout=MOUNT_TIMEOUT_S)
        for path in (self.state, self.run):
            try:
                safeio.rmtree(path)
            except FileNotFoundError:   # a concurrent remover got there first: finish it
                safeio.rmtree(path)

    def remove_quietly(self) -> None:
        """``remove`` for undo paths that must not raise over the error they report."""
        try:
            self.remove()
        except (OSError, NodeError):
            pass


def console_tail(path: str, lines: int) -> str:
    data = safeio.read_tail(path, CONSOLE_TAIL_BYTES)
    if data is None:
        return ""
    text = data.decode(errors="replace")
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])
