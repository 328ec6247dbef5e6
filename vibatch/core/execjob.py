"""``vibatch exec``: run a command in the job's VM, as the job's user, from the host.

Runs as the job user: no root, no sudo, no libvirt. It talks to the per-job user agent (a
qemu-guest-agent the prologue started as the job user, on the job's own virtio-serial port,
whose host socket belongs to the job user only), so it cannot reach another job's VM and cannot
become root in its own. Output goes to files in the job's I/O folder, which is shared into the
guest; this process tails them, so lines appear live. See docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import stat
import sys
import time
from typing import Iterator, Optional, Sequence

from .. import safeio
from ..vm.agent import AgentError, SocketAgent
from ..vm.guestsetup import JOB_FEATURES, MACHINE_FEATURES
from ..config import Config
from ..errors import ExecError, NodeError
from .jobdir import JobPaths
from .jobstore import LAST_EXIT, JobInfo
from ..util import Deadline, flock_within

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ENDING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)   # a VM lost after one: its outcome
JOB_ID_VARS = ("VIBATCH_JOB_ID", "SLURM_JOB_ID", "JOB_ID", "PBS_JOBID", "CONDOR_JOB_ID")
LOCK_TIMEOUT_S = 30.0
AGENT_TIMEOUT_S = 30.0
FAST_PHASE_S = 1.0
DROP_EVERY = 1 << 20   # give back the space of copied output each MiB   # keep one agent connection this long: short commands finish in it

# In the guest, as the job user. Outer: become a session (and process-group) leader when setsid
# exists, so a forwarded signal reaches the whole job; setsid does not fork here because the
# agent's child is not a group leader, so the pid the agent reports stays the job's pid.
# ($0 of the outer shell is the inner script; $@ are the inner script's $0 and arguments.)
OUTER = ('if command -v setsid >/dev/null 2>&1; then exec setsid /bin/sh -c "$0" "$@"; fi; '
         'exec /bin/sh -c "$0" "$@"')
# The umask is the forwarder's own: the one the batch system gave the job's process (Slurm:
# the submitter's SLURM_UMASK; Grid Engine: execd's 022; Torque: pbs_mom's 0077), not the 0077
# qemu-ga's daemon start leaves its children with.
INNER = ('out=$1 err=$2 dir=$3 mask=$4; shift 4; umask "$mask" || exit 126; '
         'exec <"/dev/null" >"$out" 2>"$err"; cd "$dir" || exit 126; exec "$@"')
# The same, with the job's stdin streamed from the host (``_Input``): the host appends to the file
# $in, and creates $in.eof at its end. A reader in the guest copies what is new into a FIFO the
# job reads (busybox sh, stat, tail, head, mkfifo, mktemp: what every guest has), polling every
# 50 ms; it stops at $in.eof once it has copied everything, or when the job has ended.
INNER_INPUT = (
    'out=$1 err=$2 dir=$3 mask=$4 in=$5; shift 5; umask "$mask" || exit 126; '
    'exec >"$out" 2>"$err"; cd "$dir" || exit 126; '
    'f=$(mktemp -u "${TMPDIR:-/tmp}/.vibatch-in.XXXXXX") && mkfifo -m 600 "$f" || exit 126; '
    '{ pos=0; while :; do n=$(stat -c %s "$in" 2>/dev/null || echo 0); '
    'if [ "$n" -gt "$pos" ]; then tail -c +$((pos+1)) "$in" | head -c $((n-pos)); pos=$n; '
    'elif [ -e "$in.eof" ]; then n=$(stat -c %s "$in"); '
    '[ "$n" -gt "$pos" ] && tail -c +$((pos+1)) "$in"; break; '
    'else sleep 0.05; fi; done; } >"$f" & r=$!; '
    '"$@" <"$f"; rc=$?; kill $r 2>/dev/null; rm -f "$f"; exit $rc')
# Signal the job's process group when the job leads one (setsid ran), else the job alone. The
# choice is made from /proc, not from kill's exit status: busybox's kill delivers
# `kill -s SIG -- -PGID` but reports failure, and a fallback on that status signalled twice.
# (dash refuses the form without "--"; bash, dash and busybox all deliver the form with it.)
# The group id is the third field after the ")" closing the command name, which may hold spaces.
KILL = ('sig=$1 pid=$2; st=$(cat "/proc/$pid/stat" 2>/dev/null) || st=""; set -- ${st##*) }; '
        'if [ "${3:-}" = "$pid" ]; then kill -s "$sig" -- "-$pid" 2>/dev/null; '
        'else kill -s "$sig" "$pid"; fi')


def current_umask() -> int:
    """This process's umask (there is no call that reads it without setting it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def find_job_id(explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    for var in JOB_ID_VARS:
        if os.environ.get(var):
            return os.environ[var]
    raise ExecError("vibatch exec: no job id: use --job or set VIBATCH_JOB_ID")


def guest_env(environ: dict, exclude: Sequence[str], guest_path: str, cwd: str,
              job_id: str, tmpdir: str = "", path_first: str = "") -> list[str]:
    """The job's environment minus what only makes sense on the host; ``tmpdir``: the job's
    scratch disk in the guest, its $TMPDIR; ``path_first``: a guest folder put first on PATH."""
    skip = set(exclude)
    env = {k: v for k, v in environ.items()
           if k not in skip and "=" not in k and "\0" not in k + v}
    path = [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(([path_first] if path_first else []) + path +
                           [p for p in guest_path.split(":") if p not in path])
    env["PWD"] = cwd
    env["VIBATCH_JOB_ID"] = job_id
    # HEPiX Machine/Job Features, made by the guest's setup (core/features.py)
    env["MACHINEFEATURES"], env["JOBFEATURES"] = MACHINE_FEATURES, JOB_FEATURES
    if tmpdir:
        env["TMPDIR"] = tmpdir
    return [f"{k}={v}" for k, v in sorted(env.items())]


class _Stream:
    """A file the guest writes into through the shared I/O folder, copied to ``sink`` live."""

    def __init__(self, path: str, sink, owner: tuple[int, int]):
        self.path, self.sink = path, sink
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        if os.getuid() == 0:  # root running a job (vibatch run): the job user must write it
            os.fchown(fd, *owner)
        self.f = os.fdopen(fd, "rb", buffering=0)
        self.pos = self.dropped = 0

    def pump(self) -> int:
        n = 0
        while chunk := self.f.read(1 << 16):
            self.sink.write(chunk)
            n += len(chunk)
        if n:
            self.sink.flush()
            self.pos += n
            if self.pos - self.dropped >= DROP_EVERY and safeio.drop_read(self.f.fileno(), self.pos):
                self.dropped = self.pos   # the I/O folder is capped: keep only the backlog
        return n

    def close(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _Input:
    """The host's stdin (a terminal of ``srun --pty``, or a pipe from srun), appended to a file
    in the job's I/O folder as it comes, for INNER_INPUT in the guest; ``path.eof`` at its end."""

    def __init__(self, path: str, source: int, owner: tuple[int, int]):
        self.path, self.source = path, source
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        if os.getuid() == 0:
            os.fchown(fd, *owner)
        self.f = os.fdopen(fd, "wb", buffering=0)
        self.ended = False

    def pump(self) -> int:
        """Copy what is ready (never waiting; the source is left blocking, since a terminal's
        stdin shares its file description with the job's stdout)."""
        n = 0
        while not self.ended and select.select([self.source], [], [], 0)[0]:
            try:
                chunk = os.read(self.source, 1 << 16)
            except OSError:     # a terminal hung up (EIO)
                chunk = b""
            if not chunk:
                self.end()
                break
            self.f.write(chunk)
            n += len(chunk)
        return n

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            with contextlib.suppress(OSError):
                os.close(os.open(self.path + ".eof", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW,
                                 0o600))

    def close(self) -> None:
        self.f.close()
        for path in (self.path, self.path + ".eof"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def streams_input(fd: int = 0) -> bool:
    """Whether ``fd`` carries input for the job: anything but /dev/null (or nothing)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    null = os.stat(os.devnull)
    return not (stat.S_ISCHR(st.st_mode) and st.st_rdev == null.st_rdev)


def _full(path: str) -> bool:
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


class Exec:
    def __init__(self, cfg: Config, job_id: str):
        self.cfg = cfg
        self.paths = JobPaths.of(cfg, job_id)
        try:
            info = JobInfo.read(self.paths)
        except NodeError as e:
            raise ExecError(f"vibatch exec: job {job_id}: {e}") from None
        if info is None:
            raise ExecError(f"vibatch exec: job {job_id} has no running VM on this node")
        if os.getuid() not in (0, info.uid):
            raise ExecError(f"vibatch exec: job {job_id} belongs to another user")
        self.info = info
        self.lock_path = os.path.join(info.io_host, ".lock")
        self.agent = SocketAgent(self.paths.socket, lock=self._lock)
        self.pending: list[int] = []
        self.ending: Optional[int] = None   # a forwarded signal that ends jobs (ENDING)
        self.input: Optional[_Input] = None
        self.relay = None   # serves the guest's requests while a command runs (poll, guest_bin)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise agent transactions of concurrent ``vibatch exec`` of this job."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if os.getuid() == 0:   # root made it (vibatch run, image test): the job user needs it too
            os.fchown(fd, self.info.uid, self.info.gid)
        try:
            if not flock_within(fd, LOCK_TIMEOUT_S):
                raise ExecError("vibatch exec: the job's agent stayed busy for "
                                f"{LOCK_TIMEOUT_S:g} s")
            yield
        finally:
            os.close(fd)

    def cwd(self) -> str:
        wd = self.info.workdir
        try:
            here = os.getcwd()
        except OSError:
            return wd
        return here if here == wd or here.startswith(wd.rstrip("/") + "/") else wd

    def run(self, argv: Sequence[str], stdout=None, stderr=None,
            environ: Optional[dict] = None, stdin: Optional[int] = None) -> int:
        """Run ``argv`` in the guest; its output goes to ``stdout``/``stderr`` (binary files,
        default: ours) as it is written; ``stdin``: a descriptor whose input is streamed to it
        (default: none, it reads /dev/null). Returns the wait status in the shell's
        convention."""
        token = f"{os.getpid()}-{secrets.token_hex(4)}"
        io_host, io_guest = self.info.io_host, self.info.io_guest
        owner = (self.info.uid, self.info.gid)
        out = _Stream(os.path.join(io_host, token + ".out"), stdout or sys.stdout.buffer, owner)
        err = _Stream(os.path.join(io_host, token + ".err"), stderr or sys.stderr.buffer, owner)
        self.input = None if stdin is None else \
            _Input(os.path.join(io_host, token + ".in"), stdin, owner)
        old = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        try:
            cwd = self.cwd()
            env = guest_env(dict(os.environ if environ is None else environ),
                            self.cfg.exec.env_exclude, self.cfg.exec.guest_path,
                            cwd, self.paths.job_id, self.info.tmpdir,
                            path_first=self.relay.guest_bin if self.relay else "")
            inner, given = (INNER, []) if self.input is None else \
                (INNER_INPUT, [f"{io_guest}/{token}.in"])
            args = ["-c", OUTER, inner, "vibatch-job", f"{io_guest}/{token}.out",
                    f"{io_guest}/{token}.err", cwd, f"{current_umask():04o}", *given, *argv]
            with self.agent.session(AGENT_TIMEOUT_S):
                pid = self.agent.exec_start("/bin/sh", args, env=env, timeout=AGENT_TIMEOUT_S)
                status = self._follow(pid, out, err, Deadline(FAST_PHASE_S))
            if status is None:  # a longer command: poll in short transactions, sharing the agent
                status = self._follow(pid, out, err)
        except AgentError as e:
            if self.ending is None:
                raise ExecError(f"vibatch exec: {e}") from None
            # the batch system ends the VM along with the job (Slurm's extern step: QEMU in
            # it dies when it ends); that is the signal's outcome, not a node fault
            name = signal.Signals(self.ending).name
            print(f"vibatch exec: the job's VM ended after {name} ({e})", file=sys.stderr)
            status = 128 + self.ending
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            out.pump(), err.pump()
            out.close(), err.close()
            if self.input is not None:
                self.input.close()
                self.input = None
        self._record(status)
        if status != 0 and _full(io_host):   # the job's own stderr could not say so
            print(f"vibatch exec: the job's I/O folder ({io_guest} in the guest) is full: "
                  "output written there was cut short", file=sys.stderr)
        return status

    def run_script(self, text: bytes, args: Sequence[str], stdout=None, stderr=None,
                   environ: Optional[dict] = None, interpreter: Optional[str] = None) -> int:
        """Run a job script the guest cannot see (it lives in the batch system's spool on the
        host): its text goes into the job's I/O folder for the run, and the guest runs it with
        ``args`` as its arguments, by ``interpreter`` or else by its own ``#!`` line."""
        name = f"{os.getpid()}-{secrets.token_hex(4)}.job"
        host = os.path.join(self.info.io_host, name)
        fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        try:
            with os.fdopen(fd, "wb") as f:
                if os.getuid() == 0:
                    os.fchown(f.fileno(), self.info.uid, self.info.gid)
                f.write(text)
            guest = f"{self.info.io_guest}/{name}"
            argv = [interpreter, guest, *args] if interpreter else [guest, *args]
            return self.run(argv, stdout, stderr, environ)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(host)

    def _on_signal(self, signum: int, _frame) -> None:
        self.pending.append(signum)
        if signum in ENDING:
            self.ending = signum

    def _follow(self, pid: int, out: _Stream, err: _Stream,
                until: Optional[Deadline] = None) -> Optional[int]:
        """The command's wait status; None if ``until`` passes first."""
        interval = 0.002
        while True:
            while self.pending:
                self._forward(pid, self.pending.pop(0))
            moved = out.pump() + err.pump()
            if self.input is not None:
                moved += self.input.pump()
            if self.relay is not None:
                self.relay.poll()
            st = self.agent.exec_status(pid, timeout=AGENT_TIMEOUT_S)
            if st.exited:
                return st.wait_status
            if until is not None and until.expired():
                return None
            interval = 0.002 if moved else min(interval * 2, 0.05)
            time.sleep(interval)

    def _forward(self, pid: int, signum: int) -> None:
        name = signal.Signals(signum).name[3:]
        self.agent.exec_start("/bin/sh", ["-c", KILL, "vibatch-kill", name, str(pid)],
                              timeout=AGENT_TIMEOUT_S)

    def _record(self, status: int) -> None:
        """Leave the last exit status where the epilogue can account for it."""
        path = os.path.join(self.info.io_host, LAST_EXIT)
        with contextlib.suppress(OSError):
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{status}\n")
            os.replace(path + ".tmp", path)
