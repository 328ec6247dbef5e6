"""The batch system's view of the VM: QEMU and its helpers handed to the job's batch system once
the job's domain runs (booted or restored), so that the system counts them as the job and
suspends them with it (docs/batch/*.md, "Accounting and suspend").

libvirt starts QEMU and the share launchers outside the job, in its own cgroup
(``machine/qemu-N-NAME.libvirt-qemu``). ``domain_running`` (one call from the prologue) finds
those processes and asks the job's batch system adapter (``BatchSystem.adopter``, through the ``Node.adopter`` port) to take them:
- Slurm: the job's extern step (``PrologFlags=Contain``) adds them to its process tracking and
  accounting (``REQUEST_ADD_EXTERN_PID``, what ``pam_slurm_adopt`` uses). The extern step exists
  only once the Prolog has returned, so a detached helper waits for it (bounded) and adds them;
- Grid Engine needs nothing here: QEMU was started with the job's additional group id
  (``JobRequest.process_gid``, domain.py's DAC label), which is how its collector finds a job;
- Torque: pbs_mom adopts their sessions into the job (TM_ADOPT_JOBID, batch/pbstm.py) once it
  has started the job.

A failure here costs the batch system's record of the VM's usage, never the job: it is logged.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from typing import Any, Callable

from ..util import atomic_write_json, log_error
from ..vm import hypervisor
from .jobdir import JobPaths

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 (pids, else cpuacct) and v2 mounts where libvirt's machine cgroups may be
_HIERARCHIES = ("pids", "cpuacct", "unified", "")
ADOPTED_FILE = "adopted.json"  # in the job's state directory, once the system took the VM
ADOPT_TIMEOUT_S = 120     # the Prolog's end (when Slurm creates the extern step) may take long


def domain_running(node: Any, state: Any) -> None:
    """The prologue's hook once the job's domain runs, booted or restored, with every device
    plugged (a warm start hot-plugs its shares, so their launchers start only then): hand its
    processes to the job's batch system, if that system takes them. Never raises."""
    if not state.batch:
        return
    try:   # the port: batch/core.py asks the job's adapter (the core never imports one)
        adopter = node.adopter(state.batch, state.job_id, dict(state.batch_env))
        if adopter is None:
            return
        paths = JobPaths.of(node.cfg, state.job_id)
        dom = hypervisor.lookup(node.conn, paths.domain)
        if dom is None:
            raise RuntimeError(f"domain {paths.domain} is not running")
        pids = vm_pids(dom)
        if not pids:
            raise RuntimeError(f"no processes found in libvirt's cgroup of {paths.domain}")
        note = os.path.join(paths.state, ADOPTED_FILE)

        def work() -> None:
            taken = adopter(pids)     # what the system took, if the adapter says
            atomic_write_json(note, {"system": state.batch, "pids": pids, "at": time.time(),
                                     **({"taken": taken} if taken else {})})
        detach(work, ADOPT_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - accounting is lost, the job goes on
        log_error(f"job {state.job_id}: handing its VM to {state.batch}", e)


def machine_dirs(domain_id: int, root: str = CGROUP_ROOT) -> list[str]:
    """libvirt's cgroup directories of the running domain with this id, one per hierarchy
    tried: ``machine/qemu-ID-NAME.libvirt-qemu`` where libvirt makes its cgroups itself, and
    ``machine.slice/machine-qemu\\x2dID\\x2dNAME.scope`` where systemd (machined) makes them
    (libvirt's virSystemdMakeScopeName: the machine name escaped as a unit name)."""
    out = []
    named = (("machine", re.compile(rf"^qemu-{int(domain_id)}-.*\.libvirt-qemu$")),
             ("machine.slice",
              re.compile(rf"^machine-qemu\\x2d{int(domain_id)}\\x2d.*\.scope$")))
    for h in _HIERARCHIES:
        for sub, pattern in named:
            base = os.path.join(root, h, sub)
            try:
                names = os.listdir(base)
            except OSError:
                continue
            out += [os.path.join(base, n) for n in names if pattern.match(n)]
    return out


def cgroup_pids(top: str) -> list[int]:
    """Every process in the cgroup ``top`` and below it (libvirt puts QEMU's threads in
    ``emulator`` and ``vcpuN``, the share launchers at the top)."""
    pids: set[int] = set()
    for d, _, _ in os.walk(top):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids.update(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return sorted(pids)


def vm_pids(dom: Any, root: str = CGROUP_ROOT) -> list[int]:
    """QEMU and its helpers: the processes in libvirt's cgroup of the domain."""
    for d in machine_dirs(dom.ID(), root):
        pids = cgroup_pids(d)
        if pids:
            return pids
    return []


def detach(work: Callable[[], None], timeout_s: int) -> None:
    """Run ``work`` in a detached grandchild (own session, no inherited descriptors, stdio on
    /dev/null, killed by its own alarm after ``timeout_s``), and return at once: a batch system
    that waits for its hook's output or process group never waits for it."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 65536)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.alarm(timeout_s)
        work()
        code = 0
    except BaseException as e:  # noqa: BLE001 - a detached child reports to the log only
        log_error("vibatch adopt", e)
        code = 1
    sys.stdout.flush()
    os._exit(code)


def wait_for(path: str, deadline: float, interval: float = 0.1) -> bool:
    """Wait until ``path`` exists (the deadline: time.monotonic())."""
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


__all__ = ["ADOPT_TIMEOUT_S", "cgroup_pids", "detach", "domain_running", "machine_dirs",
           "vm_pids", "wait_for"]

