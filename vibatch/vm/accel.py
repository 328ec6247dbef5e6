"""KVM or TCG, decided by a real probe and cached.

/dev/kvm existing proves little: in a nested setup a VM file descriptor can be created while a
real guest kernel hangs in early boot. So the probe boots a kernel from the image library under
``-accel kvm`` and waits for its first console line. The answer is cached in
``<state_dir>/accel.json`` against the host kernel, the QEMU binary and /dev/kvm, and is
re-probed when any of them changes. ``vm.acceleration: kvm|tcg`` in the config skips the probe.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import tempfile
import time
from typing import Callable, Optional

from ..hygiene import lift_limits  # noqa: F401 - the probe runs under it; adapters import it here
from ..util import atomic_write_json, read_json
from .emulator import QEMU

PROBE_TIMEOUT_S = 10.0
PROBE_MIN_AS = 2 << 30   # address space a probe QEMU needs to answer at all


def _probe_can_run() -> bool:
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    return hard == resource.RLIM_INFINITY or hard >= PROBE_MIN_AS


def _fingerprint(emulator: str) -> dict:
    def ident(path: str) -> Optional[list]:
        try:
            st = os.stat(path)
            return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_gid]
        except OSError:
            return None
    # vibatch's QEMU (the default emulator) is a wrapper: an upgrade changes the QEMU it runs
    return {"host_kernel": platform.release(), "emulator": ident(emulator),
            "qemu": ident(QEMU), "kvm": ident("/dev/kvm")}


def choose(setting: str, state_dir: str, emulator: str,
           probe_files: Callable[[], tuple[Optional[str], Optional[str]]]) -> str:
    """KVM or TCG. ``probe_files`` gives the (kernel, initrd) to probe with; it is called only
    when the cached answer does not apply."""
    if setting in ("kvm", "tcg"):
        return setting
    known = cached(state_dir, emulator)
    if known:
        return known["accel"]
    cache_path = os.path.join(state_dir, "accel.json")
    fp = _fingerprint(emulator)
    kernel, initrd = probe_files()
    accel, reason = probe(emulator, kernel, initrd)
    if not kernel or not _probe_can_run():
        return accel   # inconclusive (no kernel-boot image, or a memory cap we cannot lift):
                       # probe again next time
    atomic_write_json(cache_path, {"fingerprint": fp, "accel": accel, "reason": reason,
                                   "probed_at": time.time()})
    return accel


def cached(state_dir: str, emulator: str) -> Optional[dict]:
    """The cached probe's answer ({accel, reason, probed_at}) while it still applies, else None."""
    try:
        known = read_json(os.path.join(state_dir, "accel.json"))
    except ValueError:
        return None
    if isinstance(known, dict) and known.get("fingerprint") == _fingerprint(emulator):
        return known
    return None


def probe(emulator: str, kernel: Optional[str], initrd: Optional[str]) -> tuple[str, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is missing or not accessible"
    if not kernel:
        return "tcg", "no kernel-boot image in the library to probe KVM with"
    with tempfile.TemporaryDirectory(prefix="vibatch-accel-") as tmp:
        console = os.path.join(tmp, "console")
        argv = [emulator, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", f"file:{console}", "-kernel", kernel,
                "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
        if initrd:
            argv += ["-initrd", initrd]
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, cwd=tmp, preexec_fn=lift_limits)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if _console_has(console, b"Linux version"):
                    return "kvm", "a guest kernel booted under KVM"
                if child.poll() is not None:
                    err = child.stderr.read().decode(errors="replace").strip().splitlines()
                    return "tcg", "QEMU with KVM exited: " + (err[-1] if err else "no message")
                time.sleep(0.05)
            return "tcg", f"a guest kernel printed nothing under KVM within {PROBE_TIMEOUT_S:g} s"
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            child.stderr.close()


def _console_has(path: str, needle: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return needle in f.read()
    except FileNotFoundError:
        return False
