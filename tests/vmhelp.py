"""Helpers for the real-VM tests: run the CLI as the batch system would, check leftovers."""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import pwd
import select
import shutil
import subprocess
import time
from typing import Iterator

import filelock
import yaml

from conftest import vibatch_cmd


def variant(env, name: str, overrides: dict) -> str:
    """Another config file sharing env's directories, with some keys changed."""
    with open(env.config_path) as f:
        data = yaml.safe_load(f)
    merged = copy.deepcopy(data)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    path = os.path.join(env.base, f"vibatch-{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(merged, f)
    os.chmod(path, 0o644)
    return path


def prologue(env, job: str, user: str = "vbt-alice", workdir: str | None = None,
             config: str | None = None, args: tuple = ()):
    workdir = workdir or env.workdir(job.replace("/", "_")[:40], user if _exists(user) else "vbt-alice")
    return subprocess.run(vibatch_cmd("--config", config or env.config_path, "prologue", "--job", job,
                                      "--user", user, "--workdir", workdir, *args),
                          capture_output=True, text=True, timeout=180)


def epilogue(env, job: str, config: str | None = None):
    return subprocess.run(vibatch_cmd("--config", config or env.config_path, "epilogue", "--job", job),
                          capture_output=True, text=True, timeout=120)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def as_user(user: str) -> dict:
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def exec_popen(vm, job: str, *cmd: str, user: str = "vbt-alice", cwd: str | None = None, **kw):
    """``vibatch exec`` started as the job user, as a batch system's job starter would."""
    return subprocess.Popen(vibatch_cmd("exec", "--job", job, "--", *cmd),
                            env={"PATH": "/usr/bin:/bin", "VIBATCH_CONFIG": vm.config_path,
                                 "HOME": "/nonexistent", **kw.pop("env", {})},
                            cwd=cwd or "/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **as_user(user), **kw)


def exec_run(vm, job: str, *cmd: str, user: str = "vbt-alice", timeout: float = 120, **kw):
    p = exec_popen(vm, job, *cmd, user=user, **kw)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.decode(), err.decode()


def read_line(stream, timeout: float) -> bytes:
    """One line from a pipe, or fail after ``timeout`` seconds (a bounded wait, no sleep)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete line within {timeout} s (got {buf!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                raise EOFError(f"stream closed (got {buf!r})")
            buf += chunk
    return buf


def leftovers(env, job: str) -> list[str]:
    """Everything a job could leave behind; an empty list means nothing is left."""
    from vibatch.vm import hypervisor
    from vibatch.core.slots import SlotAllocator, Capacity
    cfg = env.cfg
    found = []
    conn = hypervisor.connect(cfg.libvirt_uri)
    try:
        if hypervisor.lookup(conn, "vibatch-" + job) is not None:
            found.append("domain")
    finally:
        conn.close()
    for d in (os.path.join(cfg.state_dir, "jobs", job), os.path.join(cfg.run_dir, "jobs", job),
              os.path.join(cfg.run_dir, "refused", job)):
        if os.path.lexists(d):
            found.append(d)
    if SlotAllocator(cfg.state_dir, Capacity((), 0), 1).get(job) is not None:
        found.append("slot")
    found += [f"virtiofsd {pid}" for pid in virtiofsd_pids(job)]
    for lock in (os.path.join(cfg.state_dir, "slots.lock"), os.path.join(cfg.run_dir, "jobs.lock")):
        try:
            with filelock.FileLock(lock, timeout=0):
                pass
        except filelock.Timeout:
            found.append(f"held lock {lock}")
    return found


@contextlib.contextmanager
def private_workdir(env, name: str) -> Iterator[str]:
    """<base>/NAME (root's, 0700) / public (0755) / data (0644, "secret"): a directory only root
    can reach on the host, to ask for as a job's working directory. Yields .../public."""
    top = os.path.join(env.base, name)
    inside = os.path.join(top, "public")
    os.makedirs(inside)
    os.chmod(top, 0o700)
    os.chmod(inside, 0o755)
    with open(os.path.join(inside, "data"), "w") as f:
        f.write("secret\n")
    os.chmod(os.path.join(inside, "data"), 0o644)
    try:
        yield inside
    finally:
        shutil.rmtree(top, ignore_errors=True)


def virtiofsd_pids(job: str) -> list[int]:
    """The live virtiofsd processes vibatch started for ``job`` (found by their argv[0])."""
    from vibatch.vm.domain import IO_TAG, WORKDIR_TAG
    from vibatch.vm.share import process_name
    names = {process_name(job, tag).encode() for tag in (WORKDIR_TAG, IO_TAG)}
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0] in names:     # a zombie's is empty
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def pinned_cpus(env, jobs) -> dict[str, set[int]]:
    """The host CPUs each job's VM is pinned to, as libvirt reports them."""
    from vibatch.vm import hypervisor
    conn = hypervisor.connect(env.cfg.libvirt_uri)
    try:
        return {job: {c for vcpu in hypervisor.lookup(conn, "vibatch-" + job).vcpuPinInfo()
                      for c, on in enumerate(vcpu) if on} for job in jobs}
    finally:
        conn.close()


def guest_root(env, job: str, script: str, *args: str, timeout: float = 60):
    """Run ``script`` as root in the job's guest, through its root agent (as an image that
    gives the user root would let them): (wait status, stdout, stderr)."""
    from vibatch.util import Deadline
    from vibatch.vm import hypervisor
    from vibatch.vm.agent import LibvirtAgent
    conn = hypervisor.connect(env.cfg.libvirt_uri)
    try:
        res = LibvirtAgent(hypervisor.lookup(conn, "vibatch-" + job)).run(
            "/bin/sh", ["-c", script, "attack", *args], Deadline(timeout))
    finally:
        conn.close()
    return res.wait_status, res.out.decode(), res.err.decode()


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout``: a bounded wait on a condition."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@contextlib.contextmanager
def batch_user(env, name: str, uid: int, shell: str = "/bin/sh") -> Iterator[str]:
    """A job user with a real home (batch systems start jobs there), removed afterwards;
    yields the home."""
    home = os.path.join(env.base, "home", name)
    os.makedirs(home, exist_ok=True)   # another cluster of this session may have made it
    os.chmod(os.path.dirname(home), 0o755)
    subprocess.run(["userdel", name], check=False, capture_output=True)
    subprocess.run(["useradd", "-u", str(uid), "-U", "-d", home, "-s", shell, name],
                   check=True)
    os.chown(home, uid, uid)
    try:
        yield home
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def install_shims(system: str, dest: str, replace: dict, modes: dict) -> str:
    """Install hooks/<system>/* as an admin would, with this test node's paths substituted."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(dest, exist_ok=True)
    os.chmod(dest, 0o755)
    for name, mode in modes.items():
        with open(os.path.join(repo, "hooks", system, name)) as f:
            text = f.read()
        for old, new in replace.items():
            text = text.replace(old, new)
        path = os.path.join(dest, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
    return dest


def guest_kernel() -> str:
    """The test image's kernel release, as the guest's `uname -r` prints it."""
    from conftest import IMAGE_BUILD
    with open(os.path.join(IMAGE_BUILD, "KVER")) as f:
        return f.read().strip()


def lost_epilogue_vm(env, job_id: str, user: str, system: str, batch_env: dict) -> None:
    """A ready VM for ``job_id`` as a prologue of ``system`` leaves it, whose epilogue will
    never come (the batch daemon died, the node left the cluster)."""
    from vibatch.core import lifecycle
    from vibatch.core.request import make_request
    home = os.path.expanduser(f"~{user}")
    node = lifecycle.Node(env.cfg)
    try:
        lifecycle.prologue(node, make_request(job_id=job_id, user=user, cores=1, memory_mb=256,
                                              image="testguest", workdir=home),
                           batch=system, batch_env=batch_env)
    finally:
        node.close()


def reap_ends_only(env, lost: str, running: str, system: str) -> None:
    """``vibatch reap`` ends the VM of ``lost`` (its batch system says the job is gone), and
    leaves ``running``'s alone."""
    r = subprocess.run(vibatch_cmd("--config", env.config_path, "reap"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"reaped job {lost} (its {system} job is gone)" in r.stdout, r.stdout
    assert f"job {running} " not in r.stdout
    assert leftovers(env, lost) == []


def _template_cli(env, config, *args):
    return subprocess.run(vibatch_cmd("--config", config or env.config_path, "template", *args),
                          capture_output=True, text=True, timeout=600)


def template_ids(env, config: str | None = None) -> set[str]:
    r = _template_cli(env, config, "list", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return {t["id"] for t in json.loads(r.stdout)}


@contextlib.contextmanager
def templates_made_here(env, config: str | None = None) -> Iterator[None]:
    """Every template made inside the block is removed after it; those there before stay (a
    module's warm shapes, below)."""
    before = template_ids(env, config)
    try:
        yield
    finally:
        for tid in sorted(template_ids(env, config) - before):
            _template_cli(env, config, "remove", tid)


def build_template(env, image: str, cores: int, memory_mb: int, config: str | None = None) -> str:
    """`vibatch template build`, as an admin would: the template's id (made or already there)."""
    r = _template_cli(env, config, "build", image, "--cores", str(cores), "--memory",
                      str(memory_mb))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.split()[1].rstrip(":")       # "template ID: IMAGE, ..."


@contextlib.contextmanager
def warm_template(env, image: str, cores: int, memory_mb: int,
                  config: str | None = None) -> Iterator[str]:
    """A warm-start template of ``image`` in that shape for the block (its id); every template
    made in the block is removed after it."""
    with templates_made_here(env, config):
        yield build_template(env, image, cores, memory_mb, config)


# The shapes (cores, MiB) of the test image that most jobs of a batch-system module ask for.
# Under TCG a cold boot to a ready guest takes about 6 s and a restore about 1.5 s, so those
# modules start their jobs warm from templates made at the module's start (about 10 s each),
# and test what they test (the batch system's side) faster. The cold path stays tested there by
# every job of another shape, and whole in test_vm_lifecycle.py, test_faults.py and the rest.
@contextlib.contextmanager
def warm_shapes(env, shapes, image: str = "testguest") -> Iterator[set[str]]:
    """Templates of ``shapes`` for a module's jobs, removed after it (with any other template
    the module made); yields their ids."""
    acct = env.cfg.accounting_file
    start = os.path.getsize(acct) if os.path.exists(acct) else 0
    with templates_made_here(env):
        yield {build_template(env, image, cores, mem) for cores, mem in shapes}
    starts = collections.Counter()  # seen with -s: which shapes this module's jobs had
    if os.path.exists(acct):        # (none yet if no job of the session has run)
        with open(acct) as f:
            f.seek(start)
            starts.update((r["start"], r["cores"], r["memory_mb"])
                          for r in map(json.loads, f) if r.get("start"))
    print(f"warm shapes {shapes}: jobs by (start, cores, MiB) {dict(starts)}")


def accounted(env, job: str) -> list[dict]:
    """vibatch's accounting records of ``job``."""
    with open(env.cfg.accounting_file) as f:
        return [json.loads(line) for line in f if f'"job_id": "{job}"' in line]
