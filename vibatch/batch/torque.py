"""Torque/PBS: prologue/epilogue run by pbs_mom as root, the job sent into the VM by
``$job_starter``.

The contract, as a real pbs_mom 6.1 was seen doing it (and its source, prolog.c/start_exec.c;
see docs/batch/torque.md):

- ``prologue`` argv: 1 job id, 2 user, 3 group, 4 job name, 5 resource list, 6 queue,
  7 account, 8 script path. Root with the job user's supplementary groups, umask 0077, cwd
  ``$PBS_HOME/mom_priv``, an environment of ``pbs_environment`` plus ``PBS_*`` variables (we read
  none of it), stdin /dev/null, stdout/stderr the job's spool files, a new session with SIGINT
  blocked and SIGQUIT/SIGPIPE ignored. ``$prologalarm`` - 10 s after the start pbs_mom SIGKILLs
  the session. Exit 0 runs the job; **1 aborts it and its output is never copied to the user**;
  anything else (or the kill) requeues it **at once, on this node, without limit**.
- ``epilogue`` argv: 1-4 as above, 5 session id, 6 resource list, 7 resources used, 8 queue,
  9 account, 10 the job's exit status, 11 script path. Its exit code is only logged.
- ``$job_starter``: argv ``[job_starter, <the user's login shell>]`` as the job user, umask 0077,
  cwd the user's home, the job's environment; stdin is a pipe carrying one line
  ``[exec ]<script path>[ <qsub -F arguments>]`` (pbs_mom means it for that shell).

So a job's fault never exits 1 (the user would never see why): the prologue exits 0 and leaves
the reason, and the starter prints it in the job's error file and fails the job (exit 125), as
for Slurm. A node's fault exits 2 (requeue) after a back-off, and the ``max_node_faults``-th of
one job takes the node out with ``pbsnodes -o -N`` (see faults.py).

The OS is chosen with a node property in the job's node spec (``qsub -l nodes=1:ppn=2:el9``):
a property that names an image or alias selects it. qsub refuses a property no node has, so a
typo never reaches a node. Otherwise the queue's default (``images.queue_defaults``) or the
site default applies.
"""
from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import sys
import time
from typing import Callable, Optional, Sequence

from .. import proc, safeio
from ..config import Config
from ..errors import CommandFailed, JobError, NodeError, NoFreeSlot, ResourceRequestError
from ..hygiene import minimal_env
from ..util import log_error
from ..core.request import JobRequest, make_request
from . import faults
from .base import AS_IS, BatchSystem, Call, exits, main
from .kit import STARTER_FAILED, exec_job, home_of, read_request, record_refusal, requestable_names

KILL_EARLY_S = 10        # pbs_mom SIGKILLs the hook's session at $prologalarm - 10 s
REQUEUE = 2
# prologue: 0 runs the job, 1 aborts it and its output never reaches the user, anything else
# requeues it (at once, on this node: see after_node_fault). The epilogue's code is only logged.
EXIT = {
    "prologue": exits(ok=0, job=0, node=REQUEUE),
    "epilogue": exits(ok=0, job=0, node=2),
    "job_starter": exits(ok=AS_IS, job=STARTER_FAILED, node=STARTER_FAILED),
}
SCRIPT_LINE_MAX = 64 * 1024
SCRIPT_LINE_TIMEOUT_S = 30
PBSNODES_TIMEOUT_S = 30
GUEST_SHELL = "/bin/sh"  # runs a job script without a #! line: the image's shell, not the host's
_UNITS = {"b": 1 / 2**20, "kb": 1 / 1024, "mb": 1, "gb": 1024, "tb": 1024**2}


def parse_limits(text: str) -> dict[str, str]:
    """'nodes=1:ppn=2:el9,mem=1gb,walltime=01:00:00' -> {'nodes': '1:ppn=2:el9', ...}."""
    out = {}
    for part in (text or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def parse_size_mb(text: str) -> int:
    m = re.match(r"^(\d+)([kmgt]?b)?$", text.strip().lower())
    if not m:
        raise ResourceRequestError(f"invalid Torque memory size {text!r} (e.g. 512mb, 2gb)")
    return max(1, int(int(m.group(1)) * _UNITS[m.group(2) or "b"]))


def parse_walltime(text: str) -> int:
    parts = text.strip().split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ResourceRequestError(f"invalid Torque walltime {text!r}") from None
    secs = 0
    for n in nums:
        secs = secs * 60 + n
    return secs


def node_spec(limits: dict[str, str]) -> tuple[Optional[int], list[str]]:
    """(ppn, properties) of the first node chunk of ``neednodes``/``nodes``."""
    spec = limits.get("neednodes") or limits.get("nodes") or ""
    chunk = spec.split("+")[0]
    ppn, props = None, []
    for i, tok in enumerate(t for t in chunk.split(":") if t):
        if tok.startswith("ppn="):
            ppn = int(tok[4:]) if tok[4:].isdigit() else None
        elif "=" in tok or (i == 0 and tok.isdigit()):
            continue
        else:
            props.append(tok)
    return ppn, props


def job_from_prologue(cfg: Config, argv: Sequence[str]) -> JobRequest:
    if len(argv) < 7:
        raise ResourceRequestError(f"Torque prologue called with {len(argv)} arguments; expected "
                                   "at least 7 (job id, user, group, name, limits, queue, account)")
    job_id, user, _group, _name, limits_text, queue, account = argv[:7]
    limits = parse_limits(limits_text)
    ppn, props = node_spec(limits)
    cores = ppn or int(limits.get("ncpus") or limits.get("procs") or 0) or cfg.jobs.default_cores
    mem = limits.get("mem")
    memory_mb = parse_size_mb(mem) if mem else cfg.jobs.default_memory_mb
    walltime = parse_walltime(limits["walltime"]) if limits.get("walltime") else None
    known = requestable_names(cfg)
    image = next((p for p in props if p in known), None)
    return make_request(job_id=job_id, user=user, cores=cores, memory_mb=memory_mb,
                        workdir=home_of(user), image=image, walltime_s=walltime,
                        queue=queue or None, account=account or None)


def read_script_line(fd: int, timeout_s: float = SCRIPT_LINE_TIMEOUT_S) -> str:
    """The line pbs_mom writes on the starter's stdin (a pipe it then closes), bounded in size
    and time."""
    if os.isatty(fd):
        raise JobError("interactive jobs (qsub -I) cannot run in a vibatch VM")
    end, data = time.monotonic() + timeout_s, b""
    while b"\n" not in data and len(data) < SCRIPT_LINE_MAX:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not ready:
            raise JobError(f"pbs_mom sent no job script on the job starter's stdin within "
                           f"{timeout_s:g} s")
        chunk = os.read(fd, SCRIPT_LINE_MAX - len(data))
        if not chunk:
            break
        data += chunk
    if b"\n" not in data:
        raise JobError("the job starter's stdin held no complete line naming the job script "
                       "(is $job_starter set in mom_priv/config, and is this a batch job?)")
    return data.split(b"\n", 1)[0].decode(errors="surrogateescape")


def parse_script_line(line: str) -> tuple[str, list[str]]:
    """``[exec ]<script> [qsub -F arguments]`` -> (script, arguments). The arguments are split
    as a POSIX shell splits words (quotes honoured; no variable or glob expansion)."""
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise JobError(f"cannot split the job's qsub -F arguments ({e}): {line!r}") from None
    if words[:1] == ["exec"]:
        words = words[1:]
    if not words or not os.path.isabs(words[0]):
        raise JobError(f"the job starter's stdin does not name a job script: {line!r}")
    return words[0], words[1:]


def node_name(cfg) -> str:
    return cfg.torque.node_name or socket.gethostname()


def after_node_fault(cfg, job_id: str, user: str, message: str, busy: bool,
                     budget_s: float) -> int:
    """A node fault of ``job_id`` here: wait, then ask for a requeue; at the
    ``max_node_faults``-th one take the node out (``pbsnodes -o``) so the requeue goes
    elsewhere, or, if that cannot be done, fail the job with the reason in its own output.
    ``busy`` (no free slot: other jobs hold the node) never takes the node out."""
    tc = cfg.torque
    count = faults.record(cfg, job_id, message)
    if busy or count < tc.max_node_faults:
        wait = faults.backoff_s(count, tc.fault_backoff_s, budget_s)
        print(f"vibatch: torque prologue: node fault {count} of job {job_id} here"
              f"{'' if busy else f' (the node is taken out at {tc.max_node_faults})'}; "
              f"requeue after {wait:.0f} s", file=sys.stderr, flush=True)
        time.sleep(wait)
        return REQUEUE
    node = node_name(cfg)
    note = f"vibatch: job {job_id} failed {count} times here: {message}"[:200]
    if tc.pbsnodes:
        try:
            proc.run([tc.pbsnodes, "-o", "-N", note, node], timeout=PBSNODES_TIMEOUT_S,
                     env=minimal_env())
            faults.offlined(cfg, job_id, note)
            print(f"vibatch: torque prologue: took node {node} out of service (pbsnodes -o): "
                  f"{note}", file=sys.stderr, flush=True)
            return REQUEUE
        except CommandFailed as e:
            print(f"vibatch: torque prologue: could not take node {node} out of service: {e}",
                  file=sys.stderr)
    record_refusal(cfg, job_id, user, f"node {node} failed to start this job's VM {count} "
                   f"times: {message}")
    return 0


ENVIRON_MAX = 1 << 20


def job_starter_pid(job_id: str, uid: int) -> Optional[int]:
    """The job's first task: the session leader pbs_mom starts as the job user, with the
    job's ``PBS_JOBID`` (seen on 6.1.3.h5: ``$job_starter`` leads the job's session). The user
    could start another such process: it would only pause the user's own VM."""
    want = f"PBS_JOBID={job_id}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{name}")
            if st.st_uid != uid or os.getsid(int(name)) != int(name):
                continue
        except OSError:
            continue
        environ = safeio.read_bounded(f"/proc/{name}/environ", ENVIRON_MAX) or b""
        if want in environ.split(b"\0"):
            return int(name)
    return None


ADOPT_WAIT_S = 90     # from the domain's start to pbs_mom's start of the job starter
ADOPT_POLL_S = 0.2
TM_TIMEOUT_S = 10


def job_uid(cfg: Config, job_id: str) -> Optional[int]:
    from ..core.jobdir import JobPaths   # noqa: PLC0415
    from ..util import read_json   # noqa: PLC0415
    uid = (read_json(JobPaths.of(cfg, job_id).state_file, {}) or {}).get("uid")
    return uid if isinstance(uid, int) else None


def watcher(cfg: Config, job_id: str) -> Optional[Callable[[Sequence[int]], None]]:
    """The suspend route (core/pause.py): ``qsig -s suspend`` stops the job's first task (seen:
    SIGTSTP, then SIGSTOP to every task), not the guest; the watcher suspends the domain
    while that process is stopped and resumes it on SIGCONT."""
    from ..core import pause   # noqa: PLC0415 - no libvirt until the watcher runs
    uid = job_uid(cfg, job_id)
    if uid is None:
        return None
    return pause.watcher(cfg, job_id, lambda: job_starter_pid(job_id, uid), uid)


def vm_sessions(pids: Sequence[int]) -> dict[int, dict]:
    """The sessions of the VM's processes, each {"pid": one of them, "comm", "ppid"}: the ones
    pbs_mom can be given. A session whose leader lives is left out: pbs_mom would keep that
    task running and signal it with the job (qdel's SIGTERM would kill QEMU at once, before the
    guest's TERM trap). libvirt's double fork leaves none (seen: QEMU and each share launcher
    lead no session; pbs_mom marks such an adopted task exited at once and never signals it,
    but keeps counting its processes). Logged, never raised."""
    from ..core.pause import proc_stat   # noqa: PLC0415
    out: dict[int, dict] = {}
    for pid in pids:
        fields = proc_stat(pid)
        if not fields or len(fields) < 4 or not fields[3].isdigit():
            continue
        sid = int(fields[3])
        if sid < 2 or sid in out:
            continue
        if proc_stat(sid) is not None:
            log_error("torque: a VM session not adopted", NodeError(
                f"session {sid} of the VM's process {pid} has a live leader: pbs_mom would "
                "signal it with the job"))
            continue
        comm = (safeio.read_bounded(f"/proc/{pid}/comm", 64) or b"").decode(errors="replace")
        out[sid] = {"pid": pid, "comm": comm.strip(), "ppid": int(fields[1])}
    return out


def adopt_vm(cfg: Config, job_id: str, uid: int, pids: Sequence[int],
             timeout_s: float = ADOPT_WAIT_S) -> dict[int, dict]:
    """Hand the VM's sessions to job ``job_id`` on the local pbs_mom (TM_ADOPT_JOBID, pbstm.py),
    once pbs_mom has started the job (its starter runs): adopting earlier would mark a job
    still in its prologue as running (``adoptSession``). pbs_mom counts an adopted process
    only if its parent is not PID 1 (``mom_get_sample``): libvirtd must run under a subreaper
    for QEMU to count (docs/batch/torque.md)."""
    from . import pbstm   # noqa: PLC0415
    deadline = time.monotonic() + timeout_s
    while job_starter_pid(job_id, uid) is None:
        if time.monotonic() > deadline:
            raise NodeError(f"pbs_mom did not start job {job_id} within {timeout_s:g} s")
        time.sleep(ADOPT_POLL_S)
    sessions = vm_sessions(pids)
    for sid, info in sessions.items():
        pbstm.adopt(cfg.torque.mom_manager_port, job_id, sid, info["pid"], TM_TIMEOUT_S)
    orphans = sorted(info["comm"] for info in sessions.values() if info["ppid"] == 1)
    if orphans:
        log_error(f"torque job {job_id}: its VM is adopted, but pbs_mom will not count it",
                  NodeError(f"the parent of {', '.join(orphans)} is PID 1, and pbs_mom skips "
                            "such processes: run libvirtd under a subreaper"))
    return sessions


# pbs_mom enforces vmem/pvmem on the summed address space, and pcput per process: QEMU is one
# process for all the job's vCPUs, so a k-core job would meet its pcput k times too early
VMEM_LIMITS = ("vmem", "pvmem", "pcput")
# a pbs_mom built with cgroups or cpusets moves an adopted process into the job's cgroups or
# cpuset (adoptSession): QEMU would leave libvirt's memory cap and pinning (not tested: left out)
TORQUE_CGROUPS = ("/sys/fs/cgroup/cpuset/torque", "/sys/fs/cgroup/memory/torque",
                  "/sys/fs/cgroup/torque", "/dev/cpuset/torque")
VMEM_KEY = "vmem_limited"         # in the record's batch_env: the job has one of them


def adopter(cfg: Config, job_id: str, env: dict
            ) -> Optional[Callable[[Sequence[int]], dict]]:
    """The suspend watcher, then the VM's sessions handed to pbs_mom (adopt_vm). Not with
    ``torque.mom_manager_port: 0``, not for a job with a vmem, pvmem or pcput limit (pbs_mom
    kills a job whose processes' address space passes it, and QEMU's alone, 3.4 GiB seen for an
    800 MiB guest, is larger than the guest's memory; pcput is per process), and not where
    pbs_mom uses cgroups or cpusets (TORQUE_CGROUPS)."""
    uid = job_uid(cfg, job_id)
    if uid is None:
        return None
    watch = watcher(cfg, job_id)

    def adopt(pids: Sequence[int]) -> dict:
        if watch is not None:
            watch(pids)          # detaches the watcher and returns at once
        if not cfg.torque.mom_manager_port or env.get(VMEM_KEY):
            return {}
        cgroups = [d for d in TORQUE_CGROUPS if os.path.isdir(d)]
        if cgroups:
            log_error(f"torque job {job_id}: its VM is not handed to pbs_mom", NodeError(
                f"pbs_mom uses cgroups or cpusets here ({cgroups[0]}): it would move QEMU out "
                "of libvirt's memory cap and pinning"))
            return {}
        return {str(sid): info for sid, info in adopt_vm(cfg, job_id, uid, pids).items()}
    return adopt


class Torque(BatchSystem):
    name = "torque"
    EXIT = EXIT
    prologue_hook, epilogue_hook, starter_hook = "prologue", "epilogue", "job_starter"
    starter_label = "job starter"
    default_alarm_s = 300    # pbs_mom's $prologalarm
    margin_s = 20            # finish (and clean up) this long before pbs_mom's alarm
    keeps_refusals = True
    usage = "[--alarm S] [--config PATH] prologue|epilogue|job_starter ..."

    def check_args(self, hook: str, argv: Sequence[str]) -> Optional[str]:
        return None if argv else "no job id"

    def job_of(self, argv: Sequence[str], env: dict) -> tuple[str, str]:
        return argv[0], argv[1] if len(argv) > 1 else ""

    def job_from_hook(self, cfg: Config, argv: Sequence[str], env: dict) -> JobRequest:
        return read_request(lambda: job_from_prologue(cfg, argv))

    def epilogue_exit_code(self, argv: Sequence[str], env: dict) -> Optional[int]:
        return int(argv[9]) if len(argv) > 9 and re.match(r"^-?\d+$", argv[9]) else None

    def starter_job_id(self, env: dict) -> str:
        return env.get("PBS_JOBID", "")

    def start(self, call: Call) -> int:
        """As the job user, with the job's environment: run the job script in the job's VM."""
        script, args = parse_script_line(read_script_line(0))
        return exec_job(call.cfg(), self.starter_job_id(call.env), args, script=script,
                        shell=GUEST_SHELL)

    def enter_root_hook(self, hook: str) -> None:
        """Undo the rest of what pbs_mom hands its root hooks (hygiene sets umask 022, which
        libvirt's QEMU user needs to read the job's disk): the job user's supplementary groups,
        and the signal dispositions pbs_mom was started with (SIGINT blocked, SIGQUIT ignored:
        inherited by every process we start)."""
        os.setgroups([0])
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)

    def after_prologue(self, cfg: Config, req: JobRequest) -> None:
        faults.clear(cfg, req.job_id, back_in_service=True)

    def adopter(self, cfg: Config, job_id: str, env: dict
                ) -> Optional[Callable[[Sequence[int]], None]]:
        """The suspend watcher, and the VM's sessions adopted into the job (adopt_vm)."""
        return adopter(cfg, job_id, env)

    def asking_env(self, env: dict, argv: Sequence[str] = ()) -> dict:
        limits = parse_limits(argv[4]) if len(argv) > 4 else {}
        return {VMEM_KEY: "1"} if any(limits.get(k) for k in VMEM_LIMITS) else {}

    def before_epilogue(self, cfg: Config, job_id: str, exit_code: Optional[int]) -> None:
        if exit_code is None or exit_code >= 0:   # the job ran: its prologue's faults are history
            faults.clear(cfg, job_id)

    def after_node_fault(self, call: Call, exc: BaseException, message: str) -> Optional[int]:
        job_id, user = self.job_of(call.args, call.env)
        budget = call.alarm(self.default_alarm_s) - KILL_EARLY_S - 5 - (time.monotonic() - call.started)
        return after_node_fault(call.cfg(), job_id, user, message, isinstance(exc, NoFreeSlot),
                                budget)


SYSTEM = Torque()

if __name__ == "__main__":
    sys.exit(main(SYSTEM))
