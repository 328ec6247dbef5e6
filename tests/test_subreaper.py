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
