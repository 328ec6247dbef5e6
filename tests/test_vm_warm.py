"""Warm start on real VMs (issue 10): jobs restored from a template under libvirt/QEMU.

One template of the test image (1 core, 256 MiB: the fault harness's shape, so its trials start
warm too) is built per module with `vibatch template build`, as an admin would; every template
the module made is removed at its end, so no other module's job starts warm.

- warm and cold give the same results for what `vibatch image test` checks (its own checks,
  run on a warm and on a cold job: user, cores, memory, shares, exit codes, signals, network
  none and nat), and the record says which start each was;
- every warm VM is a new machine: machine id, host name, clock, RNG output (also before
  vibatch's seed is written: the VM generation id alone), boot id, and a file one job wrote anywhere in its
  guest is not in the next one's; the template's files are never written;
- old state is not used: a replaced image's template, a truncated or corrupt state file;
- a restore that fails (QEMU dies in it; the prologue is killed in it) falls back to a boot,
  or fails as a node fault, with nothing left behind and one accounting line.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import IMAGE_BUILD, SESSION
from faultharness import Harness, trial_kill_prologue, wait_for
from vmhelp import (accounted, epilogue, exec_run, guest_root, leftovers, prologue,
                    templates_made_here, variant, warm_template)

pytestmark = pytest.mark.vm

MEM = 256                       # MiB: the harness's prologues ask for 256M
SHAPE = ("--cores", "1", "--memory", f"{MEM}M")
NAT_BRIDGE, NAT_SUBNET = f"vbtw{os.getpid() % 1000}", "10.214.78.0/24"


def build(vm_env, image="testguest", memory=MEM):
    """`vibatch template build IMAGE --cores 1 --memory M`: the template it made (or had)."""
    from vibatch.vm import template
    r = vm_env.run("template", "build", image, "--cores", "1", "--memory", str(memory),
                   timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.match(r"template ([0-9a-f]{16}): ", r.stdout)
    assert m, r.stdout
    t = template.load(vm_env.cfg, m.group(1))
    assert t is not None and template.why_unusable(t, None) is None
    return t


def listed(vm_env) -> dict:
    r = vm_env.run("template", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {row["id"]: row for row in json.loads(r.stdout)}


def snapshot(t) -> dict:
    """Each file of the template: sha256, size, mtime, mode, owner (sockets: lstat only)."""
    out = {}
    for name in sorted(os.listdir(t.dir)):
        path = os.path.join(t.dir, name)
        st = os.lstat(path)
        digest = None
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out[name] = (digest, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid)
    return out


AS_BUILT = {}


@pytest.fixture(scope="module", autouse=True)
def _templates_removed(vm_env):
    """Every template this module makes (the fixtures' and the tests' own) goes after it."""
    with templates_made_here(vm_env):
        yield


@pytest.fixture(scope="module")
def warm(vm_env):
    """The module's template; every template is removed after the module."""
    from vibatch.vm import template
    with warm_template(vm_env, "testguest", 1, MEM) as tid:
        t = template.load(vm_env.cfg, tid)
        AS_BUILT[t.id] = snapshot(t)    # every later test's jobs must leave it so
        yield t


@pytest.fixture(scope="module")
def harness(vm_env, warm):
    return Harness(vm_env.config_path, "vbt-alice", vm_env.workdir("warm-harness"),
                   f"{SESSION}-w")


def up(vm_env, job, *args, config=None):
    r = prologue(vm_env, job, config=config, args=SHAPE + args)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(vm_env.cfg.state_dir, "jobs", job, "state.json")) as f:
        return json.load(f)


def down(vm_env, job, config=None):
    e = epilogue(vm_env, job, config=config)
    assert e.returncode == 0, e.stderr
    assert leftovers(vm_env, job) == []
    [rec] = accounted(vm_env, job)
    return rec


# --- warm and cold alike ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def nat(vm_env):
    """A config with NAT networking on a bridge of this module's; its rules removed after."""
    path = variant(vm_env, "warm-nat", {"vm": {"network": "nat"},
                                        "network": {"nat_bridge": NAT_BRIDGE,
                                                    "nat_subnet": NAT_SUBNET}})
    yield path
    from vibatch import config
    from vibatch.core.lifecycle import qemu_ids
    from vibatch.vm import network
    cfg = config.load(path)
    network.remove(cfg, qemu_ids(cfg)[0])


def image_test_checks(cfg_path, tracker, cold, tag):
    """`vibatch image test`'s checks (imagetest._in_guest, unchanged) on one job of ours."""
    from vibatch import config
    from vibatch.commands import imagetest
    from vibatch.core import lifecycle
    from vibatch.core.request import make_request, resolve_user
    cfg = config.load(cfg_path)
    node = lifecycle.Node(cfg)
    job = tracker.job_id(tag + ("c" if cold else "w"))   # ids unique across parameters
    work = tracker.env.workdir(job)
    checks = []

    def check(name, fn, warn_only=False):
        ok, detail = fn()
        checks.append((name, ok, detail.replace(job, "JOB").replace(work, "WORK")))
        return ok
    try:
        state = lifecycle.prologue(node, make_request(job, "vbt-alice", 1, MEM, "testguest",
                                                      work), cold=cold)
        imagetest._in_guest(node, job, resolve_user("vbt-alice"), work, 1, MEM, state, check)
        rec = lifecycle.epilogue(node, job, 0)
    finally:
        node.close()
    return state, rec, checks


@pytest.mark.parametrize("net", ["none", "nat"])
def test_warm_and_cold_pass_the_same_image_checks(vm_env, tracker, warm, nat, net):
    cfg_path = nat if net == "nat" else vm_env.config_path
    got = {}
    for start in ("warm", "cold"):
        state, rec, checks = image_test_checks(cfg_path, tracker, start == "cold", net)
        assert state.start == rec["start"] == start, (state.start, rec["start"])
        assert rec["template"] == (warm.id if start == "warm" else None)
        assert ("restore" in rec["phases"]) == (start == "warm")
        assert ("boot" in rec["phases"]) == (start == "cold")
        got[start] = checks
    timing = "time to ready"
    for start, checks in got.items():
        failed = [c for c in checks if not c[1] and not c[0].startswith("the job user cannot")]
        assert failed == [], (start, failed)
        assert any(name.startswith("network matches") for name, _, _ in checks)
    # the same checks, the same outcome and the same details (but for the timings)
    assert [c for c in got["warm"] if c[0] != timing] == [c for c in got["cold"] if c[0] != timing]


# --- a new machine each time -----------------------------------------------------------------
PROBE = ('echo "machine_id=$(cat /etc/machine-id)"; '
         'echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"; echo "hostname=$(hostname)"; '
         'echo "rng=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d " ")"')
PLACES = ("/", "/root", "/etc", "/var/lib/vbt", "/var/tmp", "/tmp", "/home", "/usr/local")
BAKED_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def with_machine_id(vm_env, warm):
    """The test image has no /etc/machine-id (and the guest setup only replaces one that is
    there), so: an image of it with one, written in a cold job's guest, synced, and that job's
    disk flattened into a new image, warmmid; and a template of it."""
    from vibatch.core import lifecycle
    from vibatch.core.jobdir import JobPaths
    from vibatch.core.request import make_request
    job, disk = f"{SESSION}-mkmid", os.path.join(vm_env.base, "warmmid.qcow2")
    node = lifecycle.Node(vm_env.cfg)
    try:
        lifecycle.prologue(node, make_request(job, "vbt-alice", 1, MEM, "testguest",
                                              vm_env.workdir(job)), cold=True)
        st, _, err = guest_root(vm_env, job, f"echo {BAKED_ID} > /etc/machine-id && sync")
        assert st == 0, err
        subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2",
                        JobPaths.of(vm_env.cfg, job).overlay, disk], check=True, timeout=120)
    finally:
        lifecycle.epilogue(node, job, 0)
        node.close()
    _add(vm_env, disk, "warmmid")
    t = build(vm_env, "warmmid")
    AS_BUILT[t.id] = snapshot(t)
    return t


def test_every_warm_vm_is_a_new_machine(vm_env, tracker, with_machine_id, harness):
    """Two warm jobs of one template, the second started while the first runs. Each is stopped
    before its guest setup (the harness's SIGSTOP at the `booted` point) to read its RNG before
    vibatch writes its own seed: what separates them then is the VM generation id's reseed.
    There its clock is also set an hour back; once set up, it is the host's."""
    from vibatch.vm.guestsetup import host_name
    t = with_machine_id
    a, b = tracker.job_id("a"), tracker.job_id("b")
    seen, behind = {}, {}
    for job in (a, b):
        p = harness.popen("prologue", "--job", job, "--user", harness.user, *SHAPE,
                          "--workdir", harness.workdir, "--image", "warmmid", armed="booted",
                          action="SIGSTOP")
        wait_for(lambda: harness.stopped(p) or p.poll() is not None, 60, "prologue at booted")
        # and its clock an hour late, as a template's is under KVM (kvmclock resumes where it
        # was saved; under TCG the guest's TSC has moved on, and its clock with it)
        st, early, err = guest_root(vm_env, job, 'head -c 16 /dev/urandom | od -An -tx1; '
                                    'date -u -s "@$1" >/dev/null; date +%s', str(int(time.time()) - 3600))
        assert st == 0, err
        early, late_clock = early.rsplit("\n", 2)[:2]
        behind[job] = time.time() - int(late_clock)
        os.kill(p.pid, signal.SIGCONT)
        rc, _, err = harness.run(p)
        assert rc == 0, err
        assert harness.state(job)["template"] == t.id
        st, out, err = guest_root(vm_env, job, PROBE + '; echo "clock=$(date +%s)"')
        now = time.time()
        assert st == 0, err
        seen[job] = dict(line.split("=", 1) for line in out.splitlines())
        # the guest setup set the clock: within a second (busybox's date sets whole seconds)
        assert -1.5 < now - int(seen[job].pop("clock")) < 1.5, (job, now, out)
        seen[job]["early_rng"] = early.split()
        assert seen[job]["hostname"] == host_name(socket.gethostname(), job)
        assert seen[job]["machine_id"] not in ("", BAKED_ID)
        if job == a:   # a leaves a file everywhere it can write, on disk (synced) and in tmpfs
            st, _, err = guest_root(vm_env, a, 'for d in "$@"; do mkdir -p "$d" && echo a > '
                                    '"$d/vbt-left-by-a" || exit 1; done; sync', *PLACES)
            assert st == 0, err
    st, out, err = guest_root(vm_env, b, 'for d in "$@"; do [ ! -e "$d/vbt-left-by-a" ] || '
                              'echo "$d"; done', *PLACES)
    assert st == 0 and out == "", (out, err)
    for key in ("early_rng", "machine_id", "boot_id", "hostname", "rng"):
        assert seen[a][key] != seen[b][key], key
    assert all(3590 < late < 3610 for late in behind.values()), behind
    for job in (a, b):
        assert down(vm_env, job)["start"] == "warm"
    assert snapshot(t) == AS_BUILT[t.id]        # no job wrote to the template


# --- old state is not used -------------------------------------------------------------------
def _converted(vm_env, name, cluster):
    """The test image's disk rewritten with another qcow2 cluster size: the same guest, other
    bytes, so another digest."""
    out = os.path.join(vm_env.base, f"{name}.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", "-o", f"cluster_size={cluster}",
                    os.path.join(IMAGE_BUILD, "disk.qcow2"), out], check=True, timeout=120)
    return out


ADDED = set()     # images this module added to the session's library: removed at its end


@pytest.fixture(scope="module", autouse=True)
def added_images_removed(vm_env):
    yield
    for name in sorted(ADDED):
        r = vm_env.run("image", "remove", name, "--force")
        assert r.returncode == 0, r.stderr


def _add(vm_env, disk, name, replace=False):
    from vibatch.images.library import Library
    ADDED.add(name)
    with open(os.path.join(IMAGE_BUILD, "cmdline")) as f:
        cmdline = f.read().strip()
    return Library(vm_env.cfg.library_dir, vm_env.cfg.state_dir).add(
        disk, name=name, os_name="vbguest", os_version="test",
        kernel=os.path.join(IMAGE_BUILD, "vmlinux"), initrd=os.path.join(IMAGE_BUILD, "initrd.cpio"),
        cmdline=cmdline, replace=replace)


def test_a_replaced_image_is_not_restored(vm_env, tracker, warm):
    old = _add(vm_env, _converted(vm_env, "repl1", "128k"), "warmrepl")
    t = build(vm_env, "warmrepl")
    assert t.id != warm.id and t.meta["key"]["image_digest"] == old.digest
    job = tracker.job_id()
    assert up(vm_env, job, "--image", "warmrepl")["start"] == "warm"
    assert down(vm_env, job)["template"] == t.id
    new = _add(vm_env, _converted(vm_env, "repl2", "256k"), "warmrepl", replace=True)
    assert new.digest != old.digest
    assert listed(vm_env)[t.id]["state"] == "outdated: its image is no longer in the library"
    job = tracker.job_id()
    assert up(vm_env, job, "--image", "warmrepl")["start"] == "cold"
    rec = down(vm_env, job)
    assert rec["start"] == "cold" and rec["image_digest"] == new.digest


@pytest.fixture
def spare(vm_env, warm):
    """A template of another shape (384 MiB) to damage; rebuilt whenever it is unusable."""
    return build(vm_env, memory=384)


def _damage(t, how):
    """Damage the template's state file; returns how to undo it (None: cannot)."""
    from vibatch.vm.hypervisor import SavedState
    saved = SavedState(t.saved)
    if how == "truncated":
        os.truncate(t.saved, saved.stream_at + (saved.size - saved.stream_at) // 2)
        return None
    at = 0 if how == "header" else saved.stream_at      # libvirt's magic, or QEMU's ("QEVM")
    fd = os.open(t.saved, os.O_RDWR)
    try:
        before = os.pread(fd, 4, at)
        os.pwrite(fd, b"\xde\xad\xbe\xef", at)
    finally:
        os.close(fd)

    def undo():
        fd = os.open(t.saved, os.O_RDWR)
        try:
            os.pwrite(fd, before, at)
        finally:
            os.close(fd)
    return undo


@pytest.mark.parametrize("how", ["header", "stream", "truncated"])
def test_a_damaged_state_file_gives_a_cold_start(vm_env, tracker, spare, how):
    undo = _damage(spare, how)
    job = tracker.job_id(how)
    try:
        state = listed(vm_env)[spare.id]["state"]
        if how == "truncated":    # seen before any restore: never tried
            assert state.startswith("damaged: state.save has "), state
        else:                     # same size: found when libvirt (or we) read it
            assert state == "ready"
        st = up(vm_env, job, "--memory", "384M")
        assert st["start"] == "cold" and st.get("template") is None
        assert exec_run(vm_env, job, "true")[0] == 0
        rec = down(vm_env, job)
        assert rec["start"] == "cold" and "boot" in rec["phases"]
        assert ("restore" in rec["phases"]) == (how != "truncated")  # the failed try's time
        if how != "truncated":    # marked by the failed restore: no later job tries it again
            state = listed(vm_env)[spare.id]["state"]
            assert state.startswith("failed: ") and state.endswith("(template sync rebuilds it)"), \
                state
            again = tracker.job_id(how + "again")
            assert up(vm_env, again, "--memory", "384M")["start"] == "cold"
            assert "restore" not in down(vm_env, again)["phases"]
    finally:
        if undo:
            undo()


# --- failures --------------------------------------------------------------------------------
@pytest.mark.parametrize("boot", ["works", "dies too"])
def test_qemu_dying_in_the_restore_falls_back_to_a_boot(vm_env, tracker, harness, boot):
    """QEMU is killed right after libvirt restored it (the prologue stopped at the `domain`
    point): the prologue destroys what is left and boots instead (stopping at the same point
    of the boot). If that VM's QEMU dies too, the prologue fails as a node fault (21) and
    leaves nothing; else the job works. Either way one record, start cold."""
    job = tracker.job_id(boot[0])
    p = harness.prologue(job, armed="domain", action="SIGSTOP")
    for start in ("warm", "cold"):
        wait_for(lambda: (harness.stopped(p) and harness.state(job).get("start") == start)
                 or p.poll() is not None, 60, f"the prologue at domain ({start})")
        assert p.poll() is None, harness.run(p)
        pid = harness.domain_pid(job)
        assert pid, f"no QEMU for the {start} domain"
        if start == "warm" or boot == "dies too":
            os.kill(pid, signal.SIGKILL)
        os.kill(p.pid, signal.SIGCONT)
    rc, _, err = harness.run(p)
    if boot == "works":
        assert rc == 0, err
        assert exec_run(vm_env, job, "true")[0] == 0
        rec = down(vm_env, job)
    else:
        assert rc == 21 and "the VM stopped while booting" in err, (rc, err)
        assert leftovers(vm_env, job) == [] and harness.leftovers(job) == []
        [rec] = accounted(vm_env, job)
    assert rec["start"] == "cold" and rec["template"] is None
    assert "restore" in rec["phases"] or boot == "dies too"


@pytest.mark.parametrize("point, then", [("domain", "epilogue"), ("booted", "reap")])
def test_a_warm_prologue_killed_leaves_nothing(vm_env, harness, point, then):
    before = harness.n
    problems = trial_kill_prologue(harness, point, then)
    harness.cleanup()
    assert problems == []
    job = f"{harness.prefix}-{before + 1}kp"
    assert [r["start"] for r in harness.records(job)] == ["warm"]
