#!/usr/bin/env python3
"""Run a command as a child subreaper (prctl PR_SET_CHILD_SUBREAPER), reaping every orphan
reparented to it at once, as systemd does on a real node.

libvirtd daemonizes QEMU (a double fork), so an exited QEMU is reaped by the nearest subreaper
above libvirtd, or by PID 1; in this sandbox PID 1 reaps late, and libvirt's destroy waits for
it (the epilogue's 1.2–2 s, docs/benchmarks.md). For benchmarks: start libvirtd under it, in the
foreground, with no inherited descriptors:

    python3 -I bench/subreaper.py libvirtd

It ends when the command ends (with its status); signals it gets are passed on to the command.
"""
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    if len(sys.argv) < 2:
        sys.exit("usage: subreaper.py COMMAND [ARGS...]")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    child = os.fork()
    if child == 0:
        try:
            os.execvp(sys.argv[1], sys.argv[1:])
        finally:
            os._exit(127)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: os.kill(child, n))
    while True:
        try:
            pid, status = os.wait()     # any child: the command or an orphan given to us
        except ChildProcessError:
            return 0
        if pid == child:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
