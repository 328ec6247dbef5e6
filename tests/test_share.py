"""share.py without a VM: the seccomp filter, the walk as the job user, starting and stopping
virtiofsd, and a launcher whose parent dies before recording it (root for all but the filter)."""
import json
import os
import subprocess
import sys
import time

import pytest

from vibatch import share
from vibatch.errors import MissingWorkdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (drops to another user)")

FILTER_PROBE = r"""
import ctypes, errno, json, os, sys
sys.path.insert(0, sys.argv[1])
from vibatch.share import install_filter
d = sys.argv[2]
open(os.path.join(d, "f"), "w").close()
install_filter()
res = {}
def t(name, fn):
    try:
        fn(); res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode[e.errno]
f = os.path.join(d, "f")
t("chmod 755", lambda: os.chmod(f, 0o755))
t("chmod 4755", lambda: os.chmod(f, 0o4755))
t("chmod 2755", lambda: os.chmod(f, 0o2755))
t("fchmod 4755", lambda: os.fchmod(os.open(f, os.O_RDONLY), 0o4755))
t("create 4755", lambda: os.close(os.open(os.path.join(d, "c"), os.O_CREAT | os.O_WRONLY, 0o4755)))
t("create 644", lambda: os.close(os.open(os.path.join(d, "p"), os.O_CREAT | os.O_WRONLY, 0o644)))
t("open 4755 without O_CREAT", lambda: os.close(os.open(f, os.O_RDONLY, 0o4755)))
t("mkdir 2755", lambda: os.mkdir(os.path.join(d, "g"), 0o2755))
t("mkdir 755", lambda: os.mkdir(os.path.join(d, "m"), 0o755))
t("mknod chr", lambda: os.mknod(os.path.join(d, "n"), 0o20644, os.makedev(1, 3)))
t("mknod blk", lambda: os.mknod(os.path.join(d, "b"), 0o60644, os.makedev(7, 0)))
t("mknod reg 4755", lambda: os.mknod(os.path.join(d, "r"), 0o104755))
t("mkfifo", lambda: os.mkfifo(os.path.join(d, "fifo")))
t("setxattr", lambda: os.setxattr(f, "user.x", b"1"))
print(json.dumps(res))
"""


def test_the_filter_refuses_setuid_bits_devices_and_xattrs(tmp_path):
    out = subprocess.run([sys.executable, "-c", FILTER_PROBE, REPO, str(tmp_path)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    res = json.loads(out)
    assert res == {
        "chmod 755": "ok", "chmod 4755": "EPERM", "chmod 2755": "EPERM", "fchmod 4755": "EPERM",
        "create 4755": "EPERM", "create 644": "ok", "open 4755 without O_CREAT": "ok",
        "mkdir 2755": "EPERM", "mkdir 755": "ok", "mknod chr": "EPERM", "mknod blk": "EPERM",
        "mknod reg 4755": "EPERM", "mkfifo": "ok", "setxattr": "EPERM"}
    assert not any(os.stat(tmp_path / n).st_mode & 0o6000 for n in os.listdir(tmp_path))


@pytest.fixture
def tree(tmp_path):
    """tmp/0755 open/ (nobody's), tmp/0700 closed/ (root's) with a 0755 inside, a symlink."""
    os.chmod(tmp_path, 0o755)
    for d in (tmp_path.parent, tmp_path.parent.parent):   # pytest's base is root's 0700
        os.chmod(d, os.stat(d).st_mode | 0o711)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chown(open_dir, NOBODY, NOBODY)
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    os.chmod(closed, 0o700)
    os.chmod(closed / "inner", 0o755)
    os.symlink(open_dir, tmp_path / "link")
    run = tmp_path / "run"
    run.mkdir()
    return tmp_path


def _start(tree, path, record=lambda r: None, virtiofsd=VIRTIOFSD):
    n = time.monotonic_ns()
    src = share.ShareSource("vbjob", str(tree / "run" / f"s{n}.sock"), str(tree / "run" / f"l{n}.log"),
                            path=str(path))
    return share.start("unit", [src], NOBODY, NOBODY, [NOBODY], [], virtiofsd, (0, 0), record)


@needs_root
@pytest.mark.parametrize("rel, message", [
    ("closed/inner", "the job's user may not enter {tree}/closed (permission denied)"),
    ("link", "{tree}/link is a symbolic link"),
    ("missing/x", "does not exist ({tree}/missing is missing)"),
])
def test_the_walk_refuses_as_the_job_user(tree, rel, message):
    recorded = []
    with pytest.raises(MissingWorkdir) as e:
        _start(tree, tree / rel, recorded.extend)
    assert message.format(tree=tree) in str(e.value) and str(tree / rel) in str(e.value)
    share.stop(recorded)
    assert _alive(recorded) == []


@needs_root
def test_start_runs_virtiofsd_as_the_user_and_stop_ends_it(tree):
    recorded = []
    (tree / "open" / "inside").touch()
    recs = _start(tree, tree / "open", recorded.extend)
    assert recs == recorded and len(recs) == 1
    pid = recs[0]["pid"]
    status = _status(pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4 and status["Seccomp"] == "2"
    assert os.readlink(f"/proc/{pid}/cwd") == str(tree / "open")
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    # a client connects (QEMU would): virtiofsd chroots, empties its bounding set, drops every
    # capability, installs its own filter, and keeps running
    import socket
    client = socket.socket(socket.AF_UNIX)
    client.connect(_sock(tree))
    deadline = time.monotonic() + 10
    while _status(pid).get("Seccomp_filters") != "2" and time.monotonic() < deadline:
        time.sleep(0.01)
    status = _status(pid)
    assert status["State"].startswith("S"), status     # alive, waiting for vhost-user messages
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["Seccomp_filters"] == "2"             # ours and virtiofsd's own
    # its root is the checked directory (not the host's /, where virtiofsd changed directory)
    assert os.listdir(f"/proc/{pid}/root") == ["inside"]
    client.close()
    share.stop(recs)
    assert _alive(recs) == []
    share.stop(recs)                                    # again: nothing to do, no error


def _sock(tree):
    return str(next(p for p in (tree / "run").iterdir() if p.name.endswith(".sock")))


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@needs_root
def test_a_launcher_whose_parent_dies_before_recording_it_exits(tree):
    """The parent crashes between spawning and recording: the launcher reads EOF, never execs."""
    code = (f"import sys, os; sys.path.insert(0, {REPO!r}); from vibatch import share; "
            f"src = share.ShareSource('vbjob', {str(tree / 'run' / 'x.sock')!r}, "
            f"{str(tree / 'run' / 'x.log')!r}, path={str(tree / 'open')!r}); "
            "share.start('crash', [src], 65534, 65534, [65534], [], "
            f"{VIRTIOFSD!r}, (0, 0), lambda r: (print(r[0]['pid'], flush=True), os._exit(9)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert p.returncode == 9
    pid = int(p.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _cmdline(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _cmdline(pid) == b""                  # exited (or a zombie), never became virtiofsd


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(recs):
    return [r["pid"] for r in recs if _cmdline(r["pid"])]


def test_filter_program_jumps_stay_inside_it():
    import struct
    prog = share.filter_program()
    ins = [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert len(ins) < 4096 and ins[-1] == (0x06, 0, 0, share.RET_ALLOW)
    for i, (code, jt, jf, _) in enumerate(ins):
        if code & 0x07 == 0x05:                          # BPF_JMP: both targets in the program
            assert i + 1 + max(jt, jf) < len(ins), i
