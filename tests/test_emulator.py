"""vibatch's QEMU (qemu/vibatch_qemu.c), built here from the source as etc/setup-node.sh builds
it, run against Debian's real QEMU with no machine (no guest; a fraction of a second each).

Grid Engine's shepherd sends a job's `qsub -notify` warning, SIGUSR2, also to QEMU, which
carries the job's group for accounting (docs/batch/gridengine.md). First the attack: a stock
QEMU dies of it. Then the wrapper's QEMU ignores it and goes on answering, and is otherwise
the same QEMU. The real Grid Engine test (test_batch_gridengine.py, -notify) runs the whole path.
"""
import json
import os
import select
import signal
import subprocess

import pytest

from vibatch import config
from vibatch.commands import doctor
from vibatch.errors import NodeError
from vibatch.vm import emulator
from vibatch.vm.emulator import QEMU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(out: str, target: str = QEMU) -> str:
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", f'-DVIBATCH_QEMU="{target}"',
                    "-o", out, os.path.join(REPO, "qemu", "vibatch_qemu.c")],
                   check=True, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    return out


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    d = tmp_path_factory.mktemp("qemu")
    os.chmod(d, 0o755)
    return build(str(d / "vibatch-qemu"))


def qmp(child, command: str) -> dict:
    """One QMP command and its answer (events skipped), within 10 s."""
    child.stdin.write(json.dumps({"execute": command}).encode() + b"\n")
    child.stdin.flush()
    while True:
        assert select.select([child.stdout], [], [], 10)[0], f"no answer to {command}"
        msg = json.loads(child.stdout.readline())
        if "event" not in msg:
            return msg


def test_signal_masks_are_read_as_the_kernel_writes_them():
    assert emulator.signal_set("0000000000000000") == set()
    assert emulator.signal_set("0000000000001800") == {signal.SIGUSR2, signal.SIGPIPE}
    assert emulator.signal_set("8000000000000001") == {1, 64}


def test_a_stock_qemu_dies_of_sigusr2_and_vibatchs_ignores_it(wrapper):
    assert signal.SIGUSR2 not in emulator.ignored_signals(QEMU)
    # the probe starts it as libvirt does, every signal at its default: an ignored SIGUSR2 of
    # the caller's (doctor run from such a shell) does not make a stock QEMU pass
    old = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        assert signal.SIGUSR2 not in emulator.ignored_signals(QEMU)
    finally:
        signal.signal(signal.SIGUSR2, old)
    with emulator.running(QEMU) as child:          # the attack: Grid Engine's -notify warning
        os.kill(child.pid, signal.SIGUSR2)
        assert child.wait(timeout=10) == -signal.SIGUSR2
    assert signal.SIGUSR2 in emulator.ignored_signals(wrapper)
    with emulator.running(wrapper) as child:
        assert os.readlink(f"/proc/{child.pid}/exe") == QEMU       # exec'd, the same pid
        assert qmp(child, "qmp_capabilities") == {"return": {}}
        os.kill(child.pid, signal.SIGUSR2)
        assert qmp(child, "query-status")["return"]["status"] == "prelaunch"  # still answers
        assert child.poll() is None


def test_the_wrapper_passes_its_arguments_and_leaves_sigusr1_to_qemu(wrapper):
    env = {"PATH": "/usr/bin:/bin"}
    stock = subprocess.run([QEMU, "-version"], capture_output=True, env=env, timeout=30)
    ours = subprocess.run([wrapper, "-version"], capture_output=True, env=env, timeout=30)
    assert ours.returncode == stock.returncode == 0 and ours.stdout == stock.stdout
    # QEMU names itself by argv[0] in its errors (libvirt's logs show them): the same name
    stock = subprocess.run([QEMU, "-bogus"], capture_output=True, env=env, timeout=30)
    ours = subprocess.run([wrapper, "-bogus"], capture_output=True, env=env, timeout=30)
    assert ours.returncode == stock.returncode != 0 and ours.stderr == stock.stderr
    assert stock.stderr.startswith(b"qemu-system-x86_64: -bogus")
    # SIGUSR1 is QEMU's own (blocked; its vCPU kick under KVM): not made ignored by the wrapper
    assert (signal.SIGUSR1 in emulator.ignored_signals(wrapper)) == (
        signal.SIGUSR1 in emulator.ignored_signals(QEMU))


def test_a_wrapper_whose_qemu_is_missing_says_so(tmp_path):
    bad = build(str(tmp_path / "vibatch-qemu"), str(tmp_path / "no-qemu"))
    r = subprocess.run([bad, "-version"], capture_output=True, text=True, env={}, timeout=30)
    assert r.returncode == 127 and f"cannot run {tmp_path}/no-qemu" in r.stderr
    with pytest.raises(NodeError, match="exited: vibatch-qemu: cannot run"):
        emulator.ignored_signals(bad)
    liar = tmp_path / "liar"                   # one line on stdout is not QEMU
    liar.write_text("#!/bin/sh\necho hello; sleep 30\n")
    os.chmod(liar, 0o755)
    with pytest.raises(NodeError, match="is not QEMU"):
        emulator.ignored_signals(str(liar))


def test_doctor_checks_the_emulator_by_running_it(wrapper, tmp_path):
    cfg = config.parse({"vm": {"emulator": wrapper}}, "test")
    expect = doctor.PASS if os.geteuid() == 0 else doctor.FAIL   # root-owned, as built here
    assert doctor._emulator(cfg).level == expect
    c = doctor._emulator(config.parse({"vm": {"emulator": QEMU}}, "test"))
    assert c.level == doctor.WARN and "ended by SIGUSR2" in c.detail
    assert config.VIBATCH_QEMU in c.fix
    os.chmod(wrapper, 0o777)
    try:
        c = doctor._emulator(cfg)
        assert c.level == doctor.FAIL and "only root may change it" in c.detail
    finally:
        os.chmod(wrapper, 0o755)
    c = doctor._emulator(config.parse({"vm": {"emulator": str(tmp_path / "none")}}, "test"))
    assert c.level == doctor.FAIL and "vm.emulator" in c.detail
