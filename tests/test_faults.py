"""Crash consistency on real VMs: one trial of every kind the fault-injection harness knows
(tests/faultharness.py; its long run is on demand, see docs/testing.md). Each trial kills,
stops or races the prologue, epilogue or reap at a named point or from outside, restarts
libvirtd, kills QEMU or makes the job directories unwritable, then checks that nothing is left
(domain, both job directories, slot, locks, QEMU and virtiofsd) and that the job has exactly
one accounting line if it ever got a slot."""
import random

import pytest

from conftest import SESSION
from faultharness import Harness, catalogue

pytestmark = pytest.mark.vm

TRIALS = catalogue(random.Random(15))


@pytest.fixture(scope="module")
def harness(vm_env):
    return Harness(vm_env.config_path, "vbt-alice", vm_env.workdir("faults"), f"{SESSION}-f")


@pytest.mark.parametrize("name,trial", TRIALS, ids=[n for n, _ in TRIALS])
def test_fault(harness, name, trial):
    try:
        problems = trial(harness)
    finally:
        harness.cleanup()
    assert problems == [], f"{name}: {problems}"
