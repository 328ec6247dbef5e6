"""A job's life on one node: prologue (claim, check, clone, boot, set up) and epilogue.

Both are idempotent and bounded. A failing prologue undoes exactly what it created and nothing
that belongs to another invocation; the epilogue cleans whatever is there and succeeds when
there is nothing to clean.
"""
from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import filelock
import psutil

from . import accel, accounting, hypervisor, qemuimg
from .agent import AgentError, LibvirtAgent, SocketAgent
from .config import Config
from .domain import DomainSpec, Share, IO_TAG, WORKDIR_TAG, read_metadata, render
from .errors import (BootFailed, ConfigError, JobAlreadyRunning, LockTimeout, NodeError,
                     ResourceRequestError, VibatchError)
from .guestsetup import GUEST_IO_DIR, SetupArgs
from .jobdir import DOMAIN_PREFIX, JobPaths, console_tail
from .library import IN_USE_UNKNOWN, Image, Library
from .node import capacity
from .policy import Resolution, resolve, user_groups
from .request import JobRequest
from .slots import Slot, SlotAllocator
from .util import Deadline, PhaseTimer, atomic_write_json, hold, read_json


@dataclass
class Node:
    """Everything a hook needs on this node, built from one Config."""

    cfg: Config
    _conn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for d in (self.cfg.state_dir, self.cfg.run_dir):
            os.makedirs(d, mode=0o755, exist_ok=True)
        self.slots = SlotAllocator(self.cfg.state_dir, capacity(self.cfg), self.cfg.lock_timeout_s)
        self.library = Library(self.cfg.library_dir, self.cfg.state_dir, self.cfg.lock_timeout_s)
        self.jobs_lock = filelock.FileLock(os.path.join(self.cfg.run_dir, "jobs.lock"),
                                           timeout=self.cfg.lock_timeout_s)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = hypervisor.connect(self.cfg.libvirt_uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------------------------
def check_limits(cfg: Config, cores: int, memory_mb: int) -> None:
    j = cfg.jobs
    if j.max_cores and cores > j.max_cores:
        raise ResourceRequestError(f"{cores} cores requested; the site allows at most {j.max_cores}")
    if memory_mb < j.min_memory_mb:
        raise ResourceRequestError(f"{memory_mb} MiB requested; a VM needs at least "
                                   f"{j.min_memory_mb} MiB")
    if j.max_memory_mb and memory_mb > j.max_memory_mb:
        raise ResourceRequestError(f"{memory_mb} MiB requested; the site allows at most "
                                   f"{j.max_memory_mb} MiB")


def prologue(node: Node, req: JobRequest, image: Optional[Image] = None,
             holder: Optional[int] = None) -> dict:
    """Bring up the job's VM. Returns the job's state record (with phase timings).

    The image is resolved through the site's policy unless the caller passes one (``vibatch
    image test``, which an admin runs on images before endorsing them). ``holder`` is the pid
    of a process whose life bounds the job's (HTCondor's condor_starter): once it is gone, the
    job is over whatever its VM does, and ``reap`` ends it."""
    cfg = node.cfg
    check_limits(cfg, req.cores, req.memory_mb)
    paths = JobPaths.of(cfg, req.job_id)
    timer = PhaseTimer()
    started = time.time()
    with timer.phase("claim"):
        if image is None:
            image = resolve_image(node, req).image
        _reserve_job_dir(node, paths)
        try:
            slot, _ = node.slots.claim(req.job_id, req.cores, req.memory_mb, req.cpus)
        except BaseException:
            paths.remove()
            raise
    state: dict[str, Any] = {
        "job_id": req.job_id, "phase": "preparing", "pid": os.getpid(),
        "pid_start": psutil.Process().create_time(), "started_at": started,
        "user": req.user.name, "uid": req.user.uid, "gid": req.user.gid,
        "image": image.name, "image_digest": image.digest, "image_dir": image.dir,
        "requested_image": req.image, "queue": req.queue, "account": req.account,
        "cpus": list(slot.cpus),
        "memory_mb": slot.memory_mb, "workdir": req.workdir, "walltime_s": req.walltime_s,
        "domain": paths.domain,
    }
    try:
        if holder is not None:
            state.update(holder_pid=holder, holder_start=_start_time(holder))
        atomic_write_json(paths.state_file, state)
        _bring_up(node, req, paths, image, slot, timer, state)
    except BaseException as exc:
        if isinstance(exc, VibatchError) and not exc.detail:  # read it before it is removed
            exc.detail = console_tail(paths.console, cfg.vm.console_tail_lines)
        _undo(node, paths)
        raise
    state.update(phase="running", phases=timer.phases, ready_at=time.time())
    atomic_write_json(paths.state_file, state)
    return state


def resolve_image(node: Node, req: JobRequest) -> Resolution:
    return resolve(node.cfg, node.library, req.image, queue=req.queue,
                   groups=user_groups(req.user.name, req.user.gid), account=req.account)


def images_in_use(cfg: Config) -> dict[str, list[str]]:
    """Library versions (real directories) used by jobs on this node -> their job ids."""
    used: dict[str, list[str]] = {}
    for job_id in _job_ids(cfg):
        state = read_json(JobPaths.of(cfg, job_id).state_file)
        if state is None:   # a prologue between resolving its image and recording it
            used.setdefault(IN_USE_UNKNOWN, []).append(job_id)
        elif state.get("image_dir"):
            used.setdefault(state["image_dir"], []).append(job_id)
    return used


def library_gc(node: Node) -> list[str]:
    """Delete library versions that lost their name once no job uses them (best effort: an
    epilogue never waits for the library, nor fails because of it)."""
    try:
        return node.library.gc(images_in_use(node.cfg), wait=False)
    except (LockTimeout, OSError):
        return []


def _reserve_job_dir(node: Node, paths: JobPaths) -> None:
    """Create the job's directories, or refuse: a job never gets two VMs."""
    with hold(node.jobs_lock):
        if paths.exists():
            old = read_json(paths.state_file) or {}
            if _owner_alive(old) or (_holder_alive(old) if "holder_pid" in old else
                                     hypervisor.lookup(node.conn, paths.domain) is not None):
                raise JobAlreadyRunning(f"job {paths.job_id} already has a VM on this node "
                                        f"({old.get('phase', 'starting')}); not starting another")
            _undo(node, paths)  # leftovers of a crashed prologue: clean, then start afresh
        paths.create()


def _owner_alive(state: dict) -> bool:
    if state.get("phase") != "preparing":
        return False
    return _same_process(state.get("pid"), state.get("pid_start"))


def _holder_alive(state: dict) -> bool:
    """The job's holder process (if it has one) still runs: same pid, same start time."""
    return _same_process(state.get("holder_pid"), state.get("holder_start"))


def _same_process(pid: Any, start: Any) -> bool:
    if not isinstance(pid, int) or not isinstance(start, (int, float)):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - start) < 1
    except psutil.Error:
        return False


def _start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        raise NodeError(f"the job's holder process {pid} has already ended") from None


def jobs_held_by(cfg: Config, pid: int) -> list[str]:
    """The jobs on this node whose holder is the running process ``pid``."""
    out = []
    for job_id in _job_ids(cfg):
        st = read_json(JobPaths.of(cfg, job_id).state_file) or {}
        if st.get("holder_pid") == pid and _holder_alive(st):
            out.append(job_id)
    return out


def _bring_up(node: Node, req: JobRequest, paths: JobPaths, image: Image, slot: Slot,
              timer: PhaseTimer, state: dict) -> None:
    cfg = node.cfg
    with timer.phase("image_check"):
        state["image_hashed"] = node.library.ensure_verified(image)
    with timer.phase("clone"):
        qemuimg.create_overlay(image.disk.path, image.disk_format, paths.overlay)
        os.chown(paths.overlay, *qemu_ids(cfg))  # libvirt does no relabelling (domain.py)
        os.chmod(paths.overlay, 0o600)
    with timer.phase("domain_start"):
        kind = accel.choose(cfg.vm.acceleration, cfg.state_dir, cfg.vm.emulator,
                            lambda: _probe_files(node, image))
        spec = domain_spec(cfg, req, paths, image, slot, kind)
        dom = hypervisor.start_capped(node.conn, render(spec),
                                      slot.memory_mb + cfg.vm.memory_overhead_mb)
        state.update(accel=kind, uuid=dom.UUIDString())
    with timer.phase("boot"):
        root_agent = LibvirtAgent(dom)
        _wait_for_agent(root_agent, Deadline(cfg.vm.boot_timeout_s), cfg.vm.boot_timeout_s)
    with timer.phase("guest_setup"):
        _setup_guest(root_agent, req, paths, Deadline(cfg.vm.setup_timeout_s))


def _probe_files(node: Node, image: Image) -> tuple[Optional[str], Optional[str]]:
    """(kernel, initrd) for the KVM probe: the job's, or for a disk-boot image (which has none)
    another library image's."""
    probe = image if image.kernel else next((i for i in node.library.images() if i.kernel), None)
    if probe is None:
        return None, None
    return probe.kernel.path, probe.initrd.path if probe.initrd else None


def qemu_ids(cfg: Config) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(cfg.vm.qemu_user)
    except KeyError:
        raise ConfigError(f"{cfg.source}: vm.qemu_user: no user {cfg.vm.qemu_user!r} on this "
                          "host (it must be the user libvirt runs QEMU as)") from None
    return pw.pw_uid, pw.pw_gid


def domain_spec(cfg: Config, req: JobRequest, paths: JobPaths, image: Image, slot: Slot,
                kind: str) -> DomainSpec:
    return DomainSpec(
        name=paths.domain, accel=kind, vcpu_pins=slot.cpus, memory_mb=slot.memory_mb,
        disk_overlay=paths.overlay, disk_base=image.disk.path, disk_base_format=image.disk_format,
        console_log=paths.console, user_agent_socket=paths.socket,
        shares=(Share(req.workdir, WORKDIR_TAG), Share(paths.io, IO_TAG)),
        kernel=image.kernel.path if image.kernel else None,
        initrd=image.initrd.path if image.initrd else None, cmdline=image.cmdline,
        machine=cfg.vm.machine, emulator=cfg.vm.emulator, virtiofsd=cfg.vm.virtiofsd,
        tcg_tb_cache_mb=cfg.vm.tcg_tb_cache_mb, network=cfg.vm.network,
        metadata=(("job_id", req.job_id), ("user", req.user.name), ("uid", str(req.user.uid)),
                  ("gid", str(req.user.gid)), ("image", image.name), ("image_digest", image.digest),
                  ("cpus", ",".join(map(str, slot.cpus))), ("memory_mb", str(slot.memory_mb))))


def _wait_for_agent(agent: LibvirtAgent, deadline: Deadline, timeout: float) -> None:
    while True:
        try:
            agent.ping(timeout=1.0)
            return
        except AgentError:
            pass
        if not agent.domain.isActive():
            raise BootFailed("the VM stopped while booting (see the console below)")
        if deadline.expired():
            raise BootFailed(f"the guest agent did not answer within {timeout:g} s of boot "
                             "(see the console below)")
        time.sleep(min(0.1, deadline.remaining()))


def _setup_guest(root_agent: LibvirtAgent, req: JobRequest, paths: JobPaths,
                 deadline: Deadline) -> None:
    u = req.user
    setup = SetupArgs(u.name, u.uid, u.gid, u.home, req.workdir)
    try:
        res = root_agent.run("/bin/sh", setup.argv(), deadline, what="guest setup")
    except AgentError as e:
        raise BootFailed(f"guest setup failed: {e}") from None
    if res.wait_status != 0:
        msg = res.err.decode(errors="replace").strip() or f"exit status {res.wait_status}"
        raise BootFailed(f"guest setup failed: {msg.splitlines()[-1]}",
                         detail=res.err.decode(errors="replace"))
    # The job user owns the io folder (it is shared in) and, once proven, the agent endpoint.
    os.chown(paths.io, u.uid, u.gid)
    user_agent = SocketAgent(paths.socket)
    ids = _wait_for_user_agent(user_agent, deadline)
    if ids != (u.uid, u.gid):
        raise BootFailed(f"the guest's user agent runs as uid/gid {ids}, expected "
                         f"{u.uid}/{u.gid}; refusing to hand it to the job")
    os.chown(paths.socket, u.uid, u.gid)
    os.chmod(paths.socket, 0o600)
    atomic_write_json(paths.info, {"job_id": req.job_id, "uid": u.uid, "gid": u.gid,
                                   "user": u.name, "home": u.home, "workdir": req.workdir,
                                   "io_host": paths.io, "io_guest": GUEST_IO_DIR}, mode=0o644)


def _wait_for_user_agent(agent: SocketAgent, deadline: Deadline) -> tuple[int, int]:
    while True:
        try:
            with agent.session(max(1.0, deadline.remaining())):
                res = agent.run("/bin/sh", ["-c", "id -u; id -g"], deadline, what="id")
            out = res.out.decode().split()
            return int(out[0]), int(out[1])
        except (AgentError, ValueError, IndexError):
            if deadline.expired():
                raise BootFailed("the job user's agent did not answer in time") from None
            time.sleep(min(0.05, deadline.remaining()))


def _undo(node: Node, paths: JobPaths) -> None:
    """Remove everything of this job: VM, directories, slot. Safe to repeat."""
    dom = hypervisor.lookup(node.conn, paths.domain)
    if dom is not None:
        hypervisor.destroy(dom)
    paths.remove()
    node.slots.release(paths.job_id)


# ---------------------------------------------------------------------------------------------
def epilogue(node: Node, job_id: str, exit_code: Optional[int] = None) -> Optional[dict]:
    """Tear the job's VM down and account for it. Returns the record, or None if nothing ran."""
    cfg = node.cfg
    paths = JobPaths.of(cfg, job_id)
    t0 = time.perf_counter()
    state = read_json(paths.state_file)
    dom = hypervisor.lookup(node.conn, paths.domain)
    cpu_time = None
    vm_state = "absent"
    if dom is not None:
        xml = hypervisor.xml_desc(dom)
        meta = read_metadata(xml) if xml else {}
        if xml and meta.get("job_id") != job_id:
            raise NodeError(f"domain {paths.domain} exists but was not started by vibatch for "
                            f"job {job_id}; leaving it alone")
        cpu_time = hypervisor.cpu_time_s(dom)
        vm_state = "destroyed" if hypervisor.destroy(dom) else "gone"
    elif state is not None:
        vm_state = "gone"   # e.g. QEMU OOM-killed at the memory cap
    if exit_code is None:
        exit_code = _exit_code_from_exec(paths)
    paths.remove()
    slot = node.slots.release(job_id)
    library_gc(node)
    if state is None:
        return None
    phases = dict(state.get("phases", {}))
    phases["epilogue"] = round(time.perf_counter() - t0, 4)
    record = {
        "job_id": job_id, "user": state.get("user"), "uid": state.get("uid"),
        "image": state.get("image"), "image_digest": state.get("image_digest"),
        "cpus": state.get("cpus") or (list(slot.cpus) if slot else None),
        "cores": len(state.get("cpus") or []), "memory_mb": state.get("memory_mb"),
        "accel": state.get("accel"), "phases": phases, "exit_code": exit_code,
        "vm_cpu_time_s": round(cpu_time, 3) if cpu_time is not None else None,
        "vm_end": vm_state, "started_at": state.get("started_at"), "ended_at": time.time(),
        "prologue_completed": state.get("phase") == "running",
    }
    accounting.append(cfg.accounting_file, record)
    return record


def _exit_code_from_exec(paths: JobPaths) -> Optional[int]:
    """The last exit status ``vibatch exec`` recorded for this job, if any."""
    try:
        with open(os.path.join(paths.io, "last-exit"), "rb") as f:
            data = f.read(32)
        return int(data.strip())
    except (OSError, ValueError):
        return None


def _job_ids(cfg: Config) -> list[str]:
    """The jobs with a directory on this node."""
    jobs_dir = os.path.join(cfg.state_dir, "jobs")
    return sorted(os.listdir(jobs_dir)) if os.path.isdir(jobs_dir) else []


def running_jobs(node: Node) -> list[dict]:
    """State records of the jobs with a directory on this node, with their domain's liveness."""
    out = []
    for job_id in _job_ids(node.cfg):
        paths = JobPaths.of(node.cfg, job_id)
        st = read_json(paths.state_file) or {"job_id": job_id, "phase": "unknown"}
        st["domain_active"] = hypervisor.lookup(node.conn, paths.domain) is not None
        out.append(st)
    return out


def reap(node: Node) -> list[str]:
    """Clean up after crashes, reboots and libvirtd restarts; return what was reaped.

    - a job whose VM is gone and whose prologue is not running (QEMU died, the node rebooted,
      the epilogue never came): epilogue it, so it is accounted (``vm_end: gone``);
    - a job whose holder process has ended (HTCondor's starter died or was killed before the
      job's exit hook ran): epilogue it, VM and all;
    - a slot held by a job that has no directory: release it;
    - a vibatch domain whose job has no directory: destroy it.
    A job whose VM runs, or whose prologue is still running, is left alone.
    """
    reaped: list[str] = []
    with hold(node.jobs_lock):
        job_ids = _job_ids(node.cfg)
        stale = []
        for job_id in job_ids:
            paths = JobPaths.of(node.cfg, job_id)
            state = read_json(paths.state_file) or {}
            if _owner_alive(state):
                continue
            if ("holder_pid" in state and not _holder_alive(state)) or \
                    hypervisor.lookup(node.conn, paths.domain) is None:
                stale.append(job_id)
        for name in hypervisor.list_names(node.conn, DOMAIN_PREFIX):
            job_id = name[len(DOMAIN_PREFIX):]
            if job_id not in job_ids:
                dom = hypervisor.lookup(node.conn, name)
                xml = hypervisor.xml_desc(dom) if dom else None
                if xml and read_metadata(xml).get("job_id") == job_id:
                    hypervisor.destroy(dom)
                    reaped.append(f"domain {name} (no job directory)")
    for job_id in stale:
        record = epilogue(node, job_id)
        why = "VM gone" if record is None or record["vm_end"] != "destroyed" else "holder gone"
        reaped.append(f"job {job_id} ({why})")
    for job_id in node.slots.all():
        if not JobPaths.of(node.cfg, job_id).exists():
            node.slots.release(job_id)
            reaped.append(f"slot of job {job_id} (no job directory)")
    return reaped
