"""Operations (issue 13, part 4): the Prometheus textfile and its counters, the phase log,
progress on a terminal only, and `vibatch doctor`.

The metrics tests run the real prologue and epilogue on the fake ports (tests/fakes.py) and read
the textfile with the Prometheus text parser of the ``prometheus_client`` package, the one
Prometheus' own tooling uses. Doctor's hook checks read real files laid out as each batch system
lays them out (slurm.conf, mom_priv); Grid Engine's queue configuration comes from a stand-in
``qconf`` printing what `qconf -sq` prints. The last test (vm) runs the real `vibatch doctor
--boot` and a real job on this node.
"""
import io
import os
import pty
import shlex
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fakes import FakeRootAgent, fake_node
from test_core import site as core_site  # noqa: F401 - a fixture
from vibatch import config, util
from vibatch.commands import doctor
from vibatch.core import jobstore, lifecycle, metrics
from vibatch.images import fetch
from vibatch.errors import BootFailed, ResourceRequestError
from vibatch.core.request import make_request
from vibatch.images.library import Library, sha512_file
from vibatch.images.progress import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the prologue chowns the overlay")


@pytest.fixture
def site(core_site, tmp_path):
    """test_core's site (a library with one image, fake ports), with the phase log in a file."""
    cfg, hv, work = core_site
    data = yaml.safe_load(open(cfg.source))
    data["logs"] = {"phases": f"{tmp_path}/log/phases.log"}
    with open(cfg.source, "w") as f:
        yaml.safe_dump(data, f)
    return config.load(cfg.source), hv, work


def failing_setup(cfg, hv, work, job):
    """A prologue whose guest setup fails (a node fault)."""
    FakeRootAgent.setup_status = 1
    try:
        with pytest.raises(BootFailed):
            lifecycle.prologue(fake_node(cfg, hv), request(work, job))
    finally:
        FakeRootAgent.setup_status = 0


def request(work, job="j1", cores=1, memory_mb=256):
    return make_request(job_id=job, user="nobody", cores=cores, memory_mb=memory_mb, image=None,
                        workdir=work, walltime_s=None, cpus=None, queue=None, account=None)


def families(cfg) -> dict:
    with open(metrics.textfile_path(cfg)) as f:
        text = f.read()
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def value(fams, family, sample, **labels) -> float:
    found = [s.value for s in fams[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, fams[family].samples)
    return found[0]


@root_only
def test_textfile_after_prologue_failure_and_epilogue(site):
    cfg, hv, work = site
    lifecycle.prologue(fake_node(cfg, hv), request(work, "j1", cores=2, memory_mb=300))
    fams = families(cfg)
    assert value(fams, "vibatch_jobs_running", "vibatch_jobs_running") == 1
    assert value(fams, "vibatch_slot_cpus", "vibatch_slot_cpus") == 4
    assert value(fams, "vibatch_slot_cpus_free", "vibatch_slot_cpus_free") == 2
    cap = lifecycle.Node(cfg).slots.capacity.memory_mb
    assert value(fams, "vibatch_slot_memory_free_bytes", "vibatch_slot_memory_free_bytes") == \
        (cap - 300) << 20
    h = fams["vibatch_prologue_phase_seconds"]
    assert h.type == "histogram"
    phases = {s.labels["phase"] for s in h.samples}
    assert {"claim", "shares", "image_check", "clone", "domain_start", "boot",
            "guest_setup"} <= phases
    assert value(fams, "vibatch_prologue_phase_seconds", "vibatch_prologue_phase_seconds_count",
                 phase="boot", start="cold") == 1
    assert value(fams, "vibatch_prologue_seconds", "vibatch_prologue_seconds_bucket",
                 start="cold", le="+Inf") == 1
    # a node fault and a job fault, counted apart by class and reason
    failing_setup(cfg, hv, work, "j2")
    with pytest.raises(ResourceRequestError):
        lifecycle.prologue(fake_node(cfg, hv), request(work, "j3", cores=9))
    lifecycle.epilogue(fake_node(cfg, hv), "j1", 0)
    fams = families(cfg)
    assert value(fams, "vibatch_failures", "vibatch_failures_total", hook="prologue",
                 fault="node", reason="BootFailed") == 1
    assert value(fams, "vibatch_failures", "vibatch_failures_total", hook="prologue",
                 fault="job", reason="ResourceRequestError") == 1
    assert value(fams, "vibatch_hook_runs", "vibatch_hook_runs_total", hook="prologue",
                 result="ok") == 1
    assert value(fams, "vibatch_hook_runs", "vibatch_hook_runs_total", hook="epilogue",
                 result="ok") == 1
    # the failed prologue's durations are not in the histogram of booted ones
    assert value(fams, "vibatch_prologue_phase_seconds", "vibatch_prologue_phase_seconds_count",
                 phase="boot", start="cold") == 1
    assert value(fams, "vibatch_epilogue_seconds", "vibatch_epilogue_seconds_count",
                 start="cold") == 1
    assert value(fams, "vibatch_jobs_running", "vibatch_jobs_running") == 0
    assert value(fams, "vibatch_slot_cpus_free", "vibatch_slot_cpus_free") == 4
    assert value(fams, "vibatch_image_info", "vibatch_image_info", image="mini") == 1
    # the image was hashed when added: its verify age is there, and nothing is quarantined
    assert 0 <= value(fams, "vibatch_image_verify_age_seconds",
                      "vibatch_image_verify_age_seconds", image="mini") < 600
    assert value(fams, "vibatch_images_quarantined", "vibatch_images_quarantined") == 0
    st = os.stat(metrics.textfile_path(cfg))
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert [n for n in os.listdir(os.path.dirname(metrics.textfile_path(cfg)))] == \
        ["vibatch.prom"]   # atomic: no temporary file left
    assert stat.S_IMODE(os.stat(metrics.counters_path(cfg)).st_mode) == 0o600


@root_only
def test_phase_log_one_parseable_line_per_phase_with_the_job_id(site):
    cfg, hv, work = site
    lifecycle.prologue(fake_node(cfg, hv), request(work, "j1"))
    failing_setup(cfg, hv, work, "j2")
    lifecycle.epilogue(fake_node(cfg, hv), "j1", 3)
    with open(cfg.logs.phases) as f:
        lines = [dict(kv.split("=", 1) for kv in shlex.split(line)) for line in f]
    assert all(line["job"] in ("j1", "j2") and line["ts"] for line in lines)
    j1 = [line for line in lines if line["job"] == "j1" and line["hook"] == "prologue"]
    assert [line["phase"] for line in j1[:-1]] == ["claim", "shares", "image_check", "clone",
                                                   "domain_start", "boot", "guest_setup"]
    assert all(float(line["seconds"]) >= 0 and line["start"] == "cold" for line in j1[:-1])
    assert j1[-1]["result"] == "ok" and j1[-1]["image"] == "mini" and j1[-1]["accel"] == "tcg"
    [failed] = [line for line in lines if line["job"] == "j2" and "result" in line]
    assert failed["result"] == "failed" and failed["fault"] == "node"
    assert failed["reason"] == "BootFailed" and failed["phase"] == "guest_setup"
    assert "guest setup failed" in failed["message"]
    [end] = [line for line in lines if line["job"] == "j1" and line["hook"] == "epilogue"
             and "result" in line]
    assert end["exit_code"] == "3" and end["vm_end"] == "destroyed"


@root_only
def test_metrics_never_fail_a_job(site, tmp_path, monkeypatch):
    """A textfile that cannot be written (its directory is a file) and a counters lock that is
    held: the prologue and the epilogue still succeed; the errors go to the error log."""
    cfg, hv, work = site
    (tmp_path / "blocker").write_text("a file, not a directory")
    data = yaml.safe_load(open(cfg.source))
    data["metrics"] = {"textfile": f"{tmp_path}/blocker/vibatch.prom"}
    data["logs"] = {"phases": f"{tmp_path}/blocker/phases.log"}
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(data))
    cfg2 = config.load(str(tmp_path / "v2.yaml"))
    monkeypatch.setattr(util, "ERROR_LOG", str(tmp_path / "errors.log"))
    monkeypatch.setattr(metrics, "COUNTERS_LOCK_S", 0.1)
    held = util.root_lock(os.path.join(cfg2.state_dir, "metrics.lock"), 1)
    with util.hold(held):
        state = lifecycle.prologue(fake_node(cfg2, hv), request(work, "j1"))
        assert state.phase == jobstore.READY
        assert lifecycle.epilogue(fake_node(cfg2, hv), "j1", 0)["exit_code"] == 0
    log = (tmp_path / "errors.log").read_text()
    # the phase log, the counters and the textfile each failed, for each hook, and were logged
    assert log.count("metrics after the prologue of job j1") == 3
    assert log.count("metrics after the epilogue of job j1") == 3
    assert log.count("LockTimeout: could not lock") == 2
    assert log.count("FileExistsError") == 4


def test_counters_are_bounded_and_survive_damage(tmp_path, monkeypatch):
    cfg = config.parse({"state_dir": str(tmp_path)}, "test")
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    for i in range(6):
        metrics.count(cfg, "prologue", {}, 1.0, ("node", f"Reason{i}", "x"))
    c = metrics.read_counters(cfg)
    assert c["failures"] == {"prologue|node|Reason0": 1, "prologue|node|Reason1": 1,
                             "prologue|node|Reason2": 1, "prologue|node|other": 3}
    with open(metrics.counters_path(cfg), "w") as f:
        f.write("{not json")
    metrics.count(cfg, "epilogue", {"teardown": 0.3}, 0.3, None)
    assert metrics.read_counters(cfg)["runs"] == {"epilogue|ok": 1}
    # a bug (not a VibatchError) is the node's fault, by its class
    assert metrics._outcome("prologue", None, KeyError("x"))[1] == ("node", "KeyError", "'x'")
    [h] = metrics.read_counters(cfg)["histograms"].values()
    assert h["count"] == 1 and h["buckets"][0] == 0 and h["buckets"][1] == 1   # 0.1 < 0.3 <= 0.5


def test_catalog_and_quarantine_in_the_textfile(tmp_path):
    cfg = config.parse({"state_dir": str(tmp_path), "library_dir": f"{tmp_path}/lib"}, "test")
    util.atomic_write_json(os.path.join(str(tmp_path), "catalogs.json"), {
        "https://example.org/c.json": {"serial": 7, "expires_at": 2e9, "accepted_at": 1.5e9,
                                       "synced_at": 1.6e9, "digest": "x"}})
    util.atomic_write_json(os.path.join(str(tmp_path), "quarantine.json"), {
        "img@abc.1": {"name": "img", "reason": 'bad "hash"\nreally', "at": 1.0}})
    fams = {f.name: f for f in text_string_to_metric_families(metrics.render(cfg))}
    url = "https://example.org/c.json"
    assert value(fams, "vibatch_catalog_serial", "vibatch_catalog_serial", url=url) == 7
    assert value(fams, "vibatch_catalog_expiry_timestamp_seconds",
                 "vibatch_catalog_expiry_timestamp_seconds", url=url) == 2e9
    assert value(fams, "vibatch_catalog_sync_timestamp_seconds",
                 "vibatch_catalog_sync_timestamp_seconds", url=url) == 1.6e9
    assert value(fams, "vibatch_image_quarantined", "vibatch_image_quarantined",
                 image="img", version="img@abc.1") == 1
    assert value(fams, "vibatch_images_quarantined", "vibatch_images_quarantined") == 1
    assert metrics.kv(job="j 1", message='say "hi"') == 'job="j 1" message="say \\"hi\\""'


def test_metrics_command(tmp_path):
    (tmp_path / "v.yaml").write_text(yaml.safe_dump({"state_dir": str(tmp_path / "s"),
                                                     "library_dir": str(tmp_path / "lib")}))
    r = subprocess.run([sys.executable, "-B", "-m", "vibatch", "--config", str(tmp_path / "v.yaml"),
                        "metrics"], capture_output=True, text=True, cwd=REPO, timeout=60)
    if os.geteuid() != 0:
        assert r.returncode == 10 and "must run as root" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "s" / "metrics" / "vibatch.prom").read_text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"vibatch_jobs_running", "vibatch_slot_cpus_free", "vibatch_slot_memory_free_bytes",
            "vibatch_prologue_phase_seconds", "vibatch_failures", "vibatch_image_info",
            "vibatch_catalog_serial"} <= names
    r = subprocess.run([sys.executable, "-B", "-m", "vibatch", "metrics", "--bogus"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus" in r.stderr


# --- progress ---------------------------------------------------------------------------------
def _pty_output(fn) -> bytes:
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as term:
            fn(Progress.on(term))
        os.set_blocking(master, False)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        os.close(master)
        os.close(slave)


def test_progress_on_a_terminal_only(tmp_path):
    blob = tmp_path / "disk.raw"
    blob.write_bytes(os.urandom(3 << 20))
    want = sha512_file(str(blob))
    shown = _pty_output(lambda p: sha512_file(str(blob), p))
    assert b"hashing disk.raw" in shown and b"100.0%" in shown and b"3.0 MiB of 3.0 MiB" in shown
    quiet = io.StringIO()
    assert sha512_file(str(blob), Progress.on(quiet)) == want
    assert quiet.getvalue() == ""
    r, w = os.pipe()
    with open(w, "w") as pipe:
        assert not Progress.on(pipe).stream
    os.close(r)
    # a download (image sync): the same meter, on a terminal only
    part = str(tmp_path / "x.part")
    shown = _pty_output(lambda p: fetch.download(fetch.normalize(str(blob)), part, 3 << 20, want,
                                                 util.Deadline(30), 5, "image 'x' disk", p))
    assert b"downloading image 'x' disk" in shown and b"100.0%" in shown
    os.unlink(part)
    quiet = io.StringIO()
    fetch.download(fetch.normalize(str(blob)), part, 3 << 20, want, util.Deadline(30), 5, "x",
                   Progress.on(quiet))
    assert quiet.getvalue() == ""


# --- doctor -----------------------------------------------------------------------------------
@pytest.fixture
def places(tmp_path):
    hooks = tmp_path / "hooks"
    shutil.copytree(os.path.join(REPO, "hooks"), hooks)
    os.chmod(tmp_path, 0o755)
    return doctor.Places(hooks_dir=str(hooks), slurm_confs=[str(tmp_path / "slurm.conf")],
                         mom_privs=[str(tmp_path / "mom_priv")], qconf=str(tmp_path / "qconf"))


def _levels(checks, prefix):
    return [(c.name, c.level) for c in checks if c.name.startswith(prefix)]


def test_doctor_skips_absent_batch_systems(places):
    cfg = config.parse({}, "test")
    for fn, name in ((doctor._slurm, "hooks (slurm)"), (doctor._torque, "hooks (torque)"),
                     (doctor._gridengine, "hooks (gridengine)")):
        [c] = list(fn(cfg, places))
        assert (c.name, c.level) == (name, doctor.SKIP)


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be root-owned")
def test_doctor_reads_slurm_conf(places, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    cfg = config.parse({}, "test")
    prolog = f"{places.hooks_dir}/slurm/prolog"
    os.chmod(prolog, 0o500)
    site_epilog = tmp_path / "site-epilog"
    site_epilog.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(site_epilog, 0o755)
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=c  # a comment\nProlog={prolog}\nEpilog={site_epilog}\n"
                    "PrologFlags=Contain\n")
    checks = list(doctor._slurm(cfg, places))
    assert _levels(checks, "slurm") == [("slurm Prolog", doctor.PASS),
                                        ("slurm Epilog", doctor.WARN),
                                        ("slurm PrologFlags", doctor.FAIL)]
    os.chmod(prolog, 0o777)   # a group- and world-writable root hook
    conf.write_text(f"Prolog={prolog}\nPrologFlags=Alloc,Contain\n")
    checks = list(doctor._slurm(cfg, places))
    assert _levels(checks, "slurm") == [("slurm Prolog", doctor.FAIL),
                                        ("slurm Epilog", doctor.FAIL)]
    assert "mode -rwxrwxrwx" in checks[0].detail and checks[0].fix
    assert "sets no Epilog" in checks[1].detail


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be root-owned")
def test_doctor_reads_mom_priv(places, tmp_path):
    cfg = config.parse({}, "test")
    mom = tmp_path / "mom_priv"
    mom.mkdir()
    for name in ("prologue", "epilogue"):
        shutil.copy(f"{places.hooks_dir}/torque/{name}", mom / name)
        os.chmod(mom / name, 0o500)
    (mom / "config").write_text(f"$pbsserver head\n$job_starter {places.hooks_dir}/torque/"
                                "job_starter\n")
    assert [c.level for c in doctor._torque(cfg, places)] == [doctor.PASS] * 3
    os.chown(mom / "epilogue", 65534, 0)   # pbs_mom would refuse it too
    os.unlink(mom / "config")
    assert _levels(doctor._torque(cfg, places), "torque") == [
        ("torque prologue", doctor.PASS), ("torque epilogue", doctor.FAIL),
        ("torque $job_starter", doctor.FAIL)]


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be root-owned")
def test_doctor_reads_the_grid_engine_queues(places, tmp_path):
    """Contract: qconf prints what a real one prints (docs/batch/gridengine.md, the cluster of
    tests/clusters.py): -sql the queue names, -sq one queue's `key   value` lines."""
    cfg = config.parse({}, "test")
    g = f"{places.hooks_dir}/gridengine"
    for f in os.listdir(g):
        os.chmod(os.path.join(g, f), 0o755)
    sq = {"all.q": f"qname all.q\nprolog                root@{g}/prolog $job_id $ja_task_id\n"
                   f"epilog                {g}/epilog $job_id\nstarter_method        {g}/starter\n",
          "other.q": "qname other.q\nprolog                NONE\nepilog                NONE\n"
                     "starter_method        NONE\n"}
    script = tmp_path / "qconf"
    script.write_text("#!/usr/bin/python3\nimport sys\nq = %r\n"
                      "if sys.argv[1] == '-sql': print('\\n'.join(q))\n"
                      "else: sys.stdout.write(q[sys.argv[2]])\n" % sq)
    os.chmod(script, 0o755)
    checks = list(doctor._gridengine(cfg, places))
    assert _levels(checks, "gridengine") == [("gridengine all.q prolog", doctor.PASS),
                                             ("gridengine all.q epilog", doctor.FAIL),
                                             ("gridengine all.q starter_method", doctor.PASS)]
    assert "runs as the job owner" in checks[1].detail
    script.write_text("#!/bin/sh\necho 'error: commlib error: no qmaster' >&2\nexit 1\n")
    [c] = doctor._gridengine(cfg, places)
    assert c.level == doctor.WARN and "no qmaster" in c.detail


@root_only
def test_doctor_images_and_exit_code(site, tmp_path, monkeypatch):
    cfg, hv, work = site
    lib = Library(cfg.library_dir, cfg.state_dir)
    [c] = doctor._images(cfg)
    assert (c.name, c.level) == ("image mini", doctor.PASS)
    lib.quarantine(lib.get("mini"), "disk does not match")
    [c] = doctor._images(cfg)
    assert c.level == doctor.FAIL and "disk does not match" in c.detail
    out = []
    monkeypatch.setattr(doctor, "run", lambda cfg, error, boot: iter(
        [doctor.Check("config", doctor.FAIL if error else doctor.PASS, error)]))
    (tmp_path / "bad.yaml").write_text("vm: {network: carrier-pigeon}\n")
    assert doctor.main(str(tmp_path / "bad.yaml"), False, out.append) == 36
    assert "vm.network" in out[0] and out[-1] == "doctor: 1 failed, 0 warning(s)"
    assert doctor.main(cfg.source, False, out.append) == 0


def test_doctor_cli_bad_argument():
    r = subprocess.run([sys.executable, "-B", "-m", "vibatch", "doctor", "--bot"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unrecognized arguments: --bot" in r.stderr


def test_doctor_launcher_and_clock(tmp_path):
    launcher = tmp_path / "launcher"
    launcher.write_text("#!/bin/sh\n")
    os.chmod(launcher, 0o755)
    os.chmod(tmp_path, 0o755)
    cfg = config.parse({"vm": {"share_launcher": str(launcher)}}, "test")
    expect = doctor.PASS if os.geteuid() == 0 else doctor.FAIL
    assert doctor._launcher(cfg).level == expect
    os.chmod(launcher, 0o775)
    c = doctor._launcher(cfg)
    assert c.level == doctor.FAIL and "only root may change it" in c.detail
    rc, status, _ = doctor.clock_state()
    c = doctor._clock(cfg)
    assert c.level == (doctor.WARN if rc == doctor.TIME_ERROR or status & doctor.STA_UNSYNC
                       else doctor.PASS)


# --- on this node, for real -------------------------------------------------------------------
@pytest.mark.vm
def test_doctor_boot_and_a_real_job_in_the_textfile():
    """The installed vibatch on this node: doctor --boot boots a test job through `vibatch image
    test`'s path, and a real `vibatch run` adds one cold prologue to the textfile."""
    cfg = config.load()
    before = metrics.read_counters(cfg)["runs"].get("prologue|ok", 0)
    r = subprocess.run(["vibatch", "doctor", "--boot"], capture_output=True, text=True,
                       timeout=600)
    assert "PASS  test job: image" in r.stdout, r.stdout + r.stderr
    assert r.returncode in (0, 36), r.stderr
    assert ("FAIL" in r.stdout) == (r.returncode == 36)
    import tempfile
    work = tempfile.mkdtemp(prefix="vibatch-ops-test-", dir="/var/tmp")   # nobody reaches it
    try:
        os.chmod(work, 0o777)
        r = subprocess.run(["vibatch", "run", "--user", "nobody", "--workdir", work, "--",
                            "true"], capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(work)
    assert r.returncode == 0, r.stderr
    fams = families(cfg)
    assert value(fams, "vibatch_hook_runs", "vibatch_hook_runs_total", hook="prologue",
                 result="ok") == before + 2   # doctor's test job and this one
    assert value(fams, "vibatch_prologue_phase_seconds", "vibatch_prologue_phase_seconds_count",
                 phase="boot", start="cold") >= 2


def test_doctor_acceleration_from_the_cached_probe(tmp_path):
    """The answer accel.py cached (with its fingerprint of kernel, QEMU, /dev/kvm) is reported
    with its reason; a stale or missing one is never guessed at."""
    from vibatch.vm import accel
    cfg = config.parse({"state_dir": str(tmp_path)}, "test")
    assert doctor._accel(cfg).level == doctor.WARN   # never probed
    cache = {"fingerprint": accel._fingerprint(cfg.vm.emulator), "accel": "tcg",
             "reason": "a guest kernel printed nothing under KVM within 10 s", "probed_at": 1.0}
    util.atomic_write_json(os.path.join(str(tmp_path), "accel.json"), cache)
    c = doctor._accel(cfg)
    assert c.level == doctor.WARN and c.detail.startswith("TCG") and "printed nothing" in c.detail
    util.atomic_write_json(os.path.join(str(tmp_path), "accel.json"), {**cache, "accel": "kvm",
                                                                       "reason": "booted"})
    assert doctor._accel(cfg).level == doctor.PASS
    util.atomic_write_json(os.path.join(str(tmp_path), "accel.json"),
                           {**cache, "fingerprint": {"host_kernel": "another"}, "accel": "kvm"})
    c = doctor._accel(cfg)
    assert c.level == doctor.WARN and "KVM" not in c.detail.split(":")[0]
    cfg = config.parse({"state_dir": str(tmp_path), "vm": {"acceleration": "tcg"}}, "test")
    assert doctor._accel(cfg).level == doctor.PASS


def test_doctor_libvirt_and_virtlogd(tmp_path):
    """libvirt-python against its in-process test driver, and a real unix socket."""
    import socket
    cfg = config.parse({"libvirt_uri": "test:///default"}, "test")
    c = doctor._libvirtd(cfg)
    assert c.level == doctor.PASS and "1 domain(s)" in c.detail   # the test driver's "test"
    cfg = config.parse({"libvirt_uri": f"qemu+unix:///system?socket={tmp_path}/none"}, "test")
    [c] = doctor._safely("libvirtd", doctor._libvirtd, cfg)
    assert c.level == doctor.FAIL and "cannot connect" in c.detail
    cfg = config.parse({}, "test")
    path = str(tmp_path / "virtlogd-sock")
    assert doctor._virtlogd(cfg, path).level == doctor.FAIL
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen(1)
        assert doctor._virtlogd(cfg, path).level == doctor.PASS


def test_doctor_disk_and_cgroups(tmp_path):
    cfg = config.parse({"state_dir": str(tmp_path / "not-yet"), "library_dir": str(tmp_path),
                        "host": {"reserved_disk_mb": 0}}, "test")
    [c] = doctor._disk(cfg)   # one filesystem: one line; a missing dir is measured at its parent
    assert c.level == doctor.PASS and "GiB free" in c.detail
    cfg = config.parse({"state_dir": str(tmp_path), "host": {"reserved_disk_mb": 1 << 40}},
                       "test")
    assert {c.level for c in doctor._disk(cfg)} == {doctor.FAIL}
    c = doctor._cgroups(cfg)   # this host's
    assert c.detail.startswith("v2") == os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu io memory pids\n")
    c = doctor._cgroups(cfg, str(v2))
    assert c.level == doctor.FAIL and "v2 (unified); controller(s) cpuset missing" in c.detail
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (v2 / "machine.slice").mkdir()
    c = doctor._cgroups(cfg, str(v2))
    assert c.level == doctor.PASS and "under machine.slice" in c.detail
    v1 = tmp_path / "v1"
    for d in ("memory/machine", "cpuset", "unified"):
        (v1 / d).mkdir(parents=True)
    c = doctor._cgroups(cfg, str(v1))
    assert c.level == doctor.PASS and c.detail.startswith("v1 (hybrid") and "under machine" in c.detail


def test_new_config_keys_are_checked(tmp_path):
    from vibatch.errors import ConfigError
    for data, key in (({"metrics": {"textfile": "vibatch.txt"}}, "metrics.textfile"),
                      ({"metrics": {"textfile": "../x.prom"}}, "metrics.textfile"),
                      ({"logs": {"phases": "relative.log"}}, "logs.phases"),
                      ({"logs": {"colour": "blue"}}, "logs.colour")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config.parse(data, "v.yaml")
    cfg = config.parse({"state_dir": "/srv/vb", "metrics": {"textfile": "m/n.prom"}}, "v.yaml")
    assert metrics.textfile_path(cfg) == "/srv/vb/m/n.prom"
    assert metrics.textfile_path(config.parse({"metrics": {"textfile": ""}}, "v")) == ""
    assert config.load(os.path.join(REPO, "etc", "vibatch.yaml")).logs.phases == "syslog"


@pytest.mark.skipif(os.geteuid() != 0, reason="hooks must be root-owned")
def test_doctor_on_the_slurm_conf_a_real_slurmd_reads(places, tmp_path, monkeypatch):
    """The slurm.conf that tests/clusters.py writes for the real slurmd of test_batch_slurm.py
    (written here without starting the daemons), with the shims installed as that test installs
    them: doctor finds the Prolog and Epilog through $SLURM_CONF, as an admin's shell has it."""
    from clusters import SlurmCluster
    from vmhelp import install_shims
    hooks = install_shims("slurm", str(tmp_path / "hooks-slurm"), {},
                          {"prolog": 0o500, "epilog": 0o500, "job_exec": 0o555})
    c = SlurmCluster(str(tmp_path / "slurm"), {
        "Prolog": os.path.join(hooks, "prolog"), "Epilog": os.path.join(hooks, "epilog"),
        "PrologFlags": "Alloc", "KillWait": "5"}, features=["vibatch", "testguest"])
    os.makedirs(c.state)
    c._write_conf()
    monkeypatch.setenv("SLURM_CONF", c.conf)
    checks = list(doctor._slurm(config.parse({}, "test"), places))
    assert _levels(checks, "slurm") == [("slurm Prolog", doctor.PASS),
                                        ("slurm Epilog", doctor.PASS)]
    # the cluster tests' shims have this node's paths substituted: safe, but not byte-for-byte
    # vibatch's, which doctor says without failing
    hooks = install_shims("slurm", str(tmp_path / "hooks-subst"),
                          {"/etc/vibatch/vibatch.yaml": "/srv/vibatch.yaml"},
                          {"prolog": 0o500, "epilog": 0o500})
    c.extra.update(Prolog=os.path.join(hooks, "prolog"), Epilog=os.path.join(hooks, "epilog"))
    c._write_conf()
    assert [x.level for x in doctor._slurm(config.parse({}, "test"), places)
            if x.name.startswith("slurm")] == [doctor.WARN] * 2


SYSLOG_CHILD = r"""
import json, socket, subprocess, sys
# a private /dev (this process has its own mount namespace): the real /dev/log is untouched
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vibatch-test", "/dev"], check=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
s.settimeout(10)
from vibatch import config
from vibatch.core import metrics
cfg = config.parse({"logs": {"phases": "syslog"}}, "test")
metrics.log_phases(cfg, "prologue", "j7", {"claim": 0.01, "boot": 1.5}, 2.0,
                   ("node", "BootFailed", "the guest did not answer"))
print(json.dumps([s.recv(4096).decode() for _ in range(3)]))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="a private mount namespace needs root and unshare(1)")
def test_phase_log_to_syslog():
    """The real libc syslog(3) path, into a /dev/log socket the test binds in a mount namespace
    of its own (util-linux unshare): ident, facility daemon, priorities, one datagram a line."""
    import json
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-B",
                        "-c", SYSLOG_CHILD], capture_output=True, text=True, timeout=60,
                       env={"PATH": os.environ["PATH"], "PYTHONPATH": REPO,
                            "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, r.stderr
    lines = json.loads(r.stdout)
    info, err = f"<{3 * 8 + 6}>", f"<{3 * 8 + 3}>"   # LOG_DAEMON | LOG_INFO, LOG_DAEMON | LOG_ERR
    assert [line[:4] for line in lines] == [info, info, err]
    assert all(" vibatch[" in line and " job=j7 hook=prologue " in line for line in lines)
    assert lines[1].endswith("phase=boot seconds=1.500 start=cold")
    assert lines[2].endswith('phase=boot fault=node reason=BootFailed '
                             'message="the guest did not answer"')


@pytest.mark.skipif(os.geteuid() != 0, reason="image add is root's")
def test_image_add_shows_progress_on_a_terminal_only(tmp_path):
    """`vibatch image add` as a subprocess: its stderr a real pseudo-terminal, then a pipe."""
    from imagehelp import make_disk
    cfgfile = tmp_path / "v.yaml"
    cfgfile.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "s"),
                                       "library_dir": str(tmp_path / "lib")}))
    disk = make_disk(str(tmp_path / "d.qcow2"), "progress")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(os.urandom(1 << 20))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": REPO, "PYTHONDONTWRITEBYTECODE": "1"}

    def add(name, stderr):
        return subprocess.run([sys.executable, "-B", "-m", "vibatch", "--config", str(cfgfile),
                               "image", "add", disk, "--name", name, "--os", "t", "--os-version",
                               "1", "--kernel", str(kernel)], stdout=subprocess.PIPE,
                              stderr=stderr, text=True, timeout=120, env=env, cwd=REPO)
    shown = _pty_output(lambda p: add("on-tty", p.stream))
    assert b"hashing disk:" in shown and b"hashing vmlinux: 100.0% 1.0 MiB of 1.0 MiB" in shown
    r = add("on-pipe", subprocess.PIPE)
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("added on-pipe:")
