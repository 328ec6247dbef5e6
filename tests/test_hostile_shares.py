"""Guest root attacks the shared folders; the working directory is authorised as the job user.

Guest root comes through the root agent, which plays an image that gives the user root. In the
working directory and in the I/O folder it tries to plant a setuid-root binary, make device
nodes, chown to root, write through `..` and through symlinks planted (on the host, as the job
user could) before and after the prologue. Whatever it does, every file on the host belongs to
the job user, carries no setuid/setgid bit, is no device, and nothing outside the share moves.
Run against the code before share.py, the setuid-root, device and chown attacks succeeded (the
files were root's, 4755, a real character device), and the job below a 0700 directory ran.
"""
import os
import pwd
import shutil
import stat
import subprocess

import pytest

from conftest import SESSION
from vmhelp import (epilogue, exec_run, guest_root, leftovers, private_workdir, prologue,
                    virtiofsd_pids)

pytestmark = pytest.mark.vm

USER = "vbt-alice"
GUEST_IO = "/run/vibatch/io"


def _entries(top):
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, top)] = os.lstat(path)
    return out


def _unsafe(top, uid):
    """Every entry below ``top`` that is not the job user's, has a setuid/setgid bit, or is a
    device node."""
    bad = []
    for rel, st in sorted(_entries(top).items()):
        why = []
        if st.st_uid != uid:
            why.append(f"uid {st.st_uid}")
        if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            why.append(f"mode {st.st_mode:o}")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            why.append("device node")
        if why:
            bad.append(f"{rel}: {', '.join(why)}")
    return bad


@pytest.fixture
def outside(vm_env, request):
    """A directory beside the working directories that no job may touch: root's, with a file."""
    path = os.path.join(vm_env.base, "outside-" + request.node.name[:30])
    os.makedirs(path)
    os.chmod(path, 0o755)
    with open(os.path.join(path, "target"), "w") as f:
        f.write("original\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _plant_links(where, outside, uid, gid, prefix):
    """Symlinks pointing out of the share, made on the host as the job user could make them."""
    for name, dest in ((f"{prefix}file", os.path.join(outside, "target")),
                       (f"{prefix}dir", outside),
                       (f"{prefix}up", os.path.relpath(outside, where))):
        path = os.path.join(where, name)
        os.symlink(dest, path)
        os.lchown(path, uid, gid)


USER_FILES = 'cd "$1" && cp /bin/busybox ubin && echo data > ufile && mkdir udir && echo ok'
ROOT_ATTACK = r"""
cd "$1" || exit 99
cp /bin/busybox suid-root; chown 0:0 suid-root; chmod 4755 suid-root
chown 0:0 ubin; chmod 4755 ubin; chmod 6755 ubin; chmod g+s udir
chown 0:0 ufile udir; chown 23402:23402 ufile
mknod chardev c 1 3; mknod blockdev b 7 0
echo pwned > ../escape-dotdot; echo pwned > ../../escape-dotdot2
mkdir -p sub; echo pwned > sub/../../escape-sub
for l in prefile predir/new preup/new postfile postdir/new postup/new; do echo pwned > "$l"; done
ls -ln
"""
USER_ATTACK = r"""
cd "$1" || exit 99
cp /bin/busybox user-suid; chmod 4755 user-suid; chmod 6755 user-suid
mkdir user-dir; chmod 2775 user-dir; mkfifo fifo
echo hello > after && cat after
"""


def test_guest_root_cannot_plant_anything_in_either_share(vm_env, tracker, outside):
    from vibatch.core.jobdir import JobPaths
    pw = pwd.getpwnam(USER)
    job = tracker.job_id()
    workdir = vm_env.workdir(job[:40], USER)
    _plant_links(workdir, outside, pw.pw_uid, pw.pw_gid, "pre")
    r = prologue(vm_env, job, workdir=workdir)
    assert r.returncode == 0, r.stderr
    io_host = JobPaths.of(vm_env.cfg, job).io
    _plant_links(workdir, outside, pw.pw_uid, pw.pw_gid, "post")
    for prefix in ("pre", "post"):   # the I/O folder is the job user's on the host too
        _plant_links(io_host, outside, pw.pw_uid, pw.pw_gid, prefix)
    around = {d: set(os.listdir(d)) for d in (os.path.dirname(workdir), os.path.dirname(io_host))}
    for host, guest in ((workdir, workdir), (io_host, GUEST_IO)):
        rc, out, err = exec_run(vm_env, job, "/bin/sh", "-c", USER_FILES, "files", guest)
        assert (rc, out.strip()) == (0, "ok"), err
        rc, out, err = guest_root(vm_env, job, ROOT_ATTACK, guest)
        print(f"guest root in {guest}:\n{out}{err}")
        rc, out, err = exec_run(vm_env, job, "/bin/sh", "-c", USER_ATTACK, "attack", guest)
        print(f"job user in {guest}:\n{err}")
        # the share still serves the job user after the refused operations
        assert (rc, out.strip()) == (0, "hello"), err
        assert _unsafe(host, pw.pw_uid) == [], host
        for name in ("ubin", "user-suid"):      # there, the job user's, and not setuid
            st = os.lstat(os.path.join(host, name))
            assert st.st_uid == pw.pw_uid and stat.S_IMODE(st.st_mode) & 0o7000 == 0, name
            assert st.st_mode & stat.S_IXUSR, name    # the plain chmod the user did went through
        assert stat.S_ISFIFO(os.lstat(os.path.join(host, "fifo")).st_mode)
    # nothing outside the shares moved: the target is intact, nothing new beside them
    assert sorted(os.listdir(outside)) == ["target"]
    with open(os.path.join(outside, "target")) as f:
        assert f.read() == "original\n"
    for d, names in around.items():
        assert set(os.listdir(d)) == names, d
    assert len(virtiofsd_pids(job)) == 2
    assert epilogue(vm_env, job).returncode == 0
    assert leftovers(vm_env, job) == []


def test_a_swap_after_the_prologue_changes_nothing(vm_env, tracker, outside):
    """The user renames the shared directory away and puts a symlink to elsewhere in its
    place: the guest still writes into the directory that was checked."""
    job = tracker.job_id()
    workdir = vm_env.workdir(job[:40], USER)
    assert prologue(vm_env, job, workdir=workdir).returncode == 0
    moved = workdir + ".moved"
    os.rename(workdir, moved)
    os.symlink(outside, workdir)
    try:
        guest_root(vm_env, job, f"echo pwned > {workdir}/swapped-root")
        rc, _, err = exec_run(vm_env, job, "/bin/sh", "-c", f"echo mine > {workdir}/swapped")
        assert rc == 0, err
        assert os.path.exists(os.path.join(moved, "swapped"))
        assert sorted(os.listdir(outside)) == ["target"]
    finally:
        os.unlink(workdir)
        os.rename(moved, workdir)
    assert epilogue(vm_env, job).returncode == 0
    assert leftovers(vm_env, job) == []


def test_workdir_below_a_0700_parent_is_refused_as_the_jobs_fault(vm_env, tracker):
    job = tracker.job_id()
    with private_workdir(vm_env, f"private-{SESSION}") as private_tree:
        r = prologue(vm_env, job, workdir=private_tree)
        if r.returncode == 0:   # the attack: the job reads what its user cannot reach on the host
            rc, out, _ = exec_run(vm_env, job, "cat", os.path.join(private_tree, "data"))
            assert "secret" not in out, "the job read a file its user cannot reach on the host"
        assert r.returncode == 15, r.stdout + r.stderr
        assert f"working directory {private_tree}: the job's user may not enter " \
               f"{os.path.dirname(private_tree)} (permission denied)" in r.stderr
    assert leftovers(vm_env, job) == []
    # the node stays in service: the next job runs
    ok = tracker.job_id()
    assert prologue(vm_env, ok).returncode == 0
    assert exec_run(vm_env, ok, "true")[0] == 0


def test_workdir_through_a_symlink_is_refused(vm_env, tracker):
    pw = pwd.getpwnam(USER)
    job = tracker.job_id()
    real = vm_env.workdir(job[:30] + "-real", USER)
    link = os.path.join(os.path.dirname(real), job[:30] + "-link")
    os.symlink(real, link)
    os.lchown(link, pw.pw_uid, pw.pw_gid)
    r = prologue(vm_env, job, workdir=os.path.join(link))
    assert r.returncode == 15, r.stdout + r.stderr
    assert f"{link} is a symbolic link" in r.stderr
    assert leftovers(vm_env, job) == []


def test_qemu_and_virtiofsd_run_unprivileged_and_sandboxed(vm_env, tracker):
    """QEMU: libvirt-qemu, libvirt's seccomp sandbox on; virtiofsd: the job user, no caps."""
    job = tracker.job_id()
    assert prologue(vm_env, job).returncode == 0
    qemu_uid = pwd.getpwnam(vm_env.cfg.vm.qemu_user).pw_uid
    with open(f"/run/libvirt/qemu/vibatch-{job}.pid") as f:
        qpid = int(f.read())
    status = _status(qpid)
    assert status["Uid"].split() == [str(qemu_uid)] * 4
    assert status["Seccomp"] == "2" and status["CapEff"] == "0000000000000000"
    with open(f"/proc/{qpid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"-sandbox" in argv and argv[argv.index(b"-sandbox") + 1].startswith(b"on")
    uid = pwd.getpwnam(USER).pw_uid
    for pid in virtiofsd_pids(job):
        st = _status(pid)
        assert st["Uid"].split() == [str(uid)] * 4
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
        assert st["CapEff"] == "0000000000000000"       # dropped after the chroot
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert epilogue(vm_env, job).returncode == 0


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_crashed_prologue_leaves_no_virtiofsd_behind(vm_env, tracker):
    """The prologue is SIGKILLed once both virtiofsd run; reap ends them with the job."""
    import time
    from conftest import vibatch_cmd
    job = tracker.job_id()
    workdir = vm_env.workdir(job[:40], USER)
    proc = subprocess.Popen(vibatch_cmd("--config", vm_env.config_path, "prologue", "--job", job,
                                        "--user", USER, "--workdir", workdir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    pids = []
    while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
        pids = virtiofsd_pids(job)
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert len(pids) == 2, "the prologue never got both virtiofsd running"
    r = subprocess.run(vibatch_cmd("--config", vm_env.config_path, "reap"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert leftovers(vm_env, job) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _status(pid)["State"].startswith("Z")
