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
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from typing import Optional, Sequence

PR_SET_CHILD_SUBREAPER = 36
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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


def run(argv: Sequence[str], detach: bool = False, log: Optional[str] = None) -> int:
    """Run ``argv`` as our child and reap every orphan given to us, also after ``argv`` has
    ended (QEMU outlives a libvirtd restart: it must not fall to PID 1 then); our status is
    ``argv``'s, once no child is left."""
    report = _detach(log) if detach else None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _report(report, f"vibatch subreaper: prctl: {os.strerror(ctypes.get_errno())}")
        return 1
    child: Optional[int] = None

    def forward(signum: int, _frame: object) -> None:
        if child is not None:
            os.kill(child, signum)
    for signum in FORWARDED:
        signal.signal(signum, forward)
    child = os.fork()
    if child == 0:
        try:
            for signum in (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(signum, signal.SIG_DFL)   # Python's own dispositions: not libvirtd's
            os.execvpe(argv[0], list(argv), ENV)
        except OSError as e:
            _report(report, f"vibatch subreaper: cannot run {argv[0]}: {e.strerror}")
        finally:
            os._exit(127)
    if report is not None:
        os.close(report)        # the caller's wait ends at the exec (close-on-exec)
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
            child = None


def main(args: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vibatch.subreaper",
                                description="run COMMAND under a child subreaper")
    p.add_argument("--detach", action="store_true", help="return at once; run in the background")
    p.add_argument("--log", help="with --detach: the file stdout and stderr go to")
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(args)
    if not a.command:
        p.error("no COMMAND given")
    if a.log and not a.detach:
        p.error("--log goes with --detach")
    return run(a.command, a.detach, a.log)


if __name__ == "__main__":
    sys.exit(main())
