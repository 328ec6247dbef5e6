"""Slurm with PrologFlags=Contain and proctrack/cgroup, with slurmdbd on a private MariaDB: the
job's VM (QEMU and its share launchers) joins the job's extern step (vibatch/core/adopt.py), so
sacct counts it and scontrol suspend freezes it, on a cold boot and a warm start alike. The
cluster is test_batch_slurm.py's (its hooks, SPANK plugin and batch user), with Contain on; the
ordinary one keeps Slurm's default, where the job's trap sees scancel's SIGTERM."""
import datetime
import os
import time

import pytest

from clusters import wait_until
from test_batch_slurm import (BOOT_ID, assert_node_healthy, cancelled_once_started,
                              host_boot_id, output, slurm_cluster, submit)
from vmhelp import accounted, guest_kernel, leftovers, pinned_cpus, warm_template
from vibatch.batch import slurm


@pytest.fixture(scope="module")
def cluster(vm_env):
    with slurm_cluster(vm_env, contain=True) as c:
        yield c


def slurm_seconds(text: str) -> float:
    """sacct's TotalCPU ('00:12.345', '01:02:03', '1-02:03:04') in seconds."""
    days, _, rest = text.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def vm_processes(vm_env, job: str):
    """(libvirt's domain, the pids in libvirt's cgroup of it) of a running job."""
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
    dom = hypervisor.lookup(conn, "vibatch-" + job)
    return conn, dom, adopt.vm_pids(dom)


def cgroups_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/cgroup") as f:
        return {line.split(":")[1]: line.strip().split(":", 2)[2] for line in f}


def started(c, job: str, word: str = "started") -> bool:
    path = os.path.join(c.home, f"slurm-{job}.out")
    return os.path.exists(path) and word in output(c, job)


def test_the_vms_cpu_time_and_memory_are_in_slurms_accounting(vm_env, cluster):
    """QEMU (and the share launchers) join the job's extern step: sacct counts the guest's
    CPU (>= 8 s of a ~12 s burn, and at least what libvirt measured) and its 300 MiB; the
    move leaves libvirt's pinning and memory cap where they were (cgroup v1: only Slurm's
    freezer changes)."""
    gate = os.path.join(cluster.home, "gate-acct")
    job = submit(cluster, "#!/bin/sh\n"
                 "dd if=/dev/zero of=/dev/shm/fill bs=1M count=300 2>/dev/null\n"
                 "end=$(( $(date +%s) + 12 )); while [ $(date +%s) -lt $end ]; do :; done\n"
                 "echo burnt\n"
                 f"i=0; while [ ! -e {gate} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n",
                 "--mem=800M", "--comment", "vibatch_image=testguest")
    try:
        wait_until("the burn in the guest", lambda: started(cluster, job, "burnt"), 180)
        conn, dom, pids = vm_processes(vm_env, job)
        try:
            from vibatch.vm import hypervisor
            libvirt_cpu = hypervisor.cpu_time_s(dom)
            show = cluster.cmd("scontrol", "show", "job", "-d", job).stdout
            assert pinned_cpus(vm_env, [job])[job] == set(slurm.allocation(show, cluster.node,
                                                                           job)[0])
            hard = dom.memoryParameters()["hard_limit"]
        finally:
            conn.close()
        assert hard == (800 + vm_env.cfg.vm.memory_overhead_mb) * 1024
        assert pids, "no processes in libvirt's cgroup of the VM"
        groups = {pid: cgroups_of(pid) for pid in pids}
        comms = {pid: open(f"/proc/{pid}/comm").read().strip() for pid in pids}
        from vibatch.core.jobdir import JobPaths
        from vibatch.util import read_json
        print("adopted:", read_json(os.path.join(JobPaths.of(vm_env.cfg, job).state,
                                                 "adopted.json")))
        print("E9/E12:", {pid: (comms[pid], g["freezer"], g["cpuset"], g["memory"])
                          for pid, g in groups.items()})
        for pid, g in groups.items():   # in the extern step for Slurm, libvirt's cpuset kept
            assert g["freezer"].endswith(f"/job_{job}/step_extern"), (pid, comms[pid], g)
            assert g["cpuset"].startswith("/machine/qemu-"), (pid, g)
        # QEMU (the one with vCPU threads) stays in libvirt's memory cgroup: the cap holds
        assert any(g["memory"].startswith("/machine/qemu-") for g in groups.values()), groups
    finally:
        with open(gate, "w"):
            pass
    assert cluster.wait_finished(job)["ExitCode"] == "0:0"
    os.unlink(gate)

    def recorded():
        lines = {r["JobID"]: r for r in cluster.sacct(job, "JobID,State,TotalCPU,MaxRSS")}
        ext = lines.get(f"{job}.extern", {})
        return lines if ext.get("State") == "COMPLETED" and ext.get("MaxRSS") else None
    lines = wait_until("slurmdbd's record of the job's steps", recorded, 60, 0.5)
    total = slurm_seconds(lines[job]["TotalCPU"])
    print(f"libvirt {libvirt_cpu:.1f} s at the gate; sacct {lines}")
    assert total >= 8 and total >= 0.8 * libvirt_cpu, (total, libvirt_cpu, lines)
    assert int(lines[f"{job}.extern"]["MaxRSS"]) >= 300 << 20, lines
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_scontrol_suspend_freezes_the_guest_and_resume_goes_on(vm_env, cluster):
    """scontrol suspend freezes the extern step, QEMU with it: libvirt's CPU time stands
    still; after resume the job carries on, its guest clock is right, and it ends with its
    own exit code."""
    from vibatch.vm import hypervisor
    gate = os.path.join(cluster.home, "gate-susp")
    job = submit(cluster, "#!/bin/sh\necho started\n"
                 f"while [ ! -e {gate} ]; do :; done\n"     # burns until released
                 'echo "clock $(date +%s)"\nexit 3\n',
                 "--time=10", "--comment", "vibatch_image=testguest")
    try:
        wait_until("the job to start in its VM", lambda: started(cluster, job), 180)
        conn, dom, _ = vm_processes(vm_env, job)
        try:
            r = cluster.cmd("scontrol", "suspend", job)
            assert r.returncode == 0, r.stderr
            cluster.wait_state(job, {"SUSPENDED"}, 30)
            wait_until("the freeze (CPU time standing still)", lambda: _still(dom, 1.0), 30)
            t0 = hypervisor.cpu_time_s(dom)
            time.sleep(3)          # measuring: CPU time over 3 s of suspension
            grown = hypervisor.cpu_time_s(dom) - t0
            assert grown < 0.1, f"the suspended guest used {grown:.2f} s of CPU in 3 s"
            r = cluster.cmd("scontrol", "resume", job)
            assert r.returncode == 0, r.stderr
            cluster.wait_state(job, {"RUNNING"}, 30)
            t1 = hypervisor.cpu_time_s(dom)
            wait_until("the guest to run again", lambda: hypervisor.cpu_time_s(dom) > t1 + 0.5,
                       30)
        finally:
            conn.close()
    finally:
        with open(gate, "w"):
            pass
    released = time.time()
    rec = cluster.wait_finished(job)
    assert rec["ExitCode"] == "3:0", rec
    clock = [int(line.split()[1]) for line in output(cluster, job).splitlines()
             if line.startswith("clock ")]
    assert clock and abs(clock[0] - released) < 5, (clock, released)
    assert leftovers(vm_env, job) == []
    os.unlink(gate)
    assert_node_healthy(cluster)


def _still(dom, seconds: float) -> bool:
    from vibatch.vm import hypervisor
    t0 = hypervisor.cpu_time_s(dom)
    time.sleep(seconds)
    return hypervisor.cpu_time_s(dom) - t0 < 0.05


def test_a_warm_started_jobs_vm_is_in_its_extern_step_and_runs_its_srun_steps(vm_env, cluster):
    """A job restored from a template (its shares hot-plugged after the restore): QEMU and the
    share launchers plugged then are all in the job's extern step, and an srun step runs in
    the same restored VM and writes into the (hot-plugged) work directory."""
    gate = os.path.join(cluster.home, "gate-warm")
    with warm_template(vm_env, "testguest", 1, 400) as tid:
        job = submit(cluster, "#!/bin/sh\n"
                     f'echo "batch $(cat {BOOT_ID})"\n'
                     f"srun sh -c 'cat {BOOT_ID} > from-step; echo step $(uname -r)'\n"
                     "echo started\n"
                     f"i=0; while [ ! -e {gate} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n",
                     "--mem=400M", "--comment", "vibatch_image=testguest")
        try:
            wait_until("the warm job's srun step", lambda: started(cluster, job), 180)
            conn, _, pids = vm_processes(vm_env, job)
            conn.close()
            comms = {pid: open(f"/proc/{pid}/comm").read().strip() for pid in pids}
            groups = {pid: cgroups_of(pid)["freezer"] for pid in pids}
        finally:
            with open(gate, "w"):
                pass
        rec = cluster.wait_finished(job)
    out = output(cluster, job)
    print(f"warm job {job} from template {tid}: {comms}, freezer {groups}; output {out!r}")
    assert rec["ExitCode"] == "0:0", (rec, out)
    assert [(a["start"], a["template"]) for a in accounted(vm_env, job)] == [("warm", tid)]
    # QEMU and the launchers of the hot-plugged shares (work directory, I/O folder)
    assert "qemu-system-x86" in comms.values(), comms
    assert list(comms.values()).count("virtiofsd") >= 2, comms
    assert all(g.endswith(f"/job_{job}/step_extern") for g in groups.values()), (comms, groups)
    boot = [line.split()[1] for line in out.splitlines() if line.startswith("batch ")]
    with open(os.path.join(cluster.home, "from-step")) as f:
        assert boot and f.read().strip() == boot[0] != host_boot_id(), out
    assert f"step {guest_kernel()}" in out.splitlines(), out
    os.unlink(gate)
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def step_ends(cluster, job: str) -> dict[str, datetime.datetime]:
    """When slurmdbd says the job's ``batch`` and ``extern`` steps ended, once both did."""
    def recorded():
        ends = {r["JobID"].rpartition(".")[2]: r["End"] for r in cluster.sacct(job, "JobID,End")
                if "." in r["JobID"] and r["End"][:1].isdigit()}
        return ends if {"batch", "extern"} <= set(ends) else None
    ends = wait_until("slurmdbd's record of the job's steps", recorded, 60, 0.5)
    return {k: datetime.datetime.fromisoformat(v) for k, v in ends.items()}


def test_scancel_gives_the_guest_its_sigterm_grace(vm_env, cluster):
    """scancel sends SIGTERM to every step at once, the extern step too, whose end SIGKILLs the
    VM. The plugin's keeper holds the extern step until the job's other steps have ended, so the
    job's TERM trap runs in its VM with time to work (it sleeps 2 s, then writes), as on the
    host. Before the keeper the VM ended within about 2 s, and the forwarder said so."""
    job, rec = cancelled_once_started(
        cluster, "#!/bin/sh\ntrap 'sleep 2; echo got TERM in $(uname -r); exit 143' TERM\n"
        "echo started\nsleep 600 & wait\n")
    out = output(cluster, job)
    assert rec["JobState"] == "CANCELLED", (rec, out)
    assert f"got TERM in {guest_kernel()}" in out, out
    assert "the job's VM ended" not in out, out
    assert rec["ExitCode"] == "143:0", (rec, out)
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_the_keeper_ends_with_the_batch_step_and_killwait_still_holds(vm_env, cluster):
    """The keeper must not hold a job's end: a job that ends by itself has its extern step end
    with its batch step, not KillWait (5 s here) later; a job that ignores SIGTERM is SIGKILLed
    after KillWait as on the host (Slurm records 0:9), and nothing is left."""
    kill_wait = 5
    job = submit(cluster, "#!/bin/sh\necho done\n", "--comment", "vibatch_image=testguest")
    assert cluster.wait_finished(job)["ExitCode"] == "0:0"
    ends = step_ends(cluster, job)
    assert (ends["extern"] - ends["batch"]).total_seconds() < kill_wait, ends
    job, rec = cancelled_once_started(cluster, "#!/bin/sh\ntrap '' TERM\necho started\n"
                                      "while :; do sleep 1; done\n")
    assert rec["JobState"] == "CANCELLED" and rec["ExitCode"] == "0:9", rec
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)
