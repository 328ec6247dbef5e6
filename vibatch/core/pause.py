"""Suspend and resume reach the guest: a root watcher, started detached by the prologue (through
a batch system's adopter, core/adopt.py), mirrors the stopped state of the job's own process
into its domain (docs/batch/*.md, "Suspend").

A batch system suspends a job by stopping its processes (Grid Engine's default suspend_method
sends SIGSTOP to the job's process group; HTCondor and Torque stop the job's processes too).
The job's process on the host is vibatch's forwarder, which then stops; QEMU is libvirt's and
would carry on. The watcher looks at one process only, the one the batch system itself names as
the job (Grid Engine: ``job_pid`` in the job's spool directory), once that process is the job
user's (a pid that never becomes theirs is not followed), held from then on so that no later
owner of its pid is taken for it (``HeldProcess``):
- stopped (state ``T``): the domain is suspended (``virDomainSuspend``: no vCPU runs);
- running again: the domain is resumed and the guest's clock set (``guest-set-time``).
It acts on its own job's domain alone, chosen by root when it starts: the job's user can pause
and resume that domain by stopping their own process, and nothing else. It ends when the job's
process or the domain is gone (the domain is looked at every ``DOMAIN_CHECK_S`` too, so a
watcher following a process that outlives the job, such as one the user started, ends with the
VM), or at ``max_s``.
"""
from __future__ import annotations

import errno
import os
import select
import time
from typing import Any, Callable, Optional, Sequence

from ..util import log_error

POLL_S = 0.2           # how soon a stop or a continue reaches the domain
WATCH_MAX_S = 30 * 86400   # the watcher ends with the job; at the latest, then
STAT_MAX = 4096
OWNER_WAIT_S = 60      # from a job pid's naming to its process becoming the job user's
DOMAIN_CHECK_S = 5.0   # how soon a watcher notices its domain has ended


def proc_stat(pid: int, uid: Optional[int] = None) -> Optional[list[str]]:
    """The fields of ``/proc/PID/stat`` after the name (state, ppid, pgrp, session, ...) if the
    process lives and is ``uid``'s (any owner's if None); None otherwise. The owner is the
    effective uid of ``status``, not the owner of /proc/PID: a process that has made itself
    non-dumpable (or is between a setuid and its exec) has /proc files that are root's. Both are
    read through one open /proc/PID, so both are of the same process."""
    try:
        d = os.open(f"/proc/{int(pid)}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if uid is not None and _effective_uid(d) != uid:
            return None
        text = _read_at(d, "stat", STAT_MAX).decode(errors="replace")
    except (OSError, ValueError):
        return None
    finally:
        os.close(d)
    return text.rpartition(")")[2].split() or None   # the name before ")" may hold anything


def _read_at(d: int, name: str, limit: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _effective_uid(d: int) -> int:
    """The effective uid in /proc/PID/status ("Uid: real effective saved fs"); ValueError if
    there is none in the first STAT_MAX bytes (it is the ninth line)."""
    for line in _read_at(d, "status", STAT_MAX).split(b"\n"):
        if line.startswith(b"Uid:"):
            return int(line.split()[2])
    raise ValueError("no Uid line")


def process_state(pid: int, uid: Optional[int]) -> Optional[str]:
    """The state letter of process ``pid`` if it lives and is ``uid``'s (any owner's if None);
    None otherwise (gone, a zombie, or its pid reused by someone else)."""
    fields = proc_stat(pid, uid)
    return fields[0] if fields and fields[0] not in ("Z", "X") else None    # a zombie has ended


START_FIELD = 19      # starttime, field 22 of /proc/PID/stat, in proc_stat's fields (from 3)


class HeldProcess:
    """A process held so that another one given its pid later is never taken for it: by a
    pidfd, or where the kernel has no pidfd_open (before Linux 5.3; ENOSYS) by its start time in
    /proc (a reused pid would have to start in the same clock tick). ProcessLookupError if
    ``pid`` is no process now."""

    def __init__(self, pid: int):
        self.pid, self.fd = int(pid), None
        try:
            self.fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            raise
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM):   # EPERM: a seccomp filter's answer
                raise
        fields = proc_stat(self.pid)
        if fields is None or len(fields) <= START_FIELD:
            self.close()
            raise ProcessLookupError(self.pid)
        self.start = fields[START_FIELD]

    def state(self, uid: Optional[int] = None) -> Optional[str]:
        """The held process's state letter (process_state) if it lives and is ``uid``'s (any
        owner's if None); None if it has ended, or is not ``uid``'s."""
        fields = proc_stat(self.pid, uid)
        if not fields or fields[0] in ("Z", "X") or not self._is_it(fields):
            return None
        return fields[0]

    def alive(self) -> bool:
        """Whether the held process has not ended (a zombie has ended)."""
        if self.fd is not None:
            return not select.select([self.fd], [], [], 0)[0]   # readable once it has ended
        return self.state() is not None

    def _is_it(self, fields: list[str]) -> bool:
        """Whether ``fields``, just read from /proc/PID/stat, are the held process's."""
        if self.fd is not None:
            return self.alive()      # alive after the read: the read was of it
        return len(fields) > START_FIELD and fields[START_FIELD] == self.start

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "HeldProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow(dom: Any, job_pid: Callable[[], Optional[int]], uid: int, max_s: float,
           on_resume: Callable[[Any], None], vm_pids: Sequence[int] = (),
           start_s: float = 600, cgroup_frozen: Optional[Callable[[], bool]] = None,
           job_frozen: Optional[Callable[[], bool]] = None, owner_s: float = OWNER_WAIT_S) -> str:
    """Mirror the job's process into ``dom`` until one of them ends; returns why it stopped.
    ``job_pid()``: the job's process (None until the batch system has started it, at most
    ``start_s``; then it must become the job user's within ``owner_s``). ``vm_pids``: QEMU
    and its helpers; when the batch system stops them itself
    (Grid Engine's addgrpid signal reaches a QEMU that carries the job's group), the guest is
    frozen already, and a monitor call to a stopped QEMU would hang: then only the clock is set
    once they run again. ``cgroup_frozen()``: the batch system froze the job's cgroup, QEMU in
    it (HTCondor's condor_suspend on cgroup v1): the same, the job's process counting as
    stopped. ``job_frozen()``: the batch system froze the job's cgroup, QEMU outside it
    (HTCondor on cgroup v2): the job counts as stopped, and the domain is suspended."""
    import libvirt   # noqa: PLC0415 - only the detached watcher needs it

    def vm_stopped() -> bool:
        return bool(cgroup_frozen and cgroup_frozen()) or \
            any(process_state(p, None) == "T" for p in vm_pids)

    end = time.monotonic() + max_s
    started = time.monotonic() + start_s
    held: Optional[HeldProcess] = None   # the job's process, whoever gets its pid later
    owner_by = look_at_domain = 0.0
    owned = paused = frozen = False
    try:
        while time.monotonic() < end:
            if held is None:
                pid = job_pid()
                if pid is None and time.monotonic() > started:
                    return "the job's process never started"
                if pid is not None:
                    try:
                        held = HeldProcess(pid)
                    except ProcessLookupError:
                        return "the job's process ended"
                    owner_by = time.monotonic() + owner_s
            if held is not None:
                # Grid Engine names the job's pid as soon as it has forked it: until the child
                # has become the job's user (and exec'd), it is root's. Once it is the user's,
                # the hold, not the owner, says it is the job
                letter = held.state(None if owned else uid)
                if letter is None and (owned or not held.alive()):
                    return "the job's process ended"
                if letter is None and time.monotonic() > owner_by:
                    return "the job's process never became the job user's"
                owned = letter is not None
            if owned:
                if (cgroup_frozen and cgroup_frozen()) or (job_frozen and job_frozen()):
                    letter = "T"  # a frozen task shows "D" (v1) or "S" (v2): stopped all the same
                try:
                    if letter == "T" and not (paused or frozen):
                        if vm_stopped():
                            frozen = True
                        elif dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                            dom.suspend()
                            paused = True
                    elif letter != "T" and frozen and not vm_stopped():
                        frozen = False
                        on_resume(dom)
                    elif letter != "T" and paused and dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                        dom.resume()
                        paused = False
                        on_resume(dom)
                except libvirt.libvirtError as e:
                    if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN or not _active(dom):
                        return "the domain ended"
                    raise
            if time.monotonic() >= look_at_domain:
                if not _active(dom):
                    return "the domain ended"
                look_at_domain = time.monotonic() + DOMAIN_CHECK_S
            time.sleep(POLL_S)
    finally:
        if held is not None:
            held.close()
    return "the watcher's time ran out"


def watcher(cfg: Any, job_id: str, job_pid: Callable[[], Optional[int]], uid: int,
            max_s: float = WATCH_MAX_S) -> Callable[[Sequence[int]], None]:
    """What an adapter's ``adopter`` returns (core/adopt.py): given the VM's pids, start the
    detached root watcher of job ``job_id``'s domain, which follows ``job_pid()``."""
    def watch(pids: Sequence[int]) -> None:
        from ..vm import hypervisor   # noqa: PLC0415
        from .jobdir import JobPaths   # noqa: PLC0415
        dom = hypervisor.lookup(hypervisor.connect(cfg.libvirt_uri),
                                JobPaths.of(cfg, job_id).domain)
        if dom is not None:
            follow(dom, job_pid, uid, max_s - 60, set_clock, pids)

    def start(pids: Sequence[int]) -> None:
        from .adopt import detach   # noqa: PLC0415
        detach(lambda: watch(pids), int(max_s))
    return start


def _active(dom: Any) -> bool:
    import libvirt   # noqa: PLC0415
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def set_clock(dom: Any) -> None:
    """After a resume: the guest's clock to the host's (the guest stood still meanwhile), by
    the agent's guest-set-time. qemu-ga sets the system time first and then runs hwclock -w
    (which busy-waits up to a second, off the job's start here); an image without
    /sbin/hwclock makes that fail, which alone is not a failure."""
    from ..vm.agent import AgentError, LibvirtAgent   # noqa: PLC0415
    try:
        try:
            LibvirtAgent(dom).command("guest-set-time", {"time": time.time_ns()}, 10.0)
        except AgentError as e:
            if "hwclock" not in str(e):
                raise
    except Exception as e:  # noqa: BLE001 - the job goes on with a late clock
        log_error(f"setting the clock of {dom.name()} after a resume", e)


__all__ = ["WATCH_MAX_S", "HeldProcess", "follow", "proc_stat", "process_state", "set_clock", "watcher"]
