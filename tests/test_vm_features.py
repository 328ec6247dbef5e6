"""HEPiX Machine/Job Features in a real guest: every key a job reads, with the value of its
allocation; the files are root's and the job user cannot change them; `vibatch drain` reaches
a running job's guest and is withdrawn again. (Under real Slurm and Grid Engine, with the
values each batch system gave: test_batch_slurm / test_batch_gridengine.)"""
import json
import os
import subprocess
import time

import psutil
import pytest

from conftest import vibatch_cmd
from vmhelp import epilogue, exec_run, leftovers, prologue

pytestmark = pytest.mark.vm

LIST = ('for d in "$MACHINEFEATURES" "$JOBFEATURES"; do for f in "$d"/*; do '
        'echo "${d##*/} ${f##*/} $(cat "$f") $(stat -c "%u %a" "$f")"; done; done; '
        'stat -c "dir %u %a" "$MACHINEFEATURES" "$JOBFEATURES"; '
        'if echo 9 > "$JOBFEATURES/wall_limit_secs"; then echo "job user wrote it"; fi; '
        'if rm -f "$JOBFEATURES/job_id" && [ ! -e "$JOBFEATURES/job_id" ]; then '
        'echo "job user removed it"; fi')


def features(vm_env, job):
    rc, out, err = exec_run(vm_env, job, "sh", "-c", LIST)
    assert rc == 0, err
    keys, modes, other = {}, set(), []
    for line in out.splitlines():
        parts = line.split()
        if parts[0] in ("machine", "job") and len(parts) == 5:
            keys[(parts[0], parts[1])] = parts[2]
            modes.add((parts[3], parts[4]))
        else:
            other.append(line)
    return keys, modes, other


def test_a_job_reads_each_feature_of_its_allocation_and_a_drain(vm_env, tracker):
    job = tracker.job_id()
    t0 = int(time.time())
    r = prologue(vm_env, job, args=("--cores", "1", "--memory", "384M", "--walltime", "900"))
    assert r.returncode == 0, r.stderr
    from vibatch.core.jobdir import JobPaths
    with open(JobPaths.of(vm_env.cfg, job).state_file) as f:
        started = int(json.load(f)["started_at"])
    assert t0 <= started
    keys, modes, other = features(vm_env, job)
    logical = psutil.cpu_count()
    from vibatch.core.lifecycle import Node
    node = Node(vm_env.cfg)
    slots = len(node.slots.capacity.cpus)
    node.close()
    assert keys == {
        ("machine", "total_cpu"): str(logical), ("machine", "log_cores"): str(logical),
        ("machine", "phys_cores"): str(psutil.cpu_count(logical=False)),
        ("machine", "jobslots"): str(slots),
        ("job", "job_id"): job, ("job", "allocated_cpu"): "1", ("job", "mem_limit_MB"): "384",
        ("job", "max_rss_bytes"): str(384 << 20), ("job", "jobstart_secs"): str(started),
        ("job", "wall_limit_secs"): "900", ("job", "cpu_limit_secs"): "900",
        ("job", "shutdowntime_job"): str(started + 900)}
    assert modes == {("0", "644")}                       # root's files, readable by all
    assert other == ["dir 0 755", "dir 0 755"]           # the job user wrote and removed nothing
    # the admin drains the node: the running job sees the node's end and its own earlier end
    at = int(time.time()) + 300
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "drain", "--at", str(at)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"job {job}: updated" in r.stdout, r.stdout + r.stderr
    keys, _, _ = features(vm_env, job)
    assert keys[("machine", "shutdowntime")] == str(at)
    assert keys[("job", "shutdowntime_job")] == str(min(at, started + 900))
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "drain", "--cancel"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    keys, _, _ = features(vm_env, job)
    assert ("machine", "shutdowntime") not in keys
    assert keys[("job", "shutdowntime_job")] == str(started + 900)
    assert not os.path.exists(os.path.join(vm_env.cfg.state_dir, "drain.json"))
    assert epilogue(vm_env, job).returncode == 0
    assert leftovers(vm_env, job) == []


def test_drain_refuses_a_time_in_the_past(vm_env):
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "drain", "--at", "1000"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'1000' is not in the future" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(vm_env.cfg.state_dir, "drain.json"))
