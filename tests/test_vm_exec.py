"""One real VM for the job user vbt-alice; ``vibatch exec`` as the job's user, against it."""
import os
import pwd
import signal
import subprocess

import pytest

from conftest import SESSION
from vmhelp import (as_user, epilogue, exec_popen, exec_run, leftovers, prologue, read_line)

pytestmark = pytest.mark.vm
JOB = f"{SESSION}-exec"


@pytest.fixture(scope="module")
def job(vm_env):
    wd = vm_env.workdir("exec")
    r = prologue(vm_env, JOB, workdir=wd, args=("--cores", "1", "--memory", "512M"))
    try:
        assert r.returncode == 0, r.stderr
        yield wd
    finally:
        epilogue(vm_env, JOB)


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_codes(vm_env, job, code):
    rc, _, _ = exec_run(vm_env, JOB, "sh", "-c", f"exit {code}")
    assert rc == code


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_death_by_signal_is_128_plus_n(vm_env, job, sig):
    rc, _, _ = exec_run(vm_env, JOB, "sh", "-c", f"kill -{sig.name[3:]} $$")
    assert rc == 128 + sig


def test_command_not_found_is_127(vm_env, job):
    rc, _, _ = exec_run(vm_env, JOB, "no-such-command-xyz")
    assert rc == 127


def test_stdout_and_stderr_content_and_order(vm_env, job):
    rc, out, err = exec_run(vm_env, JOB, "sh", "-c",
                            'i=1; while [ $i -le 300 ]; do echo "out $i"; echo "err $i" >&2; '
                            'i=$((i+1)); done; seq 1 100000')
    assert rc == 0
    lines = out.splitlines()
    assert lines[:300] == [f"out {i}" for i in range(1, 301)]
    assert lines[300:] == [str(i) for i in range(1, 100001)]
    assert err.splitlines() == [f"err {i}" for i in range(1, 301)]


def test_arguments_pass_through_unchanged(vm_env, job):
    args = ["a b", "$HOME", "'q'", '"dq"', "*", "", "tab\there", "ünï"]
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", 'for a in "$@"; do printf "[%s]\\n" "$a"; done',
                          "sh", *args)
    assert rc == 0 and out.splitlines() == [f"[{a}]" for a in args]


def test_environment_and_working_directory(vm_env, job):
    sub = os.path.join(job, "sub")
    os.makedirs(sub, exist_ok=True)
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", 'pwd; echo "$MYVAR"; echo "${LD_PRELOAD-unset}"',
                          cwd=sub, env={"MYVAR": "hello world", "LD_PRELOAD": "/host/only.so"})
    assert rc == 0 and out.splitlines() == [sub, "hello world", "unset"]


def test_files_appear_on_host_owned_by_job_user(vm_env, job):
    rc, _, _ = exec_run(vm_env, JOB, "sh", "-c", "echo payload > result.txt; mkdir -p outdir",
                        cwd=job)
    assert rc == 0
    alice = pwd.getpwnam("vbt-alice")
    st = os.stat(os.path.join(job, "result.txt"))
    assert (st.st_uid, st.st_gid) == (alice.pw_uid, alice.pw_gid)
    assert open(os.path.join(job, "result.txt")).read() == "payload\n"
    assert os.stat(os.path.join(job, "outdir")).st_uid == alice.pw_uid


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_the_job_runs_with_its_starters_umask(vm_env, job, mask):
    """The umask the batch system gave the job's process (vibatch exec's own) holds in the
    guest, so files on the shared work dir get the modes they would get without a VM (the
    guest's qemu-ga would otherwise leave 0077: every file 0600)."""
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", f"umask; rm -rf m{mask:o}; mkdir m{mask:o}; "
                          f"echo x > m{mask:o}/f", cwd=job, umask=mask)
    assert rc == 0 and out.strip() == f"{mask:04o}", out
    assert os.stat(os.path.join(job, f"m{mask:o}")).st_mode & 0o777 == 0o777 & ~mask
    assert os.stat(os.path.join(job, f"m{mask:o}", "f")).st_mode & 0o777 == 0o666 & ~mask


def test_job_sees_exactly_its_cores_and_memory(vm_env, job):
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", "nproc; grep MemTotal /proc/meminfo")
    assert rc == 0
    nproc, mem = out.splitlines()
    assert int(nproc) == 1
    mem_mib = int(mem.split()[1]) / 1024
    assert 400 < mem_mib <= 512, mem            # the kernel keeps a little for itself


def test_runs_as_the_job_user_and_cannot_become_root(vm_env, job):
    alice = pwd.getpwnam("vbt-alice")
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", "id -u; id -g")
    assert rc == 0 and out.split() == [str(alice.pw_uid), str(alice.pw_gid)]
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", "su -c 'id -u' root </dev/null; cat /etc/shadow")
    assert "0" not in out.split()
    rc, _, _ = exec_run(vm_env, JOB, "sh", "-c", "echo x > /dev/virtio-ports/org.qemu.guest_agent.0")
    assert rc != 0                              # the root agent's port is not the job's


def test_other_users_cannot_reach_the_job(vm_env, job):
    rc, _, err = exec_run(vm_env, JOB, "true", user="vbt-bob")
    assert rc == 125 and "belongs to another user" in err
    sock = os.path.join(vm_env.cfg.run_dir, "jobs", JOB, "agent.sock")
    probe = subprocess.run(["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX);"
                            f"s.connect({sock!r})"], capture_output=True, text=True,
                           **as_user("vbt-bob"))
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


def test_output_is_live(vm_env, job):
    p = exec_popen(vm_env, JOB, "sh", "-c", "echo first; sleep 30; echo second")
    try:
        assert read_line(p.stdout, timeout=10) == b"first\n"
        assert p.poll() is None                   # 'first' arrived while the job still runs
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT])
def test_signals_reach_the_job(vm_env, job, sig):
    name = sig.name[3:]
    script = (f'trap "echo got-{name}; exit 42" {name}; echo ready; '
              'while :; do sleep 0.1; done')
    p = exec_popen(vm_env, JOB, "sh", "-c", script)
    try:
        assert read_line(p.stdout, timeout=20) == b"ready\n"
        p.send_signal(sig)
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert out == f"got-{name}\n".encode() and p.returncode == 42


def test_sigterm_reaches_children_too(vm_env, job):
    # the job's whole process group gets the signal, as a batch system's kill would
    p = exec_popen(vm_env, JOB, "sh", "-c", "sleep 300 & echo ready; wait")
    assert read_line(p.stdout, timeout=20) == b"ready\n"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM
    rc, out, _ = exec_run(vm_env, JOB, "sh", "-c", "ps -o args | grep -c '^sleep 300' || true")
    assert out.strip() == "0"


def test_second_prologue_for_running_job_is_refused(vm_env, job):
    r = prologue(vm_env, JOB, workdir=job)
    assert r.returncode == 16 and "already has a VM" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    rc, _, _ = exec_run(vm_env, JOB, "true")     # the running job is untouched
    assert rc == 0


def test_exec_without_a_vm(vm_env, job):
    rc, _, err = exec_run(vm_env, f"{SESSION}-novm", "true")
    assert rc == 125 and "has no running VM" in err
    assert leftovers(vm_env, f"{SESSION}-novm") == []
