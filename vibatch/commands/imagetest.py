"""``vibatch image test NAME``: boot an image as a job would and check what jobs rely on.

Admins run it before endorsing an image. Each check passes or fails with a reason; the VM, its
overlay, its slot and the scratch working directory are removed whatever happens.
"""
from __future__ import annotations

import io
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..vm import hypervisor, network
from ..core import lifecycle
from ..errors import VibatchError
from ..core.execjob import Exec
from ..core.jobdir import JobPaths
from ..images.library import Image
from ..core.request import make_request, resolve_user
from ..core.jobstore import JobState

SIGNAL_WAIT_S = 30.0
MEMORY_FLOOR = 0.80    # the guest kernel keeps some memory for itself
SCRATCH_PARENT = "/var/tmp"
SHELLS = ("sh", "ash", "bash", "dash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish", "busybox")
# As the job user: each way to root that works prints one line. su gets no terminal and no
# password: it succeeds only where root's password is empty (or PAM lets anyone in).
ROOT_PATHS = r"""
to=; command -v timeout >/dev/null 2>&1 && to="timeout 10"
if command -v sudo >/dev/null 2>&1 && $to sudo -n true </dev/null >/dev/null 2>&1; then
  echo "sudo -n works"
fi
awk -F: '$1 == "root" && $2 == "" { print "root has an empty password in /etc/passwd" }' /etc/passwd
if command -v su >/dev/null 2>&1; then
  [ "$($to su root -c 'id -u' </dev/null 2>/dev/null)" = 0 ] && echo "su to root without a password works"
fi
shells=" SHELLS "
for f in $(find / /usr /opt -xdev -type f -perm -4000 -user 0 2>/dev/null | sort -u); do
  case "$shells" in *" ${f##*/} "*) echo "setuid-root shell $f" ;; esac
done
true
"""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False   # passed, but the site should know (never fails the test)


@dataclass
class Result:
    image: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str, warning: bool = False) -> Check:
        c = Check(name, ok, detail, warning)
        self.checks.append(c)
        return c


class _Guest:
    """Runs commands in the test job's VM as the job user, capturing their output."""

    def __init__(self, node: lifecycle.Node, job_id: str):
        self.ex = Exec(node.cfg, job_id)

    def sh(self, script: str) -> tuple[int, str, str]:
        out, err = io.BytesIO(), io.BytesIO()
        status = self.ex.run(["/bin/sh", "-c", script], stdout=out, stderr=err,
                             environ={"PATH": "/usr/bin:/bin", "LANG": "C"})
        return status, out.getvalue().decode(errors="replace"), err.getvalue().decode(errors="replace")


def run(node: lifecycle.Node, image: Image, *, user: str = "nobody", cores: int = 1,
        memory_mb: Optional[int] = None, report: Callable[[Check], None] = lambda c: None) -> Result:
    cfg = node.cfg
    memory_mb = memory_mb or cfg.jobs.default_memory_mb
    juser = resolve_user(user)
    result = Result(image.name)

    def check(name: str, fn: Callable[[], tuple[bool, str]], warn_only: bool = False) -> bool:
        try:
            ok, detail = fn()
        except VibatchError as e:
            tail = "\n".join("      | " + line for line in e.detail.splitlines()[-8:])
            ok, detail = False, f"{type(e).__name__}: {e}" + (f"\n{tail}" if tail else "")
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        report(result.add(name, ok or warn_only, detail, warning=warn_only and not ok))
        return ok

    # the scratch working directory must be reachable by the job user through every parent
    # (the prologue checks with the user's own credentials): /var/tmp, not the state directory
    work = tempfile.mkdtemp(prefix="vibatch-imagetest-", dir=SCRATCH_PARENT)
    os.chown(work, juser.uid, juser.gid)
    job_id = f"imagetest-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        req = make_request(job_id=job_id, user=juser.name, cores=cores, memory_mb=memory_mb,
                           image=image.name, workdir=work)
        booted: list = []

        def boot() -> tuple[bool, str]:
            booted.append(lifecycle.prologue(node, req, image=image, cold=True))  # the image boots
            ph = booted[0].phases
            return True, (f"answered {ph['boot']:.2f} s after start (limit "
                          f"{cfg.vm.boot_timeout_s:g} s, {booted[0].accel})")

        if check("agent answers within the boot timeout", boot):
            _in_guest(node, job_id, juser, work, cores, memory_mb, booted[0], check)
    finally:
        lifecycle.epilogue(node, job_id, None)
        shutil.rmtree(work, ignore_errors=True)
    check("nothing left behind", lambda: _clean(node, job_id))
    return result


def _in_guest(node: lifecycle.Node, job_id: str, juser, work: str, cores: int, memory_mb: int,
              state: JobState, check: Callable) -> None:
    cfg = node.cfg
    guest = _Guest(node, job_id)
    check("job user has the job's uid/gid and is not root", lambda: _user(guest, juser))
    check("working directory shared read-write, files keep the job's uid",
          lambda: _workdir(guest, work, juser))
    check(f"guest sees {cores} core(s) and {memory_mb} MiB",
          lambda: _resources(guest, cores, memory_mb))
    check("exit codes come through", lambda: _exit_codes(guest))
    check("Machine/Job Features give the job's allocation",
          lambda: _features(guest, job_id, cores, memory_mb))
    check("signals reach the job", lambda: _signals(cfg.source, job_id, juser))
    check(f"network matches policy ({cfg.vm.network})",
          lambda: _network(guest, cfg.vm.network, network.guest_net(cfg, cfg.vm.network,
                                                                    state.cpus)))
    total = sum(state.phases.values())
    limit = cfg.vm.boot_timeout_s + cfg.vm.setup_timeout_s
    check("the job user cannot become root in the image", lambda: _root_paths(guest),
          warn_only=True)
    check("time to ready", lambda: (total <= limit, f"{total:.2f} s from claim to ready ("
                                    + ", ".join(f"{k} {v:.2f}" for k, v in state.phases.items())
                                    + ")"))


def _features(guest: _Guest, job_id: str, cores: int, memory_mb: int) -> tuple[bool, str]:
    st, out, err = guest.sh('cat "$JOBFEATURES/job_id" "$JOBFEATURES/allocated_cpu" '
                            '"$JOBFEATURES/mem_limit_MB" "$MACHINEFEATURES/total_cpu"')
    if st != 0:
        return False, f"cannot read them ({st}): {err.strip()}"
    got = out.split()
    ok = got[:3] == [job_id, str(cores), str(memory_mb)] and len(got) == 4
    return ok, (f"$JOBFEATURES: job_id {got[0] if got else '?'}, allocated_cpu "
                f"{got[1] if len(got) > 1 else '?'}, mem_limit_MB {got[2] if len(got) > 2 else '?'}"
                f"; $MACHINEFEATURES: total_cpu {got[3] if len(got) > 3 else '?'}")


def _user(guest: _Guest, juser) -> tuple[bool, str]:
    st, out, err = guest.sh("id -u; id -g; id -un")
    if st != 0:
        return False, f"id failed ({st}): {err.strip()}"
    uid, gid, name = out.split()[:3]
    ok = int(uid) == juser.uid and int(gid) == juser.gid and int(uid) != 0 and name == juser.name
    return ok, f"guest: {name} {uid}/{gid}; host: {juser.name} {juser.uid}/{juser.gid}"


def _workdir(guest: _Guest, work: str, juser) -> tuple[bool, str]:
    token = secrets.token_hex(8)
    host_file = os.path.join(work, "from-host")
    fd = os.open(host_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chown(host_file, juser.uid, juser.gid)
    st, out, err = guest.sh(f'cd "{work}" && cat from-host && echo "{token}" > from-guest && '
                            "rm from-host && pwd")
    if st != 0:
        return False, f"in the guest ({st}): {err.strip()}"
    lines = out.split()
    if not lines or lines[0] != token:
        return False, "the guest did not see the host's file"
    gpath = os.path.join(work, "from-guest")
    if not os.path.exists(gpath):
        return False, "the guest's file did not appear on the host"
    s = os.stat(gpath)
    with open(gpath) as f:
        same = f.read().strip() == token
    gone = not os.path.exists(host_file)
    ok = same and gone and (s.st_uid, s.st_gid) == (juser.uid, juser.gid) and lines[-1] == work
    return ok, (f"guest cwd {lines[-1]}; guest file owned {s.st_uid}/{s.st_gid} on the host "
                f"(job {juser.uid}/{juser.gid}); content {'same' if same else 'differs'}; "
                f"host file {'removed' if gone else 'still there'} by the guest")


def _root_paths(guest: _Guest) -> tuple[bool, str]:
    """sudo -n, su with an empty password, setuid-root shells. Not a host risk (the shares are
    served as the job user), but the job is then not confined to its user inside the VM."""
    st, out, err = guest.sh(ROOT_PATHS.replace("SHELLS", " ".join(SHELLS)))
    if st != 0:
        raise ValueError(f"the check did not run ({st}): {err.strip()}")
    found = [line.strip() for line in out.splitlines() if line.strip()]
    if found:
        return False, ("the job user can become root: " + "; ".join(found) + " (no host risk: "
                       "the shares are served as the job user; but nothing confines the job to "
                       "its user inside the VM)")
    return True, "no sudo -n, no password-less su, no setuid-root shell"


def _resources(guest: _Guest, cores: int, memory_mb: int) -> tuple[bool, str]:
    st, out, err = guest.sh("grep -c ^processor /proc/cpuinfo; "
                            "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
    if st != 0:
        return False, f"({st}) {err.strip()}"
    cpus, kib = (int(x) for x in out.split()[:2])
    mib = kib / 1024
    ok = cpus == cores and MEMORY_FLOOR * memory_mb <= mib <= memory_mb
    return ok, f"{cpus} CPU(s), MemTotal {mib:.0f} MiB"


def _exit_codes(guest: _Guest) -> tuple[bool, str]:
    got = {code: guest.sh(f"exit {code}")[0] for code in (0, 7, 255)}
    killed = guest.sh("kill -KILL $$")[0]
    ok = all(k == v for k, v in got.items()) and killed == 128 + signal.SIGKILL
    return ok, f"exit 0/7/255 -> {got[0]}/{got[7]}/{got[255]}; SIGKILL -> {killed}"


def _signals(config_path: str, job_id: str, juser) -> tuple[bool, str]:
    """`vibatch exec` as the job user, then SIGTERM to it, as a batch system would send."""
    argv = [sys.executable, "-m", "vibatch", "--config", config_path, "exec", "--job", job_id,
            "--", "/bin/sh", "-c", "trap 'echo got-TERM; exit 42' TERM; echo ready; "
            "while :; do sleep 1; done"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            user=juser.uid, group=juser.gid, extra_groups=[], cwd="/",
                            env={"PATH": "/usr/bin:/bin", "VIBATCH_JOB_ID": job_id})
    try:
        line = _read_line(proc, SIGNAL_WAIT_S)
        if line != "ready":
            proc.kill()
            _, err = proc.communicate(timeout=SIGNAL_WAIT_S)
            return False, (f"the job did not start (got {line!r}; "
                           f"{err.decode(errors='replace').strip()[-300:]})")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=SIGNAL_WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    ok = proc.returncode == 42 and "got-TERM" in text
    return ok, f"SIGTERM -> trap ran: {'yes' if 'got-TERM' in text else 'no'}, exit {proc.returncode}"


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    end = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").split("\n")[0].strip()


def _network(guest: _Guest, mode: str, want: Optional[network.GuestNet]) -> tuple[bool, str]:
    """none: no interface but lo; user and nat: the interface vibatch configured, with its
    address and default route; bridge: an interface (the site's DHCP configures it)."""
    st, out, err = guest.sh("ls /sys/class/net")
    if st != 0:
        return False, f"({st}) {err.strip()}"
    nics = [n for n in out.split() if n != "lo"]
    if mode == "none" or not nics or want is None:
        ok = not nics if mode == "none" else bool(nics)
        return ok, f"interfaces besides lo: {', '.join(nics) or 'none'}"
    st, out, err = guest.sh("ip -4 -o addr show; ip route show default")
    seen = " ".join(out.split())
    ok = st == 0 and f"inet {want.address}" in seen and f"default via {want.gateway}" in seen
    return ok, (f"{', '.join(nics)}: {want.address} via {want.gateway}" if ok
                else f"expected {want.address} via {want.gateway}; the guest has: {seen or err}")


def _clean(node: lifecycle.Node, job_id: str) -> tuple[bool, str]:
    paths = JobPaths.of(node.cfg, job_id)
    left = []
    if hypervisor.lookup(node.conn, paths.domain) is not None:
        left.append(f"domain {paths.domain}")
    if paths.exists():
        left.append("job directories")
    if job_id in node.slots.all():
        left.append("slot")
    return not left, ", ".join(left) or "no domain, job directory or slot"
