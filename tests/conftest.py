"""Shared fixtures.

Unit tests need nothing. Tests marked ``vm`` boot real guests under libvirt: they need root,
a running libvirtd and the test image built by etc/setup-node.sh. Every VM test works in its own
config (state, run and library directories of its own), uses job ids with a per-session prefix,
and the ``tracker`` destroys every domain and removes every directory it created, even when a
test fails; on failure it first prints the guest's console.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_BUILD = os.environ.get("VIBATCH_IMAGE_BUILD", "/var/lib/vibatch/build/testguest")
TEST_USERS = {"vbt-alice": 23401, "vbt-bob": 23402}
SESSION = f"t{os.getpid()}"


# Markers (pyproject.toml; --strict-markers): a test that uses one of these fixtures is marked
# by it, so the fast suite, pytest -m "not vm and not cluster", never reaches one.
VM_FIXTURES = {"vm_env"}                                # tracker and the daemons use it too
# Slurm, Grid Engine, the pbs_mom harness (every test of it has torque_user), condor_starter's
CLUSTER_FIXTURES = {"cluster", "sge", "mom", "torque_user", "condor"}


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden files")


@pytest.hookimpl(tryfirst=True)    # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & VM_FIXTURES:
            item.add_marker(pytest.mark.vm)
        if used & CLUSTER_FIXTURES:
            item.add_marker(pytest.mark.cluster)


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        item.failed_call = True


@pytest.fixture(scope="session", autouse=True)
def _no_io_mounts_left(tmp_path_factory):
    """Each job's I/O folder is a tmpfs (jobdir.JobPaths.create). A test that makes job
    directories in its own tmp_path and leaves them to pytest would leave those mounts (and
    pytest could not remove its temporary directories): detach whatever is left under them."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.startswith("vibatch-io ")]
    for mnt in left:
        if mnt.startswith((base + "/", "/var/tmp/vibatch-tests/" + SESSION + "/")):
            subprocess.run(["umount", "--lazy", mnt], check=False, capture_output=True)


def vibatch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vibatch", *args]


@dataclass
class VmEnv:
    base: str
    config_path: str
    cfg: object
    users: dict
    env: dict = field(default_factory=dict)

    def workdir(self, name: str, user: str = "vbt-alice") -> str:
        path = os.path.join(self.base, "work", name)
        os.makedirs(path, exist_ok=True)
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def run(self, *args: str, user: str | None = None, timeout: float = 120, **kw):
        argv = vibatch_cmd(*args)
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        return subprocess.run(argv, env={**os.environ, **self.env, **kw.pop("env", {})},
                              capture_output=True, text=True, timeout=timeout, **kw)


def _ensure_user(name: str, uid: int) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-M", "-u", str(uid), "-U", "-d", "/nonexistent", "-s",
                        "/bin/sh", name], check=True)


@pytest.fixture(scope="session")
def vm_env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("VM tests need root")
    if not os.path.exists(os.path.join(IMAGE_BUILD, "disk.qcow2")):
        pytest.fail(f"test image not built in {IMAGE_BUILD}: run etc/setup-node.sh first")
    from vibatch import config
    from vibatch.images.library import Library

    base = f"/var/tmp/vibatch-tests/{SESSION}"
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(os.path.join(base, "work"))
    for d in ("/var/tmp/vibatch-tests", base, os.path.join(base, "work")):
        os.chmod(d, 0o755)
    for name, uid in TEST_USERS.items():
        _ensure_user(name, uid)
    data = {
        "state_dir": f"{base}/state", "run_dir": f"/run/vibatch-{SESSION}",
        "library_dir": f"{base}/images", "accounting_file": f"{base}/accounting.jsonl",
        "images": {"default": "testguest"}, "lock_timeout_s": 10,
        "host": {"reserved_cpus": [], "reserved_memory_mb": 1024},
        "vm": {"boot_timeout_s": 60, "acceleration": "auto"},
    }
    config_path = os.path.join(base, "vibatch.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(data, f)
    os.chmod(config_path, 0o644)
    cfg = config.load(config_path)
    os.makedirs(cfg.state_dir, exist_ok=True)
    lib = Library(cfg.library_dir, cfg.state_dir)
    with open(os.path.join(IMAGE_BUILD, "cmdline")) as f:
        cmdline = f.read().strip()
    lib.add(os.path.join(IMAGE_BUILD, "disk.qcow2"), name="testguest", os_name="vbguest",
            os_version="test", kernel=os.path.join(IMAGE_BUILD, "vmlinux"),
            initrd=os.path.join(IMAGE_BUILD, "initrd.cpio"), cmdline=cmdline)
    # an image whose guest never answers: the kernel finds no init and panics
    lib.add(os.path.join(IMAGE_BUILD, "disk.qcow2"), name="silent", os_name="vbguest",
            os_version="test", kernel=os.path.join(IMAGE_BUILD, "vmlinux"),
            initrd=os.path.join(IMAGE_BUILD, "initrd.cpio"),
            cmdline="console=ttyS0 rdinit=/no/such/init root=/dev/nonexistent panic=0")
    env = VmEnv(base, config_path, cfg, dict(TEST_USERS), env={"VIBATCH_CONFIG": config_path})
    yield env
    _cleanup_all(cfg)
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    for name in TEST_USERS:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def _cleanup_all(cfg) -> None:
    from vibatch.vm import hypervisor
    conn = hypervisor.connect(cfg.libvirt_uri)
    try:
        for name in hypervisor.list_names(conn, "vibatch-" + SESSION):
            dom = hypervisor.lookup(conn, name)
            if dom is not None:
                hypervisor.destroy(dom)
    finally:
        conn.close()


class Tracker:
    """Records every job a test starts; tears each down however the test ended."""

    def __init__(self, env: VmEnv, test_name: str):
        self.env, self.jobs = env, []
        self.prefix = f"{SESSION}-{test_name[:20].replace('_', '')}"

    def job_id(self, suffix: str = "") -> str:
        job = f"{self.prefix}{len(self.jobs)}{suffix}"
        self.jobs.append(job)
        return job

    def node(self):
        from vibatch.core.lifecycle import Node
        return Node(self.env.cfg)

    def teardown(self, failed: bool) -> None:
        from vibatch.core import lifecycle
        from vibatch.core.jobdir import JobPaths, console_tail
        node = self.node()
        try:
            for job in self.jobs:
                paths = JobPaths.of(self.env.cfg, job)
                if failed and os.path.exists(paths.console):
                    print(f"--- console of {job} ---\n{console_tail(paths.console, 60)}")
                try:
                    lifecycle.epilogue(node, job)
                except Exception as e:  # noqa: BLE001 - teardown goes on; the test reported
                    print(f"teardown of {job}: {e}")
        finally:
            node.close()


@pytest.fixture
def tracker(vm_env, request):
    t = Tracker(vm_env, request.node.name)
    yield t
    t.teardown(getattr(request.node, "failed_call", False))
