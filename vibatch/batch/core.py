"""The job core as a root hook sees it: one ``Core`` per hook call, holding one ``Node`` (and so
one libvirt connection) for everything the hook does.

base.main imports this module only after the hook's hygiene (hygiene.enter_root_hook): through
lifecycle it imports libvirt, whose client reads its environment. Adapters never import it (nor
lifecycle): they get a Core as an argument.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from ..core import jobstore, lifecycle
from ..config import Config
from ..core.jobdir import JobPaths
from ..core.request import JobRequest


def _adopter(cfg: Config, system_name: str, job_id: str, env: dict) -> Any:
    """adopt.py's port: how the job's batch system takes its VM's processes (or None)."""
    from . import SYSTEMS, system   # noqa: PLC0415
    return system(system_name).adopter(cfg, job_id, env) if system_name in SYSTEMS else None


class Core:
    def __init__(self, cfg: Config, node: Any = None):
        self.cfg = cfg
        self._node = node     # tests pass a Node with fake ports (tests/fakes.py)

    @property
    def node(self) -> lifecycle.Node:
        if self._node is None:
            self._node = lifecycle.Node(self.cfg, adopter=functools.partial(_adopter, self.cfg))
        return self._node

    def prologue(self, req: JobRequest, holder: Optional[int] = None,
                 batch: Optional[str] = None, batch_env: Optional[dict] = None
                 ) -> jobstore.JobState:
        """Bring up the job's VM; ``holder``: a process whose life bounds the job's (once it
        has ended, ``vibatch reap`` ends the job); ``batch``: the system ``vibatch reap`` may
        ask whether the job still exists, with ``batch_env``."""
        return lifecycle.prologue(self.node, req, holder=holder, batch=batch,
                                  batch_env=batch_env)

    def epilogue(self, job_id: str, exit_code: Optional[int] = None,
                 signum: Optional[int] = None) -> None:
        """``signum``: the signal that ended the job, if the batch system says so."""
        lifecycle.epilogue(self.node, job_id, exit_code, signum)

    def jobs_held_by(self, pid: int) -> list[str]:
        """The jobs on this node whose holder is the running process ``pid``."""
        return jobstore.jobs_held_by(self.cfg, pid)

    def holder_ended(self, job_id: str) -> bool:
        """The job is on this node, held by a process that has ended."""
        state = jobstore.read(JobPaths.of(self.cfg, job_id))
        return bool(state) and state.holder_pid is not None and not jobstore.holder_alive(state)

    def close(self) -> None:
        if self._node is not None:
            self._node.close()
