"""Torque/PBS by contract: the harness in pbsmom.py calls the shipped hooks exactly as a real
pbs_mom 6.1 was seen calling them (umask 0077, cwd mom_priv, pbs_environment + PBS_* variables,
the user's supplementary groups, `job_starter <login shell>` with the script's path on stdin,
$prologalarm - 10 s then SIGKILL of the session) and applies its rules: prologue 1 aborts the job
and its output never reaches the user; any other failure reruns it at once on the same node."""
import json
import os
import pwd
import subprocess
import sys
import time

import pytest

import yaml

from pbsmom import Job, PbsMom, TmPort, fake_pbsnodes
from vmhelp import (batch_user, guest_kernel, install_shims, leftovers, variant, wait_until,
                    warm_shapes)
from vibatch import config
from vibatch.batch import torque

USER, UID = "vbt-torque", 23403


def install_hooks(dest: str, config_path: str, alarm: int = 0) -> str:
    """Install the shipped shims as an admin would, pointing at this test node's config."""
    replace = {"/etc/vibatch/vibatch.yaml": config_path,
               "/opt/vibatch/venv/bin/python": sys.executable}
    if alarm:
        replace[" --config "] = f" --alarm {alarm} --config "
    return install_shims("torque", dest, replace,
                         {"prologue": 0o500, "epilogue": 0o500, "job_starter": 0o555})


def mom_for(vm_env, name: str, config_path: str, alarm: int = 300) -> PbsMom:
    """A harness pbs_mom; the hooks' config names its TM port (torque.mom_manager_port)."""
    base = os.path.join(vm_env.base, f"torque-{name}")
    os.makedirs(base, exist_ok=True)
    tm = TmPort()
    with open(config_path) as f:
        data = yaml.safe_load(f)
    data.setdefault("torque", {})["mom_manager_port"] = tm.port
    config_path = os.path.join(base, "vibatch-tm.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(data, f)
    os.chmod(config_path, 0o644)
    hooks = install_hooks(os.path.join(base, "hooks"), config_path, alarm if alarm != 300 else 0)
    return PbsMom(os.path.join(base, "pbs_home"), hooks, alarm,
                  offline_flag=os.path.join(base, "offline"), tm=tm)


@pytest.fixture(scope="module")
def torque_user(vm_env):
    # a login shell the guest does not have: pbs_mom passes it to the job starter
    # most jobs here: nodes=1 and mem=512mb (vmhelp.warm_shapes)
    with batch_user(vm_env, USER, UID, shell="/bin/bash") as home, \
            warm_shapes(vm_env, [(1, 512)]):
        yield home


@pytest.fixture(scope="module")
def mom(vm_env, torque_user):
    return mom_for(vm_env, "main", vm_env.config_path)


@pytest.mark.vm
def test_a_job_runs_in_its_vm_as_pbs_mom_starts_it(vm_env, tracker, mom, torque_user):
    # pbs_mom: prologue under umask 0077 (the job's disk must still be readable by QEMU's
    # user), then `job_starter /bin/bash` with "<script> <qsub -F args>" on stdin; the guest
    # has no bash, and this script has no #! line: the image's shell runs it
    job = Job(tracker.job_id(".torque-srv"), USER, mem="512mb", args="one 'two words'",
              script='echo "in $(cat /etc/hostname) $(uname -r) as $(id -un), cwd $PWD, '
                     'job $PBS_JOBID"\nfor a in "$@"; do echo "arg: $a"; done\n'
                     'echo done > result.txt\nexit 7\n')
    r = mom.run(job)
    assert (r.exit_status, r.runs) == (7, 1), r.spool_err
    assert r.out.splitlines() == [
        f"in vbguest {guest_kernel()} as {USER}, cwd {torque_user}, job {job.job_id}",
        "arg: one", "arg: two words"], r.err
    result = os.path.join(torque_user, "result.txt")
    assert os.stat(result).st_uid == UID and open(result).read() == "done\n"
    rec = [json.loads(line) for line in open(vm_env.cfg.accounting_file)]
    assert [x["exit_code"] for x in rec if x["job_id"] == job.job_id] == [7]
    assert leftovers(vm_env, job.job_id) == []
    assert mom.epilogue(job, 7) == 0          # a second epilogue is harmless


@pytest.mark.vm
def test_qdel_runs_the_jobs_trap_in_the_guest(vm_env, tracker, mom, torque_user):
    # a script with its own #! line; qdel is SIGTERM to the job's session
    job = Job(tracker.job_id(".torque-srv"), USER, script=(
        "#!/bin/sh\ntrap 'echo trapped in $(cat /etc/hostname); exit 3' TERM\n"
        "echo started\nwhile :; do sleep 1; done\n"))
    ou = os.path.join(mom.spool, f"{job.job_id}.OU")

    def qdel(p):
        wait_until(lambda: "started" in open(ou).read() or p.poll() is not None, 120)
        assert p.poll() is None, open(ou.replace(".OU", ".ER")).read()
        mom.qdel(p)
    r = mom.run(job, during=qdel)
    assert r.exit_status == 3 and r.out == "started\ntrapped in vbguest\n", r.err
    assert leftovers(vm_env, job.job_id) == []


@pytest.mark.vm
def test_qsig_suspend_pauses_the_domain_and_resume_goes_on(vm_env, tracker, mom, torque_user):
    """qsig -s suspend stops the job starter (by contract: SIGTSTP, then SIGSTOP to the session,
    as the real pbs_mom was seen doing); the watcher the prologue started suspends the domain
    (libvirt's CPU time stands still); on resume the guest runs again, its clock is set, and
    the job ends with its own exit code."""
    import libvirt
    from vibatch.vm import hypervisor
    gate = os.path.join(torque_user, "gate-susp")
    job = Job(tracker.job_id(".torque-srv"), USER, script=(
        f"echo started\nwhile [ ! -e {gate} ]; do :; done\n"
        'echo "clock $(date +%s)"\nexit 3\n'))
    ou = os.path.join(mom.spool, f"{job.job_id}.OU")
    seen = {}

    def suspend(p):
        try:
            wait_until(lambda: "started" in open(ou).read() or p.poll() is not None, 120)
            assert p.poll() is None, open(ou.replace(".OU", ".ER")).read()
            conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
            try:
                dom = hypervisor.lookup(conn, "vibatch-" + job.job_id)
                mom.qsig_suspend(p)
                assert wait_until(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED, 30)
                t0 = hypervisor.cpu_time_s(dom)
                time.sleep(3)          # measuring: CPU time over 3 s of suspension
                seen["grown"] = hypervisor.cpu_time_s(dom) - t0
                mom.qsig_resume(p)
                assert wait_until(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 30)
            finally:
                conn.close()
        finally:
            with open(gate, "w"):
                pass
            seen["released"] = time.time()
    r = mom.run(job, during=suspend)
    os.unlink(gate)
    assert seen["grown"] < 0.1, f"the suspended guest used {seen['grown']:.2f} s of CPU in 3 s"
    assert r.exit_status == 3, r.err
    clock = [int(x.split()[1]) for x in r.out.splitlines() if x.startswith("clock ")]
    assert clock and abs(clock[0] - seen["released"]) < 2, (clock, seen, r.out)
    assert leftovers(vm_env, job.job_id) == []


@pytest.mark.vm
def test_the_vm_is_adopted_into_the_job_and_counted_where_pbs_mom_counts_it(
        vm_env, tracker, mom, torque_user):
    """Once the job starter runs, the prologue's helper hands QEMU's session and each share
    launcher's to pbs_mom (TM_ADOPT_JOBID on its TM port) under the job's id. None of them has
    a session leader, so pbs_mom marks them exited at once and never signals them (the job's
    exit code holds; the qdel test shows the TERM trap too). resources_used counts the guest's
    ~10 s burn and 300 MiB (>= 8 s, >= 300 MiB) where QEMU's parent is not PID 1 (libvirtd
    under a subreaper); where it is PID 1, pbs_mom leaves QEMU out, as the real 6.1.3 does."""
    from vibatch.core.jobdir import JobPaths
    from vibatch.util import read_json
    job = Job(tracker.job_id(".torque-srv"), USER, mem="800mb", script=(
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count=300 2>/dev/null\n"
        "end=$(( $(date +%s) + 10 )); while [ $(date +%s) -lt $end ]; do :; done\n"
        "echo burnt\nexit 4\n"))
    seen = {}

    def note(p):       # the prologue's record of what pbs_mom took (the state dir goes at the end)
        path = os.path.join(JobPaths.of(vm_env.cfg, job.job_id).state, "adopted.json")
        wait_until(lambda: os.path.exists(path) or p.poll() is not None, 120)
        seen.update(read_json(path, {}) or {})
    r = mom.run(job, during=note)
    print("adopted:", r.adopted, "resources_used:", r.resources_used, "refused:", mom.tm.refused)
    assert (r.exit_status, r.out) == (4, "burnt\n"), r.err
    comms = [a.comm for a in r.adopted]
    assert {a.job_id for a in r.adopted} == {job.job_id} and not mom.tm.refused
    assert sum(c.startswith("qemu") for c in comms) == 1, comms
    assert sum(c.startswith("virtiofsd") for c in comms) >= 1, comms    # the share launchers
    assert not any(a.running for a in r.adopted), r.adopted   # leaderless: never signalled
    assert sorted(int(sid) for sid in seen.get("taken", {})) == sorted(a.sid for a in r.adopted)
    qemu = next(a for a in r.adopted if a.comm.startswith("qemu"))
    if qemu.ppid != 1:
        assert r.resources_used["cput_s"] >= 8, r.resources_used
        assert r.resources_used["mem_kb"] >= 300 << 10, r.resources_used
    else:
        assert r.resources_used["cput_s"] < 8, r.resources_used   # only the forwarder counted
    assert leftovers(vm_env, job.job_id) == []


@pytest.mark.vm
def test_each_task_of_a_job_array_runs_in_its_own_vm(vm_env, tracker, mom, torque_user):
    # qsub -t 1-2 on a real pbs_mom: the hooks get the ids N[1].srv and N[2].srv (brackets in
    # the id, the files named N-1.srv), PBS_ARRAYID in the job's environment. On the code of
    # 870f6ca the brackets made the Job Features' job_id refused: a node fault for every task,
    # and the real node was taken out by a user's ordinary job array.
    base = tracker.job_id("")
    tasks = [f"{base}[{i}].torque-srv" for i in (1, 2)]
    tracker.jobs.extend(tasks)
    for i, task in enumerate(tasks, 1):
        job = Job(task, USER, script='echo "task $PBS_ARRAYID of $PBS_JOBID in '
                                     '$(cat /etc/hostname), features job $(cat $JOBFEATURES/job_id)"\n')
        r = mom.run(job, max_runs=2)
        assert (r.exit_status, r.runs) == (0, 1), r.spool_err
        assert r.out == f"task {i} of {task} in vbguest, features job {task}\n", r.err
        assert leftovers(vm_env, task) == [] and not mom.offline()
    rec = [json.loads(line) for line in open(vm_env.cfg.accounting_file)]
    assert sorted(x["job_id"] for x in rec if x["job_id"] in tasks) == tasks   # one VM each


def test_an_array_task_id_is_a_plain_feature_value():
    from vibatch.core import features
    assert features.as_args({}, {"job_id": "12[3].srv"}) == ["j:job_id=12[3].srv"]


def test_a_jobs_fault_fails_it_with_the_reason_in_its_own_error_file(vm_env, tracker, mom,
                                                                     torque_user):
    # pbs_mom never copies an aborted job's (prologue exit 1) output to the user: the reason
    # must come through the job starter
    job = Job(tracker.job_id(".torque-srv"), USER, mem="4096gb")
    r = mom.run(job)
    assert r.runs == 1 and r.exit_status == 125, (r.exit_status, r.spool_err)
    assert "vibatch: this job cannot run: 4194304 MiB requested; this node gives jobs at most" \
        in r.err
    assert leftovers(vm_env, job.job_id) == [] and not mom.offline()
    job = Job(tracker.job_id(".torque-srv"), USER, nodes="1:ppn=64")
    r = mom.run(job)
    assert r.exit_status == 125 and "64 cores requested" in r.err, r.spool_err
    assert leftovers(vm_env, job.job_id) == [] and not mom.offline()


def node_fault_mom(vm_env, name: str, pbsnodes_rc: int = 0):
    base = os.path.join(vm_env.base, f"torque-{name}")
    os.makedirs(base, exist_ok=True)
    log, flag = os.path.join(base, "pbsnodes.log"), os.path.join(base, "offline")
    tool = fake_pbsnodes(os.path.join(base, "pbsnodes"), log, flag, pbsnodes_rc)
    # a node whose QEMU is gone: every VM start fails, quickly, as the node's fault
    cfg = variant(vm_env, name, {"vm": {"emulator": "/nonexistent/qemu-system-x86_64"},
                                 "torque": {"pbsnodes": tool, "node_name": "node07",
                                            "max_node_faults": 3, "fault_backoff_s": 1}})
    return mom_for(vm_env, name, cfg), log, cfg


def test_a_node_fault_backs_off_then_takes_the_node_out(vm_env, tracker, torque_user):
    mom, log, cfg = node_fault_mom(vm_env, "nodefault")
    job = Job(tracker.job_id(".torque-srv"), USER)
    r = mom.run(job, max_runs=6)
    # pbs_mom reruns at once: the hooks themselves must stop the loop
    assert r.runs == 3 and mom.offline(), (r.runs, r.spool_err)
    gaps = [b - a for a, b in zip(r.prologue_starts, r.prologue_starts[1:])]
    assert gaps[0] >= 1 and gaps[1] >= 2, gaps          # back-off 1 s, then 2 s
    args = open(log).read().splitlines()
    assert args[0] == "-o" and args[1] == "-N" and args[3] == "node07", args
    assert f"job {job.job_id} failed 3 times here" in args[2] and "node07" not in args[2]
    assert "took node node07 out of service" in r.spool_err
    assert leftovers(vm_env, job.job_id) == []
    st = subprocess.run([sys.executable, "-m", "vibatch", "--config", cfg, "status"],
                        capture_output=True, text=True, timeout=60)
    assert "node taken out of service by vibatch" in st.stdout, st.stdout + st.stderr


def test_a_node_fault_that_cannot_offline_the_node_fails_the_job_with_the_reason(
        vm_env, tracker, torque_user):
    mom, log, _cfg = node_fault_mom(vm_env, "nodefault-nopbsnodes", pbsnodes_rc=1)
    job = Job(tracker.job_id(".torque-srv"), USER)
    r = mom.run(job, max_runs=6)
    assert r.runs == 3 and not mom.offline() and r.exit_status == 125, r.spool_err
    assert "node node07 failed to start this job's VM 3 times" in r.err
    assert leftovers(vm_env, job.job_id) == []


@pytest.mark.vm
def test_a_hung_boot_requeues_before_pbs_mom_kills_the_session(vm_env, tracker, torque_user):
    cfg = variant(vm_env, "torque-alarm", {"vm": {"boot_timeout_s": 120},
                                           "torque": {"fault_backoff_s": 30}})
    # $prologalarm 26: pbs_mom SIGKILLs the session at 16 s; vibatch gives up at 6 s, cleans
    # up, and its back-off stays within what is left
    mom = mom_for(vm_env, "alarm", cfg, alarm=26)
    job = Job(tracker.job_id(".torque-srv"), USER, nodes="1:ppn=1:silent")
    t0 = time.monotonic()
    r = mom.run(job, max_runs=1)
    assert r.exit_status == -14 and "node fault" in r.spool_err, r.spool_err
    assert "did not finish within 6 s" in r.spool_err and time.monotonic() - t0 < 16
    assert leftovers(vm_env, job.job_id) == []


def test_the_starter_without_a_vm_or_a_script_fails_the_job_with_a_message(vm_env, mom,
                                                                            torque_user):
    job = Job("99999.torque-srv", USER)
    p = mom.start_starter(job)
    assert p.wait(timeout=60) == 125
    assert "has no running VM on this node" in open(os.path.join(mom.spool, "99999.torque-srv.ER")).read()
    os.unlink(os.path.join(mom.spool, "99999.torque-srv.ER"))
    pw = pwd.getpwnam(USER)
    r = subprocess.run([os.path.join(mom.hooks, "job_starter"), "/bin/bash"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       env={"PBS_JOBID": "99999.torque-srv", "PATH": "/bin:/usr/bin"},
                       user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    assert r.returncode == 125 and "held no complete line naming the job script" in r.stderr


def test_limits_node_properties_and_the_script_line(tmp_path, monkeypatch):
    (tmp_path / "state").mkdir()
    monkeypatch.setattr(torque, "home_of", lambda user: str(tmp_path))   # the job's workdir
    cfg = config.parse({"state_dir": str(tmp_path / "state"), "library_dir": str(tmp_path / "lib"),
                        "images": {"aliases": {"el9": "alma9"}}}, "t")
    assert torque.parse_limits("neednodes=2:ppn=4:el9+1:ppn=2,mem=2gb") == \
        {"neednodes": "2:ppn=4:el9+1:ppn=2", "mem": "2gb"}
    assert torque.node_spec({"nodes": "1:ppn=3:bigmem:el9"}) == (3, ["bigmem", "el9"])
    assert torque.parse_size_mb("2gb") == 2048 and torque.parse_size_mb("1048576kb") == 1024
    assert torque.parse_walltime("01:02:03") == 3723 and torque.parse_walltime("90") == 90
    with pytest.raises(Exception, match="invalid Torque memory size"):
        torque.parse_size_mb("lots")
    # argv 5 as pbs_mom 6.1 passes it
    job = torque.job_from_prologue(cfg, ["7.srv", "nobody", "nogroup", "n",
                                         "walltime=00:05:00,mem=1gb,nodes=1:ppn=2:bigmem:el9,"
                                         "neednodes=1:ppn=2:bigmem:el9", "short", "proj",
                                         "/var/spool/torque/mom_priv/jobs/7.srv.SC"])
    assert (job.cores, job.memory_mb, job.image, job.walltime_s, job.queue, job.account) == \
        (2, 1024, "el9", 300, "short", "proj")
    plain = torque.job_from_prologue(cfg, ["7.srv", "nobody", "g", "n", "ncpus=3", "q", ""])
    assert (plain.cores, plain.image, plain.account) == (3, None, None)
    with pytest.raises(Exception, match="expected at least 7"):
        torque.job_from_prologue(cfg, ["7.srv"])
    sc = "/var/spool/torque/mom_priv/jobs/7.srv.SC"
    assert torque.parse_script_line(sc) == (sc, [])
    assert torque.parse_script_line(f"exec {sc} a 'b c' \"d\"") == (sc, ["a", "b c", "d"])
    with pytest.raises(Exception, match="does not name a job script"):
        torque.parse_script_line("")
    with pytest.raises(Exception, match="cannot split"):
        torque.parse_script_line(f"{sc} 'open")


def test_node_fault_backoff_stays_within_the_alarm():
    from vibatch.batch.faults import backoff_s
    assert [backoff_s(n, 10, 1000) for n in (1, 2, 3)] == [10, 20, 40]
    assert backoff_s(3, 10, 25) == 25 and backoff_s(1, 10, -3) == 0


# the request the real pbs_mom 6.1.3.h5 took (Task adopted, job 23.vm, session 7696)
SEEN_ADOPT = b"+5+2+523.vm2+12ADOPT COOKIE3+114+0+04+76964+7697+523.vm"


def test_the_tm_adoption_is_what_pbs_mom_took_and_a_refusal_is_an_error():
    import socket
    import threading
    from vibatch.batch import pbstm
    assert pbstm.adopt_request("23.vm", 7696, 7697) == SEEN_ADOPT
    for v in (0, 9, 10, 999, 1234567890, -3):
        import io
        assert pbstm.read_dis_int(io.BytesIO(pbstm.dis_int(v))) == v
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    got = []

    def answer(replies):
        for reply in replies:
            c, _ = srv.accept()
            with c:
                got.append(c.recv(4096))
                c.sendall(reply)
    t = threading.Thread(target=answer, args=([b"+0", b"3+999", b"x"],), daemon=True)
    t.start()
    port = srv.getsockname()[1]
    pbstm.adopt(port, "23.vm", 7696, 7697)
    with pytest.raises(pbstm.TmError, match="no such job"):
        pbstm.adopt(port, "24.vm", 7696, 7697)
    with pytest.raises(pbstm.TmError, match="malformed"):
        pbstm.adopt(port, "25.vm", 7696, 7697)
    t.join(10)
    srv.close()
    assert got[0] == SEEN_ADOPT


def test_a_vm_session_with_a_live_leader_is_not_adopted(monkeypatch):
    """pbs_mom would keep such a task running and SIGTERM it at qdel (the guest killed before
    its TERM trap): only leaderless sessions are handed over."""
    from vibatch.core import pause
    procs = {10: ["S", "1", "10", "9"],      # QEMU: session 9, leader gone
             20: ["S", "1", "20", "20"],     # a session leader itself
             9: None, }
    monkeypatch.setattr(pause, "proc_stat", lambda pid, uid=None: procs.get(pid))
    logged = []
    monkeypatch.setattr(torque, "log_error", lambda what, e: logged.append(str(e)))
    got = torque.vm_sessions([10, 20])
    assert list(got) == [9] and got[9]["pid"] == 10 and got[9]["ppid"] == 1
    assert "session 20" in logged[0] and "live leader" in logged[0]


def test_a_job_with_a_vmem_limit_keeps_its_vm_out_of_pbs_mom(monkeypatch):
    """pbs_mom kills a job whose summed address space passes its vmem/pvmem (mom_over_limit);
    QEMU's alone is larger than the guest's memory: such a job's VM is not adopted (the suspend
    watcher still starts); any other job's is."""
    argv = ["7.srv", "u", "u", "job.sh", "nodes=1:ppn=1,walltime=00:10:00,vmem=2gb,neednodes=1",
            "batch", "", "/x"]
    assert torque.SYSTEM.asking_env({}, argv) == {"vmem_limited": "1"}
    argv[4] = "nodes=1:ppn=1,walltime=00:10:00,mem=2gb,neednodes=1"
    assert torque.SYSTEM.asking_env({}, argv) == {}
    watched, adopted = [], []
    monkeypatch.setattr(torque, "job_uid", lambda cfg, job: 1000)
    monkeypatch.setattr(torque, "watcher", lambda cfg, job: watched.append)
    monkeypatch.setattr(torque, "adopt_vm", lambda cfg, job, uid, pids: adopted.append(pids) or {})
    cfg = config.Config()
    assert torque.adopter(cfg, "7.srv", {"vmem_limited": "1"})([5, 6]) == {}
    assert watched == [[5, 6]] and adopted == []
    torque.adopter(cfg, "8.srv", {})([5, 6])
    assert adopted == [[5, 6]]


def test_a_pcput_limit_or_a_cgroup_mom_keeps_the_vm_out(monkeypatch, tmp_path):
    """pcput is per process (QEMU is one for all vCPUs); a pbs_mom with cgroups or cpusets would
    move QEMU out of libvirt's cap and pinning: neither gets the VM."""
    argv = ["7.srv", "u", "u", "job.sh", "nodes=1:ppn=2,pcput=01:00:00,neednodes=1", "batch", "", "/x"]
    assert torque.SYSTEM.asking_env({}, argv) == {"vmem_limited": "1"}
    adopted, logged = [], []
    monkeypatch.setattr(torque, "job_uid", lambda cfg, job: 1000)
    monkeypatch.setattr(torque, "watcher", lambda cfg, job: None)
    monkeypatch.setattr(torque, "adopt_vm", lambda cfg, job, uid, pids: adopted.append(pids) or {})
    monkeypatch.setattr(torque, "log_error", lambda what, e: logged.append(str(e)))
    monkeypatch.setattr(torque, "TORQUE_CGROUPS", (str(tmp_path / "torque"),))
    cfg = config.Config()
    torque.adopter(cfg, "8.srv", {})([5, 6])
    assert adopted == [[5, 6]]          # no cgroup directory: handed over
    (tmp_path / "torque").mkdir()
    assert torque.adopter(cfg, "9.srv", {})([5, 6]) == {}
    assert adopted == [[5, 6]] and "cgroups or cpusets" in logged[0]


def test_a_malformed_or_endless_dis_integer_is_refused():
    import io
    from vibatch.batch import pbstm
    for data in (b"1" * 10_000, b"2+5", b"0+1", b"x", b"", b"99" + b"+1"):
        with pytest.raises(pbstm.TmError):
            pbstm.read_dis_int(io.BytesIO(data))
