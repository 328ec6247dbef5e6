"""HTCondor by contract: tests/condor_starter.py plays condor_starter (and the startd's answers
to the helper's two queries) as a real HTCondor 25.0.13 was seen doing it: the ads written as the
job's user, an error file the starter cannot read, PREPARE_JOB's HookStatusCode, the real
environment (no PATH for the wrapper; CONDOR_PRIVATE_INHERIT for the hooks), exit/evict for the
JOB_EXIT hook. The shipped hooks run with real sudo and boot real VMs."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from clusters import apt_install
from conftest import SESSION, vibatch_cmd
from vmhelp import (batch_user, guest_kernel, install_shims, leftovers, variant, wait_until,
                    warm_shapes)
from condor_starter import PRIVATE_INHERIT, submit_requirement
from vibatch import config
from vibatch.batch import htcondor, kit
from vibatch.errors import Fault, NodeError, ResourceRequestError

USER, UID = "vbt-htcondor", 23406
DAEMON, DAEMON_UID = "vbt-condor", 23407
HERE = os.path.dirname(os.path.abspath(__file__))
SUDOERS = "/etc/sudoers.d/vibatch-tests-htcondor"
ADDRESS = "<127.0.0.1:40000?addrs=127.0.0.1-40000&alias=node>"


def job_ad(cluster: int, image: str | None = None, extra: str = "", iwd: str = "") -> str:
    lines = [f"ClusterId = {cluster}", "ProcId = 0", f'Owner = "{USER}"',
             f'GlobalJobId = "{SESSION}-ap.example.org#{cluster}.0#1763700000"',
             "RequestCpus = 1", "RequestMemory = ifthenelse(MemoryUsage =!= undefined, "
             "MemoryUsage, 512)", 'AccountingGroup = "group_vbt.alice"', 'JobUniverse = 5',
             f'Iwd = "{iwd or "/nonexistent"}"', 'Cmd = "job.sh"']
    if image is not None:
        lines.append(f"{htcondor.IMAGE_ATTR} = {image}")
    return "\n".join(lines + ([extra] if extra else [])) + "\n"


MACHINE_AD = 'Name = "slot1_1@node"\nCpus = 1\nMemory = 640\nSlotType = "Dynamic"\n'


class Starter:
    """Runs tests/condor_starter.py, as root, for one job."""

    def __init__(self, env, hooks: str, pool: dict):
        self.env, self.hooks, self.pool = env, hooks, pool
        self.execute = pool["execute"]
        self.n = 0

    def run(self, tracker, ad: str, script: str, args=(), iwd=None, remove=None,
            job_exit=True, prepare_job=True, tamper=None, timeout=300, **extra) -> dict:
        self.n += 1
        spec_path = os.path.join(self.env.base, f"condor-spec-{self.n}.json")
        result = os.path.join(self.env.base, f"condor-result-{self.n}.json")
        spec = {"execute": self.execute, "uid": UID, "gid": UID, "daemon_uid": DAEMON_UID,
                "daemon_gid": DAEMON_UID, "job_ad": ad, "machine_ad": MACHINE_AD,
                "files": {f"job{self.n}.sh": [script, 0o755]}, "executable": f"job{self.n}.sh",
                "args": list(args), "env": {"JOB_VAR": "from the submit file"},
                "wrapper": os.path.join(self.hooks, "wrapper"), "iwd": iwd, "remove": remove,
                "job_exit": os.path.join(self.hooks, "job_exit") if job_exit else None,
                "prepare_job": os.path.join(self.hooks, "prepare_job") if prepare_job else None,
                "tamper": tamper, "result": result, "job_timeout": timeout,
                "condor_config": self.pool["condor_config"],
                "startd_dir": self.pool["startd_dir"],
                "startd_job_attrs": list(htcondor.SLOT_JOB_ATTRS), **extra}
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        tracker.jobs.append(htcondor.job_id_of(htcondor.parse_ad(ad.encode(), "ad")))
        subprocess.run([sys.executable, os.path.join(HERE, "condor_starter.py"), "-f", "-a",
                        "slot1_1", spec_path],
                       check=True, timeout=timeout + 60, cwd="/", env={"PATH": "/usr/bin:/bin"})
        with open(result) as f:
            return json.load(f)


def fake_pool(base: str) -> dict:
    """HTCondor's directories as a startd leaves them (owned by its account), its address file,
    a CONDOR_CONFIG the stand-in tools read, and those tools in a bin directory."""
    root = os.path.join(base, "condor")
    pool = {d: os.path.join(root, d) for d in ("execute", "log", "startd", "bin")}
    for d in pool.values():
        os.makedirs(d)
        os.chmod(d, 0o755)
    for d in ("execute", "log", "startd"):
        os.chown(pool[d], DAEMON_UID, DAEMON_UID)
    address_file = os.path.join(pool["log"], ".startd_address")
    with open(address_file, "w") as f:
        f.write(f"{ADDRESS}\n$CondorVersion: 25.0.13 2026-08-19 $\n")
    os.chown(address_file, DAEMON_UID, DAEMON_UID)
    for tool in ("condor_config_val", "condor_status"):
        path = os.path.join(pool["bin"], tool)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\nexec {sys.executable} {HERE}/condor_starter.py tool {tool} "$@"\n')
        os.chmod(path, 0o755)
    pool["condor_config"] = os.path.join(root, "condor_config.json")
    pool["startd_dir"] = pool["startd"]
    pool["address_file"] = address_file
    set_params(pool, MOUNT_UNDER_SCRATCH='"/tmp"')   # a site's choice: the tests live in /var/tmp
    return pool


def htcondor_cfg(pool: dict) -> dict:
    return {"daemon_user": DAEMON, "condor_config": pool["condor_config"], "bin_dir": pool["bin"]}


def set_params(pool: dict, **params) -> None:
    data = {"params": {"STARTD_ADDRESS_FILE": pool["address_file"], **params},
            "startd_dir": pool["startd_dir"]}
    with open(pool["condor_config"], "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def condor(vm_env):
    apt_install(["sudo"])
    # most jobs here: the slot ad's 1 CPU and 640 MiB (vmhelp.warm_shapes)
    with batch_user(vm_env, USER, UID) as home, batch_user(vm_env, DAEMON, DAEMON_UID), \
            warm_shapes(vm_env, [(1, 640)]):
        pool = fake_pool(vm_env.base)
        cfg_path = variant(vm_env, "htcondor", {"htcondor": htcondor_cfg(pool)})
        hooks = install_shims("htcondor", os.path.join(vm_env.base, "condor-hooks"), {
            "/etc/vibatch/vibatch.yaml": cfg_path, "/opt/vibatch/venv/bin/python": sys.executable,
            "/opt/vibatch/hooks/htcondor/": os.path.join(vm_env.base, "condor-hooks") + "/"},
            {"wrapper": 0o755, "job_exit": 0o755, "vm-helper": 0o755, "prepare_job": 0o755})
        with open(SUDOERS, "w") as f:   # the one rule docs/batch/htcondor.md asks for
            f.write(f"ALL ALL=(root) NOPASSWD: {hooks}/vm-helper\n")
        os.chmod(SUDOERS, 0o440)
        try:
            yield Starter(vm_env, hooks, pool), home, cfg_path
        finally:
            os.unlink(SUDOERS)


def accounted(env, job):
    with open(env.cfg.accounting_file) as f:
        return [r for r in map(json.loads, f) if r["job_id"] == job]


def files_holding(top: str, needle: str) -> list[str]:
    found = []
    for d, _dirs, files in os.walk(top):
        for name in files:
            try:
                with open(os.path.join(d, name), "rb") as f:
                    if needle.encode() in f.read(1 << 22):
                        found.append(os.path.join(d, name))
            except OSError:
                pass
    return found


def test_job_runs_in_its_vm_as_the_user_with_its_exit_code(vm_env, tracker, condor):
    starter, _home, _cfg = condor
    # the job's own ads (the user's files since 24.0) ask for more than the slot gives: ignored
    r = starter.run(tracker, job_ad(101, '"testguest"'),
                    '#!/bin/sh\necho "kernel $(uname -r) user $(id -un) cwd $PWD args $*"\n'
                    'echo "env $JOB_VAR, batch $BATCH_SYSTEM"\nenv >&2\nexit 7\n',
                    args=["a b", "c"])
    job = f"101.0@{SESSION}-ap.example.org"
    assert r["status"] == 7 and r["outcome"] == "completed", r
    assert r["prepare_job"] == {"rc": 0, "stdout": "", "stderr": "", "status": 0}   # booted it
    assert r["error_file"] is None
    assert r["stdout"].splitlines() == [
        f"kernel {guest_kernel()} user {USER} cwd {r['scratch']} args a b c",
        "env from the submit file, batch HTCondor"]
    assert "JOB_VAR=from the submit file\n" in r["stderr"]
    # HTCondor's session key (in the hooks' environment) reaches neither the guest nor a file
    assert "CONDOR_PRIVATE_INHERIT" not in r["stderr"] and PRIVATE_INHERIT not in r["stderr"]
    for top in (vm_env.cfg.state_dir, vm_env.cfg.run_dir,
                os.path.dirname(vm_env.cfg.accounting_file)):
        assert files_holding(top, PRIVATE_INHERIT.split(";")[0]) == []
    assert r["job_exit"] == {"rc": 0, "stdout": "", "stderr": ""}  # nothing left to end
    [rec] = accounted(vm_env, job)
    # the slot's size comes from the startd's slot ad (640 MiB), not the smaller request
    assert (rec["exit_code"], rec["cores"], rec["memory_mb"], rec["image"]) == (7, 1, 640,
                                                                                 "testguest")
    assert leftovers(vm_env, job) == []


def test_an_unknown_os_fails_the_job_with_the_choices_and_no_requeue(vm_env, tracker, condor):
    starter = condor[0]
    # a case-changed name is another name: the helper, START and the submit check agree
    for n, image in ((102, '"el10"'), (103, '"TestGuest"')):
        r = starter.run(tracker, job_ad(n, image), "#!/bin/sh\necho never\n")
        assert r["status"] == htcondor.EXIT["wrapper"][Fault.JOB] and r["outcome"] == "completed"
        assert r["prepare_job"]["status"] == 0     # a warning only: the wrapper fails the job
        assert "HookStatusMessage" in r["prepare_job"]["stdout"]
        assert r["error_file"] is None
        assert r["stdout"] == ""
        assert image.strip('"') in r["stderr"] and "testguest" in r["stderr"], r
        assert "job fault" in r["stderr"]
        assert leftovers(vm_env, f"{n}.0@{SESSION}-ap.example.org") == []
    r = starter.run(tracker, job_ad(104, "42"), "#!/bin/sh\necho never\n", prepare_job=False)
    assert r["status"] == 125 and 'VibatchImage = "el9"' in r["stderr"]


def test_a_node_fault_requeues_the_job_only_from_prepare_job(vm_env, tracker, condor):
    starter, _home, cfg_path = condor
    with open(cfg_path) as f:
        saved = f.read()
    # a guest that never answers, within a short boot timeout: the node's fault
    variant(vm_env, "htcondor", {"htcondor": htcondor_cfg(starter.pool),
                                 "vm": {"boot_timeout_s": 8}})
    try:
        r = starter.run(tracker, job_ad(105, '"silent"'), "#!/bin/sh\necho never\n")
        # without the hook the wrapper meets the fault, and its error file is not seen
        w = starter.run(tracker, job_ad(106, '"silent"'), "#!/bin/sh\necho never\n",
                        prepare_job=False)
    finally:
        with open(cfg_path, "w") as f:
            f.write(saved)
    assert r["outcome"] == "requeued" and r["status"] is None, r     # the wrapper never ran
    assert r["prepare_job"]["status"] == htcondor.EXIT["prepare_job"][Fault.NODE]
    assert "did not answer within 8 s" in r["prepare_job"]["stdout"]
    assert r["prepare_job"]["stdout"].count("\n") == 2                # two one-line attributes
    assert leftovers(vm_env, f"105.0@{SESSION}-ap.example.org") == []
    assert w["outcome"] == "completed" and w["status"] == htcondor.EXIT["wrapper"][Fault.NODE], w
    assert w["error_file"] is not None and w["error_file_seen"] is None
    assert "do not rerun it" in w["stderr"] and "will run again" not in w["stderr"]
    assert leftovers(vm_env, f"106.0@{SESSION}-ap.example.org") == []


def test_without_prepare_job_the_wrapper_boots_the_vm_outside_the_jobs_mount_namespace(
        vm_env, tracker, condor):
    starter = condor[0]
    # the starter runs the wrapper, and so sudo and the helper, in the job's own mount namespace
    # (MOUNT_UNDER_SCRATCH): a mount made there, such as the job's I/O tmpfs, is not libvirtd's,
    # and the share launcher libvirtd starts found only root's empty directory (on the real
    # 25.0.13 pool every job without the hook failed so, with exit 1). Made in the starter's
    # namespace, the wrapper must see it too: this host's / is not a shared mount, so nothing
    # propagates into the job's namespace by itself
    r = starter.run(tracker, job_ad(113, '"testguest"'),
                    '#!/bin/sh\necho "ran in $PWD"\nexit 3\n', prepare_job=False)
    job = f"113.0@{SESSION}-ap.example.org"
    assert r["status"] == 3 and r["stderr"] == "", r["stderr"]
    assert r["stdout"] == f"ran in {r['scratch']}\n"
    assert r["job_exit"] == {"rc": 0, "stdout": "", "stderr": ""}
    assert leftovers(vm_env, job) == []
    with open("/proc/self/mountinfo") as f:
        assert [ln for ln in f if f"/jobs/{job}/" in ln] == []


def test_mount_under_scratch_over_vibatch_is_refused(vm_env, tracker, condor):
    starter = condor[0]
    set_params(starter.pool, MOUNT_UNDER_SCRATCH='"/tmp,/var/tmp"')   # the default, as printed
    try:
        r = starter.run(tracker, job_ad(107, '"testguest"'), "#!/bin/sh\necho never\n")
    finally:
        set_params(starter.pool, MOUNT_UNDER_SCRATCH='"/tmp"')
    assert r["outcome"] == "requeued", r
    assert "MOUNT_UNDER_SCRATCH = /tmp,/var/tmp gives" in r["prepare_job"]["stdout"]
    assert f"{vm_env.cfg.state_dir} (in /var/tmp)" in r["prepare_job"]["stdout"]
    assert leftovers(vm_env, f"107.0@{SESSION}-ap.example.org") == []


def test_condor_rm_signals_the_job_in_its_vm_and_leaves_nothing(vm_env, tracker, condor):
    starter, home, _cfg = condor
    # no file transfer: the job starts in its Iwd (the user's home), which the VM shares
    r = starter.run(tracker, job_ad(108, '"testguest"', iwd=home),
                    "#!/bin/sh\ntrap 'echo got TERM in $PWD; exit 143' TERM\n"
                    "touch started.108\nsleep 300 & wait\n",
                    iwd=home, remove={"when": "started.108", "kill_sig_timeout": 60})
    assert not r["never_started"], r
    assert r["reason"] == "evict" and r["status"] == 143, r
    assert r["stdout"] == f"got TERM in {home}\n"
    assert r["job_exit"]["rc"] == 0
    assert leftovers(vm_env, f"108.0@{SESSION}-ap.example.org") == []


def test_a_sigkilled_wrapper_is_cleaned_up_by_the_job_exit_hook_or_by_reap(vm_env, tracker,
                                                                              condor):
    starter, home, cfg_path = condor
    script = "#!/bin/sh\ntouch started.$1\nsleep 300\n"
    r = starter.run(tracker, job_ad(109, '"testguest"', iwd=home), script, args=["109"],
                    iwd=home, remove={"when": "started.109", "kill_wrapper": True})
    assert not r["never_started"], r
    assert r["status"] == -9 and r["reason"] == "exit" and r["job_exit"]["rc"] == 0, r
    assert leftovers(vm_env, f"109.0@{SESSION}-ap.example.org") == []
    # no hook either: the VM outlives its starter until `vibatch reap` sees the starter gone
    r = starter.run(tracker, job_ad(110, '"testguest"', iwd=home), script, args=["110"],
                    iwd=home, remove={"when": "started.110", "kill_wrapper": True},
                    job_exit=False)
    job = f"110.0@{SESSION}-ap.example.org"
    assert r["status"] == -9 and "domain" in leftovers(vm_env, job)
    out = subprocess.run(vibatch_cmd("--config", cfg_path, "reap"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and f"job {job} (holder gone)" in out.stdout, out
    assert leftovers(vm_env, job) == []
    assert [rec["vm_end"] for rec in accounted(vm_env, job)] == ["destroyed"]


def test_forged_ads_in_the_scratch_directory_change_nothing(vm_env, tracker, condor):
    starter, home, _cfg = condor
    # the user rewrites both ads (theirs since 24.0): another job's id, 64 cores, 64 GiB, /root
    forged = job_ad(999, '"silent"', iwd="/root", extra="RequestCpus = 64")
    r = starter.run(tracker, job_ad(111, '"testguest"'),
                    '#!/bin/sh\necho "cores $(nproc) job $VIBATCH_JOB_ID cwd $PWD"\n',
                    tamper={".job.ad": forged, ".machine.ad": "Cpus = 64\nMemory = 65536\n"})
    job = f"111.0@{SESSION}-ap.example.org"
    assert r["status"] == 0, r
    assert r["stdout"] == f"cores 1 job {job} cwd {r['scratch']}\n"
    [rec] = accounted(vm_env, job)
    assert (rec["cores"], rec["memory_mb"], rec["image"]) == (1, 640, "testguest")
    assert leftovers(vm_env, job) == [] and accounted(vm_env, f"999.0@{SESSION}-ap.example.org") \
        == []


def test_the_helper_refuses_callers_outside_a_job_and_a_forged_startd(vm_env, condor, tmp_path):
    starter, home, _cfg = condor
    helper = os.path.join(starter.hooks, "vm-helper")
    fake = os.path.join(starter.execute, f"dir_{os.getpid()}")
    # the job's user, through sudo, but not under a condor_starter
    r = subprocess.run(["/usr/bin/sudo", "-n", helper, "prepare", "--scratch", fake],
                       capture_output=True, text=True, timeout=60, cwd=home, user=UID, group=UID,
                       extra_groups=[], env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == htcondor.EXIT["helper"][Fault.NODE]
    assert "no root condor_starter among its ancestors" in r.stderr
    # root without sudo: no caller to act for
    r = subprocess.run([helper, "finish"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 4 and "SUDO_UID is missing" in r.stderr
    # an address file the user could write (theirs, or in a directory of theirs) is not the
    # startd's: a user's own "startd" could then answer with any slot ad
    trusted = {0, DAEMON_UID}
    assert htcondor.read_address_file(starter.pool["address_file"], trusted) == ADDRESS
    forged = tmp_path / "log"
    forged.mkdir()
    (forged / ".startd_address").write_text("<127.0.0.1:1>\n")
    os.chown(forged / ".startd_address", UID, UID)
    with pytest.raises(NodeError, match="writable by no one else"):
        htcondor.read_address_file(str(forged / ".startd_address"), trusted)
    os.chown(forged / ".startd_address", DAEMON_UID, DAEMON_UID)
    os.chown(forged, UID, UID)
    with pytest.raises(NodeError, match="writable by no one else"):
        htcondor.read_address_file(str(forged / ".startd_address"), trusted)


def test_the_slot_is_the_one_running_our_starter():
    parse = htcondor.parse_ads
    text = ('Name = "slot1_1@n"\nState = "Claimed"\nJobId = "5.0"\nStarterPid = 41\nIwd = "/w"\n'
            '\nName = "slot1_2@n"\nState = "Claimed"\nJobId = "6.0"\nStarterPid = 42\n'
            'Iwd = "/v"\n\nName = "slot2@n"\nState = "Unclaimed"\n')
    ads = parse(text, "t")
    assert len(ads) == 3
    assert htcondor.pick_slot(ads, 42, "slot1_1")["JobId"] == "6.0"    # 25: StarterPid wins
    with pytest.raises(NodeError, match="0 slots running condor_starter 43"):
        htcondor.pick_slot(ads, 43, "slot1_1")        # a slot with a StarterPid is another's
    old = parse('Name = "slot1@n"\nState = "Claimed"\nJobId = "7.0"\nIwd = "/w"\n'
                '\nName = "slot2@n"\nState = "Claimed"\nJobId = "8.0"\nIwd = "/w"\n', "t")
    assert htcondor.pick_slot(old, 43, "slot2")["JobId"] == "8.0"      # 23/24: -slot-name
    with pytest.raises(NodeError, match="not running a job"):
        htcondor.pick_slot(parse('Name = "slot1@n"\nState = "Unclaimed"\n', "t"), 1, "slot1")
    with pytest.raises(NodeError, match="STARTD_JOB_ATTRS"):
        htcondor.pick_slot(parse('Name = "slot1@n"\nState = "Claimed"\nJobId = "1.0"\n', "t"),
                           1, "slot1")
    assert htcondor.mount_under_scratch_conflicts("/tmp,/var/tmp", ["/var/tmp/x", "/tmpx",
                                                                    "/var/lib"]) \
        == ["/var/tmp/x (in /var/tmp)"]
    assert htcondor.mount_under_scratch_conflicts("", ["/tmp/x"]) == []


def test_ads_ids_and_sizes(tmp_path):
    cfg = config.parse({"state_dir": str(tmp_path), "jobs": {"default_memory_mb": 700}}, "t")
    ad = htcondor.parse_ad(job_ad(7, '"el9"').encode(), "ad")
    assert htcondor.job_id_of(ad) == f"7.0@{SESSION}-ap.example.org"
    no_schedd = htcondor.parse_ad(b"ClusterId = 9\nProcId = 3\n", "ad")
    assert htcondor.job_id_of(no_schedd) == "9.3"
    slot = htcondor.parse_ad(b'JobId = "12.4"\nGlobalJobId = "ap#12.4#1"\n', "ad")
    assert htcondor.job_id_of(slot) == "12.4@ap"
    odd = htcondor.parse_ad(b'ClusterId = 1\nProcId = 0\nGlobalJobId = "a/..b c#1.0#5"\n', "ad")
    assert htcondor.job_id_of(odd) == "1.0@a_.b_c"
    machine = htcondor.parse_ad(MACHINE_AD.encode(), "m")
    job = htcondor.job_from_ads(cfg, ad, machine, "nobody", str(tmp_path))
    assert (job.cores, job.memory_mb, job.image, job.account, job.walltime_s) == \
        (1, 640, "el9", "group_vbt.alice", None)
    job = htcondor.job_from_ads(cfg, htcondor.parse_ad(job_ad(7, extra="AllowedJobDuration = 3600")
                                                       .encode(), "ad"), machine, "nobody",
                                str(tmp_path))
    assert (job.memory_mb, job.image, job.walltime_s) == (640, None, 3600)
    # without the slot's Cpus and Memory: never sized from the user's own expressions, which
    # here ask for far more than any slot holds (the attack), nor from the site's defaults
    greedy = htcondor.parse_ad(job_ad(7, extra="RequestCpus = 64\nRequestMemory = 1 << 20")
                               .encode(), "ad")
    for machine_ad in (None, htcondor.parse_ad(b'Name = "slot1@x"\n', "m")):
        with pytest.raises(NodeError, match="refusing to size the VM from the job's own"):
            htcondor.job_from_ads(cfg, greedy, machine_ad, "nobody", str(tmp_path))
    with pytest.raises(ResourceRequestError, match="must be an OS or image name in quotes"):
        htcondor.job_from_ads(cfg, htcondor.parse_ad(job_ad(7, "undefined").encode(), "ad"),
                              machine, "nobody", str(tmp_path))
    with pytest.raises(NodeError, match="not a ClassAd"):
        htcondor.parse_ad(b"this is = = not an ad", "x")
    with pytest.raises(NodeError, match="no ClusterId"):
        htcondor.job_id_of(htcondor.parse_ad(b'Owner = "x"\n', "ad"))
    with pytest.raises(NodeError, match="SUDO_UID is missing"):
        htcondor.find_caller({})


def test_offer_fragments_match_and_refuse_as_htcondor_evaluates_them():
    import classad2
    startd = dict(line.split(" = ", 1) for line in htcondor.config_fragment(
        ["el9", "testguest"], "startd").splitlines() if not line.startswith("#"))
    schedd = dict(line.split(" = ", 1) for line in htcondor.config_fragment(
        ["el9", "testguest"], "schedd").splitlines() if not line.startswith("#"))
    assert startd["STARTD_ATTRS"] == "$(STARTD_ATTRS) VibatchImages"
    assert startd["START"].startswith("($(START)) && (")
    machine = classad2.parseOne(f"VibatchImages = {startd['VibatchImages']}\n")
    start = classad2.ExprTree(startd["START"][len("($(START)) && "):])
    submit, reason = (schedd["SUBMIT_REQUIREMENT_VibatchImage"],
                      schedd["SUBMIT_REQUIREMENT_VibatchImage_REASON"])
    # names are case-sensitive, as the helper compares them
    for attr, ok in (('"el9"', True), ('"TestGuest"', False), ('"el10"', False), (None, True),
                     ("5", False)):
        text = f"VibatchImage = {attr}\n" if attr else "Owner = \"a\"\n"
        job = classad2.parseOne(text)
        assert (start.eval(machine, job) is True) == ok, attr     # the negotiator's match
        assert submit_requirement(submit, reason, text)[0] == ok, attr   # the schedd's check
    assert submit_requirement(submit, reason, 'VibatchImage = "el10"\n')[1] == \
        'vibatch: unknown OS "el10" (names are case-sensitive); choose one of: el9, testguest'
    assert submit_requirement(submit, reason, "VibatchImage = 5\n")[1].startswith(
        'vibatch: unknown OS "5"')


def test_image_offer_writes_the_fragments(vm_env):
    out = os.path.join(vm_env.base, "condor-offer.conf")
    r = vm_env.run("image", "offer", "--format", "htcondor-startd", "--output", out)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        lines = f.read().splitlines()
    assert 'VibatchImages = "silent,testguest"' in lines
    r = vm_env.run("image", "offer", "--format", "htcondor-schedd")
    assert 'stringListMember(TARGET.VibatchImage, "silent,testguest")' in r.stdout
    assert vm_env.run("image", "offer", "--format", "condor").returncode == 2


def test_removal_while_the_vm_boots_never_starts_the_job(vm_env, tracker, condor):
    starter = condor[0]
    job = f"112.0@{SESSION}-ap.example.org"
    # condor_rm arrives as soon as the prologue has claimed the job (its state directory exists)
    r = starter.run(tracker, job_ad(112, '"testguest"'), "#!/bin/sh\necho ran\n",
                    prepare_job=False,
                    remove={"when": os.path.join(vm_env.cfg.state_dir, "jobs", job),
                            "kill_sig_timeout": 120})
    assert not r["never_started"], r
    assert r["status"] == 128 + 15 and r["stdout"] == "" and r["error_file"] is None, r
    assert r["job_exit"]["rc"] == 0
    assert leftovers(vm_env, job) == []
    assert [rec["vm_end"] for rec in accounted(vm_env, job)] == ["destroyed"]


# ---------------------------------------------------------------------------------------------
# Accounting and suspend (issue 11): the harness tracks the job as the real starter was seen to
def alongside(run, side):
    """``run()`` (the starter, which blocks until the job ends) with ``side()`` acting on the
    running job meanwhile; both results. ``side`` must release the job whatever happens."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=run()))
    t.start()
    try:
        seen = side()
    finally:
        t.join(timeout=600)
    assert not t.is_alive(), "the starter did not finish"
    return out["result"], seen


def proc_cgroups(pid: int) -> dict:
    with open(f"/proc/{pid}/cgroup") as f:
        return {line.split(":")[1]: line.strip().split(":", 2)[2] for line in f}


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def test_the_vms_cpu_time_lands_in_the_jobs_cgroup_and_libvirts_cap_and_pinning_hold(
        vm_env, tracker, condor):
    """A starter that tracks its job by cgroup (v1, as 25.0.13 was seen doing it) counts the
    job's CPU from the job's cpuacct cgroup: once the wrapper runs, QEMU and the share
    launchers are in it (and in its freezer cgroup), so a ~10 s burn in the guest is >= 8 s of
    RemoteUserCpu + RemoteSysCpu. They stay in libvirt's memory and cpuset cgroups: the live
    memory cap and the pinning hold, and the starter's kill after the job, which reads the
    memory cgroup, finds none of them (the wrapper ended the VM)."""
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    starter, home, _cfg = condor
    n = 120
    job = f"{n}.0@{SESSION}-ap.example.org"
    script = ("#!/bin/sh\ntimeout 10 sh -c 'while :; do :; done'\ntouch burnt.$1\n"
              "i=0; while [ ! -e gate.$1 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n")

    def look():
        try:
            assert wait_until(lambda: os.path.exists(os.path.join(home, f"burnt.{n}")), 240)
            conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
            try:
                dom = hypervisor.lookup(conn, "vibatch-" + job)
                return {"pids": {p: proc_cgroups(p) for p in adopt.vm_pids(dom)},
                        "hard": dom.memoryParameters()["hard_limit"],
                        "pinned": {c for v in dom.vcpuPinInfo() for c, on in enumerate(v) if on},
                        "cpu": hypervisor.cpu_time_s(dom), "allocated": allocated_cpus(vm_env, job)}
            finally:
                conn.close()
        finally:
            touch(os.path.join(home, f"gate.{n}"))
    r, seen = alongside(lambda: starter.run(tracker, job_ad(n, '"testguest"', iwd=home), script,
                                            args=[str(n)], iwd=home, tracking="cgroup"), look)
    print("E11 usage:", r.get("usage"), "libvirt cpu at the gate:", seen["cpu"])
    assert r["status"] == 0, r
    assert r["usage"]["RemoteUserCpu"] + r["usage"]["RemoteSysCpu"] >= 8, r["usage"]
    assert r["killed_at_end"] == [], r           # the VM was gone, not killed by the starter
    for g in seen["pids"].values():
        assert g["cpuacct"].startswith("/htcondor/") and g["freezer"] == g["cpuacct"], g
        assert g["cpuset"].startswith("/machine/qemu-"), g
    assert any(g["memory"].startswith("/machine/qemu-") for g in seen["pids"].values())
    assert seen["hard"] == (640 + vm_env.cfg.vm.memory_overhead_mb) * 1024
    assert seen["pinned"] == seen["allocated"]
    assert leftovers(vm_env, job) == []


TRACKING_GID = 750007     # in the pool's MIN_TRACKING_GID..MAX_TRACKING_GID (set_params below)


def counted_by_group(pool: dict, every: int = 3) -> None:
    """The pool's configuration for a procd that tracks by group (docs/batch/htcondor.md),
    snapshots every ``every`` s (the harness's ``snapshot_s`` must be the same)."""
    set_params(pool, MOUNT_UNDER_SCRATCH='"/tmp"', USE_GID_PROCESS_TRACKING="true",
               MIN_TRACKING_GID="750000", MAX_TRACKING_GID="750100",
               **{"STARTER.PID_SNAPSHOT_INTERVAL": str(every)})


def allocated_cpus(env, job: str) -> set[int]:
    """The CPUs vibatch's own allocator gave the job (its state record)."""
    from vibatch.core.jobdir import JobPaths
    from vibatch.util import read_json
    return set((read_json(JobPaths.of(env.cfg, job).state_file, {}) or {}).get("cpus") or ())


@pytest.mark.parametrize("tracking", ["cgroup", "procd", "procd_gid", "cgroup2"])
def test_condor_suspend_stops_the_guest_and_continue_goes_on(vm_env, tracker, condor, tracking):
    """condor_suspend, as the real starter does it: with cgroups (v1) it freezes the job's
    freezer cgroup, where QEMU now is; under the procd it SIGSTOPs the wrapper's family, and the
    root watcher suspends the domain; with USE_GID_PROCESS_TRACKING QEMU is in that family and
    is stopped itself (state T), and the watcher, which must not call a stopped QEMU's monitor,
    leaves the domain running; on cgroup v2 (played from the 25.0.13 source) it freezes
    the job's v2 cgroup, which QEMU is not in, and the watcher, which left that cgroup, suspends
    the domain. Each way libvirt's CPU time stands still for 3 s; after condor_continue the
    guest burns again, its clock is right (within 2 s) and the job ends with its own exit code.
    Before the v2 watcher, the v2 guest burnt on while suspended (about 3 s in 3 s)."""
    import libvirt
    from vibatch.core import adopt
    from vibatch.core.pause import process_state
    from vibatch.vm import hypervisor
    starter, home, _cfg = condor
    n = {"cgroup": 121, "procd": 122, "cgroup2": 123, "procd_gid": 125}[tracking]
    job = f"{n}.0@{SESSION}-ap.example.org"
    marker, resume = (os.path.join(vm_env.base, f"{w}.{n}") for w in ("suspended", "resume"))
    gate = os.path.join(home, f"gate.{n}")
    script = ('#!/bin/sh\ntouch started.$1\nwhile [ ! -e gate.$1 ]; do :; done\n'
              'echo "clock $(date +%s)"\nexit 3\n')

    def side():
        try:
            assert wait_until(lambda: os.path.exists(marker), 240), "never suspended"
            conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
            try:
                dom = hypervisor.lookup(conn, "vibatch-" + job)
                if tracking == "procd_gid":   # the procd's SIGSTOP reached QEMU itself
                    [qemu] = [p for p in adopt.vm_pids(dom)
                              if open(f"/proc/{p}/comm").read().startswith("qemu")]
                    assert wait_until(lambda: process_state(qemu, None) == "T", 30)
                    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING   # not libvirt's pause

                elif tracking != "cgroup":   # the watcher's libvirt suspend
                    assert wait_until(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED, 30)
                t0 = hypervisor.cpu_time_s(dom)
                time.sleep(3)          # measuring: CPU time over 3 s of suspension
                grown = hypervisor.cpu_time_s(dom) - t0
                if tracking == "procd_gid":
                    # nor a pause asked of the stopped QEMU by the watcher: that monitor call
                    # would hang, holding the domain's job lock, and this call would fail after
                    # libvirt's 30 s ("cannot acquire state change lock")
                    shares = dom.schedulerParameters()["cpu_shares"]
                    dom.setSchedulerParameters({"cpu_shares": shares})
                touch(resume)
                t1 = hypervisor.cpu_time_s(dom)
                again = wait_until(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
                                   and hypervisor.cpu_time_s(dom) > t1 + 0.5, 30)
            finally:
                conn.close()
            return grown, again
        finally:
            touch(resume)
            touch(gate)
            released.append(time.time())
    released: list = []
    extra: dict = {}
    if tracking == "procd_gid":     # the wrapper boots the VM, which the procd then counts
        counted_by_group(starter.pool)
        extra = dict(prepare_job=False, tracking_gid=TRACKING_GID, snapshot_s=3,
                     machine_ad=MACHINE_AD.replace("Memory = 640", "Memory = 1024"))
    try:
        r, (grown, again) = alongside(lambda: starter.run(
            tracker, job_ad(n, '"testguest"', iwd=home), script, args=[str(n)], iwd=home,
            tracking="procd" if tracking == "procd_gid" else tracking,
            suspend={"when": f"started.{n}", "marker": marker, "resume_when": resume},
            **extra), side)
    finally:
        set_params(starter.pool, MOUNT_UNDER_SCRATCH='"/tmp"')
    print(f"E11 {tracking}: {grown:.3f} s of CPU in 3 s suspended; {r['stdout']!r}")
    assert grown < 0.1, f"the suspended guest used {grown:.2f} s of CPU in 3 s"
    assert again, "the guest did not run again after condor_continue"
    # on v2, root's watcher left the job's cgroup (frozen there, it could not act)
    assert r["suspend"].pop("root_in_job_cgroup", []) == [], r["suspend"]
    assert r["status"] == 3 and r["suspend"] == {"resumed_by_test": True}, r
    clock = [int(line.split()[1]) for line in r["stdout"].splitlines()
             if line.startswith("clock ")]
    assert clock and abs(clock[0] - released[0]) < 2, (clock, released, r["stdout"])
    assert leftovers(vm_env, job) == []


def test_the_procd_counts_the_vm_by_the_jobs_tracking_group(vm_env, tracker, condor):
    """Under condor_procd with USE_GID_PROCESS_TRACKING (as the real 25.0.13 starter was seen
    doing it: docs/batch/htcondor.md), the starter gives the wrapper the family's tracking group
    and the procd takes into the family every new process that carries it. The wrapper boots the
    VM (no PREPARE_JOB hook): QEMU and each virtiofsd get that group, the guest is made to fit
    in the slot's Memory (1024 MiB less QEMU's overhead and kit.HOST_RESERVE_MB), and before
    the VM ends the wrapper pauses it for one more snapshot. So the job ad's CPU holds the
    guest's ~10 s burn (>= 8 s), which runs to the job's very end, and all but the whole-second
    cuts of libvirt's figure (without the final wait, on the real pool, 13 s of 19.7 s), and its
    ResidentSetSize the guest's 300 MiB. Without the group (the procd's stock tracking) the same
    job showed 0 s. The starter's kill after the job finds nothing left of the VM."""
    from vibatch.core import adopt
    from vibatch.vm import hypervisor
    starter, home, _cfg = condor
    n = 124
    job = f"{n}.0@{SESSION}-ap.example.org"
    counted_by_group(starter.pool, every=10)
    script = ("#!/bin/sh\nawk 'BEGIN { s = sprintf(\"%314572800s\", \"\"); print \"filled\" }'\n"
              "touch filled.$1\n"
              "i=0; while [ ! -e gate.$1 ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done\n"
              "timeout 10 sh -c 'while :; do :; done'\nexit 0\n")

    def look():
        try:
            assert wait_until(lambda: os.path.exists(os.path.join(home, f"filled.{n}")), 240)
            conn = hypervisor.connect(vm_env.cfg.libvirt_uri)
            try:
                dom = hypervisor.lookup(conn, "vibatch-" + job)
                pids = adopt.vm_pids(dom)
                return {"groups": {p: proc_groups(p) for p in pids},
                        "comm": {p: open(f"/proc/{p}/comm").read().strip() for p in pids},
                        "memory_kib": dom.info()[1], "cpu": hypervisor.cpu_time_s(dom)}
            finally:
                conn.close()
        finally:
            touch(os.path.join(home, f"gate.{n}"))
    try:
        t0 = time.monotonic()
        r, seen = alongside(lambda: starter.run(
            tracker, job_ad(n, '"testguest"', iwd=home), script, args=[str(n)], iwd=home,
            prepare_job=False, tracking_gid=TRACKING_GID, snapshot_s=10,
            machine_ad=MACHINE_AD.replace("Memory = 640", "Memory = 1024")), look)
        took = time.monotonic() - t0
    finally:
        set_params(starter.pool, MOUNT_UNDER_SCRATCH='"/tmp"')
    [rec] = accounted(vm_env, job)
    print(f"E11 procd+gid: usage {r.get('usage')}, libvirt cpu {rec['vm_cpu_time_s']} s, "
          f"job {took:.1f} s")
    assert r["status"] == 0, r
    assert any(c.startswith("qemu") for c in seen["comm"].values()), seen
    assert any(c.startswith("virtiofsd") for c in seen["comm"].values()), seen
    for pid, groups in seen["groups"].items():
        assert TRACKING_GID in groups, (seen["comm"][pid], groups)
    # the whole VM fits in the slot: the guest's memory and QEMU's overhead, and room beside
    assert seen["memory_kib"] == (1024 - vm_env.cfg.vm.memory_overhead_mb
                                  - kit.HOST_RESERVE_MB) * 1024
    u = r["usage"]
    assert u["RemoteUserCpu"] + u["RemoteSysCpu"] >= 8, u
    # each process's utime and stime are cut to whole seconds: QEMU, virtiofsd, the host side
    assert u["RemoteUserCpu"] + u["RemoteSysCpu"] >= rec["vm_cpu_time_s"] - 4, (u, rec)
    assert u["ResidentSetSize"] >= 300 * 1024, u
    assert r["killed_at_end"] == [], r           # the VM was gone, not killed by the starter
    assert rec["memory_mb"] == 1024 - vm_env.cfg.vm.memory_overhead_mb - kit.HOST_RESERVE_MB
    assert leftovers(vm_env, job) == []


def proc_groups(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        return {int(g) for ln in f if ln.startswith("Groups:") for g in ln.split()[1:]}


GROUPS_CHILD = """
import os, subprocess, sys
os.setgroups([int(g) for g in sys.argv[1].split(",") if g])
code = ("import os, sys\\nfrom vibatch.batch.htcondor_usage import tracking_gid\\n"
        "pid = int(sys.argv[1]) or os.getppid()\\n"
        "try:\\n    print(tracking_gid(pid, 750000, 750100))\\n"
        "except ValueError as e:\\n    print('refused:', e)\\n")
sys.exit(subprocess.run([sys.executable, "-c", code, sys.argv[2]]).returncode)
"""


def tracking_gid_of(groups: str, pid: int = 0) -> str:
    """tracking_gid() as the helper calls it: of an ancestor (the wrapper, here a child of ours
    with ``groups``), or of ``pid``."""
    return subprocess.run([sys.executable, "-c", GROUPS_CHILD, groups, str(pid)], check=True,
                          capture_output=True, text=True, timeout=60).stdout.strip()


def test_the_tracking_group_is_the_one_group_of_the_range_the_wrapper_holds():
    """Only root can change a process's groups: the starter's tracking group is the one in
    MIN_TRACKING_GID..MAX_TRACKING_GID. None or two (a site whose real groups overlap the range)
    is refused, and so is a process that is not the caller's ancestor: the pid of a process
    that another job's starter gave its group (here: one of ours, with 750004)."""
    assert tracking_gid_of("5,750003,60") == "750003"
    assert tracking_gid_of("5,60").startswith("refused: ")
    assert "holds 2 groups" in tracking_gid_of("750001,750002")
    other = subprocess.Popen([sys.executable, "-c", "import os, time; os.setgroups([750004]); "
                              "print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "ready\n"
        assert proc_groups(other.pid) == {750004}
        assert "no longer our ancestors" in tracking_gid_of("", other.pid)
    finally:
        other.kill()
        other.wait()


class FakeCondor:
    def __init__(self, **values):
        self.values, self.asked = values, []

    def params(self, *names, subsystem=None):
        self.asked.append((subsystem, names))
        return [self.values[n] for n in names]


def test_counted_by_procd_fits_the_vm_in_the_slot_or_leaves_it_out(tmp_path, mocker):
    """USE_GID_PROCESS_TRACKING on: the request gets the tracking group and a guest that, with
    QEMU's overhead and the reserve, fits in the slot's Memory (HTCondor's MEMORY_EXCEEDED
    compares the family's memory with it). Off: unchanged. A slot too small for the smallest
    VM, or a range that is not one, leaves the VM out of the job's usage (logged): the job runs
    as before."""
    from vibatch.batch import htcondor_usage
    from vibatch.core.request import make_request
    cfg = config.parse({"state_dir": str(tmp_path)}, "t")
    mocker.patch.object(htcondor, "tracking_gid", return_value=750003)
    logged = mocker.patch.object(htcondor, "log_error")
    caller = htcondor.Caller(uid=0, starter_pid=1, job_pid=2)
    req = make_request("1.0@ap", "nobody", 1, 1024, None, str(tmp_path))
    on = dict(USE_GID_PROCESS_TRACKING="true", MIN_TRACKING_GID="750000",
              MAX_TRACKING_GID="750100", PID_SNAPSHOT_INTERVAL="5")
    condor = FakeCondor(**on)
    fitted, counted = htcondor.counted_by_procd(cfg, condor, caller, req)
    assert condor.asked[0][0] == "STARTER"         # as the starter sees its configuration
    assert counted == htcondor_usage.Tracking(750003, 5)
    assert fitted.process_gid == 750003
    assert fitted.memory_mb == 1024 - cfg.vm.memory_overhead_mb - kit.HOST_RESERVE_MB
    off = FakeCondor(**dict(on, USE_GID_PROCESS_TRACKING="false"))
    assert htcondor.counted_by_procd(cfg, off, caller, req) == (req, None)
    assert not logged.called
    small = make_request("1.0@ap", "nobody", 1, 400, None, str(tmp_path))
    assert htcondor.counted_by_procd(cfg, condor, caller, small) == (small, None)
    assert "cannot hold a VM" in str(logged.call_args[0][1])
    bad = FakeCondor(**dict(on, MIN_TRACKING_GID="0"))
    assert htcondor.counted_by_procd(cfg, bad, caller, req) == (req, None)
    assert "MIN_TRACKING_GID '0'" in str(logged.call_args[0][1])
    # booted by the PREPARE_JOB hook, before the family: said, and not counted
    assert htcondor.counted_by_procd(cfg, condor, caller, req, in_family=False) == (req, None)
    assert "PREPARE_JOB hook boots the VM before" in str(logged.call_args[0][1])
    htcondor.tracking_gid.side_effect = ValueError("holds 0 groups of the tracking range")
    assert htcondor.counted_by_procd(cfg, condor, caller, req) == (req, None)
    assert "holds 0 groups" in str(logged.call_args[0][1])


def test_the_helpers_finish_takes_only_its_one_flag(capsys):
    """``helper finish`` takes nothing but ``--wrapper`` (the procd's last snapshot): anything
    else is a usage error (2) before any root work, naming the usage."""
    from vibatch.batch.base import main
    for argv in (["helper", "finish", "--bogus"], ["helper", "finish", "--wrapper", "x"]):
        assert main(htcondor.SYSTEM, argv) == 2
        assert "helper finish [--wrapper]" in capsys.readouterr().err
