"""A hostile user against vibatch's state on the host: its locks, state files, accounting, other
jobs' agent sockets, the root hooks' environment and limits, and what root reads or removes in a
job's I/O folder. Each attack is first shown to be live (a control that would succeed if the
protection were missing), then shown to fail closed.

The attacker is an ordinary host user (``nobody``, or the job's own user where the I/O folder is
the target: it is theirs, and guest root writes there too). VM tests boot the test image."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import vibatch_cmd
from vmhelp import batch_user, epilogue, exec_run, install_shims, leftovers, prologue, variant
from vibatch import util

NOBODY = 65534


def as_nobody(argv, **kw):
    return subprocess.run(argv, user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd="/", **kw)


def can_flock(path: str) -> bool:
    """``flock -n`` as nobody: True if an ordinary user could take (and so hold) the lock."""
    return as_nobody(["flock", "-n", "-E", "75", path, "true"]).returncode == 0


def can_read(path: str) -> bool:
    return as_nobody([sys.executable, "-I", "-c", "import sys; open(sys.argv[1], 'rb').read(1)",
                      path]).returncode == 0


def state_files(cfg) -> tuple[list[str], list[str]]:
    """Every lock file and JSON state file under the state and run directories (not the image
    library, whose manifests are public on purpose, and not a job's I/O folder, which is the
    job user's), plus the accounting file."""
    locks, files = [], [cfg.accounting_file]
    for top in (cfg.state_dir, cfg.run_dir):
        for root, dirs, names in os.walk(top):
            dirs[:] = [d for d in dirs if os.path.join(root, d) not in (cfg.library_dir,)
                       and d != "io"]
            for n in names:
                p = os.path.join(root, n)
                if n.endswith(".lock"):
                    locks.append(p)
                elif n.endswith(".json") and n != "job.json":   # job.json: public on purpose
                    files.append(p)
    return locks, files


# --- unit: the agent socket's hand-over ----------------------------------------------------
def test_the_socket_gets_its_mode_before_its_owner(tmp_path, monkeypatch):
    """Main chowned the socket to the job user, then chmodded it: in between, the user's group
    had the access libvirt's mode gave. give_to sets the mode first."""
    path = str(tmp_path / "agent.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    seen = []
    real_chown = os.chown
    monkeypatch.setattr(os, "chown", lambda p, u, g, **kw: (seen.append(os.stat(p).st_mode & 0o777),
                                                            real_chown(p, u, g, **kw)))
    util.give_to(path, NOBODY, NOBODY, 0o600)
    assert seen == [0o600]
    st = os.stat(path)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o600)
    s.close()


def test_a_root_hook_forgets_its_environment_and_limits(tmp_path):
    """enter_root_hook, in a child started with a hostile environment and tight (soft) limits:
    batch systems set them so (ulimit -S; Grid Engine's h_vmem). A hard limit can only be
    lifted with CAP_SYS_RESOURCE (which this test's container lacks): docs/security.md."""
    code = ("import os, resource, sys; sys.path.insert(0, sys.argv[1]);"
            "from vibatch import hygiene; hygiene.enter_root_hook();"
            "print(sorted(os.environ.items()));"
            "print([resource.getrlimit(getattr(resource, n))[0] for n in "
            "('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE')]);"
            "open(sys.argv[2], 'wb').write(b'x' * 100000)")
    import resource

    inf = resource.RLIM_INFINITY

    def tight():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, inf))
        resource.setrlimit(resource.RLIMIT_CPU, (30, inf))
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, inf))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-I", "-B", "-c", code, repo, str(tmp_path / "big")],
                       env={"LIBVIRT_DEBUG": "1", "LIBVIRT_LOG_OUTPUTS": "1:file:/tmp/x",
                            "PATH": str(tmp_path)}, preexec_fn=tight, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    env, limits = r.stdout.splitlines()
    from vibatch import hygiene
    assert env == repr(sorted(hygiene.minimal_env().items()))
    assert limits == repr([-1, -1, -1])
    assert os.path.getsize(tmp_path / "big") == 100000


def test_disk_space_is_admitted_per_job_at_claim_time(tmp_path, monkeypatch):
    """Main admitted any number of jobs whatever their overlays could grow to. Now the sum of
    what the node's jobs may still grow, plus the new job's, must fit in the free space."""
    from types import SimpleNamespace
    from vibatch import config
    from vibatch.core import disk
    from vibatch.errors import NoFreeSlot, ResourceRequestError
    from vibatch.core.jobdir import JobPaths
    cfg = config.parse({"state_dir": str(tmp_path), "run_dir": str(tmp_path / "run"),
                        "host": {"reserved_disk_mb": 1024}, "jobs": {"max_disk_gb": 8}}, "t.yaml")
    gib = 1 << 30
    free = {"bytes": 10 * gib}
    monkeypatch.setattr(disk.os, "statvfs", lambda p: SimpleNamespace(
        f_bavail=free["bytes"] // 4096, f_frsize=4096))
    image = SimpleNamespace(name="img", virtual_size=4 * gib)

    def job(n):
        p = JobPaths.of(cfg, f"j{n}")
        os.makedirs(p.state)
        return p
    first = job(1)
    assert disk.admit(cfg, first, image) == 4 * gib + disk.OVERHEAD
    disk.admit(cfg, job(2), image)            # 8 GiB (+overhead) of 9 free above the reserve
    with pytest.raises(NoFreeSlot, match="not enough disk space for job j3"):
        disk.admit(cfg, job(3), image)
    # what a job's overlay already holds is no longer free, and no longer to be reserved
    with open(first.overlay, "wb") as f:
        f.write(b"x" * (4 << 20))
    free["bytes"] -= 4 << 20
    with pytest.raises(NoFreeSlot):
        disk.admit(cfg, JobPaths.of(cfg, "j3"), image)
    with pytest.raises(ResourceRequestError, match="jobs.max_disk_gb"):
        disk.admit(cfg, JobPaths.of(cfg, "j3"), SimpleNamespace(name="big", virtual_size=9 * gib))


# --- real VMs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def running(vm_env):
    """One job (vbt-alice's) running for the module's attacks, and one already accounted."""
    from conftest import SESSION
    jobs = [f"{SESSION}-hst-done", f"{SESSION}-hst-run"]
    for job in jobs:
        r = prologue(vm_env, job)
        assert r.returncode == 0, r.stderr
    assert epilogue(vm_env, jobs[0]).returncode == 0
    yield jobs[1]
    epilogue(vm_env, jobs[1])


@pytest.mark.vm
def test_no_ordinary_user_can_hold_a_lock_or_read_vibatchs_state(vm_env, running):
    locks, files = state_files(vm_env.cfg)
    names = {os.path.basename(p) for p in locks}
    assert {"slots.lock", "jobs.lock", "library.lock", "verified.lock"} <= names, locks
    assert any(p.endswith("/state.json") for p in files) and vm_env.cfg.accounting_file in files
    assert os.path.exists(vm_env.cfg.accounting_file)
    held = [p for p in locks if can_flock(p)]
    readable = [p for p in files if can_read(p)]
    assert held == [] and readable == [], (held, readable)
    # root (the control) can: the files are there and lockable
    assert subprocess.run(["flock", "-n", locks[0], "true"], timeout=30).returncode == 0
    # nobody cannot list the jobs on the node either
    assert not can_read(os.path.join(vm_env.cfg.state_dir, "jobs", running, "state.json"))
    assert as_nobody(["ls", os.path.join(vm_env.cfg.state_dir, "jobs")]).returncode != 0


@pytest.mark.vm
def test_the_accounting_file_is_readable_by_the_admin_group_only(vm_env, running, tracker):
    cfg_path = variant(vm_env, "acct-group", {"accounting_group": "adm"})
    job = tracker.job_id()
    assert prologue(vm_env, job, config=cfg_path).returncode == 0
    assert epilogue(vm_env, job, config=cfg_path).returncode == 0
    st = os.stat(vm_env.cfg.accounting_file)
    import grp
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, grp.getgrnam("adm").gr_gid, 0o640)
    assert not can_read(vm_env.cfg.accounting_file)


@pytest.mark.vm
def test_another_user_cannot_connect_to_a_jobs_agent_socket(vm_env, running):
    sock = os.path.join(vm_env.cfg.run_dir, "jobs", running, "agent.sock")
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(5);"
             "s.connect(sys.argv[1]); print('connected')")
    def connect(user):
        return subprocess.run(["runuser", "-u", user, "--", sys.executable, "-I", "-c", probe,
                               sock], capture_output=True, text=True, timeout=30)
    mine = connect("vbt-alice")   # the control: the job's own user reaches it
    assert mine.returncode == 0 and "connected" in mine.stdout, mine.stderr
    other = connect("vbt-bob")
    assert other.returncode != 0 and "PermissionError" in other.stderr, other
    assert connect("nobody").returncode != 0


@pytest.mark.vm
@pytest.mark.parametrize("plant", ["fifo", "symlink", "device", "huge", "directory"])
def test_whatever_is_at_last_exit_the_epilogue_reads_it_safely(vm_env, tracker, tmp_path, plant):
    """The epilogue reads io/last-exit as root. A FIFO there blocked it forever (and so the node's
    epilogue), a symlink made root read a file the user cannot (here: a root-only 0600 file
    holding 42, which became the job's recorded exit code)."""
    job = tracker.job_id(plant[:3])
    assert prologue(vm_env, job).returncode == 0
    io = os.path.join(vm_env.cfg.state_dir, "jobs", job, "io")
    target = os.path.join(io, "last-exit")
    secret = tmp_path / "root-only"
    secret.write_text("42\n")
    os.chmod(secret, 0o600)
    if plant == "fifo":
        os.mkfifo(target)
    elif plant == "symlink":
        os.symlink(str(secret), target)
    elif plant == "device":
        os.mknod(target, 0o666 | 0o020000, os.makedev(1, 5))   # /dev/zero
    elif plant == "huge":
        with open(target, "wb") as f:
            f.write(b"4" * (8 << 20))
    else:
        os.mkdir(target)
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "epilogue", "--job", job),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in open(vm_env.cfg.accounting_file)
            if f'"job_id": "{job}"' in line]
    assert len(recs) == 1 and recs[0]["exit_code"] is None, recs
    assert leftovers(vm_env, job) == []


@pytest.mark.vm
def test_a_2000_deep_tree_left_in_the_io_folder_is_removed(vm_env, tracker):
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    io = os.path.join(vm_env.cfg.state_dir, "jobs", job, "io")
    # made by the job's user on the host (the I/O folder is theirs; through virtiofs under TCG
    # the guest takes minutes for this depth), with a symlink and a FIFO at the bottom
    build = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "for _ in range(2000):\n"
             "    os.mkdir('d', dir_fd=fd); n = os.open('d', os.O_RDONLY, dir_fd=fd)\n"
             "    os.close(fd); fd = n\n"
             "os.symlink('/etc/shadow', 'shadow', dir_fd=fd); os.mkfifo('fifo', dir_fd=fd)\n")
    r = subprocess.run(["runuser", "-u", "vbt-alice", "--", sys.executable, "-I", "-c", build, io],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    depth = 0
    fd = os.open(io, os.O_RDONLY)
    while "d" in os.listdir(fd):
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, depth = nfd, depth + 1
    os.close(fd)
    assert depth == 2000
    r = epilogue(vm_env, job)
    assert r.returncode == 0, r.stdout + r.stderr
    assert leftovers(vm_env, job) == []
    assert os.path.exists("/etc/shadow")


@pytest.mark.vm
def test_output_without_end_hits_the_cap_fails_the_job_alone_and_spares_the_disk(vm_env, tracker):
    """A job filling its I/O folder: with io_max_mb 4 it gets ENOSPC there; the state
    filesystem's free space does not move. Output streamed through vibatch exec is given back
    as it is copied, so 16 MiB of stdout still passes through a 4 MiB folder."""
    cfg_path = variant(vm_env, "io4", {"jobs": {"io_max_mb": 4}})
    job = tracker.job_id()
    assert prologue(vm_env, job, config=cfg_path).returncode == 0
    before = os.statvfs(vm_env.cfg.state_dir)
    env = {"VIBATCH_CONFIG": cfg_path}
    rc, out, err = exec_run(vm_env, job, "sh", "-c",
                            "head -c 200000000 /dev/zero > /run/vibatch/io/flood", cwd="/",
                            env=env, timeout=600)
    after = os.statvfs(vm_env.cfg.state_dir)
    assert rc != 0 and "I/O folder (/run/vibatch/io in the guest) is full" in err, (rc, err)
    grew = (before.f_bavail - after.f_bavail) * before.f_frsize
    assert grew < 64 << 20, f"the state filesystem lost {grew >> 20} MiB"   # the flood: 190
    rc, out, err = exec_run(vm_env, job, "sh", "-c", "rm -f /run/vibatch/io/flood; "
                            "head -c 16777216 /dev/zero", cwd="/", env=env, timeout=600)
    assert rc == 0 and len(out) == 16 << 20, (rc, len(out), err)
    r = epilogue(vm_env, job, config=cfg_path)
    assert r.returncode == 0
    assert leftovers(vm_env, job) == []


@pytest.mark.vm
def test_a_root_hook_started_with_a_hostile_environment_uses_none_of_it(vm_env, tmp_path):
    """The Slurm and Torque epilogue shims, started as root with what Grid Engine would pass on
    from qsub -v: libvirt's log settings, Python's, and a PATH of the user's programs. Nothing
    of it is used: no log file, no marker from any planted program."""
    bad = tmp_path / "evil"
    (bad / "bin").mkdir(parents=True)
    (bad / "py" / "vibatch").mkdir(parents=True)
    marker = bad / "ran"
    payload = f"import os; open({str(marker)!r}, 'a').write('python %d\\n' % os.getuid())\n"
    (bad / "py" / "sitecustomize.py").write_text(payload)
    (bad / "py" / "vibatch" / "__init__.py").write_text(payload)
    (bad / "startup.py").write_text(payload)
    for prog in ("python3", "env", "qemu-img", "mount", "umount", "scontrol", "sh", "flock"):
        p = bad / "bin" / prog
        p.write_text(f"#!/bin/sh\necho {prog} $(id -u) >> {marker}\n")
        p.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    log = bad / "libvirt.log"
    hostile = {"LIBVIRT_DEBUG": "1", "LIBVIRT_LOG_OUTPUTS": f"1:file:{log}",
               "LIBVIRT_LOG_FILTERS": "1:*", "PYTHONPATH": str(bad / "py"),
               "PYTHONSTARTUP": str(bad / "startup.py"), "PYTHONINSPECT": "1",
               "PATH": f"{bad / 'bin'}:/usr/bin:/bin", "SLURM_JOB_ID": "999999",
               "SLURM_JOB_USER": "vbt-alice", "SLURMD_NODENAME": "x"}
    # the control: the same environment does reach a Python that is not isolated
    r = subprocess.run([sys.executable, "-c", "import vibatch"], env=hostile, timeout=60,
                       capture_output=True, stdin=subprocess.DEVNULL)
    assert marker.read_text().startswith("python 0"), r
    marker.unlink()
    hooks = install_shims("slurm", str(tmp_path / "slurm"), {
        "/etc/vibatch/vibatch.yaml": vm_env.config_path,
        "/opt/vibatch/venv/bin/python": sys.executable}, {"epilog": 0o500})
    install_shims("torque", str(tmp_path / "torque"), {
        "/etc/vibatch/vibatch.yaml": vm_env.config_path,
        "/opt/vibatch/venv/bin/python": sys.executable}, {"epilogue": 0o500})
    for argv in ([os.path.join(hooks, "epilog")],
                 [str(tmp_path / "torque" / "epilogue"), "999999.srv", "vbt-alice", "vbt-alice",
                  "name", "1", "nodes=1", "cput=0", "batch", "", "0"]):
        r = subprocess.run(argv, env=hostile, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, cwd=str(tmp_path))
        assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists(), marker.read_text()
    assert not log.exists(), log.read_text()[:2000]


@pytest.mark.vm
def test_a_prologue_under_the_batch_systems_limits_is_not_killed_halfway(vm_env, tracker,
                                                                        tmp_path):
    """Started with RLIMIT_FSIZE 1 byte (on main the prologue's first state write failed with
    EFBIG, a node fault: Torque requeues the job) and 1 s of CPU time (SIGXCPU)."""
    import resource
    inf = resource.RLIM_INFINITY

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, inf))
        resource.setrlimit(resource.RLIMIT_CPU, (1, inf))
    job = tracker.job_id()
    install_shims("torque", str(tmp_path / "torque"), {
        "/etc/vibatch/vibatch.yaml": vm_env.config_path,
        "/opt/vibatch/venv/bin/python": sys.executable}, {"prologue": 0o500, "epilogue": 0o500})
    with batch_user(vm_env, "vbt-limits", 23409):
        _limited_prologue_and_epilogue(vm_env, job, tmp_path, limited)


def _limited_prologue_and_epilogue(vm_env, job, tmp_path, limited):
    wd_user = "vbt-limits"
    r = subprocess.run([str(tmp_path / "torque" / "prologue"), job, wd_user, wd_user, "name",
                        "nodes=1:ppn=1,mem=256mb", "batch", ""], env={}, preexec_fn=limited,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                       cwd="/")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    state = json.load(open(os.path.join(vm_env.cfg.state_dir, "jobs", job, "state.json")))
    assert state["phase"] == "ready"   # the prologue finished (docs/architecture.md)
    r = subprocess.run([str(tmp_path / "torque" / "epilogue"), job, wd_user, wd_user, "name",
                        "1", "nodes=1", "cput=0", "batch", "", "0"], env={}, preexec_fn=limited,
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert leftovers(vm_env, job) == []


def _virtlogd_cap() -> int:
    """What virtlogd keeps of one log at most: max_size * (max_backups + 1), from its config."""
    size, backups = 2097152, 3
    try:
        with open("/etc/libvirt/virtlogd.conf") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip() == "max_size" and value.strip().isdigit():
                    size = int(value)
                if key.strip() == "max_backups" and value.strip().isdigit():
                    backups = int(value)
    except OSError:
        pass
    return size * (backups + 1)


@pytest.mark.vm
def test_a_guest_printing_without_end_to_its_console_fills_a_bounded_log(vm_env, tracker):
    """Guest root writes to the serial console for as long as it likes: virtlogd rotates the
    console log, so the job's console files never hold more than virtlogd keeps (on main the
    console was a plain file QEMU appended to without bound)."""
    import libvirt
    from vibatch.vm.agent import LibvirtAgent
    from vibatch.util import Deadline
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    cap = _virtlogd_cap()
    want = cap + (2 << 20)        # past the cap by twice the slack the check allows
    conn = libvirt.open(vm_env.cfg.libvirt_uri)
    try:
        agent = LibvirtAgent(conn.lookupByName("vibatch-" + job))
        res = agent.run("/bin/sh", ["-c", f"head -c {want} /dev/zero | tr '\\0' x > /dev/ttyS0"],
                        Deadline(600), what="console flood")
        assert res.wait_status == 0, res.err
    finally:
        conn.close()
    state = os.path.join(vm_env.cfg.state_dir, "jobs", job)
    logs = {n: os.path.getsize(os.path.join(state, n)) for n in os.listdir(state)
            if n.startswith("console.log")}
    total = sum(logs.values())
    assert len(logs) > 1, logs          # it was rotated: the flood really reached the log
    assert total <= cap + (1 << 20), (total, cap, logs)
