"""HTCondor's view of the VM (issue 11; docs/batch/htcondor.md, "Accounting and suspend"): the
root helper, called by the wrapper once the job's domain runs, hands QEMU and the share
launchers to the job's cgroup where the starter tracks the job by cgroup, and starts a root
watcher that carries HTCondor's suspend to the domain.

What a real condor_starter 25.0.13 was seen doing (tests/condor_starter.py plays it):
- On a cgroup v1 host with the usual layout (``cpu,cpuacct`` mounted together), it makes
  ``<BASE_CGROUP>/<name>`` in the ``memory``, ``cpu,cpuacct``, ``freezer`` and ``devices``
  hierarchies and puts the wrapper there (ProcFamilyDirectCgroupV1). The job ad's
  RemoteUserCpu/RemoteSysCpu come from that cgroup's ``cpuacct.stat``, its ResidentSetSize from
  the ``rss`` line of its ``memory.stat``; condor_suspend writes ``FROZEN`` to its
  ``freezer.state``, condor_continue ``THAWED``; once the wrapper has exited, the starter freezes
  the cgroup and SIGKILLs every process listed in its memory ``cgroup.procs``.
- Otherwise (here: a host that mounts ``cpu`` and ``cpuacct`` apart, or ``BASE_CGROUP`` empty)
  ``condor_procd`` tracks the job by process tree and by environment markers; suspend is a
  SIGSTOP to every process of that family, continue a SIGCONT.
- On cgroup v2 (from the 25.0.13 source, ProcFamilyDirectCgroupV2; not seen: this host has no
  v2 controllers) the job is in ``<leaf>/<name>.scope`` of the unified hierarchy, a sibling of
  its starter's cgroup; condor_suspend writes ``1`` to the leaf's ``cgroup.freeze``, continue
  ``0``, and the end-of-job kill freezes the leaf and writes its ``cgroup.kill``.

So, after the move, QEMU and the share launchers are in the job's ``cpuacct`` and ``freezer``
cgroups: the job ad counts their CPU and condor_suspend freezes them. They stay in libvirt's
``memory``, ``cpuset``, ``cpu`` and ``devices`` cgroups: the live memory cap, the vCPU pinning
and QEMU's device list hold, and HTCondor's kill, which reads the memory cgroup, never reaches
QEMU (the wrapper ends the VM, so condor_rm's grace in the guest is kept). The guest's memory
is a shared memfd (for virtiofs), which the v1 ``rss`` line does not count: moving the memory
cgroup would give up the cap and still report nothing. Under condor_procd the VM cannot join
the job's family (QEMU's environment and groups are fixed when it starts, before the
family exists); the watcher then pauses the domain while the wrapper is stopped. On cgroup v2
the VM stays where libvirt put it (the one hierarchy holds libvirt's memory cap and pinning):
the watcher leaves the job's v2 cgroup for its starter's, and pauses the domain while the job's
cgroup is frozen (``cgroup.events``). Its CPU and memory are not in the job ad there.
A failure here costs HTCondor's record of the VM or its suspend, never the job: it is logged.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

from .. import safeio
from ..core import pause
from ..util import atomic_write_json, log_error

CGROUP_FILE_MAX = 1 << 16
MAX_CGROUP_DEPTH = 32
V2 = ""         # mount_points()' key of the unified hierarchy (its /proc/PID/cgroup line: 0::PATH)
# the v1 hierarchies the VM joins: what the starter counts CPU in, and freezes
MOVED = ("cpuacct", "freezer")
ADOPTED_FILE = "adopted.json"   # in the job's state directory (as core/adopt.py's)
TAKEN_FILE = "htcondor.taken"   # there too: take() ran for the job (once)
COUNTED_FILE = "htcondor.counted"   # there too: the VM carries the job's tracking group
# the wrapper's wait, before the VM ends, for the procd's last snapshot of it (final_snapshot)
FINAL_WAIT_MAX_S = 32
T = TypeVar("T")


@dataclass(frozen=True)
class Tracking:
    """condor_procd counts the VM (USE_GID_PROCESS_TRACKING): the job's tracking group, which
    QEMU and the share launchers carry, and the starter's PID_SNAPSHOT_INTERVAL."""
    gid: int
    snapshot_s: int


@dataclass(frozen=True)
class JobCgroups:
    """The job's cgroup directories by v1 controller, where they differ from its starter's
    (none: the starter does not track by cgroup), and the starter's own."""
    job: dict
    starter: dict
    v2: Optional[str] = None            # the job's cgroup v2 directory, if not its starter's
    v2_starter: Optional[str] = None    # its starter's

    def job_frozen(self) -> bool:
        """The starter froze the job's cgroup v2 (QEMU is not in it): ``frozen 1`` in the job
        cgroup's ``cgroup.events``, or ``1`` in the ``cgroup.freeze`` of that cgroup or of any
        above it, up to the one it shares with its starter. condor_suspend writes the leaf's
        (``<name>.slice``, above the job's ``.scope``), which stays root's though the job's
        user owns the leaf: the user can move the job's processes into a cgroup of their own
        below it and remove the scope, but cannot undo the leaf's freeze. It counts as soon as
        it is asked for, as FREEZING does on v1."""
        if self.v2 is None:
            return False
        if "frozen 1" in _read(os.path.join(self.v2, "cgroup.events")).splitlines():
            return True
        top = os.path.commonpath([self.v2, self.v2_starter]) if self.v2_starter else "/"
        d = self.v2
        for _ in range(MAX_CGROUP_DEPTH):
            if d == top or os.path.dirname(d) == d:
                break
            if _read(os.path.join(d, "cgroup.freeze")).strip() == "1":
                return True
            d = os.path.dirname(d)
        return False

    def frozen(self) -> bool:
        """The starter froze the job (condor_suspend; FREEZING counts: it is on its way)."""
        d = self.job.get("freezer")
        if d is None:
            return False
        return _read(os.path.join(d, "freezer.state")).strip() in ("FROZEN", "FREEZING")


def _read(path: str) -> str:
    return (safeio.read_bounded(path, CGROUP_FILE_MAX) or b"").decode(errors="replace")


def cgroup_lines(pid: int) -> dict:
    """``/proc/PID/cgroup`` as {hierarchy id: (controllers, path)}; a line the kernel did not
    write (a cgroup name holding a newline makes one) makes an id repeat: refused."""
    out: dict = {}
    for line in _read(f"/proc/{int(pid)}/cgroup").splitlines():
        hid, sep, rest = line.partition(":")
        ctrls, sep2, path = rest.partition(":")
        if not (sep and sep2 and hid.isdigit()) or hid in out:
            raise ValueError(f"/proc/{pid}/cgroup: not the kernel's format")
        out[hid] = (ctrls, path)
    return out


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> dict:
    """Each cgroup v1 controller's mount point ({'cpuacct': '/sys/fs/cgroup/cpuacct', ...}),
    and the unified (v2) hierarchy's as ``V2``."""
    out: dict = {}
    for line in _read(mountinfo).splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        i = fields.index("-")
        if len(fields) < i + 4 or fields[3] != "/":
            continue          # not the whole hierarchy (a bind mount of a subtree)
        if fields[i + 1] == "cgroup2":
            out.setdefault(V2, fields[4])
            continue
        if fields[i + 1] != "cgroup":
            continue
        for opt in fields[i + 3].split(","):
            if opt not in ("rw", "ro"):
                out.setdefault(opt, fields[4])
    return out


def job_cgroups(job_pid: int, starter_pid: int) -> JobCgroups:
    """Where the starter put its job (the wrapper, ``job_pid``): the v1 hierarchies in which the
    wrapper's cgroup is not the starter's. The layout is checked against the starter's own file,
    which the job's user cannot touch."""
    mine, theirs = cgroup_lines(job_pid), cgroup_lines(starter_pid)
    if set(mine) != set(theirs) or any(mine[h][0] != theirs[h][0] for h in mine):
        raise ValueError(f"the cgroups of process {job_pid} do not match its starter's")
    mounts = mount_points()
    job, starter = {}, {}
    v2 = v2_starter = None
    for hid, (ctrls, path) in mine.items():
        if path == theirs[hid][1]:
            continue
        if not ctrls:         # the unified hierarchy: the VM stays out (see the module's doc)
            top = mounts.get(V2)
            if top and ".." not in path.split("/") and ".." not in theirs[hid][1].split("/"):
                v2, v2_starter = top + path, top + theirs[hid][1]
            continue
        for ctrl in ctrls.split(","):
            top = mounts.get(ctrl)
            if top and ".." not in path.split("/"):
                job[ctrl] = top + path
                starter[ctrl] = top + theirs[hid][1]
    return JobCgroups(job, starter, v2, v2_starter)


MAX_ANCESTRY = 64


def _read_held(pids: Sequence[int], read: Callable[[], T]) -> T:
    """``read()`` of processes that find_caller() saw among our ancestors (the wrapper, its
    starter), so that a process that has since reused one of their pids cannot be taken for
    them: each is held (pause.HeldProcess) while it is still our ancestor, and must still be
    alive once its /proc files have been read. ValueError otherwise."""
    held = []
    try:
        for pid in pids:
            try:
                held.append(pause.HeldProcess(pid))
            except ProcessLookupError:
                raise ValueError(f"process {pid} has ended") from None
        ours, pid = set(), os.getppid()
        for _ in range(MAX_ANCESTRY):
            if pid <= 1:
                break
            ours.add(pid)
            fields = pause.proc_stat(pid)
            pid = int(fields[1]) if fields and len(fields) > 1 else 0
        if not set(pids) <= ours:
            raise ValueError(f"processes {', '.join(map(str, pids))} are no longer our ancestors")
        out = read()
        if not all(p.alive() for p in held):
            raise ValueError(f"process {' or '.join(map(str, pids))} ended while it was read")
        return out
    finally:
        for p in held:
            p.close()


def held_job_cgroups(job_pid: int, starter_pid: int) -> JobCgroups:
    """job_cgroups() of the wrapper and its starter, held (_read_held)."""
    return _read_held((job_pid, starter_pid), lambda: job_cgroups(job_pid, starter_pid))


def groups_of(pid: int) -> list[int]:
    """The supplementary groups of process ``pid`` (the ``Groups:`` line of its status)."""
    text = _read(f"/proc/{int(pid)}/status")
    # a line cut off by the bounded read could end in a prefix of a gid: only whole lines
    for line in text.split("\n")[:-1]:
        name, sep, value = line.partition(":")
        if name == "Groups" and sep:
            if not all(g.isdigit() for g in value.split()):
                raise ValueError(f"/proc/{pid}/status: not the kernel's format")
            return [int(g) for g in value.split()]
    raise ValueError(f"/proc/{pid}/status has no Groups line")


def tracking_gid(job_pid: int, low: int, high: int) -> int:
    """The one group in ``low``..``high`` (MIN_TRACKING_GID..MAX_TRACKING_GID) that the
    starter gave its job's first process, the wrapper (held, _read_held): condor_procd's
    tracking group of the job. Only root can add a group to a process's list, and a job's
    user cannot take another job's group. ValueError if there is not exactly one."""
    ours = [g for g in _read_held((job_pid,), lambda: groups_of(job_pid)) if low <= g <= high]
    if len(ours) != 1:
        raise ValueError(f"process {job_pid} holds {len(ours)} groups of the tracking range "
                         f"{low}..{high}, not one")
    return ours[0]


def move(pids: Sequence[int], directory: str) -> None:
    """Put the processes into the cgroup ``directory`` (each with all its threads)."""
    fd = os.open(os.path.join(directory, "cgroup.procs"),
                 os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        for pid in pids:
            try:
                os.write(fd, str(int(pid)).encode())
            except ProcessLookupError:
                continue      # a share launcher that has just ended
    finally:
        os.close(fd)


def take(cfg, job_id: str, job_pid: int, starter_pid: int, uid: int,
         counted: Optional[Tracking] = None) -> None:
    """The helper's step once the job's wrapper runs and the domain is up: the VM into the
    job's cgroups (if the starter made any), then the suspend watcher. ``counted``: QEMU and
    the share launchers carry the job's tracking group (condor_procd counts them, and stops
    them at condor_suspend). Never raises."""
    from ..core import adopt   # noqa: PLC0415 - after the helper's hygiene (libvirt)
    from ..core.jobdir import JobPaths   # noqa: PLC0415
    from ..vm import hypervisor   # noqa: PLC0415
    paths = JobPaths.of(cfg, job_id)
    try:   # once per job: the helper can be called again by the job's user (one watcher only)
        os.close(os.open(os.path.join(paths.state, TAKEN_FILE),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return
    except OSError as e:
        log_error(f"job {job_id}: handing its VM to HTCondor", e)
        return
    try:
        cgroups: Optional[JobCgroups] = held_job_cgroups(job_pid, starter_pid)
    except Exception as e:  # noqa: BLE001 - the record of the VM is lost, the job goes on
        log_error(f"job {job_id}: finding HTCondor's job cgroup", e)
        cgroups = None
    moved = {c: cgroups.job[c] for c in MOVED if c in cgroups.job} if cgroups else {}
    vm_moved = False
    pids: list[int] = []
    try:
        if moved or counted:   # on v2 nothing is moved, and without a group no pid is needed
            conn = hypervisor.connect(cfg.libvirt_uri)
            try:
                dom = hypervisor.lookup(conn, paths.domain)
                pids = adopt.vm_pids(dom) if dom is not None else []
            finally:
                conn.close()
            if not pids:
                raise RuntimeError(f"no processes found in libvirt's cgroup of {paths.domain}")
        if counted is not None:   # for final_snapshot
            atomic_write_json(os.path.join(paths.state, COUNTED_FILE),
                              {"gid": counted.gid, "snapshot_s": counted.snapshot_s,
                               "pids": pids})
        if moved:
            for directory in moved.values():
                move(pids, directory)
            atomic_write_json(os.path.join(paths.state, ADOPTED_FILE),
                              {"system": "htcondor", "pids": pids, "cgroups": moved,
                               "job_pid": job_pid, "at": time.time()})
            vm_moved = True
    except Exception as e:  # noqa: BLE001 - the record of the VM is lost, the job goes on
        log_error(f"job {job_id}: handing its VM to HTCondor's job cgroup", e)
    try:
        start_watcher(cfg, job_id, job_pid, uid, cgroups, vm_moved,
                      vm_pids=pids if counted else ())
    except Exception as e:  # noqa: BLE001
        log_error(f"job {job_id}: starting its suspend watcher", e)


def final_snapshot(cfg, job_id: str) -> Optional[float]:
    """Before the wrapper ends a VM that condor_procd counts (COUNTED_FILE): the procd sums
    what it read of each process at its last snapshot, which it takes every
    PID_SNAPSHOT_INTERVAL, and a process that has exited keeps those figures. So the CPU the
    VM used since then would be lost. The domain is paused, so that its CPU time stands still,
    and the wrapper waits for one more snapshot: the interval and 2 s, at most
    FINAL_WAIT_MAX_S. A QEMU that the procd has stopped (condor_suspend) is not asked to
    pause: its monitor would not answer, and it uses no CPU anyway. Returns the seconds waited
    (None: not counted). Raises nothing but the helper's own alarm, in the wait."""
    import libvirt   # noqa: PLC0415 - after the helper's hygiene
    from ..core.jobdir import JobPaths   # noqa: PLC0415
    from ..vm import hypervisor   # noqa: PLC0415
    paths = JobPaths.of(cfg, job_id)
    try:
        data = safeio.read_bounded(os.path.join(paths.state, COUNTED_FILE), CGROUP_FILE_MAX)
        if data is None:
            return None
        counted = json.loads(data)
        wait = min(float(counted["snapshot_s"]) + 2, FINAL_WAIT_MAX_S)
        stopped = any(pause.process_state(int(p), None) == "T" for p in counted["pids"])
        conn = hypervisor.connect(cfg.libvirt_uri)
        try:
            dom = hypervisor.lookup(conn, paths.domain)
            if dom is None or not dom.isActive():
                return None
            if not stopped and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                dom.suspend()
        finally:
            conn.close()
    except Exception as e:  # noqa: BLE001 - the tail of the VM's usage is lost, nothing more
        log_error(f"job {job_id}: pausing its VM for condor_procd's last snapshot", e)
        return None
    time.sleep(wait)
    return wait


def start_watcher(cfg, job_id: str, job_pid: int, uid: int,
                  cgroups: Optional[JobCgroups], vm_moved: bool = False,
                  vm_pids: Sequence[int] = ()) -> None:
    """The detached root watcher (core/pause.py): under condor_procd, the domain is suspended
    while the wrapper is stopped (SIGSTOP) and resumed on SIGCONT; under a cgroup v1 freeze with
    QEMU moved into the job's freezer (``vm_moved``), QEMU is frozen with the job, and the
    watcher sets the guest's clock once it is thawed; under a freeze QEMU is not in (cgroup v2,
    or a v1 move that failed), the domain is suspended while the job's cgroup is frozen;
    ``vm_pids``, QEMU and the share launchers carrying the job's tracking group: the procd's
    SIGSTOP stops them too, and the watcher, which must not call a stopped QEMU's monitor,
    only sets the clock once they run again. It
    first leaves the job's cgroups (it is started from inside them), so that it is neither
    frozen nor killed with the job; if it cannot leave the v2 one, it does not watch."""
    from ..core.adopt import detach   # noqa: PLC0415
    from ..core.jobdir import JobPaths   # noqa: PLC0415
    from ..vm import hypervisor   # noqa: PLC0415

    def watch() -> None:
        leave = dict(cgroups.starter) if cgroups else {}
        if cgroups and cgroups.v2_starter:
            leave["v2"] = cgroups.v2_starter
        for ctrl, directory in leave.items():
            try:
                move([os.getpid()], directory)
            except OSError as e:
                log_error(f"job {job_id}'s watcher leaving its {ctrl} cgroup", e)
                if ctrl == "v2":
                    # frozen with the job, it could never see the freeze; and on v2 the job's
                    # user, who owns the leaf, could move this root process anywhere below it
                    return
        dom = hypervisor.lookup(hypervisor.connect(cfg.libvirt_uri),
                                JobPaths.of(cfg, job_id).domain)
        if dom is None:
            return
        if cgroups is not None and vm_moved:    # QEMU is in the job's v1 freezer
            pause.follow(dom, lambda: job_pid, uid, pause.WATCH_MAX_S - 60, pause.set_clock,
                         vm_pids, cgroup_frozen=cgroups.frozen)
        else:                                   # a freeze QEMU is not in suspends the domain
            def frozen() -> bool:
                return cgroups is not None and (cgroups.frozen() or cgroups.job_frozen())
            pause.follow(dom, lambda: job_pid, uid, pause.WATCH_MAX_S - 60, pause.set_clock,
                         vm_pids, job_frozen=frozen if cgroups else None)
    detach(watch, pause.WATCH_MAX_S)


__all__ = ["ADOPTED_FILE", "COUNTED_FILE", "JobCgroups", "MOVED", "Tracking", "V2", "cgroup_lines",
           "final_snapshot", "groups_of", "job_cgroups", "mount_points", "move", "start_watcher",
           "take", "tracking_gid"]
