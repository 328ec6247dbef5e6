"""HTCondor by contract: its daemons cannot be installed here, so tests/condor_starter.py plays
condor_starter exactly as HTCondor's manual and source describe it (scratch directory and ad
files, the job user, environment, argv, kill signals, the wrapper error file, the JOB_EXIT hook
and its timeout), runs the shipped hooks with real sudo, and boots real VMs."""
import json
import os
import subprocess
import sys

import pytest

from clusters import apt_install
from conftest import SESSION, vibatch_cmd
from vmhelp import batch_user, guest_kernel, install_shims, leftovers, variant
from vibatch import config
from vibatch.batch import htcondor
from vibatch.errors import NodeError, ResourceRequestError

USER, UID = "vbt-htcondor", 23406
DAEMON, DAEMON_UID = "vbt-condor", 23407
HERE = os.path.dirname(os.path.abspath(__file__))
SUDOERS = "/etc/sudoers.d/vibatch-tests-htcondor"


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

    def __init__(self, env, hooks: str, execute: str):
        self.env, self.hooks, self.execute = env, hooks, execute
        self.n = 0

    def run(self, tracker, ad: str, script: str, args=(), iwd=None, remove=None,
            job_exit=True, tamper=None, timeout=300) -> dict:
        self.n += 1
        spec_path = os.path.join(self.env.base, f"condor-spec-{self.n}.json")
        result = os.path.join(self.env.base, f"condor-result-{self.n}.json")
        spec = {"execute": self.execute, "uid": UID, "gid": UID, "daemon_uid": DAEMON_UID,
                "daemon_gid": DAEMON_UID, "job_ad": ad, "machine_ad": MACHINE_AD,
                "files": {f"job{self.n}.sh": [script, 0o755]}, "executable": f"job{self.n}.sh",
                "args": list(args), "env": {"JOB_VAR": "from the submit file"},
                "wrapper": os.path.join(self.hooks, "wrapper"), "iwd": iwd, "remove": remove,
                "job_exit": os.path.join(self.hooks, "job_exit") if job_exit else None,
                "tamper_job_ad": tamper, "result": result, "job_timeout": timeout}
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        tracker.jobs.append(htcondor.job_id_of(htcondor.parse_ad(ad.encode(), "ad")))   # torn down whatever happens
        subprocess.run([sys.executable, os.path.join(HERE, "condor_starter.py"), spec_path],
                       check=True, timeout=timeout + 60, cwd="/", env={"PATH": "/usr/bin:/bin"})
        with open(result) as f:
            return json.load(f)


@pytest.fixture(scope="module")
def condor(vm_env):
    apt_install(["sudo"])
    with batch_user(vm_env, USER, UID) as home, batch_user(vm_env, DAEMON, DAEMON_UID):
        cfg_path = variant(vm_env, "htcondor", {"htcondor": {"daemon_user": DAEMON}})
        hooks = install_shims("htcondor", os.path.join(vm_env.base, "condor-hooks"), {
            "/etc/vibatch/vibatch.yaml": cfg_path, "/opt/vibatch/venv/bin/python": sys.executable,
            "/opt/vibatch/hooks/htcondor/": os.path.join(vm_env.base, "condor-hooks") + "/"},
            {"wrapper": 0o755, "job_exit": 0o755, "vm-helper": 0o755})
        execute = os.path.join(vm_env.base, "condor", "execute")
        os.makedirs(execute)
        os.chmod(os.path.dirname(execute), 0o755)
        os.chown(execute, DAEMON_UID, DAEMON_UID)
        os.chmod(execute, 0o755)
        with open(SUDOERS, "w") as f:   # the one rule docs/batch/htcondor.md asks for
            f.write(f"ALL ALL=(root) NOPASSWD: {hooks}/vm-helper\n")
        os.chmod(SUDOERS, 0o440)
        try:
            yield Starter(vm_env, hooks, execute), home, cfg_path
        finally:
            os.unlink(SUDOERS)


def accounted(env, job):
    with open(env.cfg.accounting_file) as f:
        return [r for r in map(json.loads, f) if r["job_id"] == job]


def test_job_runs_in_its_vm_as_the_user_with_its_exit_code(vm_env, tracker, condor):
    starter, _home, _cfg = condor
    r = starter.run(tracker, job_ad(101, '"testguest"'),
                    '#!/bin/sh\necho "kernel $(uname -r) user $(id -un) cwd $PWD args $*"\n'
                    'echo "env $JOB_VAR, batch $BATCH_SYSTEM"\necho oops >&2\nexit 7\n',
                    args=["a b", "c"])
    job = f"101.0@{SESSION}-ap.example.org"
    assert r["status"] == 7, r
    assert r["error_file"] is None
    assert r["stdout"].splitlines() == [
        f"kernel {guest_kernel()} user {USER} cwd {r['scratch']} args a b c",
        "env from the submit file, batch HTCondor"]
    assert r["stderr"] == "oops\n"
    assert r["job_exit"] == {"rc": 0, "stderr": ""}      # the wrapper had already ended the VM
    [rec] = accounted(vm_env, job)
    # the slot's size comes from the machine ad (640 MiB), not the smaller request (512 MiB)
    assert (rec["exit_code"], rec["cores"], rec["memory_mb"], rec["image"]) == (7, 1, 640,
                                                                                 "testguest")
    assert leftovers(vm_env, job) == []


def test_an_unknown_os_fails_the_job_with_the_choices_and_no_requeue(vm_env, tracker, condor):
    starter = condor[0]
    r = starter.run(tracker, job_ad(102, '"el10"'), "#!/bin/sh\necho never\n")
    assert r["status"] == htcondor.WRAPPER_JOB_FAULT_EXIT
    assert r["error_file"] is None                # no error file: HTCondor must not rerun it
    assert r["stdout"] == ""
    assert "el10" in r["stderr"] and "testguest" in r["stderr"] and "job fault" in r["stderr"]
    assert leftovers(vm_env, f"102.0@{SESSION}-ap.example.org") == []
    r = starter.run(tracker, job_ad(103, "42"), "#!/bin/sh\necho never\n")
    assert r["status"] == 125 and 'VibatchImage = "el9"' in r["stderr"]


def test_a_node_fault_writes_the_error_file_so_the_job_goes_back_to_idle(vm_env, tracker, condor):
    starter, _home, cfg_path = condor
    with open(cfg_path) as f:
        saved = f.read()
    # a guest that never answers, within a short boot timeout: the node's fault
    variant_path = variant(vm_env, "htcondor", {"htcondor": {"daemon_user": DAEMON},
                                                "vm": {"boot_timeout_s": 8}})
    assert variant_path == cfg_path
    try:
        r = starter.run(tracker, job_ad(104, '"silent"'), "#!/bin/sh\necho never\n")
    finally:
        with open(cfg_path, "w") as f:
            f.write(saved)
    assert r["status"] == htcondor.WRAPPER_NODE_FAULT_EXIT
    assert r["error_file"] is not None and r["error_file"].count("\n") == 1
    assert "did not answer within 8 s" in r["error_file"]
    assert "node fault" in r["stderr"]
    assert leftovers(vm_env, f"104.0@{SESSION}-ap.example.org") == []


def test_condor_rm_signals_the_job_in_its_vm_and_leaves_nothing(vm_env, tracker, condor):
    starter, home, _cfg = condor
    # no file transfer: the job starts in its Iwd (the user's home), which the VM shares
    r = starter.run(tracker, job_ad(105, '"testguest"', iwd=home),
                    "#!/bin/sh\ntrap 'echo got TERM in $PWD; exit 143' TERM\n"
                    "touch started.105\nsleep 300 & wait\n",
                    iwd=home, remove={"when": "started.105", "kill_sig_timeout": 60})
    assert not r["never_started"], r
    assert r["reason"] == "remove" and r["status"] == 143, r
    assert r["stdout"] == f"got TERM in {home}\n"
    assert r["job_exit"]["rc"] == 0
    assert leftovers(vm_env, f"105.0@{SESSION}-ap.example.org") == []


def test_a_sigkilled_wrapper_is_cleaned_up_by_the_job_exit_hook_or_by_reap(vm_env, tracker,
                                                                              condor):
    starter, home, cfg_path = condor
    script = "#!/bin/sh\ntouch started.$1\nsleep 300\n"
    r = starter.run(tracker, job_ad(106, '"testguest"', iwd=home), script, args=["106"],
                    iwd=home, remove={"when": "started.106", "kill_sig": 9, "kill_sig_timeout": 30})
    assert not r["never_started"], r
    assert r["status"] == -9 and r["job_exit"]["rc"] == 0     # the hook ended the VM
    assert leftovers(vm_env, f"106.0@{SESSION}-ap.example.org") == []
    # no hook either: the VM outlives its starter until `vibatch reap` sees the starter gone
    r = starter.run(tracker, job_ad(107, '"testguest"', iwd=home), script, args=["107"],
                    iwd=home, remove={"when": "started.107", "kill_sig": 9, "kill_sig_timeout": 30},
                    job_exit=False)
    job = f"107.0@{SESSION}-ap.example.org"
    assert r["status"] == -9 and "domain" in leftovers(vm_env, job)
    out = subprocess.run(vibatch_cmd("--config", cfg_path, "reap"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and f"job {job} (holder gone)" in out.stdout, out
    assert leftovers(vm_env, job) == []
    assert [rec["vm_end"] for rec in accounted(vm_env, job)] == ["destroyed"]


def test_a_replaced_job_ad_is_refused(vm_env, tracker, condor):
    starter = condor[0]
    forged = job_ad(108, '"testguest"', extra="RequestCpus = 64")
    r = starter.run(tracker, job_ad(108, '"testguest"'), "#!/bin/sh\necho never\n",
                    tamper=forged)
    assert r["status"] == 125 and r["error_file"] is None
    assert "was replaced by the job's user" in r["stderr"]
    assert leftovers(vm_env, f"108.0@{SESSION}-ap.example.org") == []


def test_the_helper_refuses_callers_outside_a_job(vm_env, condor):
    starter, home, _cfg = condor
    helper = os.path.join(starter.hooks, "vm-helper")
    fake = os.path.join(starter.execute, f"dir_{os.getpid()}")
    # the job's user, through sudo, but not under a condor_starter
    r = subprocess.run(["/usr/bin/sudo", "-n", helper, "prepare", "--scratch", fake],
                       capture_output=True, text=True, timeout=60, cwd=home, user=UID, group=UID,
                       extra_groups=[], env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == htcondor.HELPER_EXIT[htcondor.Outcome.NODE_FAULT]
    assert "no root condor_starter among its ancestors" in r.stderr
    # root without sudo: no caller to act for
    r = subprocess.run([helper, "finish"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 4 and "SUDO_UID is missing" in r.stderr


def test_ads_ids_and_sizes(tmp_path):
    cfg = config.parse({"state_dir": str(tmp_path), "jobs": {"default_memory_mb": 700}}, "t")
    ad = htcondor.parse_ad(job_ad(7, '"el9"').encode(), "ad")
    assert htcondor.job_id_of(ad) == f"7.0@{SESSION}-ap.example.org"
    no_schedd = htcondor.parse_ad(b"ClusterId = 9\nProcId = 3\n", "ad")
    assert htcondor.job_id_of(no_schedd) == "9.3"
    odd = htcondor.parse_ad(b'ClusterId = 1\nProcId = 0\nGlobalJobId = "a/..b c#1.0#5"\n', "ad")
    assert htcondor.job_id_of(odd) == "1.0@a_.b_c"
    machine = htcondor.parse_ad(MACHINE_AD.encode(), "m")
    job = htcondor.job_from_ads(cfg, ad, machine, "nobody", "/w")
    assert (job.cores, job.memory_mb, job.image, job.account, job.walltime_s) == \
        (1, 640, "el9", "group_vbt.alice", None)
    # without a machine ad: the request (an expression, evaluated), then the site default
    job = htcondor.job_from_ads(cfg, htcondor.parse_ad(job_ad(7, extra="AllowedJobDuration = 3600")
                                                       .encode(), "ad"), None, "nobody", "/w")
    assert (job.memory_mb, job.image, job.walltime_s) == (512, None, 3600)
    bare = htcondor.parse_ad(b"ClusterId = 1\nProcId = 0\n", "ad")
    assert htcondor.job_from_ads(cfg, bare, None, "nobody", "/w").memory_mb == 700
    with pytest.raises(ResourceRequestError, match="must be an OS or image name in quotes"):
        htcondor.job_from_ads(cfg, htcondor.parse_ad(job_ad(7, "undefined").encode(), "ad"),
                              None, "nobody", "/w")
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
    submit = classad2.ExprTree(schedd["SUBMIT_REQUIREMENT_VibatchImage"])
    reason = classad2.ExprTree(schedd["SUBMIT_REQUIREMENT_VibatchImage_REASON"])
    for attr, ok in (('"el9"', True), ('"TestGuest"', True), ('"el10"', False), (None, True),
                     ("5", False)):
        job = classad2.parseOne(f"VibatchImage = {attr}\n" if attr else "Owner = \"a\"\n")
        assert (start.eval(machine, job) is True) == ok, attr     # the negotiator's match
        assert (submit.eval(job) is True) == ok, attr              # condor_submit's check
    assert reason.eval(classad2.parseOne('VibatchImage = "el10"\n')) == \
        'vibatch: unknown OS "el10"; choose one of: el9, testguest'


def test_image_offer_writes_the_fragments(vm_env):
    out = os.path.join(vm_env.base, "condor-offer.conf")
    r = vm_env.run("image", "offer", "--format", "htcondor-startd", "--output", out)
    assert r.returncode == 0, r.stderr
    with open(out) as f:
        lines = f.read().splitlines()
    assert 'VibatchImages = "silent,testguest"' in lines
    r = vm_env.run("image", "offer", "--format", "htcondor-schedd")
    assert 'stringListIMember(MY.VibatchImage, "silent,testguest")' in r.stdout
    assert vm_env.run("image", "offer", "--format", "condor").returncode == 2


def test_removal_while_the_vm_boots_never_starts_the_job(vm_env, tracker, condor):
    starter = condor[0]
    job = f"109.0@{SESSION}-ap.example.org"
    # condor_rm arrives as soon as the prologue has claimed the job (its state directory exists)
    r = starter.run(tracker, job_ad(109, '"testguest"'), "#!/bin/sh\necho ran\n",
                    remove={"when": os.path.join(vm_env.cfg.state_dir, "jobs", job),
                            "kill_sig_timeout": 120})
    assert not r["never_started"], r
    assert r["status"] == 128 + 15 and r["stdout"] == "" and r["error_file"] is None, r
    assert r["job_exit"]["rc"] == 0
    assert leftovers(vm_env, job) == []
    assert [rec["vm_end"] for rec in accounted(vm_env, job)] == ["destroyed"]
