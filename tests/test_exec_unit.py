import pytest

from vibatch.config import DEFAULT_ENV_EXCLUDE
from vibatch.errors import ExecError
from vibatch.core.execjob import find_job_id, guest_env


def test_guest_env_drops_host_only_and_extends_path():
    env = guest_env({"PATH": "/opt/x/bin:/usr/bin", "HOME": "/home/a", "LD_PRELOAD": "evil.so",
                     "SSH_AUTH_SOCK": "/tmp/s", "MYVAR": "1", "PWD": "/elsewhere"},
                    DEFAULT_ENV_EXCLUDE, "/usr/sbin:/usr/bin:/bin", "/work", "42")
    d = dict(e.split("=", 1) for e in env)
    assert "LD_PRELOAD" not in d and "SSH_AUTH_SOCK" not in d
    assert d["PATH"] == "/opt/x/bin:/usr/bin:/usr/sbin:/bin"
    assert d["PWD"] == "/work" and d["MYVAR"] == "1" and d["HOME"] == "/home/a"
    assert d["VIBATCH_JOB_ID"] == "42"
    # the job's Machine/Job Features directories in the guest, whatever the host had
    assert (d["MACHINEFEATURES"], d["JOBFEATURES"]) == ("/run/vibatch/features/machine",
                                                        "/run/vibatch/features/job")
    assert "TMPDIR" not in d   # the host's is dropped; a job without scratch keeps the guest's


def test_guest_env_points_tmpdir_at_the_scratch_disk():
    env = guest_env({"TMPDIR": "/tmp/host-only"}, DEFAULT_ENV_EXCLUDE, "/bin", "/w", "1",
                    tmpdir="/scratch")
    assert dict(e.split("=", 1) for e in env)["TMPDIR"] == "/scratch"


def test_find_job_id(monkeypatch):
    for var in ("VIBATCH_JOB_ID", "SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "CONDOR_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ExecError, match="no job id"):
        find_job_id(None)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert find_job_id(None) == "77"
    monkeypatch.setenv("VIBATCH_JOB_ID", "78")
    assert find_job_id(None) == "78"
    assert find_job_id("79") == "79"
