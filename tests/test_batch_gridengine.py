"""Grid Engine end to end: real sge_qmaster/sge_execd from Debian's packages, a queue whose
prolog and epilog (root@) and starter_method are vibatch's shims, and jobs submitted with qsub by
an ordinary user. Each job boots a real guest; the tests read qacct, qstat and the job's output,
and check that nothing is left behind and that the queue never goes into error."""
import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time

import pytest

from clusters import GridEngineCluster, running, wait_until
from vmhelp import (accounted, batch_user, guest_kernel, install_shims, leftovers,
                    lost_epilogue_vm, pinned_cpus, private_workdir, reap_ends_only, warm_shapes,
                    warm_template)
from vibatch.vm.guestsetup import host_name
from vibatch import batch
from vibatch.batch import gridengine
from vibatch.errors import Fault
from vibatch.util import read_json

USER, UID = "vbt-sge", 23405
ARGS = "$job_id $ja_task_id $job_owner $queue $host"


@pytest.fixture(scope="module")
def sge(vm_env):
    hooks = install_shims("gridengine", os.path.join(vm_env.base, "sge-hooks"), {
        "/etc/vibatch/vibatch.yaml": vm_env.config_path,
        "/opt/vibatch/venv/bin/python": sys.executable,
    }, {"prolog": 0o755, "epilog": 0o755, "starter": 0o755})
    c = GridEngineCluster(os.path.join(vm_env.base, "sge"), {
        "prolog": f"root@{hooks}/prolog {ARGS}", "epilog": f"root@{hooks}/epilog {ARGS}",
        "starter_method": f"{hooks}/starter", "complex_values": "vm_image=testguest,scratch=10G",
        "notify": "00:00:10",   # qsub -notify's warning: SIGUSR2 this long before the kill
    }, complexes=["vm_image vmi RESTRING == YES NO NONE 0", "scratch scr MEMORY <= YES NO 0 0"])
    # most jobs here: 1 slot, no vmem limit, h_vmem=600M or 400M (vmhelp.warm_shapes)
    shapes = [(1, vm_env.cfg.jobs.default_memory_mb), (1, fitted(vm_env, 600)), (1, 400)]
    with batch_user(vm_env, USER, UID) as home, running(c), warm_shapes(vm_env, shapes):
        c.home = home
        yield c


def qsub(c, script: str, *opts: str) -> str:
    path = os.path.join(c.home, "job.sh")
    with open(path, "w") as f:
        f.write(script)
    os.chown(path, UID, UID)
    r = c.cmd("qsub", "-terse", "-cwd", "-j", "y", "-o", f"{c.home}/o.$JOB_ID.$TASK_ID", *opts,
              path, user=USER, cwd=c.home)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(".")[0]


def output(c, job: str, task: str = "0") -> str:
    path = os.path.join(c.home, f"o.{job}.{task}")
    if not os.path.exists(path):
        return f"(no {path}; {sorted(os.listdir(c.home))})"
    with open(path) as f:
        return f.read()


def assert_queue_ok(c):
    assert c.queue_state() == "", c.cmd("qstat", "-f", "-explain", "E").stdout


def fitted(vm_env, h_vmem_mb: int) -> int:
    """The guest's memory for a 1-slot job of that h_vmem (gridengine.fit_vmem)."""
    from vibatch.batch.kit import HOST_RESERVE_MB
    return h_vmem_mb - HOST_RESERVE_MB - vm_env.cfg.vm.memory_overhead_mb


def test_an_os_request_runs_the_job_in_that_guest_with_its_exit_code(vm_env, sge):
    job = qsub(sge, 'echo "kernel $(uname -r) on $(cat /etc/hostname) as $(id -un) in $PWD"\n'
               'echo "features $(cat $JOBFEATURES/wall_limit_secs) $(cat $JOBFEATURES/allocated_cpu)'
               ' $(cat $JOBFEATURES/mem_limit_MB) $(cat $JOBFEATURES/job_id)'
               ' $(cat $MACHINEFEATURES/total_cpu)"\n'
               'echo "scratch $TMPDIR $(cat $JOBFEATURES/scratch_limit_bytes)'
               ' $(stat -c %U $TMPDIR) $(df -k $TMPDIR | tail -n 1 | tr -s " " | cut -d" " -f2)"\n'
               'echo "args: $*"\nexit 7\n', "-l",
               "vm_image=testguest,h_vmem=600M,h_rt=420,scratch=300M")
    rec = sge.wait_accounted(job)
    assert rec["exit_status"] == "7" and rec["failed"] == "0", rec
    out = output(sge, job)
    assert f"kernel {guest_kernel()} on vbguest as {USER} in {sge.home}\n" in out, out
    # HEPiX Job Features in the guest, with what Grid Engine gave: h_rt, 1 slot, and the guest's
    # memory, which h_vmem holds with QEMU
    assert f"features 420 1 {fitted(vm_env, 600)} {job} {os.cpu_count()}\n" in out, out
    # -l scratch=300M: a 300 MiB scratch disk, the user's, at $TMPDIR
    scratch = [line.split() for line in out.splitlines() if line.startswith("scratch ")]
    assert scratch and scratch[0][1:4] == ["/scratch", str(300 << 20), USER], out
    assert 0.9 * 300 * 1024 <= int(scratch[0][4]) <= 300 * 1024, out   # less ext4 metadata
    assert leftovers(vm_env, job) == []
    assert not os.path.exists(os.path.join(sge.home, "core")), subprocess.run(
        ["file", os.path.join(sge.home, "core")], capture_output=True, text=True).stdout
    acct = [line for line in open(vm_env.cfg.accounting_file) if f'"job_id": "{job}"' in line]
    assert len(acct) == 1 and '"exit_code": 7' in acct[0], acct
    assert f'"memory_mb": {fitted(vm_env, 600)}' in acct[0], acct
    assert_queue_ok(sge)


def test_a_job_of_a_templates_shape_starts_warm_with_its_shares_and_scratch(vm_env, sge):
    """Warm start under Grid Engine: restored from the template of the job's shape (1 slot,
    h_vmem 600M: a guest that fits in it), with its working directory, scratch, exit code and a
    host name of its own."""
    with warm_template(vm_env, "testguest", 1, fitted(vm_env, 600)) as tid:
        job = qsub(sge, 'echo "$(id -un) in $PWD on $(hostname) $(cat /etc/hostname), '
                   '$(nproc) cpu, scratch $(stat -c %U $TMPDIR)"\n'
                   "echo from-the-guest > warm-$JOB_ID\nexit 3\n",
                   "-l", "vm_image=testguest,h_vmem=600M,scratch=100M")
        rec = sge.wait_accounted(job)
    assert rec["exit_status"] == "3" and rec["failed"] == "0", rec
    assert output(sge, job) == (f"{USER} in {sge.home} on {host_name(socket.gethostname(), job)}"
                                f" vbguest, 1 cpu, scratch {USER}\n")
    with open(os.path.join(sge.home, f"warm-{job}")) as f:
        assert f.read() == "from-the-guest\n"
    assert [(a["start"], a["template"], a["exit_code"]) for a in accounted(vm_env, job)] == \
        [("warm", tid, 3)]
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_a_binary_job_and_its_arguments_reach_the_guest(vm_env, sge):
    r = sge.cmd("qsub", "-terse", "-cwd", "-j", "y", "-o", f"{sge.home}/o.$JOB_ID.$TASK_ID",
                "-b", "y", "-v", "VIBATCH_IMAGE=testguest", "/bin/echo", "hello world", "two",
                user=USER, cwd=sge.home)
    job = r.stdout.strip()
    assert sge.wait_accounted(job)["exit_status"] == "0"
    assert output(sge, job) == "hello world two\n"


def test_two_jobs_get_disjoint_cpus(vm_env, sge):
    gate = os.path.join(sge.home, "gate")
    script = ("echo started\n"
              f"i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n")
    jobs = [qsub(sge, script, "-v", "VIBATCH_IMAGE=testguest", "-l", "h_vmem=400M")
            for _ in range(2)]
    try:
        for job in jobs:
            wait_until(f"job {job} to start in its VM", lambda j=job: "started" in output(sge, j), 120)
        pinned = pinned_cpus(vm_env, jobs)
        for job in jobs:
            state = read_json(os.path.join(vm_env.cfg.state_dir, "jobs", job, "state.json"))
            assert set(state["cpus"]) == pinned[job]
        assert not pinned[jobs[0]] & pinned[jobs[1]]
    finally:
        with open(gate, "w"):
            pass
    for job in jobs:
        assert sge.wait_accounted(job)["exit_status"] == "0"
        assert leftovers(vm_env, job) == []
    os.unlink(gate)


def test_an_array_gets_one_vm_per_task(vm_env, sge):
    job = qsub(sge, 'echo "task $SGE_TASK_ID on $(cat /etc/hostname)"\n', "-t", "1-3",
               "-l", "vm_image=testguest,h_vmem=400M")
    for task in (1, 2, 3):
        rec = sge.wait_accounted(job, task)
        assert rec["exit_status"] == "0", rec
        assert output(sge, job, str(task)) == f"task {task} on vbguest\n"
        assert leftovers(vm_env, f"{job}.{task}") == []


def test_qdel_leaves_nothing_behind(vm_env, sge):
    job = qsub(sge, "echo started\nsleep 600\n", "-v", "VIBATCH_IMAGE=testguest")
    wait_until("the job to start in its VM", lambda: "started" in output(sge, job), 120)
    assert sge.cmd("qdel", job, user=USER).returncode == 0
    rec = sge.wait_accounted(job)     # the starter was SIGKILLed; the epilog destroyed the VM
    assert rec["exit_status"].split()[0] == "137", rec
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_qsub_notify_warns_the_job_in_its_vm_before_the_kill(vm_env, sge):
    """With -notify the shepherd sends SIGUSR2 to the job, and to QEMU (it carries the job's
    group), the queue's notify time before qdel's SIGKILL. Under a stock QEMU that warning
    ended the VM at once (test_emulator.py shows the attack); vibatch's QEMU ignores it, and
    the forwarder passes it on, so the job's own trap runs in the guest, then the kill comes."""
    job = qsub(sge, "trap 'echo \"got USR2 in $(uname -r)\"' USR2\necho started\n"
               "while :; do sleep 1; done\n", "-notify", "-v", "VIBATCH_IMAGE=testguest")
    wait_until("the job to start in its VM", lambda: "started" in output(sge, job), 120)
    from vibatch.core import adopt
    from vibatch.vm import emulator, hypervisor
    conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
    try:
        pids = adopt.vm_pids(hypervisor.lookup(conn, "vibatch-" + job))
    finally:
        conn.close()
    qemu = qemu_pids(pids)
    with open(f"/proc/{qemu[0]}/status") as f:
        status = dict(line.split(":", 1) for line in f)
    assert job_gid(sge, job) in proc_groups(qemu[0])   # the signal does reach QEMU: the gid
    assert signal.SIGUSR2 in emulator.signal_set(status["SigIgn"].strip())
    assert sge.cmd("qdel", job, user=USER).returncode == 0
    wait_until("the trap to run in the guest", lambda: "got USR2" in output(sge, job), 30)
    assert f"got USR2 in {guest_kernel()}" in output(sge, job)
    assert os.path.exists(f"/proc/{qemu[0]}")          # the VM outlived the warning ...
    rec = sge.wait_accounted(job, timeout=60)          # ... until the kill, notify time later
    assert rec["exit_status"].split()[0] == "137", rec
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_reap_asks_the_qmaster_and_ends_only_the_vm_of_a_job_it_no_longer_has(vm_env, sge):
    """reap asks the job's batch system: the VM of a running job stays; the VM of a job the
    qmaster does not know (its epilogue never came) is ended and accounted."""
    from vibatch.core.jobdir import JobPaths
    job = qsub(sge, "echo started\nsleep 600\n", "-v", "VIBATCH_IMAGE=testguest")
    wait_until("the job to start in its VM", lambda: "started" in output(sge, job), 120)
    assert read_json(JobPaths.of(vm_env.cfg, job).state_file)["batch"] == "gridengine"
    assert gridengine.job_gone(job) is False
    lost = "99999"
    assert gridengine.job_gone(lost) is True
    lost_epilogue_vm(vm_env, lost, USER, "gridengine", {})
    reap_ends_only(vm_env, lost, job, "gridengine")
    assert sge.cmd("qdel", job, user=USER).returncode == 0
    sge.wait_accounted(job)
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_the_walltime_kills_the_job_and_leaves_nothing(vm_env, sge):
    job = qsub(sge, "echo started\nsleep 600\n", "-l", "vm_image=testguest,h_rt=0:0:25")
    rec = sge.wait_accounted(job, timeout=240)
    assert rec["exit_status"].split()[0] == "137", rec
    assert "started" in output(sge, job)
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_an_unknown_os_puts_the_job_not_the_queue_in_error_with_a_readable_message(vm_env, sge):
    job = qsub(sge, "echo should-not-run\n", "-v", "VIBATCH_IMAGE=nosuch-os")
    wait_until("the job to go into error", lambda: sge.job_state(job) == "Eqw", 120)
    out = output(sge, job)
    assert "vibatch: gridengine prolog failed (job fault): unknown image or OS 'nosuch-os'" in out
    assert "you may ask for:" in out and "testguest" in out.split("you may ask for:")[1]
    assert "should-not-run" not in out
    assert_queue_ok(sge)
    assert leftovers(vm_env, job) == []
    assert sge.cmd("qdel", job, user=USER).returncode == 0
    wait_until("the job to leave", lambda: sge.job_state(job) is None, 60)
    # asked through the complex, qsub -w e refuses an image no queue offers at submit time
    r = sge.cmd("qsub", "-w", "e", "-l", "vm_image=nosuch-os", "-b", "y", "/bin/true",
                user=USER, cwd=sge.home)
    assert r.returncode != 0 and "no suitable queues" in r.stdout + r.stderr


def test_the_job_gets_execds_umask_not_the_submitters(vm_env, sge):
    """Grid Engine starts jobs with execd's umask (022), whatever the submitter's: so does the
    job's VM, and files in the shared cwd get 0644 (they were 0600)."""
    r = sge.cmd("qsub", "-terse", "-cwd", "-j", "y", "-o", f"{sge.home}/o.$JOB_ID.$TASK_ID",
                "-b", "y", "-v", "VIBATCH_IMAGE=testguest", "/bin/sh", "-c",
                "umask; rm -rf ge-u; mkdir ge-u; echo x > ge-u/f",
                user=USER, cwd=sge.home, umask=0o077)
    job = r.stdout.strip()
    assert sge.wait_accounted(job)["exit_status"] == "0"
    assert output(sge, job) == "0022\n"
    d = os.path.join(sge.home, "ge-u")
    assert (os.stat(d).st_mode & 0o777, os.stat(os.path.join(d, "f")).st_mode & 0o777) == \
        (0o755, 0o644)


def test_the_shipped_sge_request_refuses_a_mistyped_image_at_submit(vm_env, sge):
    """Without -w e, a job asking for a vm_image no queue offers waits forever in qw; the cell's
    sge_request that vibatch ships (hooks/gridengine/sge_request) makes qsub refuse it."""
    path = os.path.join(sge.common, "sge_request")
    before = open(path).read() if os.path.exists(path) else None
    r = sge.cmd("qsub", "-terse", "-l", "vm_image=nosuch-os", "-b", "y", "/bin/true",
                user=USER, cwd=sge.home)
    assert r.returncode == 0, r.stdout + r.stderr     # the gap: accepted, and it never runs
    waiting = r.stdout.strip()
    try:
        assert sge.job_state(waiting) == "qw"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(repo, "hooks", "gridengine", "sge_request")) as f, \
                open(path, "w") as out:
            out.write((before or "") + f.read())
        r = sge.cmd("qsub", "-terse", "-l", "vm_image=nosuch-os", "-b", "y", "/bin/true",
                    user=USER, cwd=sge.home)
        assert r.returncode != 0 and "no suitable queues" in r.stdout + r.stderr, r.stdout
        job = qsub(sge, "echo ok\n", "-l", "vm_image=testguest")   # a good one still runs
        assert sge.wait_accounted(job)["exit_status"] == "0" and output(sge, job) == "ok\n"
    finally:
        if before is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            with open(path, "w") as out:
                out.write(before)
        sge.cmd("qdel", waiting)


def test_a_queues_complex_value_is_not_a_default_for_jobs_that_ask_for_nothing(vm_env, sge):
    """complex_values vm_image=X on the queue only matches requests: a job without -l vm_image
    carries no vm_image request (qstat -j), and the prolog gives it vibatch's default (the
    queue here offers 'elsewhere', which no library has: had it been the default, the job
    would have gone to Eqw)."""
    sge.qconf("-mattr", "queue", "complex_values", "vm_image=elsewhere", "all.q")
    try:
        job = qsub(sge, "echo ran\n")
        assert sge.wait_accounted(job)["exit_status"] == "0" and output(sge, job) == "ran\n"
        acct = [json.loads(line) for line in open(vm_env.cfg.accounting_file)
                if f'"job_id": "{job}"' in line]
        assert acct[0]["image"] == vm_env.cfg.images.default == "testguest", acct
    finally:
        sge.qconf("-mattr", "queue", "complex_values", "vm_image=testguest,scratch=10G", "all.q")


def test_a_wd_below_another_users_0700_directory_is_refused_and_the_queue_stays_ok(vm_env, sge):
    # -wd into root's 0700 directory: refused for the job's user, who never reads the file there
    with private_workdir(vm_env, "sge-private") as inside:
        job = qsub(sge, "cat data\n", "-wd", inside)
        wait_until("the job to fail or finish", lambda: sge.job_state(job) in (None, "Eqw"), 120)
        out = output(sge, job)
        print(out)
        assert "secret" not in out
        assert_queue_ok(sge)
        assert leftovers(vm_env, job) == []
        if sge.job_state(job) == "Eqw":
            assert sge.cmd("qdel", job, user=USER).returncode == 0
            wait_until("the job to leave", lambda: sge.job_state(job) is None, 60)


def qacct_seconds(text: str) -> float:
    return float(text.rstrip("s"))


def qacct_bytes(text: str) -> float:
    units = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * units[unit]
    return float(text)


def job_spool(c, job: str) -> str:
    import glob
    found = glob.glob(f"{c.SPOOL}/execd/*/active_jobs/{job}.1")
    assert len(found) == 1, found
    return found[0]


def job_gid(c, job: str) -> int:
    """The add_grp_id the shepherd gave the job (its ``addgrpid`` file)."""
    with open(os.path.join(job_spool(c, job), "addgrpid")) as f:
        return int(f.read())


def qemu_pids(pids: list[int]) -> list[int]:
    """The QEMU among a domain's processes (``adopt.vm_pids``), by its comm."""
    out = []
    for p in pids:
        with open(f"/proc/{p}/comm") as f:
            if f.read().startswith("qemu"):
                out.append(p)
    return out


def proc_groups(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Groups:"))
    return {int(g) for g in line.split()[1:]}


def test_the_vms_cpu_time_and_memory_are_in_qacct(vm_env, sge):
    """QEMU runs with the job's add_grp_id (the DAC label), and so does each virtiofsd (its one
    supplementary group: the launcher's filter makes virtiofsd's drop of its groups a no-op),
    and the prolog registers the job before the VM starts: Grid Engine's collector counts the
    guest's ~10 s burn (qacct cpu >= 8 s and >= 80 % of libvirt's figure) and its memory
    (maxvmem, the summed address space, >= 300 MiB filled and >= the guest's 512 MiB, which no
    host process of the job but QEMU has). Pinning and the memory cap hold; QEMU keeps its uid."""
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    gate = os.path.join(sge.home, "gate-acct")
    job = qsub(sge, "awk 'BEGIN { s = sprintf(\"%314572800s\", \"\"); print \"filled\" }'\n"
               "end=$(( $(date +%s) + 10 )); while [ $(date +%s) -lt $end ]; do :; done\n"
               "echo burnt\n"
               f"i=0; while [ ! -e {gate} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n",
               "-v", "VIBATCH_IMAGE=testguest")
    try:
        wait_until("the burn in the guest", lambda: "burnt" in output(sge, job), 180)
        gid = job_gid(sge, job)
        conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
        try:
            dom = hypervisor.lookup(conn, "vibatch-" + job)
            libvirt_cpu = hypervisor.cpu_time_s(dom)
            hard = dom.memoryParameters()["hard_limit"]
            pids = adopt.vm_pids(dom)
        finally:
            conn.close()
        comms = {pid: open(f"/proc/{pid}/comm").read().strip() for pid in pids}
        print("E10 groups:", {pid: (comms[pid], sorted(proc_groups(pid))) for pid in pids})
        assert any(c.startswith("qemu") for c in comms.values()), comms
        assert any(c.startswith("virtiofsd") for c in comms.values()), comms
        for pid in pids:          # QEMU and every virtiofsd carry the job's group
            assert gid in proc_groups(pid), (pid, comms[pid], proc_groups(pid), gid)
            if comms[pid].startswith("virtiofsd"):      # the only one: not the user's groups
                assert proc_groups(pid) == {gid}, (pid, proc_groups(pid))
            if comms[pid].startswith("qemu"):
                assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam("libvirt-qemu").pw_uid
        state = read_json(os.path.join(vm_env.cfg.state_dir, "jobs", job, "state.json"))
        assert pinned_cpus(vm_env, [job])[job] == set(state["cpus"])
        assert hard == (vm_env.cfg.jobs.default_memory_mb + vm_env.cfg.vm.memory_overhead_mb) * 1024
    finally:
        with open(gate, "w"):
            pass
    rec = sge.wait_accounted(job)
    os.unlink(gate)
    cpu, maxvmem = qacct_seconds(rec["cpu"]), qacct_bytes(rec["maxvmem"])
    print(f"qacct cpu {cpu} s maxvmem {maxvmem / 2**20:.0f} MiB; libvirt {libvirt_cpu:.1f} s")
    assert rec["exit_status"] == "0" and rec["failed"] == "0", rec
    assert cpu >= 8 and cpu >= 0.8 * libvirt_cpu, (rec, libvirt_cpu)
    assert maxvmem >= max(300 << 20, vm_env.cfg.jobs.default_memory_mb << 20), rec
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


def test_a_job_with_a_vmem_limit_is_counted_and_its_vm_fits_in_the_limit(vm_env, sge):
    """execd SIGKILLs a job whose processes hold more than its h_vmem (VmRSS + VmSwap summed over
    the processes with the job's group, procfs.c). The VM is made to fit: hard cap = limit -
    the host reserve, guest = cap - QEMU's overhead; so QEMU carries the group, qacct counts the
    guest's burn and its 300 MiB, and the job, which fills them, is not killed."""
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    limit = 900
    gate = os.path.join(sge.home, "gate-vmem")
    job = qsub(sge, "awk 'BEGIN { s = sprintf(\"%314572800s\", \"\"); print \"filled\" }'\n"
               "end=$(( $(date +%s) + 10 )); while [ $(date +%s) -lt $end ]; do :; done\n"
               "echo burnt\n"
               f"i=0; while [ ! -e {gate} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n",
               "-v", "VIBATCH_IMAGE=testguest", "-l", f"h_vmem={limit}M")
    try:
        wait_until("the burn in the guest", lambda: "burnt" in output(sge, job), 180)
        gid = job_gid(sge, job)
        conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
        try:
            dom = hypervisor.lookup(conn, "vibatch-" + job)
            libvirt_cpu = hypervisor.cpu_time_s(dom)
            hard = dom.memoryParameters()["hard_limit"]
            guest_kib = dom.maxMemory()
            pids = adopt.vm_pids(dom)
        finally:
            conn.close()
        qemu = qemu_pids(pids)
        assert qemu and gid in proc_groups(qemu[0]), (pids, gid)
        with open(f"/proc/{qemu[0]}/status") as f:
            print("QEMU", [line.strip() for line in f if line.startswith(("VmRSS", "VmSwap"))])
        assert guest_kib == fitted(vm_env, limit) * 1024, guest_kib
        assert hard == (fitted(vm_env, limit) + vm_env.cfg.vm.memory_overhead_mb) * 1024, hard
    finally:
        with open(gate, "w"):
            pass
    rec = sge.wait_accounted(job)
    os.unlink(gate)
    cpu, maxvmem = qacct_seconds(rec["cpu"]), qacct_bytes(rec["maxvmem"])
    print(f"qacct cpu {cpu} s maxvmem {maxvmem / 2**20:.0f} MiB; libvirt {libvirt_cpu:.1f} s")
    assert rec["exit_status"] == "0" and rec["failed"] == "0", rec
    assert cpu >= 8 and cpu >= 0.8 * libvirt_cpu, (rec, libvirt_cpu)
    assert 300 << 20 <= maxvmem <= limit << 20, rec
    assert leftovers(vm_env, job) == []
    assert_queue_ok(sge)


@pytest.mark.parametrize("vmem", ["", "h_vmem=200M"], ids=["qemu-in-job", "vmem-too-small"])
def test_qmod_suspend_freezes_the_guest_and_unsuspend_goes_on(vm_env, sge, vmem):
    """qmod -sj stops the job (SIGSTOP, the queue's default suspend_method). A QEMU that
    carries the job's group is stopped by the shepherd itself (ENABLE_ADDGRP_KILL, as root); one
    that does not (a vmem limit too small to hold the VM) is suspended by the watcher the prolog
    started. Either
    way libvirt's CPU time stands still; after qmod -usj the guest runs again, its clock is set
    (within 2 s), and the job ends with its own exit code."""
    import libvirt
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    gate = os.path.join(sge.home, "gate-susp")
    job = qsub(sge, f"echo started\nwhile [ ! -e {gate} ]; do :; done\n"
               'echo "clock $(date +%s)"\nexit 3\n', "-v", "VIBATCH_IMAGE=testguest",
               "-l", ",".join(filter(None, ["h_rt=300", vmem])))
    try:
        wait_until("the job to start in its VM", lambda: "started" in output(sge, job), 180)
        conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
        try:
            dom = hypervisor.lookup(conn, "vibatch-" + job)
            qemu = qemu_pids(adopt.vm_pids(dom))

            def qemu_state() -> str:
                with open(f"/proc/{qemu[0]}/stat") as f:
                    return f.read().rpartition(")")[2].split()[0]
            r = sge.cmd("qmod", "-sj", job)
            assert r.returncode == 0, r.stdout + r.stderr
            if vmem:      # the watcher's libvirt suspend
                wait_until("the domain to be paused",
                           lambda: dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED, 30)
            else:         # the shepherd's own SIGSTOP to every process with the job's group
                wait_until("QEMU to be stopped", lambda: qemu_state() == "T", 30)
            assert sge.job_state(job) == "s"
            t0 = hypervisor.cpu_time_s(dom)
            time.sleep(3)          # measuring: CPU time over 3 s of suspension
            grown = hypervisor.cpu_time_s(dom) - t0
            assert grown < 0.1, f"the suspended guest used {grown:.2f} s of CPU in 3 s"
            r = sge.cmd("qmod", "-usj", job)
            assert r.returncode == 0, r.stdout + r.stderr
            wait_until("the guest to run again", lambda: qemu_state() != "T"
                       and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 30)
            burnt = hypervisor.cpu_time_s(dom) + 0.5        # and the guest burns on
            wait_until("the guest to burn again", lambda: hypervisor.cpu_time_s(dom) > burnt, 30)
        finally:
            conn.close()
    finally:
        with open(gate, "w"):
            pass
    released, rec = time.time(), sge.wait_accounted(job)
    assert rec["exit_status"] == "3" and rec["failed"] == "0", rec
    clock = [int(line.split()[1]) for line in output(sge, job).splitlines()
             if line.startswith("clock ")]
    assert clock and abs(clock[0] - released) < 2, (clock, released, output(sge, job))
    assert leftovers(vm_env, job) == []
    os.unlink(gate)
    assert_queue_ok(sge)


def test_hooks_only_ever_exit_with_codes_grid_engine_reads_as_job_or_reschedule():
    assert set(gridengine.EXIT["prolog"].values()) <= {0, 99, 100}
    assert set(gridengine.EXIT["epilog"].values()) == {0}
    assert gridengine.EXIT["prolog"][Fault.JOB] == 100
    assert batch.main(gridengine.SYSTEM, ["prolog", "17"]) == 99     # misconfigured command line: reschedule
    assert gridengine.vm_job_id("17", "0") == "17" and gridengine.vm_job_id("17", "undefined") == "17"
    assert gridengine.vm_job_id("17", "3") == "17.3"
