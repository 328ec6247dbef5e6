"""A stand-in for condor_starter, for the HTCondor contract tests (HTCondor's daemons cannot be
installed here). It runs as root under the process name ``condor_starter`` and does, in order,
what the starter does for a vanilla job with USER_JOB_WRAPPER and a JOB_EXIT hook (HTCondor's
manual: starter.rst, hooks.rst, env-of-job.rst; condor_starter's source):

1. makes the scratch directory ``<EXECUTE>/dir_<its pid>`` as HTCondor's account and writes
   ``.job.ad`` and ``.machine.ad`` into it (mode 0644), then hands the directory to the job user;
2. transfers the job's input files into it, as the job user;
3. starts ``USER_JOB_WRAPPER <executable> <args...>`` as the job user, in its own session, in
   the scratch directory (or the job's Iwd without file transfer), stdin from /dev/null and
   stdout/stderr into files, with the job's environment plus the starter's variables;
4. on removal, sends the job's kill signal (``KillSig``, SIGTERM by default) to the wrapper and,
   after the kill-signal timeout, SIGKILL to its whole process group;
5. after the job, reads ``$_CONDOR_WRAPPER_ERROR_FILE`` (present: the job goes back to Idle)
   and runs the JOB_EXIT hook as the job user, with the reason as argv and the job ad on stdin,
   killing it after 30 s;
6. removes the scratch directory.

Usage: ``python condor_starter.py SPEC.json``; the outcome is written as JSON to spec["result"].
Standard library only.
"""
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time

PR_SET_NAME = 15
ERROR_FILE = ".job_wrapper_failure"
JOB_EXIT_TIMEOUT_S = 30


def write_as(path, data, uid, gid, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return None


def wait_for(path, timeout):
    """A bounded wait for the job to reach its steady state (it creates ``path``)."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"condor_starter", 0, 0, 0)
    uid, gid = spec["uid"], spec["gid"]
    duid, dgid = spec["daemon_uid"], spec["daemon_gid"]
    scratch = os.path.join(spec["execute"], f"dir_{os.getpid()}")
    os.mkdir(scratch, 0o700)
    os.chown(scratch, duid, dgid)
    job_ad_path = os.path.join(scratch, ".job.ad")
    machine_ad_path = os.path.join(scratch, ".machine.ad")
    write_as(job_ad_path, spec["job_ad"], duid, dgid, 0o644)
    write_as(machine_ad_path, spec["machine_ad"], duid, dgid, 0o644)
    os.chown(scratch, uid, gid)
    # file transfer puts the executable and inputs into the scratch directory, as the user; a job
    # without file transfer runs its executable from the shared file system (its Iwd here)
    files_dir = spec.get("iwd") or scratch
    for name, (text, mode) in spec["files"].items():
        write_as(os.path.join(files_dir, name), text, uid, gid, mode)
    if spec.get("tamper_job_ad"):     # the job's user replaces the ad before the wrapper runs
        os.unlink(job_ad_path)
        write_as(job_ad_path, spec["tamper_job_ad"], uid, gid, 0o644)

    env = dict(spec["env"])
    env.update({"_CONDOR_SCRATCH_DIR": scratch, "_CONDOR_SLOT": "slot1_1",
                "_CONDOR_JOB_AD": job_ad_path, "_CONDOR_MACHINE_AD": machine_ad_path,
                "_CONDOR_JOB_IWD": spec.get("iwd") or scratch, "BATCH_SYSTEM": "HTCondor",
                "_CONDOR_WRAPPER_ERROR_FILE": os.path.join(scratch, ERROR_FILE),
                "TMPDIR": scratch, "OMP_NUM_THREADS": str(spec.get("cpus", 1))})
    out_path, err_path = os.path.join(scratch, "_condor_stdout"), os.path.join(scratch,
                                                                               "_condor_stderr")
    write_as(out_path, b"", uid, gid, 0o644)
    write_as(err_path, b"", uid, gid, 0o644)
    executable = os.path.join(files_dir, spec["executable"])
    cwd = spec.get("iwd") or scratch
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        job = subprocess.Popen([spec["wrapper"], executable, *spec["args"]], env=env, cwd=cwd,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               user=uid, group=gid, extra_groups=[], start_new_session=True)
    reason, removed_at, never_started = "exit", None, False
    remove = spec.get("remove")
    if remove:     # condor_rm once the job is running: KillSig, then SIGKILL after the timeout
        never_started = not wait_for(os.path.join(cwd, remove["when"]), remove.get("within", 120))
        reason, removed_at = "remove", time.monotonic()
        job.send_signal(remove.get("kill_sig", signal.SIGTERM))   # the job's KillSig
        try:
            job.wait(timeout=remove["kill_sig_timeout"])
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
    try:
        status = job.wait(timeout=spec.get("job_timeout", 300))
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        status = job.wait()
    ended = time.monotonic()
    error_file = read(os.path.join(scratch, ERROR_FILE))
    hook = None
    if spec.get("job_exit"):
        with open(job_ad_path, "rb") as f:
            ad = f.read()
        try:
            h = subprocess.run([spec["job_exit"], reason], input=ad, capture_output=True,
                               env={"_CONDOR_SCRATCH_DIR": scratch, "BATCH_SYSTEM": "HTCondor"},
                               cwd=scratch, user=uid, group=gid, extra_groups=[],
                               timeout=JOB_EXIT_TIMEOUT_S)
            hook = {"rc": h.returncode, "stderr": h.stderr.decode(errors="replace")}
        except subprocess.TimeoutExpired:
            hook = {"rc": None, "stderr": "killed after the JOB_EXIT timeout"}
    result = {"pid": os.getpid(), "scratch": scratch, "status": status, "reason": reason,
              "stdout": read(out_path), "stderr": read(err_path), "error_file": error_file,
              "job_exit": hook, "never_started": never_started,
              "removal_s": round(ended - removed_at, 2) if removed_at is not None else None}
    if not spec.get("keep_scratch"):
        shutil.rmtree(scratch, ignore_errors=True)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
