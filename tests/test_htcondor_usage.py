"""HTCondor's view of the VM (batch/htcondor_usage.py) without daemons: the cgroup parsers on
this host's own files and forged ones, the move of a real process into a real cgroup v1
freezer made here, and the watcher under a cgroup freeze (a recording stand-in for the domain).
The real route is tested by contract (test_batch_htcondor.py, real VMs) and was seen on a real
HTCondor 25.0.13 (docs/batch/htcondor.md)."""
import os
import subprocess
import sys
import threading
import time

import pytest

from test_pause import FakeDomain, no_pidfd, wait_for
from vibatch import config
from vibatch.batch import htcondor_usage as usage
from vibatch.core import pause

FREEZER = "/sys/fs/cgroup/freezer"


def test_mount_points_name_each_v1_controller(tmp_path):
    """The whole hierarchy's mount of each controller (a bind mount of a subtree, listed
    first, is not it)."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "29 25 0:26 /htcondor/x /tmp/bound rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        "30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
        "31 25 0:27 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer\n"
        "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "33 25 0:29 / /proc rw - proc proc rw\n")
    assert usage.mount_points(str(info)) == {"cpu": "/sys/fs/cgroup/cpu,cpuacct",
                                             "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                                             "freezer": "/sys/fs/cgroup/freezer",
                                             usage.V2: "/sys/fs/cgroup/unified"}


def test_a_cgroup_name_with_a_newline_cannot_forge_a_line(monkeypatch):
    """A job's user owns its cgroup directory and may make sub-cgroups with any name: one
    holding a newline would add a line of its own to /proc/PID/cgroup. It is refused."""
    files = {1: "2:cpuacct:/htcondor/job/a\n2:cpuacct:/machine/other\n1:freezer:/htcondor/job\n",
             2: "2:cpuacct:/\n1:freezer:/\n"}
    monkeypatch.setattr(usage, "_read", lambda path: files[int(path.split("/")[2])])
    with pytest.raises(ValueError):
        usage.job_cgroups(1, 2)
    files[1] = "2:cpuacct:/htcondor/job/a\n1:freezer:/htcondor/job\n0::/evil\n"   # extra id
    with pytest.raises(ValueError):
        usage.job_cgroups(1, 2)


def test_the_job_cgroups_are_where_the_wrapper_differs_from_its_starter(monkeypatch):
    files = {1: "3:memory:/htcondor/j\n2:cpuacct:/htcondor/j\n1:cpuset:/\n0::/\n",
             2: "3:memory:/\n2:cpuacct:/\n1:cpuset:/\n0::/\n"}
    monkeypatch.setattr(usage, "_read", lambda path: files[int(path.split("/")[2])])
    monkeypatch.setattr(usage, "mount_points", lambda: {"memory": "/m", "cpuacct": "/c",
                                                        "cpuset": "/s"})
    cg = usage.job_cgroups(1, 2)
    assert cg.job == {"memory": "/m/htcondor/j", "cpuacct": "/c/htcondor/j"}
    assert cg.starter == {"memory": "/m/", "cpuacct": "/c/"}
    assert cg.v2 is None and cg.v2_starter is None       # v2 the same: not the job's
    files[1] = files[2]      # under the procd: no cgroup of the job's
    assert usage.job_cgroups(1, 2).job == {}


def test_on_cgroup_v2_the_job_cgroup_is_named_and_nothing_is_moved_there(monkeypatch):
    """A v2 starter (25.0.13's source) puts the wrapper in ``<leaf>/<name>.scope``, a sibling
    of its own cgroup: the watcher gets both directories; no v1 hierarchy is the job's, so
    take() moves QEMU nowhere (the one v2 hierarchy holds libvirt's cap and pinning)."""
    files = {1: "0::/system.slice/condor.service/htcondor/j/j.scope\n",
             2: "0::/system.slice/condor.service/starter\n"}
    monkeypatch.setattr(usage, "_read", lambda path: files[int(path.split("/")[2])])
    monkeypatch.setattr(usage, "mount_points", lambda: {usage.V2: "/sys/fs/cgroup"})
    cg = usage.job_cgroups(1, 2)
    assert cg.job == {} and cg.starter == {}
    assert cg.v2 == "/sys/fs/cgroup/system.slice/condor.service/htcondor/j/j.scope"
    assert cg.v2_starter == "/sys/fs/cgroup/system.slice/condor.service/starter"
    files[1] = "0::/system.slice/../../evil\n"      # never a path out of the hierarchy
    assert usage.job_cgroups(1, 2).v2 is None


@pytest.fixture
def v2_cgroup():
    """A leaf and its .scope in this host's unified hierarchy, as a v2 starter makes them
    (cgroup.freeze and cgroup.events are v2's core files: no controller is needed)."""
    top = usage.mount_points().get(usage.V2)
    if os.geteuid() != 0 or not top or not os.path.exists(os.path.join(top, "cgroup.procs")):
        pytest.skip("needs root and a cgroup v2 hierarchy")
    leaf = os.path.join(top, f"vbt-usage2-{os.getpid()}")
    scope = os.path.join(leaf, "j.scope")
    os.makedirs(scope)
    try:
        yield leaf, scope
    finally:
        for d in (scope, leaf):
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.1)


def test_a_cgroup_v2_freeze_suspends_the_domain_and_the_thaw_resumes_it(v2_cgroup):
    """condor_suspend on v2 writes 1 to the leaf's cgroup.freeze: the job's task shows "S",
    not "T", and QEMU is not in the cgroup. Before, the watcher saw nothing and the guest ran
    on (shown first); now it suspends the domain, and resumes it and sets the clock at the
    thaw."""
    leaf, scope = v2_cgroup
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    cg = usage.JobCgroups({}, {}, scope, None)
    freeze = os.path.join(leaf, "cgroup.freeze")

    def follow(**kw):
        dom, resumed, result = FakeDomain(), [], {}
        t = threading.Thread(target=lambda: result.update(why=pause.follow(
            dom, lambda: job.pid, os.getuid(), 60, resumed.append, **kw)))
        t.start()
        return dom, resumed, result, t
    try:
        usage.move([job.pid], scope)
        assert not cg.job_frozen()
        # the old watcher (no v2 check): the frozen job is "S", the domain is left running
        dom, resumed, result, t = follow()
        with open(freeze, "w") as f:
            f.write("1")
        wait_for(cg.job_frozen)
        assert pause.process_state(job.pid, os.getuid()) != "T"
        time.sleep(3 * pause.POLL_S)     # measuring: the watcher had time to act, and did not
        assert dom.calls == []
        with open(freeze, "w") as f:
            f.write("0")
        wait_for(lambda: not cg.job_frozen())
        # now with it
        dom2, resumed2, result2, t2 = follow(job_frozen=cg.job_frozen)
        with open(freeze, "w") as f:
            f.write("1")
        wait_for(lambda: dom2.calls == ["suspend"])
        with open(freeze, "w") as f:
            f.write("0")
        wait_for(lambda: dom2.calls == ["suspend", "resume"] and resumed2 == [dom2])
    finally:
        with open(freeze, "w") as f:
            f.write("0")
        job.kill()
        job.wait()
    t.join(10)
    t2.join(10)
    assert result["why"] == result2["why"] == "the job's process ended"
    assert dom.calls == [] and resumed == []


@pytest.fixture
def freezer_cgroup():
    if os.geteuid() != 0 or not os.path.isdir(FREEZER):
        pytest.skip("needs root and a cgroup v1 freezer")
    d = os.path.join(FREEZER, f"vbt-usage-{os.getpid()}")
    os.mkdir(d)
    try:
        yield d
    finally:
        for _ in range(50):
            try:
                os.rmdir(d)
                break
            except OSError:
                time.sleep(0.1)


def test_a_cgroup_freeze_leaves_the_domain_alone_and_sets_the_clock_after_the_thaw(
        freezer_cgroup):
    """condor_suspend with cgroups writes FROZEN: QEMU (moved in) is frozen with the job; the
    watcher makes no call to the domain (a frozen QEMU would not answer) and sets the clock
    once the cgroup is thawed."""
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    cg = usage.JobCgroups({"freezer": freezer_cgroup}, {})
    dom, resumed, result = FakeDomain(), [], {}
    try:
        usage.move([job.pid], freezer_cgroup)
        with open(os.path.join(freezer_cgroup, "cgroup.procs")) as f:
            assert f.read().split() == [str(job.pid)]
        t = threading.Thread(target=lambda: result.update(why=pause.follow(
            dom, lambda: job.pid, os.getuid(), 60, resumed.append, cgroup_frozen=cg.frozen)))
        t.start()
        with open(os.path.join(freezer_cgroup, "freezer.state"), "w") as f:
            f.write("FROZEN")
        wait_for(cg.frozen)
        time.sleep(3 * pause.POLL_S)     # measuring: the watcher had time to act, and did not
        assert dom.calls == [] and resumed == []
        with open(os.path.join(freezer_cgroup, "freezer.state"), "w") as f:
            f.write("THAWED")
        wait_for(lambda: resumed == [dom])
    finally:
        with open(os.path.join(freezer_cgroup, "freezer.state"), "w") as f:
            f.write("THAWED")
        job.kill()
        job.wait()
    t.join(10)
    assert dom.calls == [] and result["why"] == "the job's process ended"


def test_take_runs_once_per_job(monkeypatch, tmp_path):
    """The helper may be called again by the job's user (prepare --wrapper): only the first
    call hands the VM over and starts a watcher."""
    from vibatch.core import jobdir
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setattr(jobdir.JobPaths, "of", staticmethod(
        lambda cfg, job: type("P", (), {"state": str(state), "domain": "vibatch-" + job})()))
    started = []
    monkeypatch.setattr(usage, "job_cgroups", lambda job_pid, starter: usage.JobCgroups({}, {}))
    monkeypatch.setattr(usage, "start_watcher", lambda *a, **k: started.append(a))
    from vibatch.vm import hypervisor
    monkeypatch.setattr(hypervisor, "connect", lambda uri: type("C", (), {"close": lambda s: None})())
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: None)
    for _ in range(3):
        usage.take(config.Config(), "j1", 10, 11, 1000)
    assert len(started) == 1 and (state / usage.TAKEN_FILE).exists()


@pytest.mark.parametrize("kernel", ["pidfd", "no-pidfd"])
def test_the_wrapper_and_its_starter_are_read_only_while_they_are_our_ancestors(kernel, monkeypatch):
    """find_caller saw the wrapper and its starter among the helper's ancestors; by take() the
    wrapper may have ended and its pid been reused by another slot's process, whose cgroups
    QEMU would then join. They are read only while held by pidfds and still our ancestors: a
    process that is not (a sibling), or has ended, is refused. Also on a kernel without
    pidfd_open (held by start time: pause.HeldProcess)."""
    pre = ""
    if kernel == "no-pidfd":
        no_pidfd(monkeypatch, "ENOSYS")
        pre = ("import errno; os.pidfd_open = lambda pid, flags=0: "
               "(_ for _ in ()).throw(OSError(errno.ENOSYS, 'no')); ")
    code = ("import os, sys; " + pre + "from vibatch.batch import htcondor_usage as u; "
            "print(u.held_job_cgroups(int(sys.argv[1]), int(sys.argv[2])).job)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": repo}
    r = subprocess.run([sys.executable, "-c", code, str(os.getpid()), str(os.getppid())],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout == "{}\n", r.stderr     # its parent and grandparent
    sibling = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(ValueError, match="no longer our ancestors"):
            usage.held_job_cgroups(sibling.pid, os.getppid())
    finally:
        sibling.kill()
        sibling.wait()
    with pytest.raises(ValueError, match="has ended"):
        usage.held_job_cgroups(sibling.pid, os.getppid())


# -- Review 13 (1ba9d27): the job's user owns its v2 leaf -------------------------------------
NOBODY = 65534


@pytest.fixture
def v2_delegated():
    """A leaf and its .scope as 25.0.13's ProcFamilyDirectCgroupV2 leaves them: both made by
    root, then the leaf directory, its cgroup.procs and its cgroup.subtree_control chowned to
    the job's user (cgroupify_myself, "Enable delegation"); the scope stays root's. (The
    harness, tests/condor_starter.py, chowns the scope's cgroup.procs instead.)"""
    top = usage.mount_points().get(usage.V2)
    if os.geteuid() != 0 or not top or not os.path.exists(os.path.join(top, "cgroup.procs")):
        pytest.skip("needs root and a cgroup v2 hierarchy")
    leaf = os.path.join(top, f"vbt-rev13-{os.getpid()}.slice")
    scope = os.path.join(leaf, f"vbt-rev13-{os.getpid()}.scope")
    os.makedirs(scope)
    for p in (leaf, os.path.join(leaf, "cgroup.procs"),
              os.path.join(leaf, "cgroup.subtree_control")):
        os.chown(p, NOBODY, NOBODY)
    try:
        yield leaf, scope
    finally:
        with open(os.path.join(leaf, "cgroup.freeze"), "w") as f:
            f.write("0")
        for d in sorted((e.path for e in os.scandir(leaf) if e.is_dir()), reverse=True) + [leaf]:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def as_user(uid, work):
    """Run ``work`` in a child with only ``uid``'s credentials; its exit code (0: it ran)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            work()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_the_jobs_user_cannot_hide_a_v2_suspend_by_removing_the_scope(v2_delegated):
    """Review 13. The watcher reads ``<scope>/cgroup.events``, a path in a directory the job's
    user owns (the leaf). The user moves the job's processes (any process there, root's too:
    v2 checks the common ancestor's cgroup.procs, not the target's owner) into a cgroup of
    their own under the leaf and removes the root-made scope (rmdir needs write access to the
    leaf only). condor_suspend then freezes the leaf and every task of the job, but the
    watcher reads nothing and the guest runs on; a native job stays frozen. The leaf's own
    cgroup.freeze (root's, the starter's intent) would have said '1'."""
    leaf, scope = v2_delegated
    job = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: (
        usage.move([os.getpid()], scope), os.setgid(NOBODY), os.setuid(NOBODY)))
    cg = usage.JobCgroups({}, {}, scope, None)
    dom, resumed, result = FakeDomain(), [], {}
    t = None
    try:
        wait_for(lambda: str(job.pid) in usage._read(os.path.join(scope, "cgroup.procs")).split())

        def hide():
            mine = os.path.join(leaf, "mine")
            os.mkdir(mine)
            with open(os.path.join(mine, "cgroup.procs"), "w") as f:
                f.write(str(job.pid))
            os.rmdir(scope)
        assert as_user(NOBODY, hide) == 0          # the kernel lets the user do all of it
        t = threading.Thread(target=lambda: result.update(why=pause.follow(
            dom, lambda: job.pid, NOBODY, 60, resumed.append, job_frozen=cg.job_frozen)))
        t.start()
        with open(os.path.join(leaf, "cgroup.freeze"), "w") as f:    # condor_suspend
            f.write("1")
        wait_for(lambda: "frozen 1" in usage._read(os.path.join(leaf, "cgroup.events")))
        wait_for(lambda: dom.calls == ["suspend"], timeout=5)
    finally:
        with open(os.path.join(leaf, "cgroup.freeze"), "w") as f:
            f.write("0")
        job.kill()
        job.wait()
        if t is not None:
            t.join(10)


def test_a_watcher_that_cannot_leave_the_jobs_v2_cgroup_does_not_watch_from_inside_it(
        monkeypatch):
    """Review 13. If the move to the starter's v2 cgroup fails, 1ba9d27 logs it and follows
    from inside the job's cgroup: a task there is frozen with the job before 'frozen 1' can
    show (the kernel sets it once every task in the subtree is frozen, the watcher's too), so
    the domain is never suspended; and the job's user, who owns the leaf, can move that root
    process into a cgroup of their own and freeze it or write its cgroup.kill (seen on this
    host's kernel). Such a watcher must not run."""
    from vibatch.core import adopt, jobdir
    from vibatch.vm import hypervisor
    followed = []

    def refuse(pids, directory):
        raise PermissionError(13, "Permission denied", directory)
    monkeypatch.setattr(usage, "move", refuse)
    monkeypatch.setattr(adopt, "detach", lambda work, timeout_s: work())
    monkeypatch.setattr(jobdir.JobPaths, "of", staticmethod(
        lambda cfg, job: type("P", (), {"domain": "vibatch-" + job})()))
    monkeypatch.setattr(hypervisor, "connect", lambda uri: object())
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: FakeDomain())
    monkeypatch.setattr(pause, "follow", lambda *a, **kw: followed.append(kw))
    monkeypatch.setattr(usage, "log_error", lambda *a: None)
    cg = usage.JobCgroups({}, {}, "/sys/fs/cgroup/htcondor/j.slice/j.scope",
                          "/sys/fs/cgroup/system.slice/condor.service")
    usage.start_watcher(config.Config(), "j1", 10, NOBODY, cg)
    assert followed == []


def test_on_v2_the_suspend_watcher_does_not_need_qemu_under_libvirts_v1_style_cgroup(
        monkeypatch, tmp_path):
    """Review 13. On v2 nothing is moved, so QEMU's pids are not needed; but take() still
    raises when adopt.vm_pids finds none, and then starts the watcher with no cgroups at all:
    no v2 suspend, and the watcher never leaves the job's cgroup. vm_pids looks for
    ``machine/qemu-ID-NAME.libvirt-qemu``; libvirt with systemd (machined) names a v2 domain's
    cgroup ``machine.slice/machine-qemu\\x2dID\\x2dNAME.scope`` (virSystemdMakeScopeName), where
    it finds nothing."""
    from vibatch.core import adopt, jobdir
    from vibatch.vm import hypervisor
    systemd = tmp_path / "cg" / "machine.slice" / "machine-qemu\\x2d1\\x2dvibatch\\x2dj1.scope"
    (systemd / "libvirt" / "emulator").mkdir(parents=True)
    (systemd / "cgroup.procs").write_text("4242\n")
    assert adopt.machine_dirs(1, str(tmp_path / "cg")) == [str(systemd)]   # found now
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setattr(jobdir.JobPaths, "of", staticmethod(
        lambda cfg, job: type("P", (), {"state": str(state), "domain": "vibatch-" + job})()))
    v2 = usage.JobCgroups({}, {}, "/sys/fs/cgroup/htcondor/j.slice/j.scope",
                          "/sys/fs/cgroup/system.slice/condor.service")
    monkeypatch.setattr(usage, "held_job_cgroups", lambda job_pid, starter: v2)
    monkeypatch.setattr(hypervisor, "connect", lambda uri: type("C", (), {"close": lambda s: None})())
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: FakeDomain())
    monkeypatch.setattr(adopt, "vm_pids", lambda dom: [])
    monkeypatch.setattr(usage, "log_error", lambda *a: None)
    started = []
    monkeypatch.setattr(usage, "start_watcher", lambda *a, **k: started.append(a))
    usage.take(config.Config(), "j1", 10, 11, NOBODY)
    assert len(started) == 1 and started[0][4] is not None and started[0][4].v2 == v2.v2


def test_final_snapshot_pauses_a_counted_vm_and_waits_one_procd_interval(monkeypatch, tmp_path):
    """A VM the procd counts (COUNTED_FILE) is paused, then the wrapper waits the starter's
    PID_SNAPSHOT_INTERVAL and 2 s (at most FINAL_WAIT_MAX_S); one the procd has stopped
    (condor_suspend: QEMU in state T) is not asked to pause, since its monitor would not
    answer. Not counted, a domain already gone, or a record that is not one: no wait."""
    import json
    import signal
    from vibatch.core import jobdir
    from vibatch.vm import hypervisor
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setattr(jobdir.JobPaths, "of", staticmethod(
        lambda cfg, job: type("P", (), {"state": str(state), "domain": "vibatch-" + job})()))
    dom = FakeDomain()
    monkeypatch.setattr(hypervisor, "connect", lambda uri: type("C", (), {"close": lambda s: None})())
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: dom)
    slept, sleep = [], time.sleep
    # the final wait is recorded, not slept; the test's own short polls still sleep
    monkeypatch.setattr(usage.time, "sleep", lambda s: slept.append(s) if s >= 1 else sleep(s))
    logged = []
    monkeypatch.setattr(usage, "log_error", lambda what, e: logged.append(str(e)))
    cfg = config.Config()
    assert usage.final_snapshot(cfg, "j1") is None and slept == [] and dom.calls == []
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"gid": 750003, "snapshot_s": 5, "pids": [child.pid]}
        (state / usage.COUNTED_FILE).write_text(json.dumps(record))
        assert usage.final_snapshot(cfg, "j1") == 7 and dom.calls == ["suspend"]
        dom.running, dom.calls = True, []
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: pause.process_state(child.pid, None) == "T")
        assert usage.final_snapshot(cfg, "j1") == 7 and dom.calls == []   # stopped: no call
        os.kill(child.pid, signal.SIGCONT)
        (state / usage.COUNTED_FILE).write_text(json.dumps(dict(record, snapshot_s=600)))
        assert usage.final_snapshot(cfg, "j1") == usage.FINAL_WAIT_MAX_S
    finally:
        child.kill()
        child.wait()
    assert slept == [7, 7, usage.FINAL_WAIT_MAX_S]
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: None)
    assert usage.final_snapshot(cfg, "j1") is None
    (state / usage.COUNTED_FILE).write_text("not json")
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: dom)
    assert usage.final_snapshot(cfg, "j1") is None and len(slept) == 3 and logged
