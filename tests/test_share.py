"""share.py without a VM: the seccomp filter, the check as the job user, and the launcher that
libvirtd starts in virtiofsd's place (root for all but the filter and the argv parser)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vibatch.vm import share
from vibatch.errors import MissingWorkdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (drops to another user)")

# a child that installs the filter, then t(name, call) records "ok" or the errno of each call
PROBE = r"""
import errno, json, os, sys
sys.path.insert(0, sys.argv[1])
from vibatch.vm.share import install_filter
d = sys.argv[2]
res = {}
def t(name, fn):
    try:
        fn(); res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode[e.errno]
"""
FILTER_PROBE = PROBE + r"""
open(os.path.join(d, "f"), "w").close()
install_filter()
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


READONLY_PROBE = PROBE + r"""
ro = sys.argv[3] == "ro"
f = os.path.join(d, "f")
with open(f, "w") as fh:
    fh.write("host")
os.mkdir(os.path.join(d, "sub"))
install_filter(readonly=ro)
def read():
    with open(f) as fh:
        assert fh.read() == "host"
t("read", read)
t("list", lambda: os.listdir(d))
t("stat", lambda: os.stat(f))
t("open O_PATH", lambda: os.close(os.open(d, os.O_PATH | os.O_DIRECTORY)))
t("write", lambda: os.close(os.open(f, os.O_WRONLY)))
t("rdwr", lambda: os.close(os.open(f, os.O_RDWR)))
t("append", lambda: os.close(os.open(f, os.O_WRONLY | os.O_APPEND)))
t("create", lambda: os.close(os.open(os.path.join(d, "new"), os.O_CREAT | os.O_RDONLY, 0o644)))
t("truncate", lambda: os.truncate(f, 0))
t("unlink", lambda: os.unlink(f))
t("rename", lambda: os.rename(f, os.path.join(d, "g")))
t("link", lambda: os.link(f, os.path.join(d, "h")))
t("symlink", lambda: os.symlink("f", os.path.join(d, "s")))
t("mkdir", lambda: os.mkdir(os.path.join(d, "m")))
t("rmdir", lambda: os.rmdir(os.path.join(d, "sub")))
t("chmod", lambda: os.chmod(f, 0o600))
t("chown", lambda: os.chown(f, os.getuid(), os.getgid()))
t("utime", lambda: os.utime(f, (0, 0)))
t("mkfifo", lambda: os.mkfifo(os.path.join(d, "p")))
print(json.dumps(res))
"""


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_a_readonly_share_refuses_every_change_with_erofs(tmp_path, mode):
    """The same process, the same owner of the tree: with the read-only filter every change
    fails with EROFS and reads still work; without it (the working directory's filter) the same
    calls succeed, so it is the filter that stops them."""
    out = subprocess.run([sys.executable, "-c", READONLY_PROBE, REPO, str(tmp_path), mode],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    res = json.loads(out)
    reads = ("read", "list", "stat", "open O_PATH")
    assert all(res[k] == "ok" for k in reads), res
    changes = {k: v for k, v in res.items() if k not in reads}
    if mode == "ro":
        assert set(changes.values()) == {"EROFS"}, changes
        assert (tmp_path / "f").read_text() == "host"
        assert sorted(os.listdir(tmp_path)) == ["f", "sub"]
    else:
        assert changes.get("write") == "ok" and changes.get("mkdir") == "ok", changes


@pytest.fixture
def tree(tmp_path):
    """tmp/0755 open/ (nobody's), tmp/0700 closed/ (root's) with a 0755 inside, a symlink, and
    specs/ (root's 0700) for the launcher's share specs."""
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
    (tmp_path / "specs").mkdir(mode=0o700)
    return tmp_path


@needs_root
@pytest.mark.parametrize("rel, message", [
    ("closed/inner", "the job's user may not enter {tree}/closed (permission denied)"),
    ("link", "{tree}/link is a symbolic link"),
    ("missing/x", "does not exist ({tree}/missing is missing)"),
    ("open/../closed/inner", "is not a normalised absolute path"),
])
def test_the_check_refuses_as_the_job_user(tree, rel, message):
    path = str(tree) + "/" + rel
    with pytest.raises(MissingWorkdir) as e:
        share.check_as_user(path, NOBODY, NOBODY, [NOBODY])
    assert message.format(tree=tree) in str(e.value) and path in str(e.value)


@needs_root
@pytest.mark.parametrize("rel, error", [
    ("missing/x", "NodeError"), ("link", "NodeError"), ("closed/inner", "MissingWorkdir")])
def test_a_site_share_missing_or_linked_is_the_nodes_fault(tree, rel, error):
    """The site configured the share: missing or reached through a link, the node is wrong; a
    share this user may not enter fails only the job."""
    path = str(tree) + "/" + rel
    with pytest.raises(Exception) as e:
        share.check_as_user(path, NOBODY, NOBODY, [NOBODY], label="site share")
    assert type(e.value).__name__ == error and f"site share {path}" in str(e.value)


@needs_root
def test_the_check_accepts_what_the_user_reaches(tree):
    share.check_as_user(str(tree / "open"), NOBODY, NOBODY, [NOBODY])
    share.check_as_user(str(tree / "closed" / "inner"), 0, 0, [0])   # root may: it is root's


def _spec(tree, **kw):
    fields = dict(job_id="unit", tag="vbjob", uid=NOBODY, gid=NOBODY, groups=(NOBODY,), cpus=(),
                  virtiofsd=VIRTIOFSD, path=str(tree / "open"))
    fields.update(kw)
    share.write_specs(str(tree / "specs"), [share.ShareSpec(**fields)])
    return share.spec_path(str(tree / "specs"), fields["tag"])


def _launch(spec_file):
    """The launcher as libvirtd starts it: virtiofsd's command line, the socket as --fd."""
    import socket
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(spec_file + ".sock")
    sock.listen(1)
    code = (f"import sys; sys.path.insert(0, {REPO!r}); "
            "from vibatch.vm.share import main; main()")
    p = subprocess.Popen([sys.executable, "-I", "-B", "-c", code, f"--fd={sock.fileno()}", "-o",
                          f"source={spec_file},cache=none", "--thread-pool-size=16"],
                         pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd="/")
    return p, sock


def _wait(what, cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.01)


@needs_root
def test_the_launcher_runs_virtiofsd_as_the_user_in_the_checked_directory(tree):
    import socket
    (tree / "open" / "inside").touch()
    p, sock = _launch(_spec(tree))
    try:
        _wait("virtiofsd exec'd", lambda: _cmdline(p.pid).startswith(b"virtiofsd-unit-vbjob\0"))
        status = _status(p.pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4 and status["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        assert os.readlink(f"/proc/{p.pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        # a client connects (QEMU would): virtiofsd chroots, empties its bounding set, drops
        # every capability, installs its own filter, and keeps running
        client = socket.socket(socket.AF_UNIX)
        client.connect(sock.getsockname())
        _wait("virtiofsd's own filter", lambda: _status(p.pid).get("Seccomp_filters") == "2")
        status = _status(p.pid)
        assert status["State"].startswith("S"), status   # alive, waiting for vhost-user messages
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
        # its root is the checked directory (not the host's /, where virtiofsd changed directory)
        assert os.listdir(f"/proc/{p.pid}/root") == ["inside"]
        client.close()
    finally:
        p.kill()
        p.wait(timeout=10)
        sock.close()


@needs_root
def test_a_directory_that_changed_since_the_prologue_is_refused_with_a_verdict(tree):
    spec = _spec(tree, path=str(tree / "closed" / "inner"))
    p, sock = _launch(spec)
    out, err = p.communicate(timeout=30)
    sock.close()
    assert p.returncode == 2, err
    why = share.refusal([spec])
    assert why == (f"working directory {tree}/closed/inner: the job's user may not enter "
                   f"{tree}/closed (permission denied)")
    assert why in err.decode()
    assert os.stat(share.verdict_path(spec)).st_uid == 0
    assert os.stat(share.verdict_path(spec)).st_mode & 0o077 == 0


@needs_root
@pytest.mark.parametrize("how", ["user's spec", "link to a spec", "group-writable dir",
                                 "not libvirt's argv"])
def test_the_launcher_trusts_only_a_spec_only_root_can_have_written(tree, how):
    spec = _spec(tree)
    if how == "user's spec":          # what a libvirt-group user could hand it, with any ids
        os.chown(spec, NOBODY, NOBODY)
    elif how == "link to a spec":
        os.symlink(spec, str(tree / "specs" / "link.json"))
        spec = str(tree / "specs" / "link.json")
    elif how == "group-writable dir":
        os.chmod(tree / "specs", 0o770)
    if how == "not libvirt's argv":
        code = (f"import sys; sys.path.insert(0, {REPO!r}); "
                "from vibatch.vm.share import main; main()")
        p = subprocess.run([sys.executable, "-I", "-B", "-c", code, "--socket-path=/x", "-o",
                            f"source={spec}"], capture_output=True, timeout=30, env={})
        assert p.returncode == 64 and b"unexpected argument '--socket-path=/x'" in p.stderr
        return
    p, sock = _launch(spec)
    out, err = p.communicate(timeout=30)
    sock.close()
    assert p.returncode == 64, err
    assert b"vibatch virtiofsd launcher:" in err
    assert share.refusal([spec]) is None


GROUPS_PROBE = PROBE + r"""
from vibatch.vm import share
gid, keep = int(sys.argv[3]), sys.argv[4] == "keep"
share.become_job_user(share._libc(), 65534, 65534, gid)   # the launcher's step 2
install_filter(keep_groups=keep)          # then virtiofsd's drop of its groups, and an add
t("drop", lambda: os.setgroups([]))
t("add", lambda: os.setgroups([0]))
print(json.dumps(res), flush=True)
sys.stdin.read()                          # the test reads our groups, as execd would
"""


@needs_root
@pytest.mark.parametrize("keep", [False, True])
def test_virtiofsds_drop_of_its_groups_keeps_the_job_group(keep):
    """virtiofsd drops every supplementary group at start; in the launcher's namespace, where
    setgroups is denied, that fails (EPERM) and virtiofsd exits, as it did with Grid Engine's
    job group before the filter's no-op. With it the drop succeeds and does nothing: the job
    group stays where Grid Engine's collector reads it (/proc/PID/status from the host), and
    no group can be added either."""
    gid = 23999
    p = subprocess.Popen([sys.executable, "-c", GROUPS_PROBE, REPO, "/", str(gid),
                          "keep" if keep else "plain"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        res = json.loads(p.stdout.readline())
        groups = _status(p.pid)["Groups"].split()
    finally:
        p.communicate("", timeout=30)
    if keep:
        assert res == {"drop": "ok", "add": "ok"} and groups == [str(gid)], (res, groups)
    else:
        assert res == {"drop": "EPERM", "add": "EPERM"} and groups == [str(gid)], (res, groups)


@needs_root
@pytest.mark.parametrize("gid", [None, 23999])
def test_the_launcher_gives_virtiofsd_the_batch_systems_job_group_alone(tree, gid):
    """Grid Engine's add_grp_id (process_gid) is virtiofsd's one supplementary group, and
    virtiofsd runs on with it past its drop of groups; without one it has none (not the
    user's groups, which only the check uses)."""
    import socket
    p, sock = _launch(_spec(tree, process_gid=gid))
    try:
        _wait("virtiofsd exec'd", lambda: _cmdline(p.pid).startswith(b"virtiofsd-unit-vbjob\0"))
        client = socket.socket(socket.AF_UNIX)
        client.connect(sock.getsockname())
        _wait("virtiofsd's own filter", lambda: _status(p.pid).get("Seccomp_filters") == "2")
        status = _status(p.pid)
        assert status["State"].startswith("S"), status
        assert status["Groups"].split() == ([str(gid)] if gid else []), status
        # with the gid it gets the job's signals too (Grid Engine's addgrpid kill): s_rt's
        # and -notify's SIGUSR1/SIGUSR2 leave it serving (their default would end it)
        ignored = int(_status(p.pid)["SigIgn"], 16)
        assert all(ignored >> (sig - 1) & 1 for sig in (signal.SIGUSR1, signal.SIGUSR2)), hex(ignored)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):   # an ignored signal is dropped when sent
            os.kill(p.pid, sig)
        assert p.poll() is None and _status(p.pid)["State"][0] in "SR", _status(p.pid)
        client.close()
    finally:
        p.kill()
        p.wait(timeout=10)
        sock.close()


def test_libvirts_command_line_is_parsed():
    # as libvirt 9.0 starts virtiofsd for a <filesystem> with <binary><cache mode='none'/>
    fd, source = share.parse_libvirt_argv(
        ["--fd=23", "-o", "source=/var/lib/vibatch/jobs/7/shares/vbjob.json,cache=none"])
    assert (fd, source) == (23, "/var/lib/vibatch/jobs/7/shares/vbjob.json")
    # a comma in the path: libvirt doubles it
    assert share.parse_libvirt_argv(["--fd=3", "-o", "source=/srv/a,,b/s.json,cache=none"]) == \
        (3, "/srv/a,b/s.json")
    for bad in ([], ["--fd=3"], ["-o", "source=/x"], ["--fd=3", "-o", "source=/x", "--other"]):
        with pytest.raises(share._Usage):
            share.parse_libvirt_argv(bad)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _status(pid):
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("keep_groups", [False, True])
def test_filter_program_jumps_stay_inside_it(readonly, keep_groups):
    import struct
    prog = share.filter_program(readonly, keep_groups)
    # setgroups is a no-op only where a job group is kept
    noop = struct.pack("HBBI", 0x06, 0, 0, share.RET_NOOP)
    assert (noop in [prog[i:i + 8] for i in range(0, len(prog), 8)]) == keep_groups
    ins = [struct.unpack("HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert len(ins) < 4096 and ins[-1] == (0x06, 0, 0, share.RET_ALLOW)
    for i, (code, jt, jf, _) in enumerate(ins):
        if code & 0x07 == 0x05:                          # BPF_JMP: both targets in the program
            assert i + 1 + max(jt, jf) < len(ins), i
