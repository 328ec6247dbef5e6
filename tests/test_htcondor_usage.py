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

from test_pause import FakeDomain, wait_for
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
                                             "freezer": "/sys/fs/cgroup/freezer"}


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
    files[1] = files[2]      # under the procd: no cgroup of the job's
    assert usage.job_cgroups(1, 2).job == {}


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
    monkeypatch.setattr(usage, "start_watcher", lambda *a: started.append(a))
    from vibatch.vm import hypervisor
    monkeypatch.setattr(hypervisor, "connect", lambda uri: type("C", (), {"close": lambda s: None})())
    monkeypatch.setattr(hypervisor, "lookup", lambda conn, name: None)
    for _ in range(3):
        usage.take(config.Config(), "j1", 10, 11, 1000)
    assert len(started) == 1 and (state / usage.TAKEN_FILE).exists()
