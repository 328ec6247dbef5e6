"""Run a daemon under a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) that reaps every
orphan given to it at once, as systemd does on a real node.

libvirtd daemonizes QEMU and the share launchers (a double fork), so they become children of
the nearest subreaper above libvirtd, or of PID 1. Where no service manager runs (containers,
this project's CI), PID 1 may reap late, and libvirt's destroy waits for the reaping: the
epilogue then takes 1.2-2 s instead of 0.2 s (docs/benchmarks.md). pbs_mom also skips every
process whose parent is PID 1, so a Torque node counts the VM in ``resources_used`` only when
QEMU's parent is a subreaper (docs/batch/torque.md). ``etc/setup-node.sh`` starts libvirtd so:

    python -I -m vibatch.subreaper --detach --log /var/log/vibatch/libvirtd.log libvirtd

``--detach``: in a new session, in /, stdin from /dev/null, stdout and stderr to ``--log`` (or
/dev/null), every other descriptor closed; the caller returns once the command has been
exec'd (status 0) or could not be (1, with the reason). TERM, INT and HUP are passed on to the
command. The subreaper reaps on after the command has ended (QEMU outlives a libvirtd restart)
and ends, with the command's status, when no child is left.

``--service``: the form for a systemd unit's ``ExecStart`` (the drop-in
``etc/systemd/libvirtd.service.d/vibatch-subreaper.conf``, which ``etc/setup-node.sh`` installs
where systemd is PID 1). The command runs in the foreground, with the unit's environment as
systemd gave it to us (``NOTIFY_SOCKET`` too: libvirtd sends ``READY=1`` itself, so the unit
needs ``NotifyAccess=all``). Socket activation: descriptors passed to us (``LISTEN_PID`` our
pid) are checked and passed on with ``LISTEN_PID`` set, in the child, to the child's own pid, as
``sd_listen_fds`` requires; ``LISTEN_*`` meant for another process are dropped. TERM, INT, HUP
and QUIT are passed on. We end as soon as the command has ended, with its status (128 + the
signal's number if a signal killed it): systemd waits for its main process, so a subreaper
that stayed for QEMU would hold every stop and restart of libvirtd (``KillMode=process`` leaves
QEMU running). What is still running then (QEMU, after a restart of libvirtd) goes to PID 1.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import sys
from typing import Mapping, Optional, Sequence

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
SERVICE_FORWARDED = (*FORWARDED, signal.SIGQUIT)
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
SD_LISTEN_FDS_START = 3
MAX_LISTEN_FDS = 64         # libvirtd takes five at most (sock, ro, admin, tcp, tls)


def service_env(environ: Mapping[str, str], pid: int) -> tuple[dict[str, str], int]:
    """The environment for the command of ``--service``, without ``LISTEN_PID`` (the child sets
    its own), and how many descriptors socket activation passed to ``pid`` (0: none, and no
    ``LISTEN_*`` is passed on). ValueError if ``LISTEN_PID`` names ``pid`` but the rest does
    not hold together: a number of descriptors that are not all open, or a name count that is
    not theirs (``sd_listen_fds_with_names`` would refuse it in libvirtd)."""
    env = {k: v for k, v in environ.items() if k not in LISTEN_VARS}
    listen_pid = environ.get("LISTEN_PID", "")
    if not re.fullmatch(r"[0-9]{1,10}", listen_pid) or int(listen_pid) != pid:
        return env, 0           # none, or meant for another process: not for our command
    fds = environ.get("LISTEN_FDS", "")
    if not re.fullmatch(r"[1-9][0-9]{0,2}", fds) or int(fds) > MAX_LISTEN_FDS:
        raise ValueError(f"LISTEN_FDS={fds!r} is not a number of descriptors "
                         f"(1 to {MAX_LISTEN_FDS})")
    n = int(fds)
    names = environ.get("LISTEN_FDNAMES")
    if names is not None and len(names.split(":")) != n:
        raise ValueError(f"LISTEN_FDNAMES={names!r} does not name LISTEN_FDS={n} descriptors")
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        try:
            os.fstat(fd)
        except OSError as e:
            raise ValueError(f"descriptor {fd} of LISTEN_FDS={n} is not open: "
                             f"{e.strerror}") from None
    env["LISTEN_FDS"] = fds
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env, n


def _detach(log: Optional[str]) -> int:
    """Fork; the caller's process waits only until the command has been exec'd (or could not
    be) and exits with 0 or 1; the child goes on in a session of its own, in /, with no
    descriptor of the caller's but the returned pipe end, which it reports failures on."""
    out = os.open(os.devnull, os.O_WRONLY) if log is None else os.open(
        log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    r, w = os.pipe2(os.O_CLOEXEC)
    if os.fork():
        os.close(w)
        msg = b""
        while chunk := os.read(r, 4096):
            msg += chunk
        if msg:
            print(msg.decode(errors="replace"), file=sys.stderr)
        os._exit(1 if msg else 0)
    os.close(r)
    os.setsid()
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    w = os.dup2(w, 3, inheritable=False)
    os.closerange(4, os.sysconf("SC_OPEN_MAX"))
    return w


def _report(fd: Optional[int], msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    if fd is not None:
        os.write(fd, msg.encode())


def run(argv: Sequence[str], detach: bool = False, log: Optional[str] = None,
        service: bool = False) -> int:
    """Run ``argv`` as our child and reap every orphan given to us, also after ``argv`` has
    ended (QEMU outlives a libvirtd restart: it must not fall to PID 1 then); our status is
    ``argv``'s, once no child is left. With ``service``: ``argv`` gets our environment (socket
    activation's passed on, ``service_env``), and we end as soon as ``argv`` has ended."""
    report = _detach(log) if detach else None
    env, nfds = ENV, 0
    if service:
        try:
            env, nfds = service_env(os.environ, os.getpid())
        except ValueError as e:
            _report(None, f"vibatch subreaper: socket activation: {e}")
            return 1
    forwarded = SERVICE_FORWARDED if service else FORWARDED
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _report(report, f"vibatch subreaper: prctl: {os.strerror(ctypes.get_errno())}")
        return 1
    child: Optional[int] = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None:
            os.kill(child, signum)
    for signum in forwarded:
        signal.signal(signum, forward)
    # blocked until ``child`` is set: a TERM that comes during the fork is passed on, not lost
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            for signum in (*forwarded, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(signum, signal.SIG_DFL)   # Python's own dispositions: not libvirtd's
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if service:
                # a stop that times out SIGKILLs the main pid only (KillMode=process): libvirtd,
                # then neither the unit's nor anyone's child, must not run on
                if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 \
                        or os.getppid() != parent:
                    os._exit(127)
            if nfds:
                env = {**env, "LISTEN_PID": str(os.getpid())}   # sd_listen_fds: our own pid
                for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + nfds):
                    os.set_inheritable(fd, True)    # systemd's are; so that exec keeps them
            os.execvpe(argv[0], list(argv), env)
        except OSError as e:
            _report(report, f"vibatch subreaper: cannot run {argv[0]}: {e.strerror}")
        finally:
            os._exit(127)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if report is not None:
        os.close(report)        # the caller's wait ends at the exec (close-on-exec)
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + nfds):
        os.close(fd)            # the command's now (systemd keeps its own)
    status = 0
    while True:
        try:
            pid, wstatus = os.wait()     # the command, or an orphan given to us
        except ChildProcessError:
            return status
        except InterruptedError:
            continue
        if pid == child:
            status = os.waitstatus_to_exitcode(wstatus)
            status = 128 - status if status < 0 else status    # as a shell says a signal
            child = None
            if service:
                return _end_service(argv[0], status)


def _end_service(command: str, status: int) -> int:
    """The command of ``--service`` has ended: reap what has ended too, say whether anything is
    left (it goes to PID 1 when we exit), and return the command's status as a shell would."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == 0:
            print(f"vibatch subreaper: {command} ended; the processes it left running now go "
                  "to PID 1", file=sys.stderr, flush=True)
            break
    return status


def main(args: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vibatch.subreaper",
                                description="run COMMAND under a child subreaper")
    p.add_argument("--detach", action="store_true", help="return at once; run in the background")
    p.add_argument("--log", help="with --detach: the file stdout and stderr go to")
    p.add_argument("--service", action="store_true",
                   help="run in the foreground as a systemd service's ExecStart: pass the "
                   "environment, NOTIFY_SOCKET and socket activation on; end with COMMAND")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    if not a.command:
        p.error("no COMMAND given")
    if a.service and (a.detach or a.log):
        p.error("--service cannot go with --detach or --log (systemd runs it in the foreground)")
    if a.log and not a.detach:
        p.error("--log goes with --detach")
    return run(a.command, a.detach, a.log, a.service)


if __name__ == "__main__":
    sys.exit(main())
