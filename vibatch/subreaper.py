"""Run a daemon under a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) that reaps every
orphan given to it at once, as systemd does on a real node.

libvirtd daemonizes QEMU and the share launchers (a double fork), so they become children of
the nearest subreaper above libvirtd, or of PID 1. Where no service manager runs (containers,
this project's CI), PID 1 may reap late, and libvirt's destroy waits for the reaping: the
epilogue then takes 1.2-2 s instead of 0.2 s (docs/benchmarks.md). pbs_mom also skips every
process whose parent is PID 1, so a Torque node counts the VM in ``resources_used`` only when
QEMU's parent is a subreaper (docs/batch/torque.md). ``etc/setup-node.sh`` starts libvirtd so:

    python -I -m vibatch.subreaper --detach --log /var/log/vibatch/libvirtd.log libvirtd

``--detach``: in a new session, stdin from /dev/null, stdout and stderr to ``--log`` (or
/dev/null), every other descriptor closed, and the caller returns at once. The subreaper ends
when the command ends, with its status; TERM, INT and HUP are passed on to the command.
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


def _detach(log: Optional[str]) -> None:
    """Fork; the parent leaves (the caller's wait ends), the child goes on in a session of its
    own with no descriptor of the caller's."""
    if os.fork():
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    out = null if log is None else os.open(
        log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))


def run(argv: Sequence[str], detach: bool = False, log: Optional[str] = None) -> int:
    if detach:
        _detach(log)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"vibatch subreaper: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    child = os.fork()
    if child == 0:
        try:
            os.execvpe(argv[0], list(argv), ENV)
        finally:
            os._exit(127)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: os.kill(child, n))
    while True:
        try:
            pid, status = os.wait()     # the command, or an orphan given to us
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status)


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
