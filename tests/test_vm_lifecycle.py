"""Prologue and epilogue on real VMs: resources, pinning, the memory cap, failures, cleanup."""
import json
import os
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import SESSION, vibatch_cmd
from vmhelp import (wait_until, epilogue, exec_popen, exec_run, leftovers, prologue, read_line, variant)

pytestmark = pytest.mark.vm


def _qemu_threads_cpus(job):
    """Cpus_allowed_list of every thread of the job's QEMU, read from /proc."""
    with open(f"/run/libvirt/qemu/vibatch-{job}.pid") as f:
        pid = int(f.read())
    cpus = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        cpus.add(line.split()[1])
    return cpus


def _domain_exists(conn, job):
    return ("vibatch-" + job) in [d.name() for d in conn.listAllDomains()]


def test_two_jobs_at_once_get_disjoint_pinned_cpus(vm_env, tracker):
    import libvirt
    jobs = [tracker.job_id("a"), tracker.job_id("b")]
    results = {}
    threads = [threading.Thread(target=lambda j=j: results.__setitem__(j, prologue(vm_env, j)))
               for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert all(results[j].returncode == 0 for j in jobs), [results[j].stderr for j in jobs]
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    pins = {}
    for j in jobs:
        dom = conn.lookupByName("vibatch-" + j)
        vcpu = [i for i, on in enumerate(dom.vcpuPinInfo(0)[0]) if on]
        emu = [i for i, on in enumerate(dom.emulatorPinInfo(0)) if on]
        assert vcpu == emu and len(vcpu) == 1
        threads_cpus = _qemu_threads_cpus(j)
        assert threads_cpus == {str(vcpu[0])}, threads_cpus   # every QEMU thread on the pin
        pins[j] = vcpu[0]
    conn.close()
    assert pins[jobs[0]] != pins[jobs[1]]
    for j in jobs:   # and each job's guest sees one CPU
        rc, out, _ = exec_run(vm_env, j, "nproc", cwd="/")
        assert rc == 0 and out.strip() == "1"


def test_multi_core_job_and_exact_cpus(vm_env, tracker):
    import libvirt
    job = tracker.job_id()
    r = prologue(vm_env, job, args=("--cpus", "0-1", "--memory", "700M"))
    assert r.returncode == 0, r.stderr
    rc, out, _ = exec_run(vm_env, job, "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
    nproc, mem = out.splitlines()
    assert rc == 0 and nproc == "2" and 600 < int(mem.split()[1]) / 1024 <= 700
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    dom = conn.lookupByName("vibatch-" + job)
    assert [[i for i, on in enumerate(m) if on] for m in dom.vcpuPinInfo(0)] == [[0], [1]]
    conn.close()


def test_memory_cap_is_set_and_enforced(vm_env, tracker):
    import libvirt
    cfg = variant(vm_env, "lowcap", {"vm": {"memory_overhead_mb": 64, "tcg_tb_cache_mb": 16}})
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg, args=("--memory", "512M"))
    assert r.returncode == 0, r.stderr
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    dom = conn.lookupByName("vibatch-" + job)
    assert dom.memoryParameters(0)["hard_limit"] == (512 + 64) * 1024
    # The guest's own OOM killer acts first while guest + QEMU stay under 576 MiB, so lower the
    # same live cgroup limit under what the guest is about to touch: the host must kill QEMU.
    dom.setMemoryParameters({libvirt.VIR_DOMAIN_MEMORY_HARD_LIMIT: 256 * 1024},
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
    rc, _, err = exec_run(vm_env, job, "sh", "-c",
                          "awk 'BEGIN { s = \"xxxxxxxxxxxxxxxx\"; while (1) s = s s }'")
    assert rc == 125 and "VM" in err
    assert wait_until(lambda: not _domain_exists(conn, job), timeout=30)  # OOM-killed: gone
    conn.close()
    e = epilogue(vm_env, job, config=cfg)
    assert e.returncode == 0, e.stderr
    assert leftovers(vm_env, job) == []
    rec = [json.loads(x) for x in open(vm_env.cfg.accounting_file)]
    assert [x["vm_end"] for x in rec if x["job_id"] == job] == ["gone"]


def test_epilogue_after_sigkilled_forwarder(vm_env, tracker):
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    p = exec_popen(vm_env, job, "sh", "-c", "echo ready; sleep 300")
    assert read_line(p.stdout, timeout=20) == b"ready\n"
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    e = epilogue(vm_env, job)
    assert e.returncode == 0, e.stderr
    assert leftovers(vm_env, job) == []


def test_epilogue_is_idempotent_and_accounts_once(vm_env, tracker):
    job = tracker.job_id()
    assert prologue(vm_env, job, args=("--memory", "300M")).returncode == 0
    assert exec_run(vm_env, job, "sh", "-c", "exit 7")[0] == 7
    for _ in range(2):
        e = epilogue(vm_env, job)
        assert e.returncode == 0 and e.stdout == ""
    assert leftovers(vm_env, job) == []
    recs = [json.loads(x) for x in open(vm_env.cfg.accounting_file) if job in x]
    assert len(recs) == 1
    rec = recs[0]
    assert rec["exit_code"] == 7 and rec["user"] == "vbt-alice" and rec["memory_mb"] == 300
    assert rec["image"] == "testguest" and rec["image_digest"].startswith("sha512:")
    assert rec["cores"] == 1 and len(rec["cpus"]) == 1 and rec["vm_cpu_time_s"] > 0
    assert set(rec["phases"]) == {"claim", "image_check", "clone", "shares", "domain_start", "boot",
                                  "guest_setup", "epilogue"}


def test_epilogue_with_nothing_to_clean(vm_env):
    e = epilogue(vm_env, f"{SESSION}-never-started")
    assert e.returncode == 0 and e.stderr == ""


def _jobs_dirs(cfg):
    return [sorted(os.listdir(d)) if os.path.isdir(d) else []
            for d in (os.path.join(cfg.state_dir, "jobs"), os.path.join(cfg.run_dir, "jobs"))]


@pytest.mark.parametrize("case, args, user, code, message", [
    ("image", ("--image", "no-such-os"), "vbt-alice", 11, "unknown image or OS 'no-such-os'; you may ask for: "),
    ("cores", ("--cores", "64"), "vbt-alice", 12, "64 cores requested; this node gives jobs at most"),
    ("memory", ("--memory", "4T"), "vbt-alice", 12, "MiB requested; this node gives jobs at most"),
    ("user", (), "no-such-user-xyz", 14, "user 'no-such-user-xyz' does not exist"),
    ("rootuser", (), "root", 14, "vibatch never runs a job as root"),
])
def test_bad_requests_leave_nothing_behind(vm_env, tracker, case, args, user, code, message):
    job = tracker.job_id()
    before = _jobs_dirs(vm_env.cfg)
    r = prologue(vm_env, job, user=user, workdir=vm_env.workdir(case), args=args)
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr
    assert leftovers(vm_env, job) == [] and _jobs_dirs(vm_env.cfg) == before


@pytest.mark.parametrize("job", ["a/b", "..", "x..y", "bad\x01id", "line\nbreak"])
def test_bad_job_ids_leave_nothing_behind(vm_env, job):
    before = _jobs_dirs(vm_env.cfg)
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "prologue", "--job", job,
                                   "--user", "vbt-alice", "--workdir", vm_env.workdir("badid")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 13 and "invalid job id" in r.stderr
    assert _jobs_dirs(vm_env.cfg) == before
    e = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "epilogue", "--job", job),
                       capture_output=True, text=True, timeout=60)
    assert e.returncode == 13


def test_missing_workdir(vm_env, tracker):
    job = tracker.job_id()
    r = prologue(vm_env, job, workdir=os.path.join(vm_env.base, "work", "does-not-exist"))
    assert r.returncode == 15 and "does not exist" in r.stderr
    assert leftovers(vm_env, job) == []


def test_guest_that_never_answers(vm_env, tracker):
    cfg = variant(vm_env, "fastfail", {"vm": {"boot_timeout_s": 8}})
    job = tracker.job_id()
    r = prologue(vm_env, job, config=cfg, args=("--image", "silent"))
    assert r.returncode == 21, r.stderr
    first, *console = r.stderr.splitlines()
    assert "did not answer within 8 s" in first or "stopped while booting" in first
    assert any("Kernel panic" in line or "rdinit" in line for line in console), r.stderr
    assert leftovers(vm_env, job) == []
    assert epilogue(vm_env, job, config=cfg).returncode == 0   # epilogue after a failed prologue


def test_library_files_are_never_touched_by_a_job(vm_env, tracker):
    from vibatch.images.library import Library
    img = Library(vm_env.cfg.library_dir, vm_env.cfg.state_dir).get("testguest")
    before = {f.path: os.stat(f.path) for f in img.files()}
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    during = {p: os.stat(p) for p in before}
    assert epilogue(vm_env, job).returncode == 0
    for path, st in before.items():
        for now in (during[path], os.stat(path)):
            assert (now.st_uid, now.st_gid, now.st_mode, now.st_ctime_ns) == \
                   (st.st_uid, st.st_gid, st.st_mode, st.st_ctime_ns), path


def test_reap_after_a_crash(vm_env, tracker):
    """QEMU killed behind vibatch's back, a stray slot, an orphan domain: reap cleans all three."""
    import libvirt
    from vibatch.core.slots import Capacity, SlotAllocator
    crashed = tracker.job_id()
    assert prologue(vm_env, crashed).returncode == 0
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    conn.lookupByName("vibatch-" + crashed).destroy()          # as if QEMU died
    orphan = tracker.job_id()
    assert prologue(vm_env, orphan).returncode == 0
    lost = os.path.join(vm_env.cfg.state_dir, "jobs", orphan)   # as if its state was lost (a
    subprocess.run(["umount", "--lazy", os.path.join(lost, "io")], check=True)   # reboot: no tmpfs)
    shutil.rmtree(lost)
    SlotAllocator(vm_env.cfg.state_dir, Capacity((0, 1), 100000), 5).release(orphan)
    stray = tracker.job_id()
    SlotAllocator(vm_env.cfg.state_dir, Capacity((0, 1), 100000), 5).claim(stray, 1, 64)
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "reap"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"job {crashed} (VM gone)" in r.stdout
    assert f"slot of job {stray}" in r.stdout
    assert f"domain vibatch-{orphan}" in r.stdout
    for job in (crashed, stray):
        assert leftovers(vm_env, job) == []
    assert wait_until(lambda: not _domain_exists(conn, orphan), timeout=30)
    conn.close()
    rec = [json.loads(x) for x in open(vm_env.cfg.accounting_file) if crashed in x]
    assert [x["vm_end"] for x in rec] == ["gone"]
    again = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "reap"),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == ""        # nothing left to reap


def test_reap_leaves_a_running_job_alone(vm_env, tracker):
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "reap"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and job not in r.stdout
    assert exec_run(vm_env, job, "true")[0] == 0


def test_walltime_plus_grace_ends_the_vm_in_the_guest_and_by_reap(vm_env, tracker):
    """Issue 11 item 4, with no batch system left to end the jobs (as after a node daemon's
    crash): at walltime (1 s) + grace (30 s) the guest's root timer powers the VM off; a guest
    whose root stopped that timer (a hostile job may be root in its VM) runs on, and reap ends
    it, past its limit. reap then also cleans up the VM that ended itself."""
    import libvirt
    from vibatch.util import Deadline
    from vibatch.vm.agent import LibvirtAgent
    cfg = variant(vm_env, "walltime", {"batch": {"walltime_grace_s": 30}})
    itself, hostile = tracker.job_id(), tracker.job_id()
    for job in (itself, hostile):
        r = prologue(vm_env, job, config=cfg, args=("--walltime", "1"))
        assert r.returncode == 0, r.stderr
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    try:
        res = LibvirtAgent(conn.lookupByName("vibatch-" + hostile)).run(
            "/bin/sh", ["-c", 'kill "$(cat /run/vibatch/walltime.pid)"'], Deadline(20), what="kill")
        assert res.wait_status == 0, res.err
        assert wait_until(lambda: not _domain_exists(conn, itself), timeout=150)
        with open(os.path.join(vm_env.cfg.state_dir, "jobs", hostile, "state.json")) as f:
            due = json.load(f)["started_at"] + 1 + 30
        import time
        assert wait_until(lambda: time.time() > due + 1, timeout=120)
        assert _domain_exists(conn, hostile)            # its timer is gone: only reap ends it
        r = subprocess.run(vibatch_cmd("--config", cfg, "reap"), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"job {itself} (VM gone)" in r.stdout
        assert f"job {hostile} (past its walltime (1 s) + grace (30 s))" in r.stdout, r.stdout
        assert not _domain_exists(conn, hostile)
    finally:
        conn.close()
    for job in (itself, hostile):
        assert leftovers(vm_env, job) == []
