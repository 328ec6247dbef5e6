"""(Son of) Grid Engine: the VM's life in the queue's root prolog/epilog, the job sent into it by
the queue's ``starter_method``.

The contract (sge_queue_conf(5), sge_shepherd(8), and what 8.1.9 does here; see
docs/batch/gridengine.md):

- ``prolog root@<shim> $job_id $ja_task_id $job_owner $queue $host`` and the same for
  ``epilog``: the shepherd runs them as root, in the job's cwd, with stdout/stderr appended to
  the job's output files, and with the job's environment, which the user controls (``-v``,
  ``PATH``, ``PYTHONPATH``): so the shims run ``python -I`` by absolute path, the identity comes
  from the pseudo-variables on the command line, and the job's request comes from the qmaster
  (``qstat -xml -j``), never from the environment. There is no prolog timeout.
- Exit codes: 0 ok; **99 reschedules** the job; **100 puts the job in error** (``Eqw``);
  anything else puts the **queue in error** (``E``) and reschedules. So: a job fault exits 100,
  a node fault 99, and nothing else ever leaves the prolog. The epilog always exits 0: every
  other code re-runs a job that already finished.
- The OS: ``-l vm_image=NAME`` (a RESTRING complex the site defines) or ``-v VIBATCH_IMAGE=NAME``.
- The cores are the job's PE slots; the memory ``h_vmem`` per slot times the slots, the VM
  made to fit in it (``fit_vmem``); the
  walltime ``h_rt``; the scratch disk ``-l scratch=SIZE`` (a MEMORY complex the site defines). The CPU ids are vibatch's own choice (SGE binds only with ``-binding``).
- ``starter_method <shim>``: the shepherd starts it as the job user with the job's environment
  and ``[job script copy | binary, args...]``; the script copy lives in execd's spool, so its
  text is handed into the VM and run by ``$SGE_STARTER_SHELL_PATH``, as SGE's posix_compliant
  mode would. ``qdel`` SIGKILLs the starter at once: the epilog is the backstop that destroys
  the VM.
- The VM in the job's usage and suspend: QEMU and virtiofsd run with the job's ``add_grp_id``
  (the prolog registers the job before the VM starts), and a root watcher mirrors a stopped job
  into the domain (``process_gid``, ``watcher`` below; docs/batch/gridengine.md).
"""
from __future__ import annotations

import dataclasses
import os
import pwd
import re
import sys
import xml.etree.ElementTree as ET
from typing import Callable, Mapping, Optional, Sequence

from .. import proc, safeio
from ..util import log_error
from ..config import Config
from ..errors import CommandFailed, NodeError, ResourceRequestError
from ..core.request import JobRequest, make_request, parse_memory_mb
from .base import AS_IS, BatchSystem, Call, exits, main
from .kit import STARTER_FAILED, exec_job, fit_vm, home_of, read_request

QSTAT = "/usr/bin/qstat"
SHEPHERD = "sge_shepherd"
ADDGRPID = "addgrpid"            # the shepherd's record of the job's group, in its spool dir
SPOOL_FILE_MAX = 1 << 20
VMEM_LIMITS = ("h_vmem", "s_vmem")
# sge_parse_num_val (sge_parse_num_par.c): strtod unless the value starts with 0 and has no
# '.' (then a sign, a decimal or fixed float, a hex float, inf or nan), else strtol base 0 (hex
# or octal) kept to 32 bits (u_long32); a k/K/m/M/g/G multiplier (t/T in later releases)
GE_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
GE_HEX_FLOAT = re.compile(r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)"
                          r"(?:[pP][+-]?[0-9]+)?")
GE_HEX_OCTAL = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*")
STRTOL_MAX = (1 << 63) - 1       # strtol saturates there; then u_long32 keeps 32 bits
GE_UNITS = {"": 1, "k": 1000, "K": 1024, "m": 1000 ** 2, "M": 1024 ** 2, "g": 1000 ** 3,
            "G": 1024 ** 3, "t": 1000 ** 4, "T": 1024 ** 4}
GE_NO_LIMIT_MB = 1 << 43    # past any node's memory (and past sge_rlim_t): no limit
QSTAT_TIMEOUT_S = 60
COMPLEX = "vm_image"
SCRATCH_COMPLEX = "scratch"     # -l scratch=10G: a MEMORY complex the site defines (not consumable)
# prolog: 99 reschedules the job, 100 puts it in error (Eqw), anything else puts the queue in
# error. epilog: anything but 0 re-runs a job that already finished.
EXIT = {
    "prolog": exits(ok=0, job=100, node=99),
    "epilog": exits(ok=0, job=0, node=0),
    "starter": exits(ok=AS_IS, job=STARTER_FAILED, node=STARTER_FAILED),
}


def vm_job_id(job_id: str, task: str) -> str:
    """One VM per array task: '17' for a plain job (task 0 or 'undefined'), '17.3' for task 3."""
    return f"{job_id}.{task}" if task.isdigit() and int(task) > 0 else job_id


def qstat_job(job_id: str) -> ET.Element:
    """The job's record from the qmaster, as XML (escaped, unlike qstat's text)."""
    # Debian's qstat wrapper finds SGE_ROOT/SGE_CELL in /etc/default/gridengine: nothing is
    # taken from this environment, which the job user controls (-v)
    env = {"PATH": os.environ["PATH"], "LC_ALL": "C"}
    r = proc.run([QSTAT, "-xml", "-j", job_id], timeout=QSTAT_TIMEOUT_S, env=env, cwd="/")
    try:
        root = ET.fromstring(r.stdout)
    except ET.ParseError as e:
        raise NodeError(f"qstat -xml -j {job_id}: unreadable XML ({e})") from None
    for el in root.iter("element"):
        if el.findtext("JB_job_number") == job_id:
            return el
    raise NodeError(f"qstat -xml -j {job_id} has no record of job {job_id}")


def _resources(job: ET.Element) -> dict[str, tuple[str, str]]:
    out = {}
    for req in job.findall("JB_hard_resource_list/qstat_l_requests"):
        out[req.findtext("CE_name", "")] = (req.findtext("CE_stringval", ""),
                                            req.findtext("CE_doubleval", ""))
    return out


def _env_list(job: ET.Element) -> dict[str, str]:
    return {v.findtext("VA_variable", ""): v.findtext("VA_value", "")
            for v in job.findall("JB_env_list/job_sublist")}


def slots(job: ET.Element, nslots: Optional[str]) -> int:
    """The PE slots: the request's range, narrowed by NSLOTS when the job asked for a range."""
    rng = job.find("JB_pe_range/ranges")
    if job.findtext("JB_pe") is None or rng is None:
        return 1
    lo, hi = int(rng.findtext("RN_min", "1")), int(rng.findtext("RN_max", "1"))
    if lo == hi:
        return lo
    n = int(nslots) if (nslots or "").isdigit() else lo
    return min(max(n, lo), hi)


def job_from_prolog(cfg: Config, argv: Sequence[str], job: ET.Element,
                    env: Mapping[str, str]) -> JobRequest:
    job_id, task, owner = argv[0], argv[1], argv[2]
    queue = argv[3] if len(argv) > 3 else None
    if job.findtext("JB_owner") != owner:
        raise NodeError(f"qstat says job {job_id} belongs to {job.findtext('JB_owner')!r}, "
                        f"the shepherd says {owner!r}")
    res = _resources(job)
    cores = slots(job, env.get("NSLOTS"))
    memory_mb = cfg.jobs.default_memory_mb
    if "h_vmem" in res:
        try:
            memory_mb = parse_memory_mb(res["h_vmem"][0]) * cores
        except ResourceRequestError:
            raise ResourceRequestError(f"invalid h_vmem {res['h_vmem'][0]!r}") from None
    walltime = None
    if "h_rt" in res:
        try:
            walltime = int(float(res["h_rt"][1])) or None
        except ValueError:
            walltime = None
    scratch_mb = None
    if SCRATCH_COMPLEX in res:
        text, value = res[SCRATCH_COMPLEX]
        try:
            scratch_mb = int(float(value)) >> 20
        except ValueError:
            scratch_mb = parse_memory_mb(text, f"{SCRATCH_COMPLEX} size")
    image = res.get(COMPLEX, ("", ""))[0] or _env_list(job).get("VIBATCH_IMAGE") or None
    workdir = job.findtext("JB_cwd") or home_of(owner)
    account = job.findtext("JB_account")
    return make_request(job_id=vm_job_id(job_id, task), user=owner, cores=cores,
                        memory_mb=memory_mb, workdir=workdir, image=image, walltime_s=walltime,
                        queue=queue, account=None if account in (None, "", "sge") else account,
                        scratch_mb=scratch_mb,
                        network=_env_list(job).get("VIBATCH_NETWORK") or None)


def spool_config(env: Mapping[str, str]) -> dict[str, str]:
    """``$SGE_JOB_SPOOL_DIR/config`` (key=value): the starter reads script_file and
    handle_as_binary from it."""
    return read_spool_config(env.get("SGE_JOB_SPOOL_DIR", ""))


def read_spool_config(directory: str) -> dict[str, str]:
    """The ``config`` file the shepherd runs the job by (execd's, sgeadmin 0644), as a dict;
    empty if it cannot be read. Opened without following a link, at most SPOOL_FILE_MAX."""
    data = safeio.read_bounded(os.path.join(directory, "config"), SPOOL_FILE_MAX) or b""
    out = {}
    for line in data.decode(errors="replace").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


# -- the VM in Grid Engine's usage collection and suspend (docs/batch/gridengine.md) --------
# Grid Engine's collector (PDC, execd) counts every process whose groups hold the job's
# add_grp_id (procfs.c: /proc/*/status "Groups:"), from the job's registration on. It caches
# each process it sees: one seen before the job is registered is never counted, and execd
# registers the job only when the shepherd writes ``addgrpid``, after the prolog, once the VM
# already runs. So the prolog writes that file (the same line the shepherd writes later) before
# the VM starts, and execd registers the job at its next collection, before it looks at QEMU.

def shepherd_spool() -> Optional[str]:
    """The job's ``active_jobs/<job>.<task>`` directory: the working directory of the
    sge_shepherd running this root hook (the shims exec, so it is our parent). None when our
    parent is not a shepherd (the hook was run some other way)."""
    ppid = os.getppid()
    try:
        if os.path.basename(os.readlink(f"/proc/{ppid}/exe")) != SHEPHERD:
            return None
        return os.readlink(f"/proc/{ppid}/cwd")
    except OSError:
        return None


def own_config(conf: Mapping[str, str], job_id: str, task: str, owner: str
               ) -> Mapping[str, str]:
    """The shepherd's config, if it is this job's (its limits and group are read from it)."""
    mine = (conf.get("job_id"), conf.get("ja_task_id"), conf.get("job_owner"))
    if mine != (job_id, task if task.isdigit() else "0", owner):
        raise NodeError(f"the shepherd's config names job {mine}, not {(job_id, task, owner)}")
    return conf


def job_group(conf: Mapping[str, str], job_id: str, task: str, owner: str) -> int:
    """The job's add_grp_id from its spool config, if the config is this job's."""
    own_config(conf, job_id, task, owner)
    gid = conf.get("add_grp_id", "")
    if not gid.isdigit() or int(gid) <= 0:
        raise NodeError(f"the shepherd's config has no valid add_grp_id ({gid!r})")
    return int(gid)


def register_early(directory: str, gid: int) -> None:
    """Write the job's ``addgrpid`` file as the shepherd does (``GID\n``, owned by the spool's
    owner, who writes it again at the job's start), so that execd registers the job with its
    collector before the VM starts. The directory is execd's (not the user's): checked."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(dfd)
        if st.st_mode & 0o022:
            raise NodeError(f"{directory} is writable by others: not Grid Engine's spool")
        tmp = ADDGRPID + ".vibatch"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=dfd)
        try:
            os.write(fd, f"{int(gid)}\n".encode())
            os.fchown(fd, st.st_uid, st.st_gid)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.rename(tmp, ADDGRPID, src_dir_fd=dfd, dst_dir_fd=dfd)
    finally:
        os.close(dfd)


def ge_memory_mb(text: str) -> Optional[int]:
    """A Grid Engine memory value in MiB, read as sge_parse_num_val reads it for execd's limit
    (sge_types(1): bytes, K/M/G of 1024 or k/m/g of 1000; TRUE and FALSE are 1 and 0): through
    strtod (a sign, decimals, exponents, hex floats, inf and nan) unless it starts with 0 and
    has no '.', else as hex or octal kept to 32 bits, as Grid Engine's u_long32 keeps it. None
    for INFINITY, inf, nan (a limit no usage exceeds) or a value past any memory. ValueError
    for anything else (a negative value, a time value ``h:m:s``): never taken for no limit."""
    s = text.strip()
    if s.lower() in ("infinity", "true", "false"):
        return {"infinity": None, "true": 0, "false": 0}[s.lower()]
    number, unit = (s[:-1], s[-1]) if s[-1:] in GE_UNITS and s[-1:] else (s, "")
    if "." in number or not number.startswith("0"):
        if number.lstrip("+").lower() in ("inf", "nan"):
            return None
        if GE_DECIMAL.fullmatch(number):
            value = float(number)
        elif GE_HEX_FLOAT.fullmatch(number):
            sign = -1.0 if number.startswith("-") else 1.0
            value = sign * float.fromhex(number.lstrip("+-"))
        else:
            raise ValueError(f"{text!r} is not a memory value")
        if value < 0:
            raise ValueError(f"{text!r} is negative")
        mb = value * GE_UNITS[unit] / (1 << 20)
        return None if not mb < GE_NO_LIMIT_MB else int(mb)
    if not GE_HEX_OCTAL.fullmatch(number):
        raise ValueError(f"{text!r} is not a memory value")
    value = int(number[2:], 16) if number[1:2] in ("x", "X") else int(number, 8)
    return (min(value, STRTOL_MAX) & 0xFFFFFFFF) * GE_UNITS[unit] >> 20


def host_slots(conf: Mapping[str, str]) -> int:
    """The slots the job was granted on this host (``host_slots``, which execd writes into
    every job's config): a parallel job's limit here is per slot of this host, not of the
    job's total. ValueError if the config has no such number."""
    text = conf.get("host_slots", "")
    if not text.isdigit() or not 0 < int(text) < 1 << 20:
        raise ValueError(f"the shepherd's config has no valid host_slots ({text!r})")
    return int(text)


def this_host(req: JobRequest, conf: Mapping[str, str]) -> JobRequest:
    """A parallel job spread over hosts gets a VM of the slots granted here (``host_slots``):
    the prolog runs on the master host only, and the other hosts' slots are the other hosts'
    cores (qstat's range is the job's total)."""
    try:
        here = host_slots(conf)
    except ValueError:
        return req
    return dataclasses.replace(req, cores=here) if here < req.cores else req


def limit_slots(conf: Mapping[str, str]) -> int:
    """The slots by which the shepherd config's (the master queue's) h_vmem and s_vmem hold the
    job on this host. execd sums each granted queue instance's limit times its slots here; the
    config has the master queue's limits and ``host_slots`` counts every queue's slots. Where
    the job has slots in several queues of this host (``pe_hostfile``), those queues may keep
    limits of their own (a job's h_vmem request is written into all of them, else each keeps
    its own), so only the master queue's slots are taken: its limit times them is never more
    than execd's sum. ValueError if that cannot be read."""
    slots = host_slots(conf)
    hostfile = conf.get("pe_hostfile", "")
    if not hostfile:
        return slots
    data = safeio.read_bounded(hostfile, SPOOL_FILE_MAX)
    if data is None:
        raise ValueError(f"the job's pe_hostfile {hostfile} cannot be read")
    host, queue = conf.get("host", "").lower(), conf.get("queue", "")
    here = [f for f in (line.split() for line in data.decode(errors="replace").splitlines())
            if len(f) >= 3 and f[0].lower() == host and f[1].isdigit()]
    if len({f[2] for f in here}) <= 1:
        return slots
    master = sum(int(f[1]) for f in here if f[2].partition("@")[0] == queue)
    if not 0 < master <= slots:
        raise ValueError(f"the pe_hostfile {hostfile} has no slots of queue {queue!r} here")
    return master


def vmem_limit_mb(conf: Mapping[str, str], slots: int) -> Optional[int]:
    """What execd holds the job's processes on this host to, in MiB (force_job_rlimit in
    execd_ck_to_do.c: the smaller of the queue instance's h_vmem and s_vmem, times the slots
    granted on this host), from the shepherd's config; None without a limit. The sum it
    compares is of each process's VmRSS + VmSwap (procfs.c), not its address space.
    ValueError, naming the limit, for a value it cannot read."""
    limits = []
    for key in VMEM_LIMITS:
        try:
            mb = ge_memory_mb(conf.get(key, "INFINITY"))
        except ValueError as e:
            raise ValueError(f"its {key} {e}") from None
        if mb is not None:
            limits.append(mb)
    return min(limits) * slots if limits else None


def fit_vmem(cfg: Config, req: JobRequest, conf: Mapping[str, str]) -> tuple[JobRequest, bool]:
    """(the request, whether QEMU may carry the job's group). execd SIGKILLs a job whose
    processes, QEMU among them once it has the group, hold more than the job's vmem limit on
    this host. So the VM is made to fit in it: its hard cap (the guest's memory plus QEMU's
    overhead) is the limit less kit.HOST_RESERVE_MB, for the job's host processes, virtiofsd
    and QEMU's shared libraries, which the cap does not hold. A limit too small for the smallest
    VM, or one that cannot be read, leaves the guest its requested memory and QEMU out of the job's
    usage, as before (logged): never a VM that execd would kill."""
    def uncounted(why: str) -> tuple[JobRequest, bool]:
        log_error(f"gridengine prolog of job {req.job_id}: the VM stays out of its usage",
                  ResourceRequestError(why))
        return req, False
    try:
        limit = vmem_limit_mb(conf, limit_slots(conf))
    except ValueError as e:
        return uncounted(str(e))
    if limit is None:
        return req, True
    try:
        return fit_vm(cfg, req, limit, f"its vmem limit of {limit} MiB on this host"), True
    except ResourceRequestError as e:
        return uncounted(e.message)


def process_gid(spool: str, conf: Mapping[str, str], job_id: str, task: str,
                owner: str) -> Optional[int]:
    """The group QEMU and the share launchers get (request.py's process_gid), with the job
    registered for it. Best effort: a failure costs the record of the VM's usage, never the
    job (logged)."""
    try:
        gid = job_group(conf, job_id, task, owner)
        register_early(spool, gid)
        return gid
    except (OSError, NodeError) as e:
        log_error(f"gridengine prolog of job {job_id}: the VM stays out of its usage", e)
        return None


def read_job_pid(spool: str) -> Optional[int]:
    """The job's pid the shepherd records (``job_pid``) once it has started the job."""
    text = (safeio.read_bounded(os.path.join(spool, "job_pid"), 64) or b"").strip()
    return int(text) if text.isdigit() and int(text) > 1 else None


def watcher(cfg: Config, job_id: str) -> Optional[Callable[[Sequence[int]], None]]:
    """The suspend route (core/pause.py): a detached root watcher that suspends the job's
    domain while the job's process (``job_pid``) is stopped, as Grid Engine's suspend_method
    (SIGSTOP to the job) leaves it, and resumes it on SIGCONT; when QEMU carries the job's
    group, the shepherd's addgrpid signal stops QEMU itself, and the watcher only sets the
    clock after the resume. None when not run by a shepherd."""
    spool = shepherd_spool()
    if spool is None:
        return None
    conf = read_spool_config(spool)
    try:
        uid = pwd.getpwnam(conf.get("job_owner", "")).pw_uid
    except KeyError:
        raise NodeError("the shepherd's config names no known job owner") from None

    from ..core import pause   # noqa: PLC0415 - no libvirt until the watcher runs
    return pause.watcher(cfg, job_id, lambda: read_job_pid(spool), uid)


def job_gone(vm_job: str) -> Optional[bool]:
    """Whether the qmaster says the job of VM job ``vm_job`` ('17' or '17.3') no longer exists:
    True when it lists the job as unknown, False while it has a record, None if it cannot be
    asked or says anything else."""
    job_id = vm_job.split(".", 1)[0]
    try:   # proc.run's own minimal environment: nothing of reap's caller reaches qstat
        r = proc.run([QSTAT, "-xml", "-j", job_id], timeout=QSTAT_TIMEOUT_S, cwd="/",
                     check=False)
    except CommandFailed:
        return None
    try:
        root = ET.fromstring(r.stdout)
    except ET.ParseError:
        return None
    # a job it does not know: <unknown_jobs><ST_name>ID</ST_name></unknown_jobs> (8.1.9, exit 0)
    if root.tag == "unknown_jobs" and job_id in [n.text for n in root.iter("ST_name")]:
        return True
    if any(el.findtext("JB_job_number") == job_id for el in root.iter("element")):
        return False
    return None      # e.g. <comunication_error>: the qmaster cannot be asked


class GridEngine(BatchSystem):
    name = "gridengine"
    EXIT = EXIT
    default_alarm_s = 600     # SGE itself has no prolog timeout; ours keeps a hung boot bounded
    usage = "[--config PATH] prolog|epilog JOB_ID TASK OWNER [QUEUE] | starter ARGS"

    def check_args(self, hook: str, argv: Sequence[str]) -> Optional[str]:
        if len(argv) < 3:
            return f"expected '$job_id $ja_task_id $job_owner [$queue]' as arguments, got {argv!r}"
        return None

    def job_of(self, argv: Sequence[str], env: dict) -> tuple[str, str]:
        return vm_job_id(argv[0], argv[1]), argv[2]

    def job_from_hook(self, cfg: Config, argv: Sequence[str], env: dict) -> JobRequest:
        record = qstat_job(argv[0])   # the node's: its failure is the node's
        req = read_request(lambda: job_from_prolog(cfg, argv, record, env))
        spool = shepherd_spool()
        if spool is None:
            return req
        try:
            conf = own_config(read_spool_config(spool), argv[0], argv[1], argv[2])
        except (OSError, NodeError) as e:
            log_error(f"gridengine prolog of job {argv[0]}: the VM stays out of its usage", e)
            return req
        req, counted = fit_vmem(cfg, this_host(req, conf), conf)
        gid = process_gid(spool, conf, argv[0], argv[1], argv[2]) if counted else None
        return dataclasses.replace(req, process_gid=gid) if gid else req

    def adopter(self, cfg: Config, job_id: str, env: dict
                ) -> Optional[Callable[[Sequence[int]], None]]:
        """Nothing to hand over for accounting (QEMU carries the job's group from its start,
        process_gid); the suspend watcher starts here, with the VM's processes."""
        return watcher(cfg, job_id)

    def job_gone(self, job_id: str, env: dict) -> Optional[bool]:
        return job_gone(job_id)

    def epilogue_exit_code(self, argv: Sequence[str], env: dict) -> Optional[int]:
        code = env.get("SGE_JOBEXIT_STAT", "")
        return int(code) if code.isdigit() else None

    def starter_job_id(self, env: dict) -> str:
        return vm_job_id(env.get("JOB_ID", ""), env.get("SGE_TASK_ID", ""))

    def start(self, call: Call) -> int:
        """The shepherd's ``[job script copy | binary, args...]``: a script's text is run in
        the guest by ``$SGE_STARTER_SHELL_PATH``, as SGE's posix_compliant mode would."""
        argv, job_id = call.args, self.starter_job_id(call.env)
        conf = spool_config(call.env)
        if argv and conf.get("handle_as_binary") == "0" and argv[0] == conf.get("script_file"):
            shell = call.env.get("SGE_STARTER_SHELL_PATH") or "/bin/sh"
            return exec_job(call.cfg(), job_id, argv[1:], script=argv[0], interpreter=shell)
        return exec_job(call.cfg(), job_id, list(argv))


SYSTEM = GridEngine()

if __name__ == "__main__":
    sys.exit(main(SYSTEM))
