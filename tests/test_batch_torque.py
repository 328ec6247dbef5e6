"""Torque/PBS by contract: pbs_mom cannot be installed here, so a harness calls the shipped hooks
exactly as pbs_mom does (argv, empty environment, stdin /dev/null, cwd /, root for the prologue
and epilogue, the job user with the job's environment for $job_starter, and the alarm), and the
tests check Torque's exit-code rules: 0 ok, 1 fail without retry, other non-zero requeue."""
import json
import os
import stat
import subprocess
import sys

import pytest

from vmhelp import as_user, batch_user, install_shims, leftovers, variant
from vibatch import config
from vibatch.batch import torque

USER, UID = "vbt-torque", 23403


class PbsMom:
    """Calls hooks the way pbs_mom's start_exec.c/prolog.c do."""

    def __init__(self, hooks: str):
        self.hooks = hooks

    def _root(self, hook: str, argv: list[str], timeout: float):
        path = os.path.join(self.hooks, hook)
        st = os.stat(path)   # pbs_mom refuses a hook that is not root-owned or is writable
        assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        return subprocess.run([path, *argv], env={}, stdin=subprocess.DEVNULL, cwd="/",
                              capture_output=True, text=True, timeout=timeout)

    def prologue(self, job_id, user, limits, queue="batch", account="", timeout=300):
        return self._root("prologue", [job_id, user, user, "job-name", limits, queue, account],
                          timeout)

    def epilogue(self, job_id, user, exit_code, timeout=300):
        return self._root("epilogue", [job_id, user, user, "job-name", "12345", "nodes=1:ppn=1",
                                       "cput=00:00:01,mem=1kb,walltime=00:00:05", "batch", "",
                                       str(exit_code)], timeout)

    def starter(self, job_id, user, home, *cmd, timeout=120):
        env = {"PBS_JOBID": job_id, "PBS_O_WORKDIR": home, "PBS_QUEUE": "batch", "HOME": home,
               "USER": user, "LOGNAME": user, "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh",
               "PBS_ENVIRONMENT": "PBS_BATCH"}
        return subprocess.run([os.path.join(self.hooks, "job_starter"), *cmd], env=env,
                              stdin=subprocess.DEVNULL, cwd=home, capture_output=True, text=True,
                              timeout=timeout, **as_user(user))


def install_hooks(dest: str, config_path: str, alarm: int = 0) -> PbsMom:
    """Install the shipped shims as an admin would, pointing at this test node's config."""
    replace = {"/etc/vibatch/vibatch.yaml": config_path, "/opt/vibatch/venv/bin/python": sys.executable}
    if alarm:
        replace[" --config "] = f" --alarm {alarm} --config "
    return PbsMom(install_shims("torque", dest, replace,
                                {"prologue": 0o500, "epilogue": 0o500, "job_starter": 0o555}))


@pytest.fixture(scope="module")
def torque_user(vm_env):
    with batch_user(vm_env, USER, UID) as home:
        yield home


@pytest.fixture(scope="module")
def mom(vm_env):
    return install_hooks(os.path.join(vm_env.base, "torque-hooks"), vm_env.config_path)


def test_job_runs_in_its_vm_and_its_exit_code_is_accounted(vm_env, tracker, mom, torque_user):
    job = tracker.job_id(".torque-srv")
    r = mom.prologue(job, USER, "neednodes=1:ppn=1,nodes=1:ppn=1,mem=512mb,walltime=00:10:00")
    assert r.returncode == 0, r.stderr
    r = mom.starter(job, USER, torque_user, "/bin/sh", "-c",
                    'echo "in $(cat /etc/hostname) as $(id -un), cwd $PWD, job $PBS_JOBID"; exit 7')
    assert r.returncode == 7, r.stderr
    assert r.stdout.strip() == f"in vbguest as {USER}, cwd {torque_user}, job {job}"
    r = mom.epilogue(job, USER, 7)
    assert r.returncode == 0, r.stderr
    rec = [json.loads(line) for line in open(vm_env.cfg.accounting_file)]
    assert [x["exit_code"] for x in rec if x["job_id"] == job] == [7]
    assert leftovers(vm_env, job) == []
    assert mom.epilogue(job, USER, 7).returncode == 0          # a second epilogue is harmless


def test_a_users_mistake_fails_the_job_without_retry(vm_env, tracker, mom, torque_user):
    job = tracker.job_id(".torque-srv")
    # vbt-alice's home does not exist: the job is at fault, pbs_mom must not requeue it
    r = mom.prologue(job, "vbt-alice", "nodes=1:ppn=1,mem=512mb")
    assert r.returncode == 1
    assert "job fault" in r.stderr and "working directory /nonexistent does not exist" in r.stderr
    assert leftovers(vm_env, job) == []
    r = mom.prologue(job, USER, "nodes=1:ppn=64")
    assert r.returncode == 1 and "64 cores requested" in r.stderr
    assert mom.epilogue(job, "vbt-alice", -3).returncode == 0   # after a failed prologue


def test_a_node_fault_requeues_before_pbs_moms_alarm(vm_env, tracker, torque_user):
    cfg = variant(vm_env, "torque-alarm", {"vm": {"boot_timeout_s": 120}})
    mom = install_hooks(os.path.join(vm_env.base, "torque-hooks-alarm"), cfg, alarm=26)
    job = tracker.job_id(".torque-srv")
    # the "silent" image never answers; our own deadline (26 - 20 s) ends the prologue, cleans
    # up, and exits 2 (requeue) well before pbs_mom would kill it at 26 s
    r = mom.prologue(job, USER, "nodes=1:ppn=1:silent", timeout=26)
    assert r.returncode == 2, r.stderr
    assert "node fault" in r.stderr and "did not finish within 6 s" in r.stderr
    assert leftovers(vm_env, job) == []


def test_starter_without_a_vm_fails_the_job_with_a_message(vm_env, mom, torque_user):
    r = mom.starter("99999.torque-srv", USER, torque_user, "/bin/sh", "-c", "true")
    assert r.returncode == 125 and "has no running VM on this node" in r.stderr


def test_limits_and_node_properties(tmp_path):
    (tmp_path / "state").mkdir()
    cfg = config.parse({"state_dir": str(tmp_path / "state"), "library_dir": str(tmp_path / "lib"),
                        "images": {"aliases": {"el9": "alma9"}}}, "t")
    assert torque.parse_limits("neednodes=2:ppn=4:el9+1:ppn=2,mem=2gb") == \
        {"neednodes": "2:ppn=4:el9+1:ppn=2", "mem": "2gb"}
    assert torque.node_spec({"nodes": "1:ppn=3:bigmem:el9"}) == (3, ["bigmem", "el9"])
    assert torque.parse_size_mb("2gb") == 2048 and torque.parse_size_mb("1048576kb") == 1024
    assert torque.parse_walltime("01:02:03") == 3723 and torque.parse_walltime("90") == 90
    with pytest.raises(Exception, match="invalid Torque memory size"):
        torque.parse_size_mb("lots")
    job = torque.job_from_prologue(cfg, ["7.srv", "nobody", "nogroup", "n",
                                         "nodes=1:ppn=2:bigmem:el9,mem=1gb,walltime=00:05:00",
                                         "short", "proj"])
    assert (job.cores, job.memory_mb, job.image, job.walltime_s, job.queue, job.account) == \
        (2, 1024, "el9", 300, "short", "proj")
    plain = torque.job_from_prologue(cfg, ["7.srv", "nobody", "g", "n", "ncpus=3", "q", ""])
    assert (plain.cores, plain.image, plain.account) == (3, None, None)
    with pytest.raises(Exception, match="expected at least 7"):
        torque.job_from_prologue(cfg, ["7.srv"])

