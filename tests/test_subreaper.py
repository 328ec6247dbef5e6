"""vibatch.subreaper: what libvirtd daemonizes (a double fork, as QEMU) is given to the
subreaper, not to PID 1, and the command's status is the subreaper's."""
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the command: a child that forks a grandchild and exits (a daemonizing double fork); the
# grandchild reports the parent it was given, once its own parent is gone (bounded wait)
DOUBLE_FORK = r"""
import os, sys, time
r, w = os.pipe()
if os.fork() == 0:
    first = os.getpid()
    if os.fork() == 0:
        deadline = time.monotonic() + 10
        while os.getppid() == first and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(w, str(os.getppid()).encode()); os._exit(0)
    os._exit(0)
os.close(w)
print(os.read(r, 64).decode(), flush=True)
sys.exit(7)
"""


def run(argv, **kw):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    out, err = p.communicate(timeout=60)
    return p.pid, p.returncode, out, err


def test_an_orphan_is_given_to_the_subreaper():
    pid, rc, out, err = run([sys.executable, "-m", "vibatch.subreaper", sys.executable, "-c",
                             DOUBLE_FORK], cwd=REPO)
    assert rc == 7, err                     # the command's status
    assert int(out.strip()) == pid          # the subreaper took the orphan


def test_without_the_subreaper_the_orphan_goes_elsewhere():
    """The same command run directly: the orphan goes to PID 1 or to a subreaper above this
    test, not to the command's parent (so the first test sees the subreaper's doing)."""
    pid, rc, out, err = run([sys.executable, "-c", DOUBLE_FORK])
    assert rc == 7, err
    assert int(out.strip()) not in (pid, os.getpid())


def test_bad_arguments_are_refused():
    p = subprocess.run([sys.executable, "-m", "vibatch.subreaper"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "no COMMAND" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vibatch.subreaper", "--log", "/tmp/x", "true"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--log goes with --detach" in p.stderr


def test_orphans_are_reaped_after_the_command_ended(tmp_path):
    """The command exits at once, leaving a daemonized grandchild (as libvirtd leaves QEMU at a
    restart): the subreaper stays until that one has ended too, and keeps the command's status."""
    marker = tmp_path / "orphan-parent"
    script = (f"import os, time\nif os.fork() == 0:\n    first = os.getpid()\n"
              f"    if os.fork() == 0:\n"
              f"        deadline = time.monotonic() + 10\n"
              f"        while (os.getppid() == first or not os.path.exists({str(marker)!r} + '.go'))"
              f" and time.monotonic() < deadline:\n"
              f"            time.sleep(0.01)\n"
              f"        open({str(marker)!r}, 'w').write(str(os.getppid())); os._exit(0)\n"
              f"    os._exit(0)\nos._exit(5)\n")
    p = subprocess.Popen([sys.executable, "-m", "vibatch.subreaper", sys.executable, "-c", script],
                         cwd=REPO, stderr=subprocess.PIPE, text=True)
    open(str(marker) + ".go", "w").close()
    assert p.wait(timeout=60) == 5, p.stderr.read()
    assert int(marker.read_text()) == p.pid    # given to the subreaper, which waited for it


def test_detach_returns_once_the_command_runs_and_reports_what_cannot(tmp_path):
    log = tmp_path / "log"
    p = subprocess.run([sys.executable, "-m", "vibatch.subreaper", "--detach", "--log", str(log),
                        "sh", "-c", "echo started in $(pwd) with fds $(ls /proc/$$/fd | tr '\\n' ' ')"],
                       cwd=REPO, capture_output=True, text=True, timeout=60, pass_fds=())
    assert p.returncode == 0, p.stderr
    from vibatch.util import Deadline
    d = Deadline(10)
    while "started" not in (log.read_text() if log.exists() else "") and not d.expired():
        time.sleep(0.01)
    text = log.read_text()
    assert "started in / " in text, text
    assert set(text.split("fds ")[1].split()) <= {"0", "1", "2", "3"}, text   # 3: ls's own dir fd
    p = subprocess.run([sys.executable, "-m", "vibatch.subreaper", "--detach", "--log", str(log),
                        "/nonexistent/libvirtd"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "cannot run /nonexistent/libvirtd" in p.stderr, p.stderr


# --service: the form of a systemd unit's ExecStart (etc/systemd/libvirtd.service.d/)

# our code, also in the processes the tests start (cwd alone would do for -m, not for -c)
SUB_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": REPO}
SERVICE = [sys.executable, "-m", "vibatch.subreaper", "--service"]


def read_line(fd, deadline):
    """One line from the pipe ``fd`` (bytes), by ``deadline`` (a vibatch.util.Deadline)."""
    import select
    buf = b""
    while not buf.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], deadline.remaining())
        assert ready, f"no line by the deadline (got {buf!r})"
        chunk = os.read(fd, 4096)
        assert chunk, f"EOF before a line (got {buf!r})"
        buf += chunk
    return buf


# the command: accepts on fd 3, reports what it was given, ends when the test hangs up
SOCKET_CHILD = r"""
import json, os, socket
s = socket.socket(fileno=3)
conn, _ = s.accept()
conn.settimeout(60)
conn.sendall(json.dumps({
    "pid": os.getpid(), "ppid": os.getppid(), "name": s.getsockname(),
    "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    **{k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}}).encode()
    + b"\n")
conn.recv(1)
"""


def test_service_passes_socket_activation_on_with_the_childs_own_pid(tmp_path):
    import json
    import shutil
    import socket

    import pytest

    from vibatch.util import Deadline
    activate = shutil.which("systemd-socket-activate", path=SUB_ENV["PATH"])
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    path = str(tmp_path / "sock")
    # systemd-socket-activate passes on only PATH, TERM, USER, HOME and what -E names
    p = subprocess.Popen([activate, "-l", path, "--fdname=vibatch-test",
                          "-E", f"PYTHONPATH={REPO}", *SERVICE, sys.executable, "-c",
                          SOCKET_CHILD], cwd=REPO, env=SUB_ENV, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        d = Deadline(60)
        line = read_line(p.stderr.fileno(), d)
        assert f"Listening on {path} as 3.".encode() in line, line
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(60)
            c.connect(path)             # systemd-socket-activate execs the subreaper now
            info = json.loads(c.makefile("rb").readline())
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
        p.stderr.close()
    assert info["ppid"] == p.pid != info["pid"]      # the command, under the subreaper
    assert info["LISTEN_PID"] == str(info["pid"])    # its own pid, not the subreaper's
    assert info["LISTEN_FDS"] == "1" and info["LISTEN_FDNAMES"] == "vibatch-test"
    assert info["listening"] == 1 and info["name"] == path   # fd 3: the socket we connected to


# the launcher: makes fds 3.. as asked, gives itself LISTEN_PID and becomes the subreaper
# (exec keeps the pid), as systemd's socket activation does
LAUNCHER = r"""
import json, os, sys
nfds, listen, argv = json.loads(sys.argv[1])
os.closerange(3, 64)
for fd in range(3, 3 + nfds):
    os.dup2(0, fd)
env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
env.update(listen, LISTEN_PID=str(os.getpid()))
os.execve(sys.executable, [sys.executable, "-m", "vibatch.subreaper", "--service", *argv], env)
"""

# the command: what it was given
ENV_CHILD = r"""
import json, os
print(json.dumps({"pid": os.getpid(), "env": {k: v for k, v in os.environ.items()
                                              if k.startswith("LISTEN_") or k == "VBT"},
                  "open": [fd for fd in range(3, 8) if os.path.exists(f"/proc/self/fd/{fd}")]}))
"""


def launch(nfds, listen, argv):
    import json
    return subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps([nfds, listen, argv])],
                          cwd=REPO, env={**SUB_ENV, "VBT": "kept"}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def test_service_passes_two_descriptors_and_their_names_on():
    import json
    p = launch(2, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, [sys.executable, "-c", ENV_CHILD])
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["env"] == {"LISTEN_PID": str(info["pid"]), "LISTEN_FDS": "2",
                           "LISTEN_FDNAMES": "a:b", "VBT": "kept"}
    assert info["open"][:2] == [3, 4] and 5 not in info["open"]


def test_service_refuses_socket_activation_that_does_not_hold_together(tmp_path):
    ran = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    for nfds, listen, what in [
            (1, {"LISTEN_FDS": "x"}, "LISTEN_FDS='x' is not a number"),
            (1, {"LISTEN_FDS": "0"}, "LISTEN_FDS='0' is not a number"),
            (1, {}, "LISTEN_FDS='' is not a number"),
            (1, {"LISTEN_FDS": "65"}, "LISTEN_FDS='65' is not a number"),
            (1, {"LISTEN_FDS": "2"}, "descriptor 4 of LISTEN_FDS=2 is not open"),
            (2, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a"},
             "LISTEN_FDNAMES='a' does not name LISTEN_FDS=2 descriptors")]:
        p = launch(nfds, listen, cmd)
        assert p.returncode == 1 and f"socket activation: {what}" in p.stderr, (listen, p.stderr)
        assert not ran.exists(), listen


def test_service_drops_socket_activation_meant_for_another_process():
    import json
    for listen_pid in ("1", "", "x"):
        p = subprocess.run([*SERVICE, sys.executable, "-c", ENV_CHILD], cwd=REPO,
                           env={**SUB_ENV, "VBT": "kept", "LISTEN_PID": listen_pid,
                                "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"},
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["env"] == {"VBT": "kept"}, listen_pid   # the rest: kept


NOTIFY_CHILD = r"""
import os, socket
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
print(os.getpid())
"""


def test_service_passes_notify_socket_on_and_the_ready_comes_from_the_child(tmp_path):
    """libvirtd sends READY=1 itself: its pid is not the unit's main pid (the subreaper's), so
    systemd takes it only with NotifyAccess=all."""
    import socket
    import struct
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        s.settimeout(60)
        p = subprocess.Popen([*SERVICE, sys.executable, "-c", NOTIFY_CHILD], cwd=REPO,
                             env={**SUB_ENV, "NOTIFY_SOCKET": path}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        msg, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("iII")))
        out, err = p.communicate(timeout=60)
        s.setblocking(False)
        try:
            more = s.recv(4096)
        except BlockingIOError:
            more = None
    assert p.returncode == 0, err
    assert msg == b"READY=1" and more is None       # the child's, and nothing of ours
    creds = [struct.unpack("iII", data[:struct.calcsize("iII")]) for level, kind, data in anc
             if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(creds) == 1
    assert creds[0][0] == int(out) != p.pid          # sent by the child, not the subreaper


# the command: ready once the forwarded signals are blocked; its status names the one it got
SIGNAL_CHILD = r"""
import os, signal, sys
sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
print(os.getpid(), flush=True)
info = signal.sigtimedwait(sigs, 60)
sys.exit(3 if info is None else 100 + info.si_signo)
"""


def test_service_passes_term_int_hup_and_quit_on_and_ends_with_the_childs_status():
    import signal

    from vibatch.util import Deadline
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        p = subprocess.Popen([*SERVICE, sys.executable, "-c", SIGNAL_CHILD], cwd=REPO,
                             env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            child = int(read_line(p.stdout.fileno(), Deadline(60)))
            assert child != p.pid
            os.kill(p.pid, signum)
            assert p.wait(timeout=60) == 100 + signum, signum
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
            p.stdout.close()


def test_service_status_of_a_child_killed_by_a_signal_is_128_plus_it():
    import signal

    from vibatch.util import Deadline
    script = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    p = subprocess.Popen([*SERVICE, sys.executable, "-c", script], cwd=REPO, env=SUB_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        child = int(read_line(p.stdout.fileno(), Deadline(60)))
        os.kill(child, signal.SIGKILL)
        assert p.wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
        p.stdout.close()


def test_service_ends_with_the_command_not_with_what_it_left(tmp_path):
    """Unlike the default mode, --service does not stay for what the command left running
    (systemd waits for its main process at every stop): it ends with the command's status and
    says that what is left goes to PID 1."""
    go = tmp_path / "go"
    script = (f"import os, sys, time\nr, w = os.pipe()\n"
              f"if os.fork() == 0:\n"
              f"    if os.fork() == 0:\n"
              f"        os.write(w, str(os.getpid()).encode()); os.close(w)\n"
              f"        deadline = time.monotonic() + 30\n"
              f"        while not os.path.exists({str(go)!r}) and time.monotonic() < deadline:\n"
              f"            time.sleep(0.01)\n"
              f"        os._exit(0)\n"
              f"    os._exit(0)\n"
              f"os.close(w)\nprint(os.read(r, 64).decode(), flush=True)\nsys.exit(5)\n")
    out, err = tmp_path / "out", tmp_path / "err"
    try:
        with open(out, "w") as o, open(err, "w") as e:   # files: the orphan keeps them open
            p = subprocess.Popen([*SERVICE, sys.executable, "-c", script], cwd=REPO,
                                 env=SUB_ENV, stdout=o, stderr=e)
            assert p.wait(timeout=60) == 5, err.read_text()
        left = int(out.read_text())
        os.kill(left, 0)                                 # still running: not waited for
        assert "the processes it left running now go to PID 1" in err.read_text()
    finally:
        go.touch()


def test_service_goes_with_neither_detach_nor_log():
    for extra in (["--detach"], ["--log", "/tmp/x"], ["--detach", "--log", "/tmp/x"]):
        p = subprocess.run([sys.executable, "-m", "vibatch.subreaper", "--service", *extra,
                            "true"], cwd=REPO, env=SUB_ENV, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, extra
        assert "--service cannot go with --detach or --log" in p.stderr, p.stderr


def test_service_takes_the_command_with_it_when_it_is_sigkilled():
    """A stop that times out makes systemd SIGKILL the main pid only (KillMode=process): the
    command (libvirtd) must not run on outside the unit. Without PR_SET_PDEATHSIG it did."""
    import signal

    from vibatch.util import Deadline
    script = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n"
    p = subprocess.Popen([*SERVICE, sys.executable, "-c", script], cwd=REPO, env=SUB_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        child = int(read_line(p.stdout.fileno(), Deadline(60)))
        p.kill()
        p.wait(timeout=60)
        deadline = Deadline(30)
        while not deadline.expired():
            try:
                with open(f"/proc/{child}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break        # dead, not yet reaped by whoever inherited it
            except FileNotFoundError:
                break
            time.sleep(0.05)         # polling the kernel's state, with a deadline
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("the command ran on after the subreaper was SIGKILLed")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
        p.stdout.close()


def test_a_command_killed_by_a_signal_ends_with_128_plus_it():
    """As a shell says it (and systemd, a CI runner): 143 for SIGTERM, not Python's 241."""
    pid, rc, out, err = run([sys.executable, "-m", "vibatch.subreaper", "sh", "-c",
                             "kill -TERM $$"], cwd=REPO)
    assert rc == 143, (rc, err)
