"""What the configured emulator does with the signals a batch system may send it.

Grid Engine's shepherd signals every process that carries a job's additional group id, QEMU
included (docs/batch/gridengine.md). SIGUSR2, its `qsub -notify` warning before a kill, would
end a stock QEMU 7.2 at once; vibatch's QEMU (``qemu/vibatch_qemu.c``, built by
``etc/setup-node.sh``) ignores it. ``ignored_signals`` starts the emulator with no machine,
reads which signals its process ignores, and ends it: ``vibatch doctor`` and the tests ask it.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from typing import Iterator

from ..errors import NodeError
from ..hygiene import lift_limits

QEMU = "/usr/bin/qemu-system-x86_64"     # what vibatch's QEMU runs (etc/setup-node.sh)

START_TIMEOUT_S = 10.0
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def signal_set(mask: str) -> set[int]:
    """The signals of a /proc/PID/status mask (``SigIgn:`` and the like)."""
    bits = int(mask, 16)
    return {n for n in range(1, 65) if bits >> (n - 1) & 1}


@contextlib.contextmanager
def running(emulator: str, timeout: float = START_TIMEOUT_S) -> Iterator[subprocess.Popen]:
    """``emulator`` with no machine, once QEMU's main loop runs (its QMP greeting: so the
    process has exec'd QEMU); QMP on the child's stdin and stdout. Ended on leaving."""
    argv = [emulator, "-machine", "none", "-nodefaults", "-no-user-config", "-display", "none",
            "-S", "-qmp", "stdio"]
    try:
        child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=ENV, cwd="/", preexec_fn=_as_libvirt)
    except OSError as e:
        raise NodeError(f"vm.emulator {emulator}: {e.strerror}") from e
    try:
        deadline = time.monotonic() + timeout
        greeting = b""
        while b"\n" not in greeting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeError(f"vm.emulator {emulator} gave no QMP greeting within "
                                f"{timeout:g} s")
            if not select.select([child.stdout], [], [], left)[0]:
                continue
            chunk = os.read(child.stdout.fileno(), 4096)
            if not chunk:
                ready = select.select([child.stderr], [], [], max(0.0, min(
                    1.0, deadline - time.monotonic())))[0]
                err = (os.read(child.stderr.fileno(), 4096) if ready else b"")
                lines = err.decode(errors="replace").strip().splitlines()
                raise NodeError(f"vm.emulator {emulator} exited: "
                                + (lines[-1] if lines else "no message"))
            greeting += chunk
        if not greeting.startswith(b'{"QMP"'):
            raise NodeError(f"vm.emulator {emulator} is not QEMU: no QMP greeting")
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            stream.close()


def _as_libvirt() -> None:
    """The child starts as libvirt starts an emulator: every signal we might have ignored at its
    default (libvirt resets them all), and no inherited limit that QEMU's setup would fail on."""
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    lift_limits()


def ignored_signals(emulator: str, timeout: float = START_TIMEOUT_S) -> set[int]:
    """The signals ``emulator``'s process ignores once QEMU runs (NodeError if it does not)."""
    with running(emulator, timeout) as child:
        with open(f"/proc/{child.pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return signal_set(line.split()[1])
    raise NodeError(f"/proc/{child.pid}/status has no SigIgn line")
