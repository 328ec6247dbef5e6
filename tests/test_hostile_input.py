"""A hostile user's input: whatever a job's user can put into its request (working directory, job
name, comment, account, OS attribute, environment, resource strings, array indexes) is refused as
the job's fault with a message naming it, or yields a valid request; it never crashes a hook and
never counts as the node's fault (which drains a Slurm node or reschedules on Grid Engine).

- property-based (``hypothesis``): arbitrary text and bytes fed to every adapter's parser (Slurm,
  Grid Engine, Torque) and then to the request constructor, as the hook does;
- fixed cases for the names the issue lists (control characters, newlines, commas, quotes,
  spaces, ``$()``, non-UTF-8, ``/run``, ``/usr/lib``), through the same path;
- real Slurm and real Grid Engine: hostile working directories, job names and comments leave the
  node in service and no queue in error (``vm``).
"""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibatch import config
from vibatch.batch import gridengine, slurm, torque
from vibatch.batch.kit import read_request
from vibatch.errors import VibatchError
from vibatch.core.request import JobRequest, make_request

USER = "nobody"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
# text as the hooks receive it: str from argv/env (os.fsdecode: non-UTF-8 bytes become
# surrogates), plus anything printable, control characters and the characters the issue names
text = st.one_of(
    st.text(),
    st.binary(max_size=64).map(os.fsdecode),
    st.text(alphabet=st.sampled_from(list("/ab,.$()'\"` \n\t\r\x00\x01\x7f\x85=:[]-_0129")),
            max_size=40),
)

# what batch systems' own syntaxes look like, to reach past the first check of each parser
hostlist = st.from_regex(r"\Avm(\[[0-9a-z,\-]{0,6}\]?)?[0-9a-z\[\],\-]{0,4}\Z")
number = st.one_of(text, st.from_regex(r"\A-?[0-9]{1,25}(\.[0-9]*)?([kKmMgGtT][bB]?)?\Z"))
torque_limits = st.lists(st.tuples(st.sampled_from(["nodes", "neednodes", "ncpus", "procs", "mem",
                                                    "walltime", "ppn"]), number),
                         max_size=4).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-cfg")
    return config.parse({"state_dir": str(base / "state"), "library_dir": str(base / "lib"),
                         "run_dir": str(base / "run")}, "hostile.yaml")


def outcome(parse):
    """Run a parser and then the request constructor, as the prologue does: a valid request, or
    the job's fault. Anything else (a node fault, a crash) fails the test."""
    try:
        req = read_request(parse)
    except VibatchError as e:
        assert e.fault == "job", f"{type(e).__name__} is a node fault for user input: {e}"
        assert e.message
        return e
    assert isinstance(req, JobRequest)
    check_valid(req)
    return req


def check_valid(req: JobRequest) -> None:
    for value in (req.workdir, req.queue or "", req.account or "", req.image or ""):
        value.encode("utf-8")
        assert not any(ord(c) < 32 or ord(c) == 127 for c in value), value
    assert "," not in req.workdir and os.path.isabs(req.workdir)
    assert req.cores >= 1 and req.memory_mb >= 1


# --- Slurm: slurmd's environment carries the user's comment, constraints, work dir, account;
#     scontrol's text carries the job name and comment unescaped -----------------------------
def slurm_show(job_id, node, name, comment, cpu_ids="0", mem="512", limit="UNLIMITED"):
    return (f"JobId={job_id} JobName={name}\n   UserId={USER}(65534) GroupId=nogroup(65534)\n"
            f"   RunTime=00:00:01 TimeLimit={limit} TimeMin=N/A\n"
            f"   Comment={comment}\n"
            f"   Nodes={node} CPU_IDs={cpu_ids} Mem={mem} GRES=\n   Partition=debug\n")


@FUZZ
@given(name=text, comment=text, constraints=text, workdir=text, account=text, partition=text,
       cpu_ids=number, mem=number, limit=number, nodes=st.one_of(text, hostlist))
def test_slurm_prolog_never_faults_the_node_on_user_input(cfg, name, comment, constraints,
                                                          workdir, account, partition, cpu_ids,
                                                          mem, limit, nodes):
    env = {"SLURM_JOB_ID": "7001", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "vm",
           "SLURM_JOB_COMMENT": comment, "SLURM_JOB_CONSTRAINTS": constraints,
           "SLURM_JOB_WORK_DIR": workdir, "SLURM_JOB_ACCOUNT": account,
           "SLURM_JOB_PARTITION": partition}
    outcome(lambda: slurm.job_from_prolog(cfg, env, slurm_show("7001", "vm", name, comment)))
    outcome(lambda: slurm.job_from_prolog(cfg, env, slurm_show("7001", nodes or "vm", name,
                                                               comment, cpu_ids, mem, limit)))


@FUZZ
@given(show=text)
def test_slurm_prolog_survives_any_scontrol_text(cfg, show):
    env = {"SLURM_JOB_ID": "7001", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "vm",
           "SLURM_JOB_WORK_DIR": "/var/tmp"}
    outcome(lambda: slurm.job_from_prolog(cfg, env, show))
    outcome(lambda: slurm.job_from_prolog(cfg, env, "JobId=7001 " + show))


@pytest.mark.parametrize("nodes", ["vm[a]", "vm[1-x]", "vm[-]"])
def test_a_malformed_host_list_is_the_jobs_fault(cfg, nodes):
    """Found by the property above: Slurm's host-range syntax in a forged allocation line made
    expand_hostlist raise ValueError, a node fault (the node drained)."""
    env = {"SLURM_JOB_ID": "7001", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "vm",
           "SLURM_JOB_WORK_DIR": "/var/tmp"}
    assert isinstance(outcome(lambda: slurm.job_from_prolog(
        cfg, env, slurm_show("7001", nodes, "n", ""))), VibatchError)


# --- Grid Engine: qstat -xml's record holds the job's cwd, account, requests and -v list -----
def sge_record(owner, cwd, account, h_vmem, h_rt, image, env_image, pe_min, pe_max):
    el = ET.Element("element")
    ET.SubElement(el, "JB_job_number").text = "17"
    ET.SubElement(el, "JB_owner").text = owner
    ET.SubElement(el, "JB_cwd").text = cwd
    ET.SubElement(el, "JB_account").text = account
    ET.SubElement(el, "JB_pe").text = "smp"
    rng = ET.SubElement(ET.SubElement(el, "JB_pe_range"), "ranges")
    ET.SubElement(rng, "RN_min").text = pe_min
    ET.SubElement(rng, "RN_max").text = pe_max
    res = ET.SubElement(el, "JB_hard_resource_list")
    for name, sval, dval in (("h_vmem", h_vmem, ""), ("h_rt", "", h_rt), ("vm_image", image, "")):
        req = ET.SubElement(res, "qstat_l_requests")
        ET.SubElement(req, "CE_name").text = name
        ET.SubElement(req, "CE_stringval").text = sval
        ET.SubElement(req, "CE_doubleval").text = dval
    var = ET.SubElement(ET.SubElement(el, "JB_env_list"), "job_sublist")
    ET.SubElement(var, "VA_variable").text = "VIBATCH_IMAGE"
    ET.SubElement(var, "VA_value").text = env_image
    return el


@FUZZ
@given(cwd=text, account=text, h_vmem=number, h_rt=number, image=text, env_image=text,
       pe_min=number, pe_max=number, nslots=number, task=number)
def test_gridengine_prolog_never_faults_the_node_on_user_input(cfg, cwd, account, h_vmem, h_rt,
                                                               image, env_image, pe_min, pe_max,
                                                               nslots, task):
    rec = sge_record(USER, cwd, account, h_vmem, h_rt, image, env_image, pe_min, pe_max)
    outcome(lambda: gridengine.job_from_prolog(cfg, ["17", task or "undefined", USER, "all.q"],
                                               rec, {"NSLOTS": nslots}))


# --- Torque: argv 4 (job name), 5 (resource list) and 7 (account) come from qsub -------------
@FUZZ
@given(name=text, limits=st.one_of(text, torque_limits), queue=text, account=text)
def test_torque_prologue_never_faults_the_node_on_user_input(cfg, name, limits, queue, account):
    outcome(lambda: torque.job_from_prologue(cfg, ["17.srv", USER, "nogroup", name, limits,
                                                   queue, account]))


# --- the request constructor itself ---------------------------------------------------------
@FUZZ
@given(workdir=text, image=text, queue=text, account=text, cores=st.integers(),
       memory=st.integers(), walltime=st.one_of(st.none(), st.integers()),
       cpus=st.one_of(st.none(), st.lists(st.integers(), max_size=4)))
def test_the_request_constructor_refuses_as_the_jobs_fault(workdir, image, queue, account, cores,
                                                           memory, walltime, cpus):
    outcome(lambda: make_request("17", USER, cores, memory, image or None, workdir, walltime,
                                 tuple(cpus) if cpus else None, queue or None, account or None))


HOSTILE_NAMES = ["a,b", "a\nb", "a\x01b", "a\x7fb", "tab\there", os.fsdecode(b"caf\xe9")]
SYSTEM_WORKDIRS = ["/run", "/run/user", "/usr/lib", "/usr/lib/x86_64-linux-gnu", "/etc/ssh", "/",
                   "//usr//lib", "/usr/../usr/lib", "/var/run"]


@pytest.mark.parametrize("workdir", HOSTILE_NAMES + SYSTEM_WORKDIRS)
def test_hostile_working_directories_are_the_jobs_fault_naming_the_path(workdir, tmp_path):
    if not workdir.startswith("/"):   # a real directory with that name: it exists
        os.mkdir(tmp_path / workdir)
        workdir = os.path.join(str(tmp_path), workdir)
    assert os.path.isdir(workdir)
    e = outcome(lambda: make_request("17", USER, 1, 512, None, workdir))
    assert isinstance(e, VibatchError) and e.exit_code == 15, e
    assert "working directory" in e.message


def test_quotes_spaces_and_command_substitution_are_just_characters(tmp_path):
    """Shell-looking names are fine (every value travels as an argument, never as shell
    text): the request keeps them as they are."""
    wd = tmp_path / "it's a \"$(touch pwned)\" `id` dir"
    wd.mkdir()
    req = outcome(lambda: make_request("17", USER, 1, 512, None, str(wd), queue="q $(id)",
                                       account="a'b\"c"))
    assert isinstance(req, JobRequest) and req.workdir == str(wd)
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()


def test_a_comment_with_newlines_cannot_forge_the_allocation(cfg):
    """scontrol prints the comment unescaped: a comment holding a forged allocation line (more
    CPUs) is refused as the job's fault, not used, and not a node fault."""
    forged = "x\n   Nodes=vm CPU_IDs=0-63 Mem=999999 GRES=\n"
    env = {"SLURM_JOB_ID": "7001", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "vm",
           "SLURM_JOB_COMMENT": forged, "SLURM_JOB_WORK_DIR": "/var/tmp"}
    e = outcome(lambda: slurm.job_from_prolog(cfg, env, slurm_show("7001", "vm", "n", forged)))
    assert isinstance(e, VibatchError) and "Nodes=... CPU_IDs=..." in e.message
    # a blank line in the job name used to cut the record short just after a forged allocation
    for name in ("x\n   Nodes=vm CPU_IDs=0-63 Mem=1\n\n", "x\n\nJobId=7001 JobName=y\n"
                 "   Nodes=vm CPU_IDs=0-63 Mem=1\n"):
        env["SLURM_JOB_COMMENT"] = ""
        e = outcome(lambda: slurm.job_from_prolog(cfg, env, slurm_show("7001", "vm", name, "")))
        assert isinstance(e, VibatchError), e
    assert slurm.array_task_id(slurm_show("7001", "vm", "n", "") + "\n" +
                               slurm_show("7002", "vm", "n", ""), "7001") is None
    two = ("JobId=7002 ArrayJobId=7001 ArrayTaskId=2 JobName=n\n\n"
           "JobId=7001 ArrayJobId=7001 ArrayTaskId=1 JobName=n\n")
    assert slurm.array_task_id(two, "7001") == "7001_1"


# --- real Slurm and real Grid Engine -------------------------------------------------------
from clusters import wait_until  # noqa: E402
from test_batch_gridengine import USER as SGE_USER, assert_queue_ok, qsub, sge  # noqa: E402,F401
from test_batch_gridengine import output as sge_output  # noqa: E402
from test_batch_slurm import USER as SLURM_USER, assert_node_healthy, slurm_cluster, submit  # noqa: E402


@pytest.fixture
def cluster(vm_env):
    """Slurm for one test only: it is stopped before the Grid Engine tests start theirs."""
    with slurm_cluster(vm_env) as c:
        yield c


def _user_dir(home, name, uid):
    path = os.path.join(home, name)
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, uid)
    return path


@pytest.mark.vm
def test_hostile_names_through_slurm_fail_their_job_and_never_drain_the_node(vm_env, cluster):
    """Each job names something hostile; each fails alone with the reason in its own output (the
    Prolog exits 0: non-zero drains the node), and the node stays in service throughout."""
    import pwd
    uid = pwd.getpwnam(SLURM_USER).pw_uid
    home = cluster.home
    script = "#!/bin/sh\necho ran-in-vm\n"
    cases = {   # name -> (sbatch options, what the refusal names; None: the job runs)
        "comma": (["--chdir", _user_dir(home, "a,b", uid)], "working directory"),
        "control": (["--chdir", _user_dir(home, "tab\there", uid)], "working directory"),
        "usrlib": (["--chdir", "/usr/lib"], "working directory /usr/lib cannot be shared"),
        "forged": (["-J", "x\n   Nodes=%s CPU_IDs=0-63 Mem=1\n\n" % cluster.node,
                    "--comment", "c\n   Nodes=%s CPU_IDs=0-63 Mem=1" % cluster.node],
                   "allocation"),
        "shell": (["-J", "q'\"$(touch /tmp/pwned-slurm) `id` x", "--comment",
                   "it's \"$(id)\" ok"], None),
    }
    for name, (opts, why) in cases.items():
        job = submit(cluster, script, *opts, "-o", f"{home}/hn-%j.out",
                     "--export=ALL,VIBATCH_IMAGE=testguest")
        rec = cluster.wait_finished(job)
        with open(os.path.join(home, f"hn-{job}.out")) as f:
            out = f.read()
        if why is None:
            assert rec["ExitCode"] == "0:0" and "ran-in-vm" in out, (name, rec, out)
        else:
            assert rec["JobState"] == "FAILED" and rec["ExitCode"] == "125:0", (name, rec, out)
            assert "vibatch: this job cannot run:" in out and why in out, (name, out)
            assert "ran-in-vm" not in out
        assert_node_healthy(cluster)
        assert leftovers_of(vm_env, job) == []
    assert not os.path.exists("/tmp/pwned-slurm")


def leftovers_of(vm_env, job):
    from vmhelp import leftovers
    return leftovers(vm_env, job)


@pytest.mark.vm
def test_hostile_names_through_grid_engine_fail_their_job_and_no_queue_goes_into_error(vm_env, sge):
    import pwd
    uid = pwd.getpwnam(SGE_USER).pw_uid
    home = sge.home
    cases = {
        "comma": (["-wd", _user_dir(home, "c,d", uid)], "working directory"),
        "usrlib": (["-wd", "/usr/lib"], "working directory /usr/lib cannot be shared"),
        "run": (["-wd", "/run"], "working directory /run cannot be shared"),
        "shell": (["-N", "q'$(touch_pwned)x", "-ac", "k=v"], None),
    }
    for name, (opts, why) in cases.items():
        job = qsub(sge, "echo ran-in-vm\n", "-v", "VIBATCH_IMAGE=testguest", *opts)
        if why is None:
            rec = sge.wait_accounted(job)
            assert rec["exit_status"] == "0", (name, rec)
            assert "ran-in-vm" in sge_output(sge, job)
        else:
            wait_until(f"job {job} ({name}) to be refused", lambda: sge.job_state(job) == "Eqw"
                       or sge.queue_state() not in ("", None), 180)
            assert_queue_ok(sge)
            out = sge_output(sge, job)
            assert "failed (job fault)" in out and why in out, (name, out)
            assert "ran-in-vm" not in out
            assert sge.cmd("qdel", job, user=SGE_USER).returncode == 0
            wait_until("the job to leave", lambda: sge.job_state(job) is None, 60)
        assert_queue_ok(sge)
        assert leftovers_of(vm_env, job) == []


EVIL_SO = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "a");
    if (f) { fprintf(f, "preload uid %d\n", (int)getuid()); fclose(f); }
}
"""


@pytest.mark.vm
def test_qsub_v_cannot_steer_grid_engines_root_prolog(vm_env, sge, tmp_path):
    """Grid Engine hands the root prolog and epilog the job's environment, -v included. Planted:
    libvirt's log settings (root's libvirt client would append to the user's file), a
    preloaded library, Python's variables and a PATH of the user's programs, and the loader's
    LD_DEBUG_OUTPUT. None of it runs or writes as root; the job itself runs."""
    import pwd
    uid = pwd.getpwnam(SGE_USER).pw_uid
    evil = _user_dir(sge.home, "evil", uid)
    marker = os.path.join(evil, "marker")
    src = os.path.join(str(tmp_path), "evil.c")
    with open(src, "w") as f:
        f.write(EVIL_SO)
    so = os.path.join(evil, "evil.so")
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", so, src],
                   check=True, timeout=120)
    os.chmod(so, 0o755)
    py = _user_dir(evil, "py", uid)
    payload = f"import os; open({marker!r}, 'a').write('python uid %d\\n' % os.getuid())\n"
    for rel in ("sitecustomize.py", "startup.py"):
        with open(os.path.join(py, rel), "w") as f:
            f.write(payload)
    bindir = _user_dir(evil, "bin", uid)
    for prog in ("python3", "env", "qstat", "qemu-img", "mount", "umount", "sh"):
        with open(os.path.join(bindir, prog), "w") as f:
            f.write(f"#!/bin/sh\necho {prog} uid $(id -u) >> {marker}\n")
        os.chmod(os.path.join(bindir, prog), 0o755)
    for path in (marker,):
        with open(path, "w"):
            pass
        os.chown(path, uid, uid)
        os.chmod(path, 0o666)
    lvlog = os.path.join(evil, "libvirt.log")
    ldlog = os.path.join(evil, "ld")
    hostile = ["LIBVIRT_DEBUG=1", f"LIBVIRT_LOG_OUTPUTS=1:file:{lvlog}", f"LD_PRELOAD={so}",
               "LD_DEBUG=libs", f"LD_DEBUG_OUTPUT={ldlog}", f"PYTHONPATH={py}",
               f"PYTHONSTARTUP={py}/startup.py", f"PATH={bindir}:/usr/bin:/bin"]
    args = []
    for var in hostile:
        args += ["-v", var]
    job = qsub(sge, "echo ran-in-vm\n", "-v", "VIBATCH_IMAGE=testguest", *args)
    rec = sge.wait_accounted(job)
    out = sge_output(sge, job)
    with open(marker) as f:
        planted = f.read()
    ld_root, ld_all = [], []
    for n in os.listdir(evil):
        p = os.path.join(evil, n)
        if n.startswith("ld."):
            ld_all.append((n, os.stat(p).st_uid))
            if os.stat(p).st_uid == 0:
                with open(p, errors="replace") as f:
                    ld_root.append((n, f.read(4000)))
    print("planted:", planted, "\nloader debug files (name, uid):", ld_all,
          "\nroot's:", [(n, t[:300]) for n, t in ld_root])
    assert not os.path.exists(lvlog), "root's libvirt client wrote the user's log file"
    assert " uid 0" not in planted, planted
    # the loader of root's shell still reads LD_DEBUG_OUTPUT (Grid Engine does not remove it;
    # see docs/security.md), but nothing of ours starts under it: no Python loads there
    assert not [n for n, t in ld_root if "python" in t], ld_root
    assert rec["exit_status"] == "0" and "ran-in-vm" in out, (rec, out)
    assert_queue_ok(sge)
    assert leftovers_of(vm_env, job) == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
