"""Slurm end to end: a real slurmctld/slurmd/munge from Debian's packages, with vibatch's Prolog,
Epilog and job_submit.lua installed, and jobs submitted with sbatch by an ordinary user. Each job
boots a real guest; the tests read what Slurm recorded (job state, exit code, node state) and
what the job printed, and check that nothing is left behind."""
import contextlib
import json
import os
import subprocess
import sys

import pytest

from clusters import SlurmCluster, running, wait_until
from vmhelp import (accounted, batch_user, guest_kernel, install_shims, leftovers,
                    lost_epilogue_vm, pinned_cpus, private_workdir, reap_ends_only, warm_shapes,
                    warm_template)
from vibatch.batch import slurm
from vibatch.vm.guestsetup import host_name

USER, UID = "vbt-slurm", 23404


@pytest.fixture(scope="module")
def cluster(vm_env):
    # most jobs here: 1 CPU, and DefMemPerCPU's 256 MiB or --mem=400M (vmhelp.warm_shapes)
    with slurm_cluster(vm_env) as c, warm_shapes(vm_env, [(1, 256), (1, 400)]):
        yield c


@contextlib.contextmanager
def slurm_cluster(vm_env, contain: bool = False):
    """A running one-node Slurm with vibatch's hooks, the SPANK plugin and a batch user
    (c.home), stopped after. ``contain``: PrologFlags=Contain with proctrack/cgroup and
    slurmdbd, so the VM joins the job's extern step (test_batch_slurm_contain.py)."""
    hooks = os.path.join(vm_env.base, "slurm-hooks")
    offer = os.path.join(vm_env.base, "offer")
    install_shims("slurm", hooks, {
        "/etc/vibatch/vibatch.yaml": vm_env.config_path,
        "/opt/vibatch/venv/bin/python": sys.executable,
        "/opt/vibatch/hooks/slurm/job_exec": os.path.join(hooks, "job_exec"),
        "/etc/vibatch/offer": offer,
    }, {"prolog": 0o500, "epilog": 0o500, "job_exec": 0o555, "job_submit.lua": 0o644})
    r = vm_env.run("image", "offer", "--output", offer)
    assert r.returncode == 0, r.stderr
    # the SPANK plugin as setup-node built it, next to the venv (every step into the VM)
    plugin = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(sys.executable))),
                          "lib", "vibatch_spank.so")
    assert os.path.exists(plugin), f"{plugin} missing: run etc/setup-node.sh"
    plugstack = os.path.join(hooks, "plugstack.conf")
    with open(plugstack, "w") as f:
        f.write(f"required {plugin} python={sys.executable} config={vm_env.config_path}\n")
    os.chmod(plugstack, 0o644)
    c = SlurmCluster(os.path.join(vm_env.base, "slurm"), {
        "Prolog": os.path.join(hooks, "prolog"), "Epilog": os.path.join(hooks, "epilog"),
        "PrologFlags": "Alloc", "KillWait": "5", "OverTimeLimit": "0", "FirstJobId": "7001",
        "JobRequeue": "0", "PlugStackConfig": plugstack,
        "LaunchParameters": "use_interactive_step",
        # the VM in the job's extern step: counted by sacct, frozen by scontrol suspend; its
        # own job ids (one vm_env, one accounting file and state for the whole session)
        **({"PrologFlags": "Alloc,Contain", "ProctrackType": "proctrack/cgroup",
            "FirstJobId": "8001"} if contain else {}),
    }, features=["vibatch", "testguest"], job_submit_lua=os.path.join(hooks, "job_submit.lua"),
        accounting=contain)
    with batch_user(vm_env, USER, UID) as home, running(c):
        c.home = home
        yield c


def submit(c, script: str, *opts: str, cwd=None, umask: int = 0o022) -> str:
    cwd = cwd or c.home
    path = os.path.join(cwd, "job.sh")
    with open(path, "w") as f:
        f.write(script)
    os.chown(path, UID, UID)
    r = c.cmd("sbatch", "--parsable", *opts, path, user=USER, cwd=cwd, umask=umask)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def output(c, job_id: str, cwd=None) -> str:
    with open(os.path.join(cwd or c.home, f"slurm-{job_id}.out")) as f:
        return f.read()


def assert_node_healthy(c):
    # a trailing "-" is Slurm's PLANNED flag (sinfo(1)): backfill had planned a pending job (an
    # array's last task) for the node, and it stays until the next backfill cycle; not a fault
    state = c.node_state()
    assert state.removesuffix("-") in ("idle", "mixed", "allocated"), (state, c.node_reason())


def test_an_os_request_runs_the_job_in_that_guest_with_its_exit_code(vm_env, cluster):
    job = submit(cluster, "#!/bin/sh\n#SBATCH --mem=600M\n#SBATCH --time=7\n#SBATCH --tmp=300M\n"
                 'echo "kernel $(uname -r) on $(cat /etc/hostname) as $(id -un) in $PWD"\n'
                 'echo "features $(cat $JOBFEATURES/wall_limit_secs) $(cat $JOBFEATURES/allocated_cpu)'
                 ' $(cat $JOBFEATURES/mem_limit_MB) $(cat $JOBFEATURES/job_id)'
                 ' $(cat $MACHINEFEATURES/total_cpu)"\n'
                 'echo "scratch $TMPDIR $(cat $JOBFEATURES/scratch_limit_bytes)'
                 ' $(stat -c %U $TMPDIR) $(df -k $TMPDIR | tail -n 1 | tr -s " " | cut -d" " -f2)"\n'
                 'echo "args: $*"\necho to-stderr >&2\nexit 7\n',
                 "--export=ALL,VIBATCH_IMAGE=testguest")
    rec = cluster.wait_finished(job)
    assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "7:0", rec
    out = output(cluster, job)
    assert f"kernel {guest_kernel()} on vbguest as {USER} in {cluster.home}\n" in out, out
    assert "to-stderr" in out
    # HEPiX Job Features in the guest, with what Slurm gave: 7 minutes, 1 CPU, 600 MB
    assert f"features 420 1 600 {job} {os.cpu_count()}\n" in out, out
    # --tmp=300M: a 300 MiB scratch disk, the user's, at $TMPDIR (less ext4's own metadata)
    scratch = [line.split() for line in out.splitlines() if line.startswith("scratch ")]
    assert scratch and scratch[0][1:4] == ["/scratch", str(300 << 20), USER], out
    assert 0.9 * 300 * 1024 <= int(scratch[0][4]) <= 300 * 1024, out   # less ext4 metadata
    assert "comment" not in out and rec.get("Comment", "").endswith("vibatch_image=testguest")
    assert leftovers(vm_env, job) == []
    acct = [line for line in open(vm_env.cfg.accounting_file) if f'"job_id": "{job}"' in line]
    assert len(acct) == 1 and '"exit_code": 7' in acct[0] and '"memory_mb": 600' in acct[0]
    assert_node_healthy(cluster)


def test_a_job_of_a_templates_shape_starts_warm_with_its_shares_and_scratch(vm_env, cluster):
    """Warm start under Slurm: the job's VM is restored from the template of its shape (1 CPU,
    600 MB); its working directory, scratch and exit code are as in a cold start, and its
    guest has a host name of its own."""
    with warm_template(vm_env, "testguest", 1, 600) as tid:
        job = submit(cluster, "#!/bin/sh\n#SBATCH -c 1\n#SBATCH --mem=600M\n#SBATCH --tmp=100M\n"
                     'echo "$(id -un) in $PWD on $(hostname) $(cat /etc/hostname), '
                     '$(nproc) cpu, scratch $(stat -c %U $TMPDIR)"\n'
                     "echo from-the-guest > warm-$SLURM_JOB_ID\nexit 3\n",
                     "--comment", "vibatch_image=testguest")
        rec = cluster.wait_finished(job)
    assert rec["ExitCode"] == "3:0", rec
    assert output(cluster, job) == (f"{USER} in {cluster.home} on "
                                    f"{host_name(cluster.node, job)} vbguest, 1 cpu, scratch {USER}\n")
    with open(os.path.join(cluster.home, f"warm-{job}")) as f:
        assert f.read() == "from-the-guest\n"
    assert [(a["start"], a["template"], a["exit_code"]) for a in accounted(vm_env, job)] == \
        [("warm", tid, 3)]
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_two_jobs_get_disjoint_cpus_from_their_allocation(vm_env, cluster):
    gate = os.path.join(cluster.home, "gate")
    script = ("#!/bin/sh\necho started\n"
              f"i=0; while [ ! -e {gate} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
              "echo released\n")
    jobs = [submit(cluster, script, "-c", "1", "--mem=400M", "--comment",
                   "vibatch_image=testguest") for _ in range(2)]
    try:
        for job in jobs:
            wait_until(f"job {job} to start in its VM", lambda j=job: os.path.exists(
                os.path.join(cluster.home, f"slurm-{j}.out")) and "started" in output(cluster, j), 120)
        pinned = pinned_cpus(vm_env, jobs)
        allocated = {}
        for job in jobs:
            show = cluster.cmd("scontrol", "show", "job", "-d", job).stdout
            allocated[job] = set(slurm.allocation(show, cluster.node, job)[0])
        assert pinned == allocated
        assert not pinned[jobs[0]] & pinned[jobs[1]]
    finally:
        with open(gate, "w"):
            pass
    for job in jobs:
        assert cluster.wait_finished(job)["ExitCode"] == "0:0"
        assert "released" in output(cluster, job)
        assert leftovers(vm_env, job) == []
    os.unlink(gate)


def test_a_maintenance_reservation_reaches_a_running_job_as_shutdowntime(vm_env, cluster):
    """The admin books a Slurm maintenance of this node; `vibatch drain --sync` (cron) puts
    its start into the running job's $MACHINEFEATURES/shutdowntime, and withdraws it when the
    reservation is deleted, also once no job runs."""
    import datetime
    import time
    gate = os.path.join(cluster.home, "gate-maint")
    job = submit(cluster, "#!/bin/sh\necho started\n"
                 f"i=0; while [ ! -e {gate} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n"
                 'echo "shutdowntime $(cat $MACHINEFEATURES/shutdowntime)'
                 ' $(cat $JOBFEATURES/shutdowntime_job)"\n',
                 "--mem=400M", "--comment", "vibatch_image=testguest")
    start = datetime.datetime.fromtimestamp(int(time.time()) + 7200).replace(microsecond=0)
    try:
        wait_until(f"job {job} to start in its VM", lambda: os.path.exists(
            os.path.join(cluster.home, f"slurm-{job}.out")) and "started" in output(cluster, job),
            120)
        r = cluster.cmd("scontrol", "create", "reservation", "ReservationName=vbmaint",
                        f"StartTime={start.isoformat()}", "Duration=10", f"Nodes={cluster.node}",
                        "Users=root", "Flags=MAINT,IGNORE_JOBS")
        assert r.returncode == 0, r.stderr
        r = vm_env.run("drain", "--sync")
        at = int(start.timestamp())
        assert r.returncode == 0 and f"node drains at {at}" in r.stdout, r.stdout + r.stderr
        assert f"job {job}: updated" in r.stdout
    finally:
        with open(gate, "w"):
            pass
        cluster.cmd("scontrol", "delete", "ReservationName=vbmaint")
    assert cluster.wait_finished(job)["ExitCode"] == "0:0"
    assert f"shutdowntime {at} {at}\n" in output(cluster, job), output(cluster, job)
    r = vm_env.run("drain", "--sync")          # no job runs now: asked as the last job was
    assert r.returncode == 0 and "node is not draining" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(os.path.join(vm_env.cfg.state_dir, "drain.json"))
    assert leftovers(vm_env, job) == []
    os.unlink(gate)


def test_an_array_picks_its_os_by_constraint_and_each_task_gets_a_vm(vm_env, cluster):
    job = submit(cluster, '#!/bin/sh\necho "task $SLURM_ARRAY_TASK_ID on $(cat /etc/hostname)"\n',
                 "--array=1-3", "-c", "1", "--mem=400M", "--constraint=testguest",
                 "-o", "slurm-%A_%a.out")
    ids = []
    for task in (1, 2, 3):
        rec = cluster.wait_finished(f"{job}_{task}")
        assert rec["JobState"] == "COMPLETED", (rec, [open(os.path.join(cluster.home, n)).read()
                                                      for n in os.listdir(cluster.home)
                                                      if n.startswith(f"slurm-{job}")])
        ids.append(rec["JobId"])
        with open(os.path.join(cluster.home, f"slurm-{job}_{task}.out")) as f:
            assert f.read() == f"task {task} on vbguest\n"
    assert len(set(ids)) == 3
    for task_job in ids:
        assert leftovers(vm_env, task_job) == []


def cancelled_once_started(cluster, script: str) -> tuple[str, dict]:
    """Submit ``script`` (it prints "started"), scancel it as the user once it runs in its VM;
    (job id, Slurm's record once the Epilog ran)."""
    job = submit(cluster, script, "--comment", "vibatch_image=testguest")
    wait_until("the job to start in its VM", lambda: os.path.exists(
        os.path.join(cluster.home, f"slurm-{job}.out")) and "started" in output(cluster, job), 120)
    assert cluster.cmd("scancel", job, user=USER).returncode == 0
    return job, cluster.wait_finished(job)


def test_scancel_stops_the_job_and_leaves_nothing(vm_env, cluster):
    job, rec = cancelled_once_started(cluster, "#!/bin/sh\ntrap 'echo got TERM; exit 143' TERM\n"
                                      "echo started\nsleep 600 & wait\n")
    assert rec["JobState"] == "CANCELLED", rec
    assert "got TERM" in output(cluster, job)
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_scancel_of_a_job_ignoring_sigterm_is_recorded_with_slurms_signal(vm_env, cluster):
    """Slurm SIGKILLs a job that ignores SIGTERM after KillWait and records 0:9; vibatch's
    accounting record carries that signal too (it said exit code 0 before)."""
    job, rec = cancelled_once_started(cluster, "#!/bin/sh\ntrap '' TERM\necho started\n"
                                      "while :; do sleep 1; done\n")
    assert rec["JobState"] == "CANCELLED" and rec["ExitCode"] == "0:9", rec
    acct = [json.loads(line) for line in open(vm_env.cfg.accounting_file)
            if f'"job_id": "{job}"' in line]
    assert len(acct) == 1 and (acct[0]["exit_code"], acct[0].get("signal")) == (128 + 9, 9), acct
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_the_job_gets_the_submitters_umask(vm_env, cluster):
    """Slurm applies the submitter's umask (SLURM_UMASK) to the job: so does the job's VM,
    and files it writes in the shared work dir get the modes a job on the host would give."""
    modes = {}
    for mask in (0o002, 0o077):
        job = submit(cluster, f"#!/bin/sh\numask\nrm -rf u{mask:o}; mkdir u{mask:o}\n"
                     f"echo x > u{mask:o}/f\n", "--comment", "vibatch_image=testguest",
                     umask=mask)
        assert cluster.wait_finished(job)["ExitCode"] == "0:0"
        assert output(cluster, job) == f"{mask:04o}\n"
        d = os.path.join(cluster.home, f"u{mask:o}")
        modes[mask] = (os.stat(d).st_mode & 0o777, os.stat(os.path.join(d, "f")).st_mode & 0o777)
    assert modes == {0o002: (0o775, 0o664), 0o077: (0o700, 0o600)}


def test_reap_asks_slurmctld_and_ends_only_the_vm_of_a_job_it_no_longer_has(vm_env, cluster):
    """reap asks the job's batch system: the VM of a running job stays; the VM of a job
    slurmctld has no record of (an id below FirstJobId, never used) is ended and accounted."""
    job = submit(cluster, "#!/bin/sh\necho started\nsleep 600 & wait\n",
                 "--comment", "vibatch_image=testguest")
    wait_until("the job to start in its VM", lambda: os.path.exists(
        os.path.join(cluster.home, f"slurm-{job}.out")) and "started" in output(cluster, job), 120)
    from vibatch.core.jobdir import JobPaths
    from vibatch.util import read_json
    state = read_json(JobPaths.of(vm_env.cfg, job).state_file)
    assert state["batch"] == "slurm" and state["batch_env"]["SLURM_CONF"] == cluster.conf
    assert slurm.job_gone(job, state["batch_env"]) is False      # it holds this node
    lost = "6999"
    lost_epilogue_vm(vm_env, lost, USER, "slurm", state["batch_env"])
    assert slurm.job_gone(lost, state["batch_env"]) is True
    reap_ends_only(vm_env, lost, job, "slurm")
    assert read_json(JobPaths.of(vm_env.cfg, job).state_file)["phase"] == "ready"
    assert cluster.cmd("scancel", job, user=USER).returncode == 0
    assert cluster.wait_finished(job)["JobState"] == "CANCELLED"
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_the_time_limit_kills_the_job_and_leaves_nothing(vm_env, cluster):
    job = submit(cluster, "#!/bin/sh\necho started\nsleep 600\n", "--time=1")
    rec = cluster.wait_finished(job, timeout=240)
    assert rec["JobState"] == "TIMEOUT", rec
    assert "started" in output(cluster, job)
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_an_unknown_os_is_refused_at_submit_with_the_choices(vm_env, cluster):
    r = cluster.cmd("sbatch", "--export=ALL,VIBATCH_IMAGE=nosuch-os", "--wrap", "true",
                    user=USER, cwd=cluster.home)
    assert r.returncode != 0
    assert "unknown OS image 'nosuch-os' (from VIBATCH_IMAGE)" in r.stderr
    assert "testguest" in r.stderr.split("offers:")[1]
    r = cluster.cmd("sbatch", "--comment", "vibatch_image=nosuch-os", "--wrap", "true",
                    user=USER, cwd=cluster.home)
    assert r.returncode != 0 and "from the job comment" in r.stderr
    assert_node_healthy(cluster)


def test_an_unknown_os_by_constraint_is_refused_at_submit_with_the_choices(vm_env, cluster):
    """A --constraint term that is neither an offered OS nor a feature of any node: the lua
    names the choices instead of Slurm's bare "Invalid feature specification"."""
    r = cluster.cmd("sbatch", "--constraint=nosuch-os", "--wrap", "true",
                    user=USER, cwd=cluster.home)
    assert r.returncode != 0
    assert "--constraint 'nosuch-os' names no OS image of this cluster" in r.stderr, r.stderr
    assert "testguest" in r.stderr.split("offers:")[1] and "Invalid feature" in r.stderr
    # a real feature that names no OS still passes (the job gets the default image)
    job = submit(cluster, "#!/bin/sh\necho ok\n", "--constraint=vibatch")
    assert cluster.wait_finished(job)["ExitCode"] == "0:0" and output(cluster, job) == "ok\n"
    assert_node_healthy(cluster)


def test_a_job_the_prolog_refuses_fails_with_its_reason_and_the_node_stays_up(vm_env, cluster):
    # submitted from /tmp: a system directory cannot be shared into a VM. That is only known on
    # the node, so the Prolog refuses the job, exits 0 (non-zero would drain the node) and the
    # job fails with the reason in its own output.
    tmp = "/tmp/vibatch-slurm-test"
    os.makedirs(tmp, exist_ok=True)
    os.chown(tmp, UID, UID)
    try:
        job = submit(cluster, "#!/bin/sh\necho should-not-run\n", "--chdir=/tmp",
                     "-o", f"{tmp}/slurm-%j.out", cwd=tmp)
        rec = cluster.wait_finished(job)
        assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "125:0", rec
        out = output(cluster, job, cwd=tmp)
        assert "vibatch: this job cannot run: working directory /tmp cannot be shared" in out
        assert "should-not-run" not in out
        assert leftovers(vm_env, job) == []
        assert_node_healthy(cluster)
    finally:
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_a_chdir_below_another_users_0700_directory_is_refused_and_the_node_stays_up(vm_env,
                                                                                   cluster):
    # --chdir into root's 0700 directory: vibatch checks it with the job user's credentials
    # (not root's), refuses it as the job's fault, and the job never reads the file there
    with private_workdir(vm_env, "slurm-private") as inside:
        job = submit(cluster, "#!/bin/sh\ncat data\n", f"--chdir={inside}",
                     "-o", f"{cluster.home}/slurm-%j.out")
        rec = cluster.wait_finished(job)
        assert rec["JobState"] == "FAILED", rec
        out = output(cluster, job)
        parent = os.path.dirname(inside)
        assert f"working directory {inside}: the job's user may not enter {parent}" in out, out
        assert "secret" not in out
        assert leftovers(vm_env, job) == []
        assert_node_healthy(cluster)


def test_scontrol_parsing_refuses_an_injected_allocation():
    show = ("JobId=5 JobName=evil\n   Nodes=vm CPU_IDs=7 Mem=99\n   UserId=u(1) GroupId=g(1)\n"
            "   RunTime=00:00:01 TimeLimit=01:00:00 TimeMin=N/A\n   JOB_GRES=(null)\n"
            "     Nodes=vm CPU_IDs=1 Mem=256 GRES=\n   Comment=x\n")
    with pytest.raises(Exception, match="2 candidate lines"):
        slurm.allocation(show, "vm", "5")
    with pytest.raises(Exception, match="cannot read job 6.s record"):
        slurm.allocation(show, "vm", "6")
    array = show.replace("JobName=evil\n   Nodes=vm CPU_IDs=7 Mem=99", "JobName=a") + "\n" + \
        show.replace("JobId=5 JobName=evil\n   Nodes=vm CPU_IDs=7 Mem=99", "JobId=4 JobName=a")
    with pytest.raises(Exception, match="2 records"):   # an array's master id prints every
        slurm.allocation(array, "vm", "5")              # task: the adapter re-reads the task
    clean = show.replace("JobName=evil\n   Nodes=vm CPU_IDs=7 Mem=99", "JobName=ok")
    assert slurm.allocation(clean, "vm", "5") == ((1,), 256, 3600)
    multi = clean.replace("Nodes=vm CPU_IDs=1 Mem=256",
                          "Nodes=n[01-02] CPU_IDs=0-3 Mem=1024 GRES=\n     Nodes=vm CPU_IDs=2,5 Mem=512")
    assert slurm.allocation(multi, "vm", "5") == ((2, 5), 512, 3600)
    assert slurm.allocation(multi, "n02", "5")[0] == (0, 1, 2, 3)


def test_the_tmp_grant_is_read_once_or_refused():
    """--tmp is MinTmpDiskNode (MiB, or with Slurm's unit); a job name that holds a second such
    line cannot raise it."""
    line = "   MinCPUsNode=1 MinMemoryNode=600M MinTmpDiskNode={}\n"
    assert slurm.tmp_disk_mb("JobId=5 JobName=x\n" + line.format("300M")) == 300
    assert slurm.tmp_disk_mb("JobId=5 JobName=x\n" + line.format("2G")) == 2048
    assert slurm.tmp_disk_mb("JobId=5 JobName=x\n" + line.format("0")) is None
    assert slurm.tmp_disk_mb("JobId=5 JobName=x\n") is None
    with pytest.raises(Exception, match="2 candidate lines"):
        slurm.tmp_disk_mb("JobId=5 JobName=x\n" + line.format("900G") + line.format("1M"))


def test_a_maintenance_reservation_is_read_for_this_node_only():
    show = ("ReservationName=m1 StartTime=2030-01-02T03:04:05 EndTime=2030-01-02T04:04:05 "
            "Duration=01:00:00 Nodes=vm[1-3] NodeCnt=3 Flags=MAINT,SPEC_NODES State=INACTIVE\n"
            "ReservationName=m0 StartTime=2030-01-01T00:00:00 EndTime=2030-01-01T01:00:00 "
            "Duration=01:00:00 Nodes=vm2 NodeCnt=1 Flags=SPEC_NODES State=INACTIVE\n"
            "ReservationName=old StartTime=2020-01-01T00:00:00 EndTime=2020-01-01T01:00:00 "
            "Duration=01:00:00 Nodes=vm2 NodeCnt=1 Flags=MAINT State=INACTIVE\n")
    import datetime
    want = int(datetime.datetime.fromisoformat("2030-01-02T03:04:05").timestamp())
    now = datetime.datetime.fromisoformat("2026-12-02T00:00:00").timestamp()
    assert slurm.maintenance_start(show, "vm2", now) == want    # not m0 (no MAINT), not old
    assert slurm.maintenance_start(show, "vm9", now) is None
    assert slurm.maintenance_start("", "vm2", now) is None


def test_slurm_parsers():
    assert slurm.expand_hostlist("vm[1-3,7],db") == ["vm1", "vm2", "vm3", "vm7", "db"]
    assert slurm.expand_hostlist("n[08-10]") == ["n08", "n09", "n10"]
    assert slurm.parse_time_limit("1-02:03:04") == 93784
    assert slurm.parse_time_limit("05:00") == 300 and slurm.parse_time_limit("5") == 300
    assert slurm.parse_time_limit("UNLIMITED") is None
    assert slurm.image_from_comment("hi vibatch_image=a x vibatch_image=el9") == "el9"
    assert slurm.image_from_comment("myvibatch_image=a") is None
    assert slurm.network_from_comment("vibatch_image=a vibatch_network=nat") == "nat"
    assert slurm.network_from_comment("vibatch_image=a") is None
    assert slurm.image_from_constraints("bigmem&[el9*2|x]", {"el9"}) == "el9"
    assert slurm.exit_code({"SLURM_JOB_EXIT_CODE2": "7:0"}) == 7
    assert slurm.exit_code({"SLURM_JOB_EXIT_CODE2": "0:15"}) == 143
    assert slurm.exit_code({}) is None


# -- every step in the job's VM (the SPANK plugin, spank/vibatch_spank.c) -----------------------

SPANK_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "spank", "vibatch_spank.c")


def test_the_plugin_builds_with_kernel_headers_that_lack_pidfd_and_close_range(tmp_path):
    """RHEL 8's and Ubuntu 20.04's headers have no SYS_pidfd_open, SYS_pidfd_send_signal or
    SYS_close_range: the plugin is built with a <sys/syscall.h> that has only SYS_gettid (found
    before the system's, as -I is), with setup-node's -Werror. 2b93cd0 failed here
    ('SYS_close_range' undeclared). The fallback numbers are this machine's headers' own."""
    fake = tmp_path / "old" / "sys"
    fake.mkdir(parents=True)
    probe = tmp_path / "probe.c"
    probe.write_text("#include <stdio.h>\n#include <sys/syscall.h>\nint main(void) { printf("
                     "\"%d %d %d %d\", SYS_gettid, SYS_pidfd_send_signal, SYS_pidfd_open, "
                     "SYS_close_range); return 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "probe"), str(probe)], check=True)
    gettid, *numbers = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True,
                                      check=True).stdout.split()
    with open(SPANK_SRC) as f:
        src = f.read()
    for name, number in zip(("pidfd_send_signal", "pidfd_open", "close_range"), numbers):
        assert f"#define SYS_{name} {number}\n" in src, name
    (fake / "syscall.h").write_text(f"#define SYS_gettid {gettid}\n")
    build = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
             "-o", str(tmp_path / "p.so"), SPANK_SRC]
    r = subprocess.run(build[:1] + ["-I", str(tmp_path / "old")] + build[1:],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    without = src
    for name, number in zip(("pidfd_send_signal", "pidfd_open", "close_range"), numbers):
        without = without.replace(f"#define SYS_{name} {number}\n", "")
    (tmp_path / "nofallback.c").write_text(without)
    r = subprocess.run(build[:1] + ["-I", str(tmp_path / "old")] + build[1:-1]
                       + [str(tmp_path / "nofallback.c")], capture_output=True, text=True)
    assert r.returncode != 0 and "SYS_close_range" in r.stderr   # what the old headers did


# What each architecture's kernel headers (<asm/unistd.h>) number pidfd_send_signal,
# pidfd_open and close_range: one table since 5.1 (424, 434, 436), offset on some ABIs.
KERNEL_NUMBERS = {
    "x86_64": (["-D__x86_64__"], (424, 434, 436)),
    "aarch64": (["-D__aarch64__"], (424, 434, 436)),
    "ppc64le": (["-D__powerpc64__", "-D__LITTLE_ENDIAN__"], (424, 434, 436)),
    "s390x": (["-D__s390x__", "-D__s390__"], (424, 434, 436)),
    "mips o32": (["-D__mips__", "-D_MIPS_SIM=1"], (4424, 4434, 4436)),     # __NR_Linux 4000
    "mips n64": (["-D__mips__", "-D_MIPS_SIM=2"], (5424, 5434, 5436)),     # 5000
    "mips n32": (["-D__mips__", "-D_MIPS_SIM=3"], (6424, 6434, 6436)),     # 6000
    "ia64": (["-D__ia64__"], (1448, 1458, 1460)),                           # 1024
    "alpha": (["-D__alpha__"], (534, 544, 546)),                            # 110 + n: refused
    "x32": (["-D__x86_64__", "-D__ILP32__"],                               # __X32_SYSCALL_BIT
            tuple(0x40000000 + n for n in (424, 434, 436))),
}


@pytest.mark.parametrize("arch", sorted(KERNEL_NUMBERS))
def test_the_fallback_syscall_numbers_are_the_kernels_or_the_build_is_refused(arch, tmp_path):
    """Review 13 (e61bb3b): where the headers lack them the plugin defines 424, 434 and 436,
    "the same on every architecture but alpha" (refused by #error). They are right on x86_64,
    aarch64, ppc64le and s390x; MIPS (4000/5000/6000 + n), ia64 (1024 + n) and x32 (bit 30
    set) number them otherwise, and there the plugin would call other system calls. The
    fallback block alone is preprocessed as each target predefines its macros."""
    with open(SPANK_SRC) as f:
        src = f.read()
    start = src.index("#ifndef SYS_pidfd_send_signal")
    end = src.index("#endif", src.index("#error", start)) + len("#endif")
    block = src[start:end] + "\nNUMBERS SYS_pidfd_send_signal SYS_pidfd_open SYS_close_range\n"
    (tmp_path / "block.c").write_text(block)
    flags, want = KERNEL_NUMBERS[arch]
    r = subprocess.run(["gcc", "-E", "-P", "-undef", *flags, str(tmp_path / "block.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        assert "#error" in r.stderr     # refused at build time: fine
        return
    line = next(x for x in r.stdout.splitlines() if x.startswith("NUMBERS"))
    assert tuple(int(n) for n in line.split()[1:]) == want, arch


BOOT_ID = "/proc/sys/kernel/random/boot_id"   # one per boot: the same in every step of one VM


def host_boot_id() -> str:
    with open(BOOT_ID) as f:
        return f.read().strip()


def converse(c, argv, probe: str, want: bytes, timeout: float = 240):
    """Run ``argv`` as the batch user on a new pseudo-terminal (its controlling terminal), as
    someone typing: type ``probe`` until the terminal shows a match of the regex ``want``
    (typed text that comes before the program reads it may be dropped), then ``exit``. Returns
    (the match, the exit status)."""
    import fcntl
    import pty
    import re
    import select
    import termios
    import time
    master, slave = pty.openpty()

    def child_tty():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(["runuser", "-u", USER, "--", *argv], stdin=slave, stdout=slave,
                         stderr=slave, cwd=c.home, preexec_fn=child_tty,
                         env={**c.env, "SHELL": "/bin/sh", "HOME": c.home})
    os.close(slave)
    seen, found, next_probe = b"", None, 0.0
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end and p.poll() is None:
            if found is None and time.monotonic() >= next_probe:
                os.write(master, probe.encode() + b"\n")
                next_probe = time.monotonic() + 3
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
            if found is None:
                found = re.search(want, seen)
                if found is not None:
                    os.write(master, b"exit\n")
        rc = p.wait(timeout=max(1, end - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    assert found is not None, seen.decode(errors="replace")
    return found, rc


def test_srun_steps_in_a_batch_script_run_in_its_vm(vm_env, cluster):
    """The script runs in the guest; each `srun` there makes a real Slurm step (sacct-visible),
    whose task the plugin sends back into the same VM; output, captures and exit codes work,
    and an srun option that would run a program on the host is refused."""
    job = submit(cluster, "#!/bin/sh\n#SBATCH --mem=400M\n"
                 f'echo "batch $(cat {BOOT_ID})"\n'
                 "srun hostname\nsrun uname -r\n"
                 f"srun cat {BOOT_ID} | sed 's/^/step /'\n"
                 'x=$(srun echo captured); echo "got $x"\n'
                 "srun sh -c 'exit 3'; echo \"rc $?\"\n"
                 "srun --task-ep=/bin/true true; echo \"refused $?\"\n",
                 "--comment", "vibatch_image=testguest")
    rec = cluster.wait_finished(job)
    out = output(cluster, job)
    assert rec["JobState"] == "COMPLETED", (rec, out)
    lines = out.splitlines()
    boot = [line.split()[1] for line in lines if line.startswith("batch ")]
    assert boot and boot[0] != host_boot_id(), out
    assert lines[1:3] == [host_name(cluster.node, job), guest_kernel()], out   # its own VM
    assert f"step {boot[0]}" in lines, out            # the same VM: one boot
    assert "got captured" in lines and "rc 3" in lines and "refused 125" in lines, out
    assert "--task-ep=/bin/true: srun options that run a program on the host" in out, out
    assert leftovers(vm_env, job) == []
    assert_node_healthy(cluster)


def test_srun_pty_from_a_terminal_gets_a_shell_in_the_guest(vm_env, cluster):
    found, rc = converse(cluster, ["srun", "--pty", "--mem=400M", "/bin/sh"],
                         "echo kernel=$(uname -r) host=$(cat /etc/hostname)",
                         rb"kernel=(\S+) host=vbguest")
    assert found.group(1).decode() == guest_kernel() and rc == 0


def test_a_salloc_shell_and_its_sruns_run_in_one_guest(vm_env, cluster):
    """salloc's shell is the interactive step (LaunchParameters=use_interactive_step), in the
    VM; an srun typed there is a step of the same job, in the same VM."""
    uuid = rb"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    found, rc = converse(cluster, ["salloc", "--mem=400M"],
                         f"echo shell=$(cat {BOOT_ID}) step=$(srun cat {BOOT_ID}) "
                         "k=$(srun uname -r)", rb"shell=" + uuid + rb" step=" + uuid + rb" k=(\S+)")
    shell, step, kernel = (g.decode() for g in found.groups())
    assert shell == step != host_boot_id() and kernel == guest_kernel() and rc == 0


def test_a_step_cannot_run_the_users_code_on_the_host(vm_env, cluster):
    """Two ways a step's user could run code on the host before the task: LD_PRELOAD in the
    task's environment (--export) and srun --task-prolog (which slurmstepd runs after the SPANK
    task_init, task.c's exec_task). First the preload is shown working on the host, then
    through srun neither runs there: the plugin starts the forwarder with a fixed environment
    before either could."""
    mark = os.path.join(cluster.home, "ran-on")
    src = os.path.join(cluster.home, "evil.c")
    lib = os.path.join(cluster.home, "evil.so")
    with open(src, "w") as f:
        f.write('#include <stdio.h>\n#include <sys/utsname.h>\n'
                '__attribute__((constructor)) static void mark(void) { struct utsname u; '
                f'FILE *f = fopen("{mark}", "a"); if (f && !uname(&u)) '
                'fprintf(f, "%s\\n", u.release); if (f) fclose(f); }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", lib, src], check=True)
    prolog = os.path.join(cluster.home, "tp.sh")
    with open(prolog, "w") as f:
        f.write(f"#!/bin/sh\nuname -r >> {mark}\n")
    for path in (lib, prolog):
        os.chmod(path, 0o755)
    r = cluster.cmd("env", f"LD_PRELOAD={lib}", "/bin/true", user=USER, cwd=cluster.home)
    with open(mark) as f:
        assert r.returncode == 0 and f.read() == os.uname().release + "\n"  # the attack works
    os.unlink(mark)
    r = cluster.cmd("srun", "--mem=400M", f"--task-prolog={prolog}",
                    f"--export=ALL,LD_PRELOAD={lib}", "sh", "-c", "echo k=$(uname -r)",
                    user=USER, cwd=cluster.home, timeout=180)
    assert r.returncode == 0 and r.stdout == f"k={guest_kernel()}\n", r.stdout + r.stderr
    ran = open(mark).read() if os.path.exists(mark) else ""
    assert os.uname().release not in ran, ran
