"""Where one job's files live: the contract between prologue, ``vibatch exec`` and epilogue.

    <state_dir>/jobs/<id>/          root, 0711 (nobody else can list it)
        state.json                  the prologue's record (root, 0600)
        overlay.qcow2               the copy-on-write disk (root 0600; libvirt lends it to QEMU)
        console.log                 the serial console
        io/                         the job user's, 0700: shared into the guest for exec's output
    <run_dir>/jobs/<id>/            root, 0711
        agent.sock                  the job user's agent endpoint (the job user's, 0600)
        job.json                    what ``vibatch exec`` needs to know (0644)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from .config import Config
from .errors import NodeError
from .request import check_job_id

DOMAIN_PREFIX = "vibatch-"
SOCKET_PATH_MAX = 107


@dataclass(frozen=True)
class JobPaths:
    job_id: str
    state: str
    run: str

    @classmethod
    def of(cls, cfg: Config, job_id: str) -> "JobPaths":
        check_job_id(job_id)
        return cls(job_id, os.path.join(cfg.state_dir, "jobs", job_id),
                   os.path.join(cfg.run_dir, "jobs", job_id))

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
        os.mkdir(self.run, 0o711)
        os.mkdir(self.io, 0o700)

    def remove(self) -> None:
        """Remove both directories; never follows a symlink a job user may have planted."""
        for path in (self.state, self.run):
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.isdir(path):
                shutil.rmtree(path, onerror=_gone_is_fine)

    def remove_quietly(self) -> None:
        """``remove`` for undo paths that must not raise over the error they report."""
        try:
            self.remove()
        except OSError:
            pass


def _gone_is_fine(_func, _path, exc_info) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def console_tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])
