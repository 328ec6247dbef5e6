"""A job's life on one node: prologue (claim, check, clone, boot, set up) and epilogue.

Both are idempotent and bounded. A failing prologue undoes exactly what it created and nothing
that belongs to another invocation; the epilogue cleans whatever is there and succeeds when
there is nothing to clean.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from ..vm import accel, hypervisor, network, share, template
from . import (accounting, adopt, disk, faultpoints, features, jobstore, metrics, pause,
               walltime)
from ..images import qemuimg
from ..vm.agent import AgentError, LibvirtAgent, SocketAgent
from ..config import Config, paths_overlap
from ..vm.domain import DomainSpec, Share, IO_TAG, WORKDIR_TAG, read_metadata, render, to_xml
from ..errors import (BootFailed, ConfigError, HypervisorError, JobAlreadyRunning, LockTimeout,
                      MissingWorkdir, NodeError, ResourceRequestError, VibatchError)
from ..vm.guestsetup import (GUEST_IO_DIR, JOB_FEATURES, MACHINE_FEATURES, SetupArgs,
                             clock_base, fresh_machine)
from .jobdir import DOMAIN_PREFIX, JobPaths, console_tail
from ..images.library import IN_USE_UNKNOWN, Image, Library
from .node import capacity
from ..images.policy import Resolution, resolve, user_groups
from .request import JobRequest
from .slots import Slot, SlotAllocator
from ..util import (Deadline, PhaseTimer, atomic_write_json, give_to, hold, log_error, private_dir,
                    read_json, root_lock)


@dataclass
class Node:
    """Everything a hook needs on this node, built from one Config: the composition root.

    Its ports are passed in, never imported by the steps: ``connect`` (uri -> a libvirt-python
    style connection), ``root_agent`` (domain -> the guest's root agent) and ``user_agent``
    (socket path -> the job user's agent). The defaults are the real ones; tests/fakes.py has
    fakes that let the whole lifecycle run without root's libvirtd or a guest."""

    cfg: Config
    _conn: Any = field(default=None, repr=False)
    connect: Callable[[str], Any] = field(default=hypervisor.connect, repr=False)
    root_agent: Callable[[Any], Any] = field(default=LibvirtAgent, repr=False)
    user_agent: Callable[[str], Any] = field(default=SocketAgent, repr=False)
    # checks the working directory with the job user's own credentials (share.py)
    check_workdir: Callable[..., None] = field(default=share.check_as_user, repr=False)
    # starts a template build in the background: (cfg, image name, cores, memory_mb)
    build_template: Callable[..., None] = field(default=template.spawn_build, repr=False)
    # how the job's batch system takes the VM's processes (adopt.py; set by batch/core.py)
    adopter: Callable[[str, str, dict], Any] = field(default=lambda *_: None, repr=False)

    def __post_init__(self) -> None:
        for d in (self.cfg.state_dir, self.cfg.run_dir):
            private_dir(d)   # 0711: users reach their own job's files, list nothing
        self.slots = SlotAllocator(self.cfg.state_dir, capacity(self.cfg), self.cfg.lock_timeout_s)
        self.library = Library(self.cfg.library_dir, self.cfg.state_dir, self.cfg.lock_timeout_s)
        self.jobs_lock = root_lock(os.path.join(self.cfg.run_dir, "jobs.lock"),
                                   self.cfg.lock_timeout_s)

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = self.connect(self.cfg.libvirt_uri)
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


@metrics.observed("prologue")   # phase log, counters, textfile: best effort
def prologue(node: Node, req: JobRequest, image: Optional[Image] = None,
             holder: Optional[int] = None, batch: Optional[str] = None,
             batch_env: Optional[dict] = None, cold: bool = False) -> jobstore.JobState:
    """Bring up the job's VM. Returns the job's record (with phase timings).

    The image is resolved through the site's policy unless the caller passes one (``vibatch
    image test``, which an admin runs on images before endorsing them). ``holder`` is the pid
    of a process whose life bounds the job's (HTCondor's condor_starter): once it is gone, the
    job is over whatever its VM does, and ``reap`` ends it. ``batch`` names the batch system
    whose job this is, which ``reap`` may ask whether the job still exists (``batch_env``: the
    few variables its client needs for that, such as SLURM_CONF).

    Each step is preceded by its phase in the job's record (jobstore). Whatever stops the
    prologue (an error, SIGTERM, the hook's alarm) undoes what it made and accounts for it once;
    a SIGKILL leaves the record to the next epilogue, reap or prologue for the same job.

    The VM is restored from a template of the job's image and shape when one is ready (a warm
    start; ``cold`` forces a boot), else booted; a restore that fails boots instead."""
    cfg = node.cfg
    check_limits(cfg, req.cores, req.memory_mb)
    net_mode = network.choose(cfg, req.network, user_groups(req.user.name, req.user.gid))
    paths = JobPaths.of(cfg, req.job_id)
    timer = PhaseTimer()
    started = time.time()
    with timer.phase("claim"):
        if image is None:
            image = resolve_image(node, req).image
        rec = jobstore.Record(paths, jobstore.JobState(
            job_id=req.job_id, phase=jobstore.RESERVED, **jobstore.me(), started_at=started,
            user=req.user.name, uid=req.user.uid, gid=req.user.gid,
            image=image.name, image_digest=image.digest, image_dir=image.dir,
            requested_image=req.image, queue=req.queue, account=req.account,
            workdir=req.workdir, walltime_s=req.walltime_s, domain=paths.domain, batch=batch,
            batch_env=dict(batch_env or {}), network=net_mode,
            scratch_bytes=disk.scratch_bytes(cfg, req.scratch_mb),
            site_shares=tuple(path for _, path in site_shares(cfg, image))))
        if holder is not None:
            rec.stage(holder_pid=holder, holder_start=_start_time(holder))
        _reserve(node, rec)
    try:
        with _stoppable():
            faultpoints.point("reserved")
            with timer.phase("claim"):
                rec.set(jobstore.SLOT)
                disk.admit(cfg, paths, image, rec.state.scratch_bytes)
                slot, _ = node.slots.claim(req.job_id, req.cores, req.memory_mb, req.cpus)
                rec.stage(cpus=tuple(slot.cpus), memory_mb=slot.memory_mb)
            _bring_up(node, req, rec, image, slot, timer, cold)
            # ready: nobody owns it now; it is the batch system's job until its epilogue
            rec.set(jobstore.READY, phases=dict(timer.phases), ready_at=time.time(),
                    owner_pid=None, owner_start=None)
    except BaseException as exc:
        if isinstance(exc, VibatchError) and not exc.detail:  # read it before it is removed
            exc.detail = console_tail(paths.console, cfg.vm.console_tail_lines)
        _undo(node, rec, exc)
        metrics.note_phases(exc, timer.phases)
        raise
    return rec.state


class Stopped(NodeError):
    """The prologue was asked to stop (SIGTERM): by the batch system, or by an epilogue."""


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """SIGTERM ends the prologue through its undo, not halfway (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(_signum, _frame):
        raise Stopped("the prologue was stopped (SIGTERM) before the VM was ready")
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def resolve_image(node: Node, req: JobRequest) -> Resolution:
    return resolve(node.cfg, node.library, req.image, queue=req.queue,
                   groups=user_groups(req.user.name, req.user.gid), account=req.account)


def resolve_image_name(node: Node, name: str) -> Image:
    """An admin's image name or alias (no job policy applies: ``template build``)."""
    return node.library.get(node.cfg.images.aliases.get(name, name))


def images_in_use(cfg: Config) -> dict[str, list[str]]:
    """Library versions (real directories) used by jobs on this node -> their job ids."""
    return jobstore.images_in_use(cfg, IN_USE_UNKNOWN)


def library_gc(node: Node) -> list[str]:
    """Delete library versions that lost their name once no job uses them (best effort: an
    epilogue never waits for the library, nor fails because of it)."""
    try:
        return node.library.gc(images_in_use(node.cfg), wait=False)
    except (LockTimeout, OSError):
        return []


def _reserve(node: Node, rec: jobstore.Record) -> None:
    """Create the job's directories and its record, or refuse: one job id, one owner. Both
    happen under the jobs lock, so a directory seen without a record under that lock is the
    leftover of a process that died there."""
    paths = rec.paths
    with hold(node.jobs_lock):
        if paths.exists():
            old = jobstore.read(paths)
            if old is not None and (jobstore.owner_alive(old) or _still_running(node, paths, old)):
                raise JobAlreadyRunning(f"job {paths.job_id} already has a VM on this node "
                                        f"({_describe(old)}); not starting another")
            # leftovers of a crashed run of this job: account and clean them, then start afresh
            _end_unowned(node, paths, old, "prologue")
        _clear_orphan(node, paths.job_id)
        try:
            paths.create()
        except OSError as e:
            paths.remove_quietly()
            raise NodeError(f"cannot create the job's directories ({e.filename}: "
                            f"{e.strerror})") from None
        try:
            jobstore.write(paths, rec.state)
        except NodeError:
            paths.remove_quietly()
            raise


def _still_running(node: Node, paths: JobPaths, state: jobstore.JobState) -> bool:
    """A finished prologue's job that is still on: its holder runs, or (without one) its VM."""
    if state.phase != jobstore.READY:
        return False
    if state.holder_pid is not None:
        return jobstore.holder_alive(state)
    return hypervisor.lookup(node.conn, paths.domain) is not None


def _describe(state: jobstore.JobState) -> str:
    phase = state.phase
    if jobstore.owner_alive(state):
        doing = "being prepared" if phase in jobstore.PREPARING else "being ended"
        return f"{doing} by pid {state.owner_pid}"
    return "its VM is running" if phase == jobstore.READY else f"phase {phase}"


def _start_time(pid: int) -> float:
    try:
        return jobstore.process_start(pid)
    except NodeError:
        raise NodeError(f"the job's holder process {pid} has already ended") from None


def _bring_up(node: Node, req: JobRequest, rec: jobstore.Record, image: Image, slot: Slot,
              timer: PhaseTimer, cold: bool = False) -> None:
    cfg, paths = node.cfg, rec.paths
    site = site_shares(cfg, image)
    faultpoints.point("slot")
    with timer.phase("shares"):      # first: a working directory the user may not reach fails
        _prepare_shares(node, req, paths, slot, site,   # before the image is hashed or cloned
                        rec.state.scratch_bytes)
    with timer.phase("image_check"):
        rec.stage(image_hashed=node.library.ensure_verified(image))
    with timer.phase("clone"):
        rec.set(jobstore.OVERLAY)
        kind = accel.choose(cfg.vm.acceleration, cfg.state_dir, cfg.vm.emulator,
                            lambda: _probe_files(node, image))
        tpl = None if cold else _template_for(node, image, slot, kind)
        _make_overlay(cfg, paths, image, tpl)
        if rec.state.scratch_bytes:
            disk.create_scratch(paths.scratch, rec.state.scratch_bytes, req.user.uid,
                                req.user.gid, qemu_ids(cfg))
    faultpoints.point("overlay")
    network.ensure(cfg, rec.state.network, qemu_ids(cfg)[0])
    spec = domain_spec(cfg, req, paths, image, slot, kind, rec.state.scratch_bytes,
                       rec.state.network)
    root_agent = None
    if tpl is not None:
        try:
            root_agent = _restore(node, rec, spec, tpl, slot, timer)
        except (HypervisorError, AgentError, BootFailed) as e:   # never the job's fault
            log_error(f"job {req.job_id}: warm start from template {tpl.id} failed; "
                      "booting instead", e)
            with timer.phase("restore"):
                _end_vm(node, paths, rec.state.uuid, tolerate=False)
                rec.set(jobstore.OVERLAY, uuid=None, start=None, template=None)
                _make_overlay(cfg, paths, image, None)
    if root_agent is None:
        root_agent = _boot(node, rec, spec, slot, timer)
        if not cold and cfg.templates.enabled and cfg.templates.on_first_use:
            _request_template(node, image, slot, kind)
    adopt.domain_running(node, rec.state)   # booted or restored, shares plugged (adopt.py)
    faultpoints.point("booted")
    with timer.phase("guest_setup"):
        _setup_guest(node, root_agent, node.user_agent(paths.socket), req, slot, paths,
                     Deadline(cfg.vm.setup_timeout_s), int(rec.state.started_at or time.time()),
                     rec.state.scratch_bytes, site,
                     network.guest_net(cfg, rec.state.network or "none", slot.cpus),
                     restored=rec.state.start == "warm")
    faultpoints.point("set_up")


def _make_overlay(cfg: Config, paths: JobPaths, image: Image,
                  tpl: Optional[template.Template]) -> None:
    """The job's disk: an overlay on the template's disk (warm) or on the image's (cold)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.overlay)
    if tpl is not None:
        qemuimg.create_overlay(tpl.overlay, "qcow2", paths.overlay)
    else:
        qemuimg.create_overlay(image.disk.path, image.disk_format, paths.overlay)
    os.chown(paths.overlay, *qemu_ids(cfg))  # libvirt does no relabelling (domain.py)
    os.chmod(paths.overlay, 0o600)


def _template_key(node: Node, image: Image, slot: Slot, kind: str) -> template.Key:
    spec = template_spec(node, image, len(slot.cpus), slot.memory_mb, kind)
    return template.key_for(node.cfg, node.conn, spec, image.digest)


def _template_for(node: Node, image: Image, slot: Slot,
                  kind: str) -> Optional[template.Template]:
    if not node.cfg.templates.enabled:
        return None
    return template.find(node.cfg, _template_key(node, image, slot, kind))


def _request_template(node: Node, image: Image, slot: Slot, kind: str) -> None:
    """A job booted cold: have its shape's template built in the background (best effort)."""
    try:
        key = _template_key(node, image, slot, kind)
        if not template.building(node.cfg, key.id):
            node.build_template(node.cfg, image.name, len(slot.cpus), slot.memory_mb)
    except (VibatchError, OSError) as e:
        log_error(f"template request for {image.name}", e)


def _boot(node: Node, rec: jobstore.Record, spec: DomainSpec, slot: Slot,
          timer: PhaseTimer) -> Any:
    cfg = node.cfg
    with timer.phase("domain_start"):
        rec.set(jobstore.DOMAIN, accel=spec.accel, start="cold")
        try:
            dom = hypervisor.start_capped(node.conn, render(spec),
                                          slot.memory_mb + cfg.vm.memory_overhead_mb)
        except HypervisorError:
            _raise_if_share_refused(spec)
            raise
        faultpoints.point("domain")
        rec.set(jobstore.DOMAIN, uuid=dom.UUIDString())
    with timer.phase("boot"):
        root_agent = node.root_agent(dom)
        _wait_for_agent(root_agent, Deadline(cfg.vm.boot_timeout_s), cfg.vm.boot_timeout_s)
    return root_agent


def _restore(node: Node, rec: jobstore.Record, spec: DomainSpec, tpl: template.Template,
             slot: Slot, timer: PhaseTimer) -> Any:
    """Restore the template as the job's own domain (its name, a new UUID and VM generation
    id, its CPUs, memory cap and overlay), plug in the job's shares, scratch disk and NIC, and
    leave the guest's clock to the setup (its template's save time until then). Any failure
    here is the node's: the caller boots instead."""
    cfg, paths = node.cfg, rec.paths
    with timer.phase("restore"):
        rec.set(jobstore.DOMAIN, accel=spec.accel, start="warm", template=tpl.id)
        try:
            saved = hypervisor.SavedState(tpl.saved)
            dom = hypervisor.restore_as(node.conn, saved, template.job_xml(saved.xml, spec, tpl),
                                        os.path.join(paths.state, "restore.fifo"),
                                        cfg.vm.boot_timeout_s)
        except HypervisorError as e:     # its saved state: no later job tries it again
            template.mark_failed(cfg, tpl.id, e.message)
            raise
        faultpoints.point("domain")
        rec.set(jobstore.DOMAIN, uuid=dom.UUIDString())
        hypervisor.cap_and_resume(dom, slot.memory_mb + cfg.vm.memory_overhead_mb)
    with timer.phase("agent"):
        root_agent = node.root_agent(dom)
        _wait_for_agent(root_agent, Deadline(cfg.vm.boot_timeout_s), cfg.vm.boot_timeout_s)
    with timer.phase("hotplug"):
        for device in spec.hotplugged():
            try:
                hypervisor.attach_live(dom, to_xml(device))
            except HypervisorError:
                _raise_if_share_refused(spec)
                raise
    return root_agent


def _raise_if_share_refused(spec: DomainSpec) -> None:
    """libvirt failed to start a share: if the launcher refused the working directory (it
    changed since the check as the user), that is the job's fault, not the node's."""
    why = share.refusal([s.source for s in spec.shares])
    if why:
        raise MissingWorkdir(why) from None


def site_shares(cfg: Config, image: Image) -> list[tuple[str, str]]:
    """(virtiofs tag, path) of each of the site's read-only shares this image's guests get."""
    names = {image.name} | {a for a, target in cfg.images.aliases.items() if target == image.name}
    return [(f"{SITE_TAG}{i}", s.path) for i, s in enumerate(cfg.shares)
            if not s.images or names & set(s.images)]


SITE_TAG = "vbsite"


def _prepare_shares(node: Node, req: JobRequest, paths: JobPaths, slot: Slot,
                    site: list[tuple[str, str]], scratch_bytes: int) -> None:
    """The working directory and the site's shares checked as the job user (a refusal is the
    job's fault; a site share that is missing, the node's), and each share's spec written for
    the launcher libvirt starts in virtiofsd's place (share.py)."""
    cfg, u = node.cfg, req.user
    mounts = [p for _, p in site] + ([cfg.scratch.mount] if scratch_bytes else [])
    for path in mounts:
        if paths_overlap(req.workdir, path):
            raise MissingWorkdir(f"working directory {req.workdir} cannot be shared into a VM: "
                                 f"the guest mounts {path} there for the site")
    groups = tuple(os.getgrouplist(u.name, u.gid))
    node.check_workdir(req.workdir, u.uid, u.gid, groups)
    for _, path in site:
        node.check_workdir(path, u.uid, u.gid, groups, label="site share")
    os.chown(paths.io, u.uid, u.gid, follow_symlinks=False)  # served as the job user
    common = dict(job_id=req.job_id, uid=u.uid, gid=u.gid, groups=groups,
                  cpus=tuple(slot.cpus), virtiofsd=cfg.vm.virtiofsd,
                  process_gid=req.process_gid)
    share.write_specs(paths.state, [
        share.ShareSpec(tag=WORKDIR_TAG, path=req.workdir, **common),
        share.ShareSpec(tag=IO_TAG, own=paths.io, **common),
        *(share.ShareSpec(tag=tag, path=path, readonly=True, label="site share", **common)
          for tag, path in site)])


def _shares(cfg: Config, paths: JobPaths, image: Image) -> tuple[Share, ...]:
    tags = [WORKDIR_TAG, IO_TAG] + [tag for tag, _ in site_shares(cfg, image)]
    return tuple(Share(share.spec_path(paths.state, tag), tag) for tag in tags)


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


def _image_spec(cfg: Config, image: Image, kind: str, cpus: tuple[int, ...],
                memory_mb: int) -> DomainSpec:
    """What a VM of ``image`` is, before it is anyone's: no name, disk paths, shares or NIC."""
    return DomainSpec(
        name="", accel=kind, vcpu_pins=tuple(cpus), memory_mb=memory_mb, disk_overlay="",
        disk_base=image.disk.path, disk_base_format=image.disk_format, console_log="",
        user_agent_socket="", shares=(),
        kernel=image.kernel.path if image.kernel else None,
        initrd=image.initrd.path if image.initrd else None, cmdline=image.cmdline,
        machine=cfg.vm.machine, emulator=cfg.vm.emulator, virtiofsd=cfg.vm.share_launcher,
        tcg_tb_cache_mb=cfg.vm.tcg_tb_cache_mb)


def domain_spec(cfg: Config, req: JobRequest, paths: JobPaths, image: Image, slot: Slot,
                kind: str, scratch_bytes: int = 0, net_mode: Optional[str] = None) -> DomainSpec:
    net_mode = net_mode or cfg.vm.network
    guest_net = network.guest_net(cfg, net_mode, slot.cpus)
    return dataclasses.replace(
        _image_spec(cfg, image, kind, slot.cpus, slot.memory_mb),
        name=paths.domain, disk_overlay=paths.overlay, console_log=paths.console,
        user_agent_socket=paths.socket, shares=_shares(cfg, paths, image),
        scratch_disk=paths.scratch if scratch_bytes else None, scratch_serial=disk.SCRATCH_LABEL,
        network=net_mode,
        network_bridge={"nat": cfg.network.nat_bridge, "bridge": cfg.network.bridge}.get(net_mode,
                                                                                        ""),
        mac=guest_net.mac if guest_net else "",
        metadata=(("job_id", req.job_id), ("user", req.user.name), ("uid", str(req.user.uid)),
                  ("gid", str(req.user.gid)), ("image", image.name), ("image_digest", image.digest),
                  ("cpus", ",".join(map(str, slot.cpus))), ("memory_mb", str(slot.memory_mb)),
                  ("state_dir", cfg.state_dir)),
        process_ids=(qemu_ids(cfg)[0], req.process_gid) if req.process_gid else None)


def template_spec(node: Node, image: Image, cores: int, memory_mb: int,
                  kind: str) -> DomainSpec:
    """The domain a template of ``image`` is booted as (named and placed by template.build):
    no shares, scratch disk or NIC; pinned to the node's first job CPUs at a low CPU weight,
    so that the jobs there come first."""
    return dataclasses.replace(
        _image_spec(node.cfg, image, kind, tuple(node.slots.capacity.cpus)[:cores], memory_mb),
        template=True, cpu_weight=10)


def build_template(node: Node, image: Image, cores: int, memory_mb: int,
                   log: Callable[[str], None] = lambda _m: None) -> template.Template:
    """Boot ``image`` with ``cores`` vCPUs and ``memory_mb`` and keep it as a template (off the
    job's path: ``vibatch template build``/``sync``, or a cold job's background request)."""
    cfg = node.cfg
    check_limits(cfg, cores, memory_mb)
    cpus = node.slots.capacity.cpus
    if cores > len(cpus):
        raise ResourceRequestError(f"{cores} cores: this node gives jobs at most {len(cpus)}")
    node.library.ensure_verified(image)
    kind = accel.choose(cfg.vm.acceleration, cfg.state_dir, cfg.vm.emulator,
                        lambda: _probe_files(node, image))
    spec = template_spec(node, image, cores, memory_mb, kind)
    key = template.key_for(cfg, node.conn, spec, image.digest)
    def ready(dom: Any, deadline: Deadline) -> Any:
        agent = node.root_agent(dom)
        _wait_for_agent(agent, deadline, deadline.seconds)
        return agent
    return template.build(cfg, node.conn, key, spec, image.name, ready, qemu_ids(cfg), log)


def _wait_for_agent(agent: Any, deadline: Deadline, timeout: float) -> None:
    while True:
        try:
            agent.ping(timeout=1.0)
            return
        except AgentError:
            pass
        if not hypervisor.is_active(agent.domain):
            raise BootFailed("the VM stopped while booting (see the console below)")
        if deadline.expired():
            raise BootFailed(f"the guest agent did not answer within {timeout:g} s of boot "
                             "(see the console below)")
        # quick while a restored guest's agent is due, then slower: each failed ping is an
        # error line in libvirtd's log
        waited = deadline.seconds - deadline.remaining()
        time.sleep(min(0.02 if waited < 0.5 else 0.1, deadline.remaining()))


def _clock_base(root_agent: Any, job_id: str) -> Optional[int]:
    """guestsetup.clock_base, or None (logged) if the guest's agent would not give it."""
    try:
        return clock_base(root_agent)
    except (AgentError, ValueError, IndexError, ArithmeticError) as e:
        log_error(f"job {job_id}: the restored guest's uptime", e)
        return None


def _setup_guest(node: Node, root_agent: Any, user_agent: Any, req: JobRequest, slot: Slot,
                 paths: JobPaths, deadline: Deadline, started: int, scratch_bytes: int,
                 site: list[tuple[str, str]], net: Optional[network.GuestNet],
                 restored: bool = False) -> None:
    u, cfg = req.user, node.cfg
    tmpdir = cfg.scratch.mount if scratch_bytes else ""
    setup = SetupArgs(u.name, u.uid, u.gid, u.home, req.workdir,
                      features.as_args(*job_features(node, req.job_id, len(slot.cpus),
                                                     slot.memory_mb, req.walltime_s, started,
                                                     scratch_bytes)),
                      shares=tuple(site),
                      scratch=(disk.SCRATCH_LABEL, tmpdir) if tmpdir else None,
                      net=net.arg() if net else None,
                      fresh=fresh_machine(socket.gethostname(), req.job_id),
                      deadline_s=walltime.guest_deadline_s(cfg, req.walltime_s),
                      clock_cs=_clock_base(root_agent, req.job_id) if restored else None)
    try:
        res = root_agent.run("/bin/sh", setup.argv(), deadline, what="guest setup")
    except AgentError as e:
        raise BootFailed(f"guest setup failed: {e}") from None
    if restored and setup.clock_cs is None:   # no base: the agent's way, slower (pause.set_clock)
        pause.set_clock(root_agent.domain)
    if res.wait_status != 0:
        msg = res.err.decode(errors="replace").strip() or f"exit status {res.wait_status}"
        raise BootFailed(f"guest setup failed: {msg.splitlines()[-1]}",
                         detail=res.err.decode(errors="replace"))
    # The job user owns the io folder (_start_shares) and, once proven, the agent endpoint.
    uids, gids = _wait_for_user_agent(user_agent, deadline)
    if set(uids) != {u.uid} or set(gids) != {u.gid}:
        raise BootFailed(f"the guest's user agent runs as uids {uids} and gids {gids}, "
                         f"expected {u.uid}/{u.gid}; refusing to hand it to the job")
    give_to(paths.socket, u.uid, u.gid, 0o600)
    os.chmod(paths.run, 0o711)   # only now can anyone but root reach the socket at all
    jobstore.JobInfo(job_id=req.job_id, uid=u.uid, gid=u.gid, user=u.name, home=u.home,
                     workdir=req.workdir, io_host=paths.io, io_guest=GUEST_IO_DIR,
                     tmpdir=tmpdir).write(paths)


def job_features(node: Node, job_id: str, cores: int, memory_mb: int,
                 walltime_s: Optional[int], started: int,
                 scratch_bytes: int = 0) -> tuple[dict, dict]:
    """(machine, job) features of a job of this node (features.py)."""
    m = features.machine(node.cfg, len(node.slots.capacity.cpus))
    return m, features.job(node.cfg, job_id, cores, memory_mb, walltime_s, started, m,
                           scratch_bytes)


def _wait_for_user_agent(agent: Any, deadline: Deadline) -> tuple[tuple[int, ...], ...]:
    """The user agent's real, effective, saved and file-system uids and gids, from its own
    ``/proc/self/status`` (read by the agent: no process started in the guest)."""
    while True:
        try:
            with agent.session(max(1.0, deadline.remaining())):
                status = agent.read_file("/proc/self/status", 16384, max(1.0, deadline.remaining()))
            return proc_ids(status)
        except (AgentError, ValueError):
            if deadline.expired():
                raise BootFailed("the job user's agent did not answer in time") from None
            time.sleep(min(0.02, deadline.remaining()))


def proc_ids(status: bytes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(uids, gids) of a ``/proc/PID/status`` text; ValueError unless it has both lines."""
    found = {}
    for line in status.decode(errors="replace").splitlines():
        key, _, rest = line.partition(":")
        if key in ("Uid", "Gid"):
            found[key] = tuple(int(v) for v in rest.split())
    if len(found.get("Uid", ())) != 4 or len(found.get("Gid", ())) != 4:
        raise ValueError("no Uid/Gid lines")
    return found["Uid"], found["Gid"]


def _undo(node: Node, rec: jobstore.Record, exc: BaseException) -> None:
    """Tear down what this prologue made, whatever failed, and never raise: the caller reports
    the original error. SIGTERM and the alarm wait until it is done. If libvirt is gone, the
    directories and the slot are still released and the domain is left marked for ``reap``."""
    blocked = {signal.SIGTERM, signal.SIGALRM}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        _finish(node, rec, ended_by="prologue", best_effort=True)
    except BaseException as e:  # noqa: BLE001 - the original error is the one to report
        log_error(f"undo of job {rec.paths.job_id} after {type(exc).__name__}: {exc}", e)
        rec.paths.remove_quietly()
        with contextlib.suppress(Exception):
            node.slots.release(rec.paths.job_id)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _take_over(rec: jobstore.Record, ended_by: str, exit_code: Optional[int] = None,
               signum: Optional[int] = None) -> None:
    """Make this process the record's owner and move it to ``ending`` (under the jobs lock,
    unless this process already owns it). The job's exit code, if the caller knows it, is kept
    for whoever finishes the record."""
    fields: dict[str, Any] = {**jobstore.me(), "ended_by": rec.state.ended_by or ended_by}
    if exit_code is not None:
        fields["exit_code"] = exit_code
    if signum:
        fields["exit_signal"] = signum
    if jobstore.before(rec.state.phase, jobstore.ENDING):
        rec.set(jobstore.ENDING, ended_from=rec.state.phase, **fields)
    else:
        rec.set(**fields)


def _end_unowned(node: Node, paths: JobPaths, state: Optional[jobstore.JobState], ended_by: str,
                 exit_code: Optional[int] = None) -> Optional[dict]:
    """End a job nobody alive owns (held: the jobs lock). Returns its accounting record."""
    if state is None:   # directories without a record: nothing was claimed for them yet
        _end_vm(node, paths, None, tolerate=False)
        _remove(node, paths)
        return None
    rec = jobstore.Record(paths, state)
    _take_over(rec, ended_by, exit_code)
    return _finish(node, rec, ended_by=ended_by, exit_code=exit_code)


def _finish(node: Node, rec: jobstore.Record, *, ended_by: str,
            exit_code: Optional[int] = None, best_effort: bool = False) -> Optional[dict]:
    """Tear the job down from whatever phase its record is in: VM, accounting (exactly once,
    before anything it describes is removed), directories, slot. Safe to repeat after a kill
    at any point. ``best_effort`` (a prologue's undo) goes on when the record cannot be written
    or libvirt is unreachable."""
    t0 = time.perf_counter()
    paths = rec.paths
    if jobstore.before(rec.state.phase, jobstore.ENDING) or rec.state.owner_pid != os.getpid():
        try:
            _take_over(rec, ended_by)
        except NodeError:
            if not best_effort:
                raise
    faultpoints.point("ending")
    record = None
    if rec.state.phase != jobstore.ACCOUNTED:
        if rec.state.vm_end is None:   # a rerun after a kill knows what the first run found
            vm_end, cpu_time = _end_vm(node, paths, rec.state.uuid, tolerate=best_effort)
            rec.stage(vm_end=vm_end, vm_cpu_time_s=cpu_time)
            try:
                rec.set(jobstore.ENDING)
            except NodeError:
                if not best_effort:
                    raise
        faultpoints.point("vm_ended")
        slot = node.slots.get(paths.job_id)
        if slot is not None or not jobstore.before(rec.state.ended_from, jobstore.OVERLAY):
            if exit_code is None:
                exit_code = rec.state.exit_code
            if exit_code is None:
                exit_code = jobstore.last_exit(paths)
            record = _record(rec.state, slot, exit_code, time.perf_counter() - t0)
            _account_once(node.cfg, paths, record, best_effort)
        faultpoints.point("accounted")
        try:
            rec.set(jobstore.ACCOUNTED)
        except NodeError:
            if not best_effort:
                raise
    _remove(node, paths)
    library_gc(node)
    return record


def _end_vm(node: Node, paths: JobPaths, uuid_: Optional[str], tolerate: bool
            ) -> tuple[str, Optional[float]]:
    """Destroy the job's VM if it has one (``uuid_``: the domain's, if it was ever created).
    Returns (what happened to it, its CPU seconds)."""
    try:
        dom = hypervisor.lookup(node.conn, paths.domain)
        if dom is not None:
            xml = hypervisor.xml_desc(dom)
            if xml and not _ours(node.cfg, read_metadata(xml), paths.job_id):
                raise NodeError(f"domain {paths.domain} exists but was not started by this "
                                f"vibatch for job {paths.job_id}; leaving it alone")
            cpu_time = hypervisor.cpu_time_s(dom)
            if hypervisor.destroy(dom):
                return "destroyed", cpu_time
    except HypervisorError as e:
        if not tolerate:
            raise
        _mark_orphan(node, paths, uuid_, e)
        return "unknown", None
    # gone before we came: it died (QEMU killed, OOM at the cap, node rebooted) or never was
    return ("gone" if uuid_ else "never_started"), None


def _ours(cfg: Config, meta: dict, job_id: str) -> bool:
    return meta.get("job_id") == job_id and meta.get("state_dir", cfg.state_dir) == cfg.state_dir


def _record(state: jobstore.JobState, slot: Optional[Slot], exit_code: Optional[int],
            teardown_s: float) -> dict:
    phases = dict(state.phases)
    phases["epilogue"] = round(teardown_s, 4)
    cpus = list(state.cpus) or (list(slot.cpus) if slot else None)
    cpu_time = state.vm_cpu_time_s
    return {
        "record_id": uuid.uuid4().hex, "job_id": state.job_id,
        "user": state.user or None, "uid": state.uid,
        "image": state.image or None, "image_digest": state.image_digest or None,
        "cpus": cpus, "cores": len(cpus or []),
        "memory_mb": state.memory_mb or (slot.memory_mb if slot else None),
        "accel": state.accel, "phases": phases, "exit_code": exit_code,
        "signal": state.exit_signal,
        "vm_cpu_time_s": round(cpu_time, 3) if cpu_time is not None else None,
        "vm_end": state.vm_end or "unknown", "started_at": state.started_at,
        "ended_at": time.time(), "prologue_completed": state.ended_from == jobstore.READY,
        "ended_by": state.ended_by, "network": state.network,
        "scratch_bytes": state.scratch_bytes, "site_shares": list(state.site_shares),
        "start": state.start, "template": state.template,
    }


def _account_once(cfg: Config, paths: JobPaths, record: dict, best_effort: bool) -> None:
    """Append the job's accounting line exactly once, across kills and reruns: the line is
    first kept in the job's directory, and a rerun appends it only if the file lacks it."""
    kept = os.path.join(paths.state, jobstore.RECORD_FILE)
    try:
        previous = read_json(kept)
    except ValueError:
        previous = None
    if isinstance(previous, dict) and previous.get("record_id"):
        record.clear()
        record.update(previous)
        if accounting.contains(cfg.accounting_file, record["record_id"]):
            return
    else:
        try:
            atomic_write_json(kept, record)
        except OSError:
            if not best_effort:
                raise NodeError(f"cannot write {kept}") from None
    faultpoints.point("record_kept")
    accounting.append(cfg.accounting_file, record, cfg.accounting_group)


def _remove(node: Node, paths: JobPaths) -> None:
    paths.remove()
    faultpoints.point("removed")
    node.slots.release(paths.job_id)


def _orphan_path(cfg: Config, job_id: str) -> str:
    return os.path.join(cfg.state_dir, "orphans", job_id)


def _mark_orphan(node: Node, paths: JobPaths, uuid_: Optional[str], why: Exception) -> None:
    """libvirt could not be asked about the job's VM: leave its name for the next ``reap``."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(_orphan_path(node.cfg, paths.job_id)), mode=0o700,
                    exist_ok=True)
        atomic_write_json(_orphan_path(node.cfg, paths.job_id),
                          {"domain": paths.domain, "uuid": uuid_, "why": str(why),
                           "at": time.time()})


def _clear_orphan(node: Node, job_id: str) -> Optional[str]:
    """Destroy a VM left by an undo that could not reach libvirt; forget it once it is gone."""
    path = _orphan_path(node.cfg, job_id)
    if not os.path.exists(path):
        return None
    paths = JobPaths.of(node.cfg, job_id)
    vm_end, _ = _end_vm(node, paths, "?", tolerate=False)
    os.unlink(path)
    return vm_end


# ---------------------------------------------------------------------------------------------
@metrics.observed("epilogue")
def epilogue(node: Node, job_id: str, exit_code: Optional[int] = None,
             signum: Optional[int] = None) -> Optional[dict]:
    """Tear the job's VM down and account for it. Returns the record, or None if nothing ran
    (or another process, alive, is ending it: that one accounts).

    A prologue still running for the job is asked to stop (SIGTERM: it undoes itself) and, if
    it has not within the lock timeout, killed; then its record is finished here."""
    cfg = node.cfg
    paths = JobPaths.of(cfg, job_id)
    deadline = Deadline(cfg.lock_timeout_s)
    signalled = False
    while True:
        with hold(node.jobs_lock):
            state = jobstore.read(paths) if paths.exists() else None
            if state is None:   # nothing ran, or directories without a record
                if paths.exists() or node.slots.get(job_id) is not None:
                    _end_unowned(node, paths, None, "epilogue")
                _clear_orphan(node, job_id)
                return None
            if not jobstore.owner_alive(state):
                rec = jobstore.Record(paths, state)
                _take_over(rec, "epilogue", exit_code, signum)
                break
            owner, preparing = state.owner_pid, state.phase in jobstore.PREPARING
        if not preparing:   # another epilogue or reap is ending it
            if deadline.expired():
                raise LockTimeout(f"job {job_id} is being ended by pid {owner}, which did not "
                                  f"finish within {cfg.lock_timeout_s:g} s")
        elif not signalled:
            _signal(owner, signal.SIGTERM)
            signalled = True
        elif deadline.expired():
            _signal(owner, signal.SIGKILL)
        time.sleep(0.05)
    return _finish(node, rec, ended_by="epilogue", exit_code=exit_code)


def _signal(pid: Any, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
        os.kill(pid, signum)


DrainTime = Callable[[str, dict], Optional[int]]   # (system, batch_env) -> its drain time


def sync_drain(node: Node, drain_time: DrainTime) -> tuple[Optional[int], list]:
    """Ask the batch system of each ready job (and the one that announced the drain in force)
    when this node is to be drained (a Slurm maintenance reservation, for one), and announce
    the earliest answer as the node's ``shutdowntime``; withdraw a drain found this way once
    no system announces one. An admin's ``vibatch drain --at`` is left as it is. Returns (the
    time in force, announce's answers: empty when nothing changed)."""
    current = features.shutdowntime(node.cfg)
    by, by_env = features.drain_source(node.cfg)
    if by == "admin":
        return current, []
    keys = {(by, tuple(sorted(by_env.items())))} if by else set()
    for _, st in jobstore.records(node.cfg):
        if st and st.phase == jobstore.READY and st.batch:
            keys.add((st.batch, tuple(sorted(st.batch_env.items()))))
    answers = sorted((t, system, env) for system, env in keys
                     if (t := drain_time(system, dict(env))) is not None)
    if not keys:
        return current, []
    at, source, env = answers[0] if answers else (None, None, ())
    if at == current and source == by:
        return current, []
    return at, announce_shutdown(node, at, source or "admin", dict(env))


def announce_shutdown(node: Node, at: Optional[int], source: str = "admin",
                      env: Optional[dict] = None) -> list[tuple[str, Optional[str]]]:
    """The node drains at ``at`` (epoch seconds), or no longer (None): record it for the jobs
    to come, and rewrite ``shutdowntime`` (machine) and ``shutdowntime_job`` in every ready
    job's guest through its root agent. Returns (job, None or why it could not be updated)."""
    features.set_drain(node.cfg, at, source, env)
    out: list[tuple[str, Optional[str]]] = []
    for paths, st in jobstore.records(node.cfg):
        if not st or st.phase != jobstore.READY:
            continue
        m, j = job_features(node, st.job_id, len(st.cpus), st.memory_mb or 0, st.walltime_s,
                            int(st.started_at or time.time()), st.scratch_bytes)
        script = ('set -u; for kv in "$@"; do f=${kv%%=*} v=${kv#*=}; '
                  'if [ -n "$v" ]; then printf "%s\\n" "$v" > "$f.new" && chmod 644 "$f.new" && '
                  'mv -f "$f.new" "$f"; else rm -f "$f"; fi || exit 1; done')
        args = [f"{MACHINE_FEATURES}/shutdowntime={m.get('shutdowntime', '')}",
                f"{JOB_FEATURES}/shutdowntime_job={j.get('shutdowntime_job', '')}"]
        try:
            dom = hypervisor.lookup(node.conn, paths.domain)
            if dom is None:
                raise AgentError("its VM is not running")
            res = node.root_agent(dom).run("/bin/sh", ["-c", script, "vibatch-drain", *args],
                                           Deadline(node.cfg.vm.setup_timeout_s), what="drain")
            out.append((st.job_id, None if res.wait_status == 0 else
                        res.err.decode(errors="replace").strip() or f"status {res.wait_status}"))
        except (AgentError, HypervisorError) as e:
            out.append((st.job_id, str(e)))
    return out


def running_jobs(node: Node) -> list[dict]:
    """State records of the jobs with a directory on this node, with their domain's liveness."""
    out = []
    for paths, st in jobstore.records(node.cfg):
        info = st.to_json() if st else {"job_id": paths.job_id, "phase": "unknown"}
        info["domain_active"] = hypervisor.lookup(node.conn, paths.domain) is not None
        info["owner_alive"] = bool(st) and jobstore.owner_alive(st)
        out.append(info)
    return out


# (batch system, job id, its batch_env) -> is the job gone? None: cannot tell
JobGone = Callable[[str, str, dict], Optional[bool]]


def reap(node: Node, batch_gone: Optional[JobGone] = None) -> list[str]:
    """Clean up after crashes, reboots and libvirtd restarts; return what was reaped.

    Safe to run at any time, beside live prologues and epilogues (from cron every minute). It
    ends exactly the jobs nobody alive owns that cannot go on:
    - a prologue that died (any phase before ``ready``, with its VM or without);
    - an epilogue or reap that died (``ending``/``accounted``): it is finished;
    - a ready job whose VM is gone (QEMU died, the node rebooted, the epilogue never came);
    - a ready job whose holder process has ended (HTCondor's starter died before the job's
      exit hook ran), VM and all;
    - a ready job whose batch system says its job no longer exists (``batch_gone`` answers
      True: the epilogue was lost, e.g. the batch daemon died or the node left the cluster);
      an answer of None (the batch system cannot be asked, or cannot tell) leaves it alone;
    and it releases slots of jobs with no directory, and destroys vibatch domains of this node
    whose job has no directory (e.g. left by an undo while libvirt was down). A job whose
    record has a live owner is never touched.
    """
    out: list[str] = []
    todo: list[tuple[jobstore.Record, str]] = []
    gone = _ask_batch(node, batch_gone) if batch_gone is not None else set()
    with hold(node.jobs_lock):
        for paths, state in jobstore.records(node.cfg):
            why = _reap_reason(node, paths, state, gone)
            if why is None:
                continue
            if state is None:
                _end_unowned(node, paths, None, "reap")
                out.append(f"job {paths.job_id} ({why})")
                continue
            rec = jobstore.Record(paths, state)
            _take_over(rec, "reap")
            todo.append((rec, why))
        job_ids = set(jobstore.job_ids(node.cfg))
        for name in hypervisor.list_names(node.conn, DOMAIN_PREFIX):
            job_id = name[len(DOMAIN_PREFIX):]
            if job_id in job_ids:
                continue
            dom = hypervisor.lookup(node.conn, name)
            xml = hypervisor.xml_desc(dom) if dom else None
            if xml and _ours(node.cfg, read_metadata(xml), job_id) and hypervisor.destroy(dom):
                out.append(f"domain {name} (no job directory)")
        for job_id in _orphans(node.cfg):
            if job_id not in job_ids:
                _clear_orphan(node, job_id)
        out.extend(template.leftovers(node.conn, node.cfg))
    for rec, why in todo:
        _finish(node, rec, ended_by="reap")
        out.append(f"job {rec.paths.job_id} ({why})")
    for job_id in node.slots.all():
        if not JobPaths.of(node.cfg, job_id).exists():
            node.slots.release(job_id)
            out.append(f"slot of job {job_id} (no job directory)")
    return out


def _ask_batch(node: Node, batch_gone: JobGone) -> set[tuple[str, Optional[float]]]:
    """The ready jobs (job id, ready time) whose batch system says they no longer exist. Asked
    before the jobs lock is taken: a batch system's client may take seconds to answer."""
    gone = set()
    for paths, st in jobstore.records(node.cfg):
        if st and st.phase == jobstore.READY and st.batch and st.holder_pid is None and \
                not jobstore.owner_alive(st) and _gone(batch_gone, st, paths.job_id):
            gone.add((paths.job_id, st.ready_at))
    return gone


def _reap_reason(node: Node, paths: JobPaths, state: Optional[jobstore.JobState],
                 gone: frozenset | set = frozenset()) -> Optional[str]:
    if state is None:
        return "directories without a record"
    phase = state.phase
    if phase == jobstore.CORRUPT or jobstore.owner_alive(state):
        return None
    if phase in (jobstore.ENDING, jobstore.ACCOUNTED):
        return "its epilogue died"
    if phase != jobstore.READY:
        return "its prologue died"
    if state.holder_pid is not None and not jobstore.holder_alive(state):
        return "holder gone"
    if hypervisor.lookup(node.conn, paths.domain) is None:
        return "VM gone"
    if walltime.overdue(node.cfg, state.started_at, state.walltime_s):
        return walltime.reason(node.cfg, state.walltime_s)
    if state.holder_pid is None and (paths.job_id, state.ready_at) in gone:
        return f"its {state.batch} job is gone"   # the same ready record the batch was asked of
    return None


def _gone(batch_gone: JobGone, state: jobstore.JobState, job_id: str) -> bool:
    """True only on the batch system's definite answer; any failure to ask is "unknown"."""
    try:
        return batch_gone(state.batch or "", job_id, dict(state.batch_env)) is True
    except Exception as e:  # noqa: BLE001 - reap must go on with the other jobs
        log_error(f"reap: asking {state.batch} about job {job_id}", e)
        return False


def _orphans(cfg: Config) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(cfg.state_dir, "orphans")))
    except FileNotFoundError:
        return []
