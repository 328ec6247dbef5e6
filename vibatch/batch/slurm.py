"""Slurm: the VM's life in the Prolog/Epilog (slurmd, root, ``PrologFlags=Alloc``), the job sent
into it by a ``job_submit.lua`` that rewrites the batch script's first line to our forwarder.

The contract (Slurm 22.05's prolog_epilog and slurm.conf docs, and what slurmd does here; see
docs/batch/slurm.md):

- ``Prolog``/``Epilog`` run as root with no PATH and an environment slurmd builds (never the
  user's ``--export`` variables): ``SLURM_JOB_ID``, ``_USER``, ``_PARTITION``, ``_ACCOUNT`` (if
  set), ``_CONSTRAINTS``, ``_COMMENT``, ``_WORK_DIR``, ``SLURMD_NODENAME``, ``SLURM_CONF``; the
  Epilog also ``SLURM_JOB_EXIT_CODE2`` (``rc:signal``). CPU ids, memory and the time limit are
  not in it: they come from ``scontrol show job -d``.
- A Prolog that exits non-zero **drains the node** and requeues the job held; so does a failing
  Epilog (the job keeps its state). So only a node fault exits non-zero. A job fault exits 0
  and leaves its message for the forwarder, which prints it in the job's output and fails the
  job (exit 125).
- The OS: ``--export=VIBATCH_IMAGE=NAME``, ``--comment vibatch_image=NAME``, or
  ``--constraint NAME`` (a node feature named like an image or alias). The lua checks the name
  at submit time against the site's offer file (``vibatch image offer``) and writes the choice
  into the comment, where the Prolog reads it.
- The forwarder is the rewritten script's interpreter: the kernel runs it as
  ``job_exec <spool>/slurm_script [args]`` in the batch step, as the job user, with the job's
  environment, cwd and output files; it runs the rest of the script in the VM.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import struct
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

from .. import proc
from ..config import Config
from ..errors import CommandFailed, JobError, NodeError
from ..core.request import JobRequest, make_request, parse_cpu_list, parse_memory_mb
from ..hygiene import minimal_env
from ..images import offerfile
from ..util import log_error
from .base import AS_IS, BatchSystem, Call, exits, main
from .kit import STARTER_FAILED, exec_job, read_request, requestable_names
from .slurmsteps import StepRelay, read_task_env
from ..core.execjob import streams_input

IMAGE_KEY = "vibatch_image"
SCONTROL = "/usr/bin/scontrol"
SCONTROL_TIMEOUT_S = 30
# A failing Prolog or Epilog drains the node: only a node fault exits non-zero. A job fault
# exits 0 and leaves its reason for the forwarder, which fails the job with it.
EXIT = {
    "prolog": exits(ok=0, job=0, node=1),
    "epilog": exits(ok=0, job=0, node=1),
    "exec": exits(ok=AS_IS, job=STARTER_FAILED, node=STARTER_FAILED),
    "task": exits(ok=AS_IS, job=STARTER_FAILED, node=STARTER_FAILED),
}
_DETAIL = re.compile(r"^\s+Nodes=(\S+) CPU_IDs=(\S+) Mem=(\d+)")
_RUNTIME = re.compile(r"^\s+RunTime=\S+ TimeLimit=(\S+)")
_TMPDISK = re.compile(r"^\s+MinCPUsNode=\S+ MinMemory\w+=\S+ MinTmpDiskNode=(\S+)")
NETWORK_KEY = "vibatch_network"
_IMAGE_TOKEN = re.compile(r"(?:^|\s)" + IMAGE_KEY + r"=(\S*)")
_NETWORK_TOKEN = re.compile(r"(?:^|\s)" + NETWORK_KEY + r"=(\S*)")


def image_from_comment(comment: Optional[str]) -> Optional[str]:
    """The last ``vibatch_image=NAME`` in a job comment (the lua appends its choice last)."""
    found = _IMAGE_TOKEN.findall(comment or "")
    return found[-1] if found and found[-1] else None


def network_from_comment(comment: Optional[str]) -> Optional[str]:
    """The last ``vibatch_network=MODE`` in a job comment (the policy decides: network.py)."""
    found = _NETWORK_TOKEN.findall(comment or "")
    return found[-1] if found and found[-1] else None


def image_from_constraints(constraints: Optional[str], known: set[str]) -> Optional[str]:
    """The first feature in a constraint expression (``a&b``, ``a|b``, ``[a*2&b]``) that names
    an image or alias."""
    for term in re.split(r"[&|,*\[\]()\s]+", constraints or ""):
        if term in known:
            return term
    return None


def expand_hostlist(text: str) -> list[str]:
    """'vm[1-3,7],db' -> ['vm1', 'vm2', 'vm3', 'vm7', 'db'] (Slurm's host range syntax)."""
    out: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", text):
        m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
        if not m:
            out.append(item)
            continue
        prefix, ranges, rest = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                out.extend(prefix + str(n).zfill(width) + tail for tail in expand_hostlist(rest) or [""])
    return out


def parse_time_limit(text: str) -> Optional[int]:
    """'UNLIMITED' -> None; '1-02:03:04', '02:03:04', '03:04', '5' (minutes) -> seconds."""
    if not re.match(r"^(\d+-)?\d+(:\d+){0,2}$", text or ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    else:
        secs = 0
        for p in ([0] * (3 - len(parts)) + parts):
            secs = secs * 60 + p
    return secs + int(days or 0) * 86400 or None


def allocation(show: str, node: str, job_id: str) -> tuple[tuple[int, ...], int, Optional[int]]:
    """(CPU ids, memory MiB, time limit s) of ``node`` from ``scontrol show job -d``.

    ``show`` must be one record (for an array task, ask for ``array_task_id()``). That text is
    not escaped: a job name or comment may hold lines that look like a record or an allocation
    (and blank lines, which would cut a record short), so the whole text must hold exactly one
    record start and one allocation line for this node, or the job is refused."""
    starts = [line for line in show.splitlines() if line.startswith("JobId=")]
    if len(starts) != 1 or not starts[0].startswith(f"JobId={job_id} "):
        raise JobError(f"cannot read job {job_id}'s record from scontrol ({len(starts)} "
                       "records; does the job name or comment hold 'JobId=...'?)")
    details = []
    for line in show.splitlines():
        m = _DETAIL.match(line)
        if m and node in expand_hostlist(m.group(1)):
            details.append(m)
    if len(details) != 1:
        raise JobError(f"cannot read this job's allocation on node {node} from scontrol "
                       f"({len(details)} candidate lines; does the job name or comment hold "
                       "'Nodes=... CPU_IDs=...'?)")
    limits = [m.group(1) for m in map(_RUNTIME.match, show.splitlines()) if m]
    cpus = parse_cpu_list(details[0].group(2))
    return cpus, int(details[0].group(3)), parse_time_limit(limits[0]) if len(limits) == 1 else None


def tmp_disk_mb(show: str) -> Optional[int]:
    """``sbatch --tmp`` (MinTmpDiskNode, MiB) from ``scontrol show job``: the job's scratch disk.
    The record's text is not escaped (``allocation``): more than one such line is refused."""
    found = [m.group(1) for m in map(_TMPDISK.match, show.splitlines()) if m]
    if len(found) > 1:
        raise JobError(f"cannot read the job's --tmp from scontrol ({len(found)} candidate "
                       "lines; does the job name or comment hold 'MinTmpDiskNode=...'?)")
    if not found or found[0] == "0":
        return None
    return parse_memory_mb(found[0], "--tmp size")


def array_task_id(show: str, job_id: str) -> Optional[str]:
    """For an array task whose id is also its array's, scontrol prints every task's record: the
    task's own name (``ArrayJobId_ArrayTaskId``, printed before any text the user chose on the
    record's first line), to ask for its record alone. None for one record."""
    if sum(line.startswith("JobId=") for line in show.splitlines()) < 2:
        return None
    for line in show.splitlines():
        m = re.match(rf"^JobId={re.escape(job_id)} ArrayJobId=(\d+) ArrayTaskId=(\d+) ", line)
        if m:
            return f"{m.group(1)}_{m.group(2)}"
    return None


def scontrol_show(job_id: str, env: Mapping[str, str]) -> str:
    run_env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    if env.get("SLURM_CONF"):
        run_env["SLURM_CONF"] = env["SLURM_CONF"]
    return proc.run([SCONTROL, "show", "job", "-d", job_id], timeout=SCONTROL_TIMEOUT_S,
                    env=run_env).stdout


def job_from_prolog(cfg: Config, env: Mapping[str, str], show: str) -> JobRequest:
    job_id, user = env.get("SLURM_JOB_ID", ""), env.get("SLURM_JOB_USER", "")
    node = env.get("SLURMD_NODENAME", "")
    if not job_id or not user or not node:
        raise NodeError("the Slurm Prolog was called without SLURM_JOB_ID, SLURM_JOB_USER or "
                        "SLURMD_NODENAME: is it installed as slurm.conf's Prolog?")
    cpus, mem, limit = allocation(show, node, job_id)
    image = image_from_comment(env.get("SLURM_JOB_COMMENT"))
    if image is None:
        image = image_from_constraints(env.get("SLURM_JOB_CONSTRAINTS"), requestable_names(cfg))
    return make_request(job_id=job_id, user=user, cores=len(cpus),
                        memory_mb=mem or cfg.jobs.default_memory_mb,
                        workdir=env.get("SLURM_JOB_WORK_DIR", ""), image=image, walltime_s=limit,
                        queue=env.get("SLURM_JOB_PARTITION") or None,
                        account=env.get("SLURM_JOB_ACCOUNT") or None, cpus=cpus,
                        scratch_mb=tmp_disk_mb(show),
                        network=network_from_comment(env.get("SLURM_JOB_COMMENT")))


def exit_status(text: str) -> tuple[Optional[int], Optional[int]]:
    """(exit code, signal) from Slurm's ``rc:signal`` ('7:0' -> (7, None); '0:9' -> (137, 9):
    a signal gives 128+N, as a shell reports it)."""
    m = re.match(r"^(\d+):(\d+)$", text or "")
    if not m:
        return None, None
    rc, sig = int(m.group(1)), int(m.group(2))
    return (128 + sig, sig) if sig else (rc, None)


def exit_code(env: Mapping[str, str]) -> Optional[int]:
    """The job's exit code from ``SLURM_JOB_EXIT_CODE2`` ('7:0'; a signal gives 128+N)."""
    return exit_status(env.get("SLURM_JOB_EXIT_CODE2", ""))[0]


def final_status(job_id: str, env: Mapping[str, str]) -> tuple[Optional[int], Optional[int]]:
    """The Epilog's (exit code, signal). slurmd fills ``SLURM_JOB_EXIT_CODE2`` from the request
    that ends the job: after ``scancel`` (or the time limit) that is ``0:0``, sent before the
    batch step was killed (seen on 22.05: a job that ignored SIGTERM was SIGKILLed and
    slurmctld recorded ``0:9``, the Epilog got ``0:0``). By the time the Epilog runs, the step
    has ended and reported to slurmctld: so a ``0:0`` is checked against slurmctld's
    ``ExitCode`` (the environment's answer stands if slurmctld cannot be asked)."""
    code, sig = exit_status(env.get("SLURM_JOB_EXIT_CODE2", ""))
    if code not in (0, None):
        return code, sig
    fields = show_job_fields(job_id, env)
    asked = exit_status((fields or {}).get("ExitCode", "")) if fields else (None, None)
    return asked if asked[0] is not None else (code, sig)


# a job in one of these holds its nodes; any other state (or no record at all) is over
HOLDING = {"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING",
           "STAGE_OUT", "STOPPED"}
ASK_TIMEOUT_S = 10


def show_job_fields(job_id: str, env: Mapping[str, str]) -> Optional[dict]:
    """``scontrol -o show job ID`` as {field: value}; {} for "Invalid job id"; None if
    slurmctld cannot be asked, or answers for another job (an array's other tasks) or without
    a JobState. The line is not escaped: a job's own name or comment can repeat a field, which
    misleads only about that job."""
    conf = {"SLURM_CONF": env["SLURM_CONF"]} if env.get("SLURM_CONF") else {}
    try:
        r = proc.run([SCONTROL, "-o", "show", "job", job_id], timeout=ASK_TIMEOUT_S,
                     env=minimal_env(**conf), check=False)
    except CommandFailed:
        return None
    if r.returncode != 0:
        return {} if "Invalid job id specified" in r.stderr else None
    fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
    if fields.get("JobId") != job_id or "JobState" not in fields:
        return None        # an array's other tasks, or text we do not know
    return fields


def job_gone(job_id: str, env: Mapping[str, str]) -> Optional[bool]:
    """Whether job ``job_id`` no longer holds this node, as slurmctld says: True for "Invalid
    job id" or a state that holds no node (or nodes that are not this one: requeued); False
    while it holds this node; None if slurmctld cannot be asked or its answer is unclear."""
    fields = show_job_fields(job_id, env)
    if fields is None:
        return None
    if not fields:
        return True
    if fields["JobState"] not in HOLDING:
        return True
    node = env.get("SLURMD_NODENAME")
    return bool(node) and node not in expand_hostlist(fields.get("NodeList", ""))


def maintenance_start(show: str, node: str, now: float) -> Optional[int]:
    """The earliest start (epoch seconds) of a MAINT reservation of ``node`` that has not
    ended, from ``scontrol -o show reservation`` (one reservation per line; admins' text)."""
    starts = []
    for line in show.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "MAINT" not in fields.get("Flags", "").split(",") or \
                node not in expand_hostlist(fields.get("Nodes", "")):
            continue
        try:
            start, end = (datetime.datetime.fromisoformat(fields[k]).timestamp()
                          for k in ("StartTime", "EndTime"))
        except (KeyError, ValueError):
            continue
        if end > now:
            starts.append(int(start))
    return min(starts) if starts else None


def drain_time(env: Mapping[str, str]) -> Optional[int]:
    node = env.get("SLURMD_NODENAME")
    if not node:
        return None
    conf = {"SLURM_CONF": env["SLURM_CONF"]} if env.get("SLURM_CONF") else {}
    try:
        r = proc.run([SCONTROL, "-o", "show", "reservation"], timeout=ASK_TIMEOUT_S,
                     env=minimal_env(**conf), check=False)
    except CommandFailed:
        return None
    if r.returncode != 0 and "No reservations" not in r.stdout + r.stderr:
        return None
    return maintenance_start(r.stdout, node, time.time())


def node_features(text: str, node: str) -> Optional[set[str]]:
    """The Features= of ``node``'s NodeName line(s) in slurm.conf (None: no line names it)."""
    found: Optional[set[str]] = None
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        fields = dict(item.partition("=")[::2] for item in line.split() if "=" in item)
        names = {k.lower(): v for k, v in fields.items()}
        if "nodename" in names and node in expand_hostlist(names["nodename"]):
            found = (found or set()) | set(filter(None, names.get("features", "").split(",")))
    return found


# The job's extern step (PrologFlags=Contain) takes the VM's processes: slurmstepd's socket
# protocol (src/common/stepd_api.c, slurmstepd/req.c of 22.05): the client's protocol version
# (int) -> the step's (int); REQUEST_STATE (int) -> state (int); REQUEST_ADD_EXTERN_PID (int)
# and the pid (pid_t) -> rc (int, 0 ok). Only root (or SlurmUser) may add a pid.
EXTERN_STEP = 0xFFFFFFFC          # SLURM_EXTERN_CONT
PROTOCOL_VERSION = 38 << 8        # SLURM_22_05_PROTOCOL_VERSION (23.x still accept it)
REQUEST_STATE, REQUEST_ADD_EXTERN_PID = 5, 22
STEP_RUNNING = 2                  # SLURMSTEPD_STEP_RUNNING
STEPD_TIMEOUT_S = 10


def slurmd_config(env: Mapping[str, str]) -> dict[str, str]:
    """``scontrol show config`` as {key: value} (the node's: its failure is the node's)."""
    conf = {"SLURM_CONF": env["SLURM_CONF"]} if env.get("SLURM_CONF") else {}
    out = proc.run([SCONTROL, "show", "config"], timeout=SCONTROL_TIMEOUT_S,
                   env=minimal_env(**conf)).stdout
    return {m.group(1): m.group(2) for m in
            re.finditer(r"(?m)^(\w+)\s*=\s*(.*?)\s*$", out)}


def spool_dir(config: Mapping[str, str], node: str) -> str:
    """SlurmdSpoolDir of this node, ``%n``/``%h`` expanded."""
    path = config.get("SlurmdSpoolDir", "")
    if not path.startswith("/"):
        raise NodeError(f"scontrol show config gives no usable SlurmdSpoolDir ({path!r})")
    return path.replace("%n", node).replace("%h", socket.gethostname().split(".")[0])


def contains_jobs(config: Mapping[str, str]) -> bool:
    """PrologFlags=Contain (every job gets an extern step) with cgroup process tracking (the
    only tracking that follows a process its step did not start)."""
    flags = {f.strip().lower() for f in config.get("PrologFlags", "").split(",")}
    return "contain" in flags and config.get("ProctrackType") == "proctrack/cgroup"


def extern_socket(spool: str, node: str, job_id: str) -> str:
    return os.path.join(spool, f"{node}_{job_id}.{EXTERN_STEP}")


def _stepd_int(s: socket.socket, *send: int) -> int:
    s.sendall(struct.pack(f"={len(send)}i", *send))
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            raise NodeError("slurmstepd closed the connection")
        data += chunk
    return struct.unpack("=i", data)[0]


def add_extern_pids(path: str, pids: Sequence[int], deadline: float) -> None:
    """Add ``pids`` to the extern step listening on ``path``, once it runs (``deadline``:
    time.monotonic())."""
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(STEPD_TIMEOUT_S)
            s.connect(path)
            if _stepd_int(s, PROTOCOL_VERSION) <= 0:
                raise NodeError(f"{path}: slurmstepd refused protocol version {PROTOCOL_VERSION}")
            if _stepd_int(s, REQUEST_STATE) == STEP_RUNNING:
                for pid in pids:
                    if _stepd_int(s, REQUEST_ADD_EXTERN_PID, pid) != 0:
                        raise NodeError(f"the extern step at {path} refused pid {pid}")
                return
        if time.monotonic() > deadline:
            raise NodeError(f"the extern step at {path} did not start running in time")
        time.sleep(0.1)


def adopter(job_id: str, env: Mapping[str, str], timeout_s: float = 120
            ) -> Optional[Callable[[Sequence[int]], None]]:
    """What hands the VM's processes to job ``job_id``'s extern step, if the node has one
    (``contains_jobs``). The step exists only once the Prolog has returned (slurmd spawns it
    then), so this waits for its socket."""
    config = slurmd_config(env)
    if not contains_jobs(config):
        return None
    node = env.get("SLURMD_NODENAME", "")
    path = extern_socket(spool_dir(config, node), node, job_id)

    def adopt(pids: Sequence[int]) -> None:
        deadline = time.monotonic() + timeout_s
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise NodeError(f"no extern step for job {job_id} at {path} within "
                                f"{timeout_s:g} s")
            time.sleep(0.1)
        add_extern_pids(path, pids, deadline)
    return adopt


class Slurm(BatchSystem):
    name = "slurm"
    EXIT = EXIT
    starter_hook = "exec"     # the rewritten script's interpreter: job user, batch step
    starter_label = "job"
    other_starters = ("task",)   # the SPANK plugin's: any step's task (slurmsteps.py)
    default_alarm_s = 300     # Slurm's PrologEpilogTimeout is unlimited unless the site sets it
    margin_s = 20
    keeps_refusals = True
    usage = ("[--alarm S] [--config PATH] prolog|epilog|exec SCRIPT [ARGS]|"
             "task FD JOBID batch|step -- ARGV")

    def job_of(self, argv: Sequence[str], env: dict) -> tuple[str, str]:
        return env.get("SLURM_JOB_ID", ""), env.get("SLURM_JOB_USER", "")

    def job_from_hook(self, cfg: Config, argv: Sequence[str], env: dict) -> JobRequest:
        job_id = env.get("SLURM_JOB_ID", "")
        if not job_id:
            raise NodeError("no SLURM_JOB_ID in the Prolog's environment")
        show = scontrol_show(job_id, env)   # the node's: its failure is the node's
        task = array_task_id(show, job_id)
        if task is not None:
            show = scontrol_show(task, env)
        return read_request(lambda: job_from_prolog(cfg, env, show))

    def asking_env(self, env: dict, argv: Sequence[str] = ()) -> dict:
        return {k: env[k] for k in ("SLURM_CONF", "SLURMD_NODENAME") if env.get(k)}

    @staticmethod
    def node_features(text: str, node: str) -> Optional[set[str]]:
        return node_features(text, node)

    def after_prologue(self, cfg: Config, req: JobRequest) -> None:
        """Keep the offer file in step with the library (also after a change of aliases in the
        config, which no image command sees). Best effort: a job never fails for it."""
        try:
            offerfile.refresh(cfg)
        except Exception as e:  # noqa: BLE001 - the job's VM is ready; only log
            log_error(f"slurm prolog of job {req.job_id}: refreshing {cfg.batch.offer_file}", e)

    def job_gone(self, job_id: str, env: dict) -> Optional[bool]:
        return job_gone(job_id, env)

    def drain_time(self, env: dict) -> Optional[int]:
        return drain_time(env)

    def adopter(self, cfg: Config, job_id: str, env: dict
                ) -> Optional[Callable[[Sequence[int]], None]]:
        """The job's extern step takes the VM (``PrologFlags=Contain``; without it, nothing)."""
        return adopter(job_id, env)

    def epilogue_exit_code(self, argv: Sequence[str], env: dict) -> Optional[int]:
        return exit_code(env)

    def epilogue_status(self, argv: Sequence[str], env: dict) -> tuple[Optional[int],
                                                                       Optional[int]]:
        return final_status(env.get("SLURM_JOB_ID", ""), env)

    def starter_job_id(self, env: dict) -> str:
        return env.get("SLURM_JOB_ID", "")

    def start(self, call: Call) -> int:
        if call.hook == "task":
            return self.start_task(call)
        if not call.args:
            raise JobError("no job script (this is a #! interpreter)")
        return exec_job(call.cfg(), self.starter_job_id(call.env), call.args[1:],
                        script=call.args[0], drop_first_line=True)

    def start_task(self, call: Call) -> int:
        """A task of a step, exec'd by the SPANK plugin in the task's own process (as the job
        user): ``FD JOBID batch|step -- ARGV``, the task's environment in the memfd FD, the
        job id Slurm's own. ``call.env`` is the plugin's fixed one (slurmstepd's SLURM_CONF)."""
        a = call.args
        if len(a) < 5 or not a[0].isdigit() or not a[1].isdigit() or \
                a[2] not in ("batch", "step") or a[3] != "--":
            raise NodeError("usage: task FD JOBID batch|step -- ARGV (the SPANK plugin's call)")
        env, job_id, argv = read_task_env(int(a[0])), a[1], a[4:]

        def relay(ex) -> StepRelay:
            return StepRelay(ex.info.io_host, ex.info.io_guest, ex.info.workdir,
                             call.env.get("SLURM_CONF"))

        if a[2] == "step":    # srun's input (task 0's; a terminal with --pty) goes along
            return exec_job(call.cfg(), job_id, argv, environ=env, relay=relay,
                            stdin=0 if streams_input(0) else None)
        with open(argv[0], "rb") as f:     # the spooled script: drop job_submit.lua's line
            first = f.readline(4096)
        ours = first.startswith(b"#!") and first.rstrip().endswith(b"/job_exec")
        return exec_job(call.cfg(), job_id, argv[1:], script=argv[0], drop_first_line=ours,
                        environ=env, relay=relay)


SYSTEM = Slurm()

if __name__ == "__main__":
    sys.exit(main(SYSTEM))
