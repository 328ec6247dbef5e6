"""The core lifecycle (prologue, epilogue, reap) on fake ports (tests/fakes.py): every phase
killed in a forked child, then what remains is checked exactly. Runs in seconds, no VM; needs
root (the overlay is handed to QEMU's user) and qemu-img."""
import dataclasses
import json
import os
import signal
import stat

import pytest
import yaml

from fakes import FakeHypervisor, FakeRootAgent, FakeUserAgent, fake_node
from imagehelp import make_disk
from vibatch import config
from vibatch.core import faultpoints, jobstore, lifecycle
from vibatch.errors import BootFailed, HypervisorError, JobAlreadyRunning, NodeError
from vibatch.core.jobdir import JobPaths
from vibatch.images.library import Library
from vibatch.core.request import make_request

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the prologue chowns the overlay")

PROLOGUE_POINTS = ("reserved", "slot", "overlay", "domain", "booted", "set_up")
TEARDOWN_POINTS = ("ending", "vm_ended", "record_kept", "accounted", "removed")


@pytest.fixture
def site(tmp_path):
    data = {"state_dir": f"{tmp_path}/state", "run_dir": f"{tmp_path}/run",
            "library_dir": f"{tmp_path}/lib", "accounting_file": f"{tmp_path}/acct.jsonl",
            "lock_timeout_s": 3, "images": {"default": "mini"},
            "host": {"cpus": [0, 1, 2, 3], "reserved_memory_mb": 0},
            "vm": {"acceleration": "tcg", "boot_timeout_s": 2, "setup_timeout_s": 2}}
    path = tmp_path / "vibatch.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = config.load(str(path))
    os.makedirs(cfg.state_dir)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0" * 4096)
    Library(cfg.library_dir, cfg.state_dir).add(make_disk(str(tmp_path / "d.qcow2"), "mini"),
                                                name="mini", os_name="t", os_version="1",
                                                kernel=str(kernel))
    work = tmp_path / "work"
    work.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(work, 0o777)
    hv = FakeHypervisor(str(tmp_path / "domains.json"))
    yield cfg, hv, str(work)
    hv.down = False
    for job in jobstore.job_ids(cfg):   # what a test left running (its I/O folder is a mount)
        lifecycle.epilogue(fake_node(cfg, hv), job)


def request(cfg, work, job="j1", cores=1):
    return make_request(job_id=job, user="nobody", cores=cores, memory_mb=256, image=None,
                        workdir=work, walltime_s=None, cpus=None, queue=None, account=None)


def in_child(fn, point=None, action=signal.SIGKILL) -> int:
    """Run ``fn`` in a forked child with fault ``point`` armed; return its wait status."""
    pid = os.fork()
    if pid == 0:
        faultpoints.ARMED, faultpoints.ACTION = point, action
        try:
            fn()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(3)
    if action == signal.SIGSTOP:
        _, status = os.waitpid(pid, os.WUNTRACED)
        return pid if os.WIFSTOPPED(status) else -1
    return os.waitpid(pid, 0)[1]


def remains(cfg, hv, job="j1") -> list:
    paths = JobPaths.of(cfg, job)
    left = [p for p in (paths.state, paths.run, os.path.join(cfg.state_dir, "orphans", job))
            if os.path.lexists(p)]
    left += ["domain"] if "vibatch-" + job in hv.domains() else []
    node = lifecycle.Node(cfg)
    left += ["slot"] if node.slots.get(job) else []
    return left


def records(cfg, job="j1") -> list:
    try:
        with open(cfg.accounting_file) as f:
            return [r for r in map(json.loads, f) if r["job_id"] == job]
    except FileNotFoundError:
        return []


def test_prologue_and_epilogue(site):
    cfg, hv, work = site
    node = fake_node(cfg, hv)
    state = lifecycle.prologue(node, request(cfg, work))
    assert state.phase == jobstore.READY and jobstore.read(JobPaths.of(cfg, "j1")).phase == "ready"
    assert "vibatch-j1" in hv.domains() and node.slots.get("j1").cpus == (0,)
    record = lifecycle.epilogue(fake_node(cfg, hv), "j1", 0)
    assert record["vm_end"] == "destroyed" and record["prologue_completed"] is True
    assert remains(cfg, hv) == [] and records(cfg) == [record]
    assert lifecycle.epilogue(fake_node(cfg, hv), "j1") is None   # twice: nothing to do
    assert len(records(cfg)) == 1


@pytest.mark.parametrize("point", PROLOGUE_POINTS)
@pytest.mark.parametrize("then", ["reap", "epilogue", "prologue"])
def test_prologue_killed_at_every_phase(site, point, then):
    """Item 1 (reap after a prologue died with its domain), item 4's cause, and a requeued job
    on the same node: whatever takes over leaves nothing and accounts exactly once."""
    cfg, hv, work = site
    status = in_child(lambda: lifecycle.prologue(fake_node(cfg, hv), request(cfg, work)), point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert jobstore.read(JobPaths.of(cfg, "j1")).phase in jobstore.PREPARING
    node = fake_node(cfg, hv)
    if then == "reap":
        assert lifecycle.reap(node) == ["job j1 (its prologue died)"]
    elif then == "epilogue":
        lifecycle.epilogue(node, "j1")
    else:
        lifecycle.prologue(node, request(cfg, work))
        lifecycle.epilogue(fake_node(cfg, hv), "j1")
    assert remains(cfg, hv) == []
    got = records(cfg)
    first = got[:1] if point != "reserved" else []
    assert len(got) == len(first) + (then == "prologue")
    if first:
        ends = {"slot": "never_started", "overlay": "never_started"}
        assert first[0]["vm_end"] == ends.get(point, "destroyed")
        assert first[0]["prologue_completed"] is False
    assert lifecycle.reap(fake_node(cfg, hv)) == []   # a second reap finds nothing


@pytest.mark.parametrize("point", TEARDOWN_POINTS)
@pytest.mark.parametrize("then", ["reap", "epilogue"])
def test_epilogue_killed_at_every_step_accounts_once(site, point, then):
    """Item 7: the accounting line is written before anything it describes goes, once."""
    cfg, hv, work = site
    lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    status = in_child(lambda: lifecycle.epilogue(fake_node(cfg, hv), "j1", 7), point)
    assert os.WIFSIGNALED(status)
    node = fake_node(cfg, hv)
    lifecycle.epilogue(node, "j1", 7) if then == "epilogue" else lifecycle.reap(node)
    assert remains(cfg, hv) == []
    got = records(cfg)
    assert len(got) == 1 and got[0]["vm_end"] == "destroyed" and got[0]["exit_code"] == 7


@pytest.mark.parametrize("point", TEARDOWN_POINTS)
def test_undo_killed_at_every_step(site, point):
    """A failing prologue's undo, killed halfway: reap finishes it, one line."""
    cfg, hv, work = site
    FakeRootAgent.setup_status = 1
    try:
        status = in_child(lambda: lifecycle.prologue(fake_node(cfg, hv), request(cfg, work)), point)
    finally:
        FakeRootAgent.setup_status = 0
    assert os.WIFSIGNALED(status)
    lifecycle.reap(fake_node(cfg, hv))
    assert remains(cfg, hv) == [] and len(records(cfg)) == 1


def test_failed_prologue_undoes_and_accounts(site):
    cfg, hv, work = site
    FakeRootAgent.setup_status = 1
    try:
        with pytest.raises(BootFailed, match="guest setup failed"):
            lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    finally:
        FakeRootAgent.setup_status = 0
    assert remains(cfg, hv) == []
    [rec] = records(cfg)
    assert rec["vm_end"] == "destroyed" and rec["ended_by"] == "prologue"


def test_user_agent_with_another_uid_is_refused(site):
    """A guest whose user agent runs with root's effective uid (its real uid the job user's)
    is not handed to the job: the prologue fails as the node's fault and undoes everything."""
    cfg, hv, work = site
    FakeUserAgent.setuid = 0
    try:
        with pytest.raises(BootFailed, match=r"uids \(\d+, 0, \d+, \d+\).*refusing"):
            lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    finally:
        FakeUserAgent.setuid = None
    assert remains(cfg, hv) == []
    [rec] = records(cfg)
    assert rec["vm_end"] == "destroyed" and rec["ended_by"] == "prologue"


def test_proc_ids_reads_all_four_ids():
    assert lifecycle.proc_ids(b"Name:\tx\nUid:\t5\t6\t7\t8\nGid:\t1\t1\t1\t2\n") == \
        ((5, 6, 7, 8), (1, 1, 1, 2))
    with pytest.raises(ValueError):
        lifecycle.proc_ids(b"Name:\tx\nUid:\t5\n")


def test_vm_that_never_started_says_so(site):
    """Item 8: vm_end is never_started, not gone, when createXML failed."""
    cfg, hv, work = site
    hv.fail_create = "cannot access storage file"
    with pytest.raises(HypervisorError, match="cannot access storage"):
        lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    assert remains(cfg, hv) == []
    assert [r["vm_end"] for r in records(cfg)] == ["never_started"]


def test_qemu_dying_in_the_boot_wait_is_a_boot_failure(site, monkeypatch):
    """Item 2: the domain vanishes while the prologue waits for its agent: 21, not a crash."""
    cfg, hv, work = site
    pings = []

    def ping(self, timeout=1.0):
        pings.append(1)
        hv.kill(self.domain.name())   # QEMU killed: the transient domain is gone
        raise lifecycle.AgentError("guest agent: not up")
    monkeypatch.setattr(FakeRootAgent, "ping", ping)
    with pytest.raises(BootFailed, match="stopped while booting"):
        lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    assert pings and remains(cfg, hv) == []
    assert [r["vm_end"] for r in records(cfg)] == ["gone"]


@pytest.mark.parametrize("point", ["overlay", "domain", "booted"])
def test_lost_libvirt_still_releases_and_marks_for_reap(site, point):
    """Item 3: libvirt goes away mid-prologue; the undo releases directories and slot, reports
    the original error, and leaves the domain to the next reap."""
    cfg, hv, work = site
    pid = in_child(lambda: lifecycle.prologue(fake_node(cfg, hv), request(cfg, work)), point,
                   signal.SIGSTOP)
    hv.down = True                                   # the child's later calls fail
    os.kill(pid, signal.SIGCONT)
    status = os.waitpid(pid, 0)[1]
    hv.down = False
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    left = remains(cfg, hv)
    assert JobPaths.of(cfg, "j1").state not in left and "slot" not in left
    lifecycle.reap(fake_node(cfg, hv))
    assert remains(cfg, hv) == [] and len(records(cfg)) == 1


def test_second_prologue_beside_a_live_one_gets_16_and_touches_nothing(site):
    """Items 4 and 5: a live owner's record is never touched, by a prologue or a reap."""
    cfg, hv, work = site
    pid = in_child(lambda: lifecycle.prologue(fake_node(cfg, hv), request(cfg, work)), "domain",
                   signal.SIGSTOP)
    before = jobstore.read(JobPaths.of(cfg, "j1"))
    with pytest.raises(JobAlreadyRunning, match=r"being prepared by pid \d+"):
        lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    assert lifecycle.reap(fake_node(cfg, hv)) == []
    assert jobstore.read(JobPaths.of(cfg, "j1")) == before
    os.kill(pid, signal.SIGCONT)
    assert os.waitpid(pid, 0)[1] == 0
    assert jobstore.read(JobPaths.of(cfg, "j1")).phase == "ready"
    assert lifecycle.Node(cfg).slots.get("j1").cpus == (0,)


def test_second_prologue_for_a_running_job_says_so(site):
    """Item 8: the 16 message says what the job is doing (not "preparing")."""
    cfg, hv, work = site
    lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    with pytest.raises(JobAlreadyRunning, match=r"\(its VM is running\)"):
        lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))


def test_epilogue_stops_a_live_prologue(site):
    """The batch system ends a job whose prologue still runs: SIGTERM, its undo, one line."""
    cfg, hv, work = site
    pid = in_child(lambda: lifecycle.prologue(fake_node(cfg, hv), request(cfg, work)), "booted",
                   signal.SIGSTOP)
    os.kill(pid, signal.SIGCONT)   # running again; the epilogue's SIGTERM lands in its steps
    lifecycle.epilogue(fake_node(cfg, hv), "j1")
    status = os.waitpid(pid, 0)[1]
    assert not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    assert remains(cfg, hv) == [] and len(records(cfg)) == 1


@pytest.mark.parametrize("where", ["state_dir", "run_dir"])
def test_unwritable_job_directories_are_a_node_fault(site, where):
    """Item 6: an OS error on the job directories maps to a one-line node fault; nothing left."""
    cfg, hv, work = site
    jobs = os.path.join(getattr(cfg, where), "jobs")
    os.makedirs(jobs, exist_ok=True)
    os.rename(jobs, jobs + ".real")
    open(jobs, "w").close()        # a file where the directory should be: ENOTDIR for root too
    try:
        with pytest.raises(NodeError, match="cannot create the job's directories") as e:
            lifecycle.prologue(fake_node(cfg, hv), request(cfg, work))
    finally:
        os.unlink(jobs)
        os.rename(jobs + ".real", jobs)
    assert "\n" not in str(e.value)
    assert remains(cfg, hv) == [] and records(cfg) == []


def test_reap_leaves_other_nodes_domains_alone(site):
    """Domains whose metadata names another state_dir (another vibatch config) are not ours."""
    cfg, hv, work = site
    lifecycle.prologue(fake_node(cfg, hv), request(cfg, work, job="other"))
    other = config.load(cfg.source)
    import dataclasses
    mine = dataclasses.replace(other, state_dir=other.state_dir + "2", run_dir=other.run_dir + "2")
    assert lifecycle.reap(fake_node(mine, hv)) == []
    assert "vibatch-other" in hv.domains()


def test_error_log_is_root_only(tmp_path, monkeypatch):
    from vibatch import util
    monkeypatch.setattr(util, "ERROR_LOG", str(tmp_path / "log" / "errors.log"))
    try:
        raise ValueError("boom")
    except ValueError as e:
        util.log_error("test", e)
    st = os.stat(util.ERROR_LOG)
    assert stat.S_IMODE(st.st_mode) == 0o600 and "ValueError: boom" in open(util.ERROR_LOG).read()


def test_the_record_reader_is_strict_and_names_the_file(site, tmp_path):
    """state.json is JobState's: version 2, known keys only, each of its type, a known phase.
    Anything else is a node fault naming the file (vibatch's own writes are atomic), and reap
    and the listing leave such a record alone (phase corrupt)."""
    cfg = site[0]
    paths = JobPaths.of(cfg, "j9")
    paths.create()
    good = jobstore.JobState(job_id="j9", phase=jobstore.SLOT, cpus=(1, 2), phases={"claim": 0.1})
    jobstore.write(paths, good)
    assert jobstore.read(paths) == good and jobstore.read(paths).cpus == (1, 2)
    for change, why in (({"version": 1}, "version 1"), ({"colour": "red"}, "unknown keys colour"),
                        ({"cpus": ["1"]}, "cpus is list"), ({"uid": True}, "uid is bool"),
                        ({"phase": "booting"}, "phase 'booting'"), ({"owner_pid": 1.5},
                                                                    "owner_pid is float")):
        with open(paths.state_file, "w") as f:
            json.dump({**good.to_json(), **change}, f)
        with pytest.raises(NodeError) as e:
            jobstore.read(paths)
        assert paths.state_file in str(e.value) and why in str(e.value), (change, str(e.value))
    assert [(p.job_id, s.phase) for p, s in jobstore.records(cfg)] == [("j9", jobstore.CORRUPT)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.phase = jobstore.READY            # frozen: changed only through a Record
    rec = jobstore.Record(paths, good)
    rec.set(jobstore.OVERLAY, accel="tcg")
    assert jobstore.read(paths) == rec.state and rec.state.accel == "tcg" and good.accel is None


def test_reap_ends_a_ready_job_only_when_its_batch_system_says_it_is_gone(site):
    """The epilogue was lost (the batch daemon died, the node left the cluster): the VM runs on,
    nobody owns the record. reap asks the job's batch system, and ends the job only on a
    definite "gone"; "still there", "cannot tell" and a failing client leave it running."""
    cfg, hv, work = site
    node = fake_node(cfg, hv)
    lifecycle.prologue(node, request(cfg, work), batch="fakebatch")
    lifecycle.prologue(node, request(cfg, work, job="j2"))          # no batch system to ask
    paths = JobPaths.of(cfg, "j1")
    running = [paths.state, paths.run, "domain", "slot"]
    asked = []

    def answer(value):
        def ask(system, job, env):
            asked.append((system, job))
            if isinstance(value, Exception):
                raise value
            return value
        return ask
    for value in (False, None, RuntimeError("scontrol: connection refused")):
        assert lifecycle.reap(fake_node(cfg, hv), answer(value)) == []
        assert asked.pop() == ("fakebatch", "j1") and asked == []
        assert remains(cfg, hv) == running          # untouched: directories, VM and slot
    assert lifecycle.reap(fake_node(cfg, hv), answer(True)) == ["job j1 (its fakebatch job is gone)"]
    assert asked == [("fakebatch", "j1")]
    assert remains(cfg, hv) == [] and len(records(cfg)) == 1
    assert records(cfg)[0]["ended_by"] == "reap" and records(cfg)[0]["vm_end"] == "destroyed"
    assert "vibatch-j2" in hv.domains()     # never asked about, never touched
    assert lifecycle.reap(fake_node(cfg, hv), answer(True)) == []   # j2 has no batch system


def test_machine_and_job_features_come_from_the_allocation_and_the_drain(site):
    """HEPiX Machine/Job Features: the keys Vac and DIRAC read, each from the job's slot, its
    wall limit and the node; shutdowntime only while draining (vibatch drain), and a drain
    reaches a running job's guest through its root agent."""
    import psutil
    from vibatch.core import features
    cfg, hv, work = site
    node = fake_node(cfg, hv)
    m, j = lifecycle.job_features(node, "j7", 2, 300, 600, 1_000_000)
    logical = psutil.cpu_count()
    assert m == {"total_cpu": str(logical), "log_cores": str(logical),
                 "phys_cores": str(psutil.cpu_count(logical=False)), "jobslots": "4"}
    assert j == {"job_id": "j7", "allocated_cpu": "2", "mem_limit_MB": "300",
                 "max_rss_bytes": str(300 << 20), "jobstart_secs": "1000000",
                 "wall_limit_secs": "600", "cpu_limit_secs": "1200",
                 "shutdowntime_job": "1000600"}
    _, j = lifecycle.job_features(node, "j7", 1, 256, None, 5)      # no wall limit known
    assert "wall_limit_secs" not in j and "shutdowntime_job" not in j
    lifecycle.prologue(node, request(cfg, work))
    assert lifecycle.announce_shutdown(node, 1_000_300) == [("j1", None)]
    m, j = lifecycle.job_features(node, "j7", 2, 300, 600, 1_000_000)
    assert m["shutdowntime"] == "1000300" and j["shutdowntime_job"] == "1000300"
    assert lifecycle.announce_shutdown(node, None) == [("j1", None)]
    assert features.shutdowntime(cfg) is None
    assert "shutdowntime" not in lifecycle.job_features(node, "j7", 2, 300, 600, 1)[0]
    hs = config.parse({**yaml.safe_load(open(cfg.source)), "features": {"hs06": 80}}, "t")
    assert features.job(hs, "j", 2, 256, None, 0, {"total_cpu": "8"})["hs06_job"] == "20"
    assert features.machine(hs, 4)["hs06"] == "80"
    for bad in ({"job_id": "a b"}, {"x;rm": "1"}, {"job_id": "$(id)"}):
        with pytest.raises(ValueError, match="not a key and a plain value"):
            features.as_args({}, bad)
    assert features.as_args({"total_cpu": "8"}, {"job_id": "j1"}) == ["m:total_cpu=8",
                                                                     "j:job_id=j1"]


def test_site_shares_and_scratch_reach_the_domain_the_guest_and_the_record(site, tmp_path):
    """Each site share this image's guests get is a read-only spec (as the job user) and a
    virtiofs of the domain; a share for other images is not; the scratch disk is a sparse ext4
    file of the granted size, the job user's, gone after the epilogue; the accounting record
    names them."""
    import xml.etree.ElementTree as ET
    from vibatch.vm import share
    cfg, hv, work = site
    for d in ("cvmfs", "certs", "other"):
        (tmp_path / d).mkdir()
    base = yaml.safe_load(open(cfg.source))
    cfg = config.parse({**base, "scratch": {"default_gb": 1, "mount": "/scratch"}, "shares": [
        {"path": str(tmp_path / "cvmfs")}, {"path": str(tmp_path / "certs"), "images": ["mini"]},
        {"path": str(tmp_path / "other"), "images": ["el9"]}]}, "t")
    node = fake_node(cfg, hv)
    req = dataclasses.replace(request(cfg, work), scratch_mb=300)
    state = lifecycle.prologue(node, req)
    paths = JobPaths.of(cfg, "j1")
    assert state.site_shares == (str(tmp_path / "cvmfs"), str(tmp_path / "certs"))
    dom = ET.fromstring(hv.domains()["vibatch-j1"]["xml"])
    tags = [fs.find("target").get("dir") for fs in dom.iter("filesystem")]
    assert tags == ["vbjob", "vbio", "vbsite0", "vbsite1"]
    spec = share.read_spec(share.spec_path(paths.state, "vbsite1"))
    assert (spec.path, spec.readonly, spec.uid, spec.label) == (str(tmp_path / "certs"), True,
                                                                65534, "site share")
    assert share.read_spec(share.spec_path(paths.state, "vbjob")).readonly is False
    st = os.stat(paths.scratch)
    assert st.st_size == 300 << 20 and st.st_blocks * 512 < 16 << 20   # sparse
    assert [d.find("serial").text for d in dom.iter("disk") if d.find("serial") is not None] \
        == ["vbscratch"]
    info = jobstore.JobInfo.read(paths)
    assert info.tmpdir == "/scratch"
    record = lifecycle.epilogue(fake_node(cfg, hv), "j1", 0)
    assert (record["scratch_bytes"], record["network"]) == (300 << 20, "none")
    assert record["site_shares"] == [str(tmp_path / "cvmfs"), str(tmp_path / "certs")]
    assert not os.path.lexists(paths.scratch) and remains(cfg, hv) == []
    _, j = lifecycle.job_features(node, "j", 1, 256, None, 0, 300 << 20)
    assert j["scratch_limit_bytes"] == str(300 << 20)


def test_a_missing_site_share_is_the_nodes_fault_and_an_overlap_the_jobs(site, tmp_path):
    from vibatch.errors import MissingWorkdir, ResourceRequestError
    cfg, hv, work = site
    base = yaml.safe_load(open(cfg.source))
    gone = config.parse({**base, "shares": [{"path": str(tmp_path / "nowhere")}]}, "t")
    with pytest.raises(NodeError, match="site share .*nowhere does not exist"):
        lifecycle.prologue(fake_node(gone, hv), request(gone, work))
    assert remains(gone, hv) == []
    inside = config.parse({**base, "shares": [{"path": work}]}, "t")
    with pytest.raises(MissingWorkdir, match="the guest mounts .* there for the site"):
        lifecycle.prologue(fake_node(inside, hv), request(inside, work))
    capped = config.parse({**base, "scratch": {"max_gb": 1}}, "t")
    with pytest.raises(ResourceRequestError, match="2048 MiB of scratch requested.*at most 1 GiB"):
        lifecycle.prologue(fake_node(capped, hv),
                           dataclasses.replace(request(capped, work), scratch_mb=2048))
    assert remains(capped, hv) == []


def test_drain_sync_takes_the_batch_systems_maintenance_and_withdraws_it(site):
    """`vibatch drain --sync`: the earliest drain time a ready job's batch system announces
    becomes shutdowntime, asked again with the same environment once that job is gone, and
    withdrawn when the system no longer announces one; an admin's drain is never touched."""
    from vibatch.core import features
    cfg, hv, work = site
    node = fake_node(cfg, hv)
    lifecycle.prologue(node, request(cfg, work), batch="slurm",
                       batch_env={"SLURMD_NODENAME": "vm"})
    maint = {"at": 1_900_000_000}
    asked = []

    def drain_time(system, env):
        asked.append((system, env))
        return maint["at"]
    assert lifecycle.sync_drain(node, drain_time)[0] == 1_900_000_000
    assert asked == [("slurm", {"SLURMD_NODENAME": "vm"})]
    assert features.shutdowntime(cfg) == 1_900_000_000
    assert lifecycle.job_features(node, "j", 1, 256, None, 0)[0]["shutdowntime"] == "1900000000"
    assert lifecycle.sync_drain(node, drain_time) == (1_900_000_000, [])   # unchanged
    lifecycle.epilogue(node, "j1", 0)
    maint["at"] = None           # the reservation was deleted; no job runs any more
    assert lifecycle.sync_drain(node, drain_time)[0] is None
    assert features.shutdowntime(cfg) is None and asked[-1] == ("slurm", {"SLURMD_NODENAME": "vm"})
    lifecycle.announce_shutdown(node, 1_800_000_000)           # the admin's own
    maint["at"] = 1_700_000_000
    assert lifecycle.sync_drain(node, drain_time) == (1_800_000_000, [])
    lifecycle.announce_shutdown(node, None)


def test_reap_ends_a_ready_job_past_its_walltime_plus_grace(site):
    """Item 4 of issue 11: a job whose batch daemon died without its epilogue (nobody says it
    is gone) still ends at its time limit plus batch.walltime_grace_s, by reap."""
    cfg, hv, work = site
    req = dataclasses.replace(request(cfg, work), walltime_s=60)
    lifecycle.prologue(fake_node(cfg, hv), req)
    assert lifecycle.reap(fake_node(cfg, hv)) == []          # within the limit: left alone
    paths = JobPaths.of(cfg, "j1")
    state = jobstore.read(paths)
    grace = cfg.batch.walltime_grace_s
    jobstore.Record(paths, state).set(started_at=state.started_at - 60 - grace + 5)
    assert lifecycle.reap(fake_node(cfg, hv)) == []          # within limit + grace: still left
    jobstore.Record(paths, jobstore.read(paths)).set(started_at=state.started_at - 60 - grace - 1)
    assert lifecycle.reap(fake_node(cfg, hv)) == \
        [f"job j1 (past its walltime (60 s) + grace ({grace} s))"]
    assert remains(cfg, hv) == [] and records(cfg)[0]["ended_by"] == "reap"


def test_the_guest_is_told_its_walltime_deadline_last():
    from vibatch.vm.guestsetup import SetupArgs
    argv = SetupArgs("u", 1, 1, "/h", "/w", net="n:x", deadline_s=360).argv()
    assert argv[-2:] == ["n:x", "t:360"]
    assert not [a for a in SetupArgs("u", 1, 1, "/h", "/w").argv() if a.startswith("t:")]


def test_each_job_gets_a_host_name_of_its_own_that_is_one_dns_label():
    from vibatch.vm.guestsetup import fresh_machine, host_name
    assert host_name("wn042.example.org", "7001") == "wn042-7001"
    assert host_name("WN1", "123.pbs.Server") == "wn1-123-pbs-server"   # Torque's ids
    assert host_name("wn1", "4567[2]") == "wn1-4567-2"                  # an array task
    long = host_name("n" * 60, "123456")
    assert len(long) <= 63 and not long.endswith("-")
    one, two = fresh_machine("wn1", "1"), fresh_machine("wn1", "2")
    assert [a[:2] for a in one] == ["r:", "i:", "h:"]
    assert one[2] == "h:wn1-1" and two[2] == "h:wn1-2"
    assert one[0] != two[0] and one[1] != two[1]                         # seed, machine id
