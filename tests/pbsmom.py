"""A contract harness for Torque's pbs_mom: it calls the shipped hooks exactly as a real pbs_mom
6.1 (built from source, run as a single node) was seen calling them, and applies pbs_mom's rules
to their results. See docs/batch/torque.md, "The contract, as observed".

- prologue and epilogue: root, but with the job user's supplementary groups; umask 0077 (the
  epilogue 0022); cwd ``$PBS_HOME/mom_priv``; the environment of ``$PBS_HOME/pbs_environment``
  plus ``PBS_*`` variables; stdin /dev/null; stdout/stderr appended to the job's ``.OU``/``.ER``
  spool files; a new session with SIGPIPE ignored (one session also saw SIGINT blocked and
  SIGQUIT ignored, as pbs_mom itself had them: the harness applies all three); at
  ``$prologalarm`` - 10 s the whole session gets SIGKILL (no SIGTERM first). Argv: 8 for the
  prologue, 11 for the epilogue.
- ``$job_starter``: the job user (uid, gid, supplementary groups), umask 0077, cwd the home,
  the job's environment, argv ``[job_starter, <login shell>]``, stdin a pipe carrying
  ``<$PBS_HOME/mom_priv/jobs/<id>.SC>[ <qsub -F args>]\\n`` (the script is the user's, 0700).
- an array task ``8[1].srv``: the hooks get that id; its files are named ``8-1.srv``
  (``.SC``, ``.OU``, ``.ER``), and its environment has ``PBS_ARRAYID=1``.
- the rules: prologue 0 runs the job; 1 aborts it (exit_status -2) and **the spool files are
  never copied to the user**; anything else, or the kill, is exit_status -14 and the job is
  **run again at once on the same node** (unless the node went offline meanwhile). The
  epilogue runs after every prologue, a failed one too (argv 5 session id 0, argv 10 -2 or
  -14). The job's exit_status is the starter's exit code, or 256 + N after signal N. qdel is
  SIGTERM to the job's session. ``qsig -s suspend`` is SIGTSTP to the job starter, then
  (5 s later) SIGSTOP to the job's session; ``-s resume`` SIGCONT (seen on 6.1.3.h5).
- its TM port (``TmPort``, the manager port pbs_mom serves TM requests on): ``TM_ADOPT_JOBID``
  from a local address is taken for a running job whatever the caller's uid (0, or 999 for a
  job it does not run; the real one also takes a job still in its prologue, and marks it
  running: the harness refuses that, as vibatch must not do it); an adopted session whose leader (pid = sid) is gone is marked exited at
  once and never signalled (not by qdel, qsig or the job's end), but its processes are still
  counted; a session with a live leader is a running task, signalled with the job's own
  (kill_job signals every running task; from the source). ``resources_used`` counts the
  processes of the job's sessions whose parent is not PID 1 (``mom_get_sample``: seen, a
  stand-in re-parented to PID 1 was never counted, its twin under a subreaper was: 9 s, 331
  MiB), sampled at each adoption and at the job's end: cput = utime+stime+cutime+cstime,
  mem = RSS, vmem = the address space, each the largest sum seen.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

PBS_ENVIRONMENT = {"PATH": "/bin:/usr/bin", "LANG": "C.UTF-8"}
PROLOGUE_ABORT = -2     # JOB_EXEC_FAIL2
PROLOGUE_RETRY = -14    # JOB_EXEC_RETRY_PROLOGUE
SIG_BASE = 256


@dataclass
class Job:
    job_id: str
    user: str
    nodes: str = "1:ppn=1"            # -l nodes=...
    walltime: str = "00:10:00"
    mem: str = ""                     # -l mem=...
    script: str = "true\n"
    args: str = ""                    # qsub -F "..."
    queue: str = "batch"
    account: str = ""
    name: str = "job.sh"

    @property
    def file_prefix(self) -> str:
        """What pbs_mom names the job's files by (its ``hashname``): an array task ``8[1].srv``
        has ``mom_priv/jobs/8-1.srv.SC`` and ``spool/8-1.srv.OU``."""
        return re.sub(r"\[(\d+)\]", r"-\1", self.job_id)

    @property
    def array_id(self) -> str:
        """``PBS_ARRAYID`` in an array task's environment ("" for a plain job)."""
        m = re.search(r"\[(\d+)\]", self.job_id)
        return m.group(1) if m else ""

    @property
    def resources(self) -> str:
        """argv 5 as pbs_mom 6.1 passed it for ``-l nodes=N,walltime=W,mem=M``: the user's
        list in the user's order, then ``neednodes``."""
        mem = f",mem={self.mem}" if self.mem else ""
        return f"nodes={self.nodes},walltime={self.walltime}{mem},neednodes={self.nodes}"


@dataclass
class Result:
    exit_status: int
    runs: int                          # how often the prologue ran (1 + hot requeues)
    out: Optional[str]                 # the user's -o file; None: pbs_mom never copied it
    err: Optional[str]
    spool_err: str                     # what the .ER spool file held at the end of the last run
    prologue_starts: list = field(default_factory=list)   # monotonic times
    resources_used: dict = field(default_factory=dict)    # cput_s, mem_kb, vmem_kb
    adopted: list = field(default_factory=list)           # Adopted, in the order they came


# -- the TM port: adoption and the collector ------------------------------------------------
TM_PROTOCOL, TM_PROTOCOL_VER, TM_ADOPT_JOBID, TM_OKAY, TM_ERROR = 5, 2, 114, 0, 999


@dataclass
class Adopted:
    job_id: str
    sid: int
    pid: int
    comm: str
    ppid: int
    running: bool          # the session had a live leader: pbs_mom signals it with the job


def _stat(pid: int) -> Optional[list[str]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _dis_read_int(f) -> int:
    count = 1
    while True:
        c = f.read(1)
        if c in (b"+", b"-"):
            v = int(f.read(count))
            return -v if c == b"-" else v
        if not c or not c.isdigit():
            raise ValueError(f"not a DIS integer: {c!r}")
        count = int(c + f.read(count - 1))


def _dis_read_str(f) -> bytes:
    return f.read(_dis_read_int(f))


def _dis_int(v: int) -> bytes:
    digits = str(abs(v))
    out, n = ("-" if v < 0 else "+") + digits, len(digits)
    while n > 1:
        out, n = str(n) + out, len(str(n))
    return out.encode()


class TmPort:
    """pbs_mom's TM port, for TM_ADOPT_JOBID only (what vibatch sends), as the real one took it
    (mom_comm.c tm_request/adoptSession; seen on 6.1.3.h5)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.running_job: Optional[str] = None
        self.adopted: list[Adopted] = []
        self.refused: list[tuple[str, int]] = []
        self.used = {"cput_s": 0.0, "mem_kb": 0, "vmem_kb": 0}
        self.job_sids: set[int] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                try:
                    self._request(conn)
                except (OSError, ValueError):
                    continue

    def _request(self, conn: socket.socket) -> None:
        f = conn.makefile("rb")
        proto, ver = _dis_read_int(f), _dis_read_int(f)
        _job, cookie = _dis_read_str(f).decode(), _dis_read_str(f)
        command, _event, _task = _dis_read_int(f), _dis_read_int(f), _dis_read_int(f)
        if (proto, ver, command) != (TM_PROTOCOL, TM_PROTOCOL_VER, TM_ADOPT_JOBID):
            raise ValueError(f"not a TM adoption: {(proto, ver, command)}")
        sid, pid, target = _dis_read_int(f), _dis_read_int(f), _dis_read_str(f).decode()
        with self.lock:
            ok = target == self.running_job and cookie == b"ADOPT COOKIE"
            if ok:
                fields = _stat(pid) or ["?", "0"]
                try:
                    with open(f"/proc/{pid}/comm") as c:
                        comm = c.read().strip()
                except OSError:
                    comm = ""
                self.adopted.append(Adopted(target, sid, pid, comm, int(fields[1]),
                                            _stat(sid) is not None))
                self.job_sids.add(sid)
                self._sample()
            else:
                self.refused.append((target, sid))
        conn.sendall(_dis_int(TM_OKAY if ok else TM_ERROR))

    def _sample(self) -> None:
        """mom_get_sample + mom_set_use: the job's sessions, parents other than PID 1."""
        tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        cput = mem = vmem = 0
        for name in os.listdir("/proc"):
            fields = _stat(int(name)) if name.isdigit() else None
            if not fields or int(fields[3]) not in self.job_sids:
                continue
            if int(name) < 2 or int(fields[1]) < 2 or int(fields[3]) < 2:
                continue
            cput += sum(int(x) for x in fields[11:15])    # utime stime cutime cstime
            vmem += int(fields[20])
            mem += int(fields[21]) * page
        self.used = {"cput_s": max(self.used["cput_s"], cput / tick),
                     "mem_kb": max(self.used["mem_kb"], mem >> 10),
                     "vmem_kb": max(self.used["vmem_kb"], vmem >> 10)}

    def start(self, job_id: str) -> None:
        """pbs_mom starts the job (state RUNNING), then its first task."""
        with self.lock:
            self.running_job, self.job_sids = job_id, set()
            self.adopted, self.used = [], {"cput_s": 0.0, "mem_kb": 0, "vmem_kb": 0}

    def add_session(self, sid: int) -> None:
        with self.lock:
            self.job_sids.add(sid)

    def end(self) -> tuple[dict, list]:
        """The job's last sample, when its first task ended (before the epilogue)."""
        with self.lock:
            self._sample()
            self.running_job = None
            return dict(self.used), list(self.adopted)

    def running_sessions(self) -> list[int]:
        """The adopted sessions pbs_mom still signals with the job (a live leader)."""
        with self.lock:
            return [a.sid for a in self.adopted if a.running]

    def close(self) -> None:
        self.sock.close()


class PbsMom:
    def __init__(self, home: str, hooks: str, alarm: int = 300,
                 offline_flag: Optional[str] = None, tm: Optional[TmPort] = None):
        self.home, self.hooks, self.alarm = home, hooks, alarm
        self.offline_flag = offline_flag   # the fake pbsnodes creates it on `pbsnodes -o`
        self.tm = tm or TmPort()           # torque.mom_manager_port must name tm.port
        self.mom_priv = os.path.join(home, "mom_priv")
        self.spool = os.path.join(home, "spool")
        for d, mode in ((home, 0o755), (self.mom_priv, 0o751),
                        (os.path.join(self.mom_priv, "jobs"), 0o751), (self.spool, 0o1777)):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, mode)

    # -- how pbs_mom starts its children ------------------------------------------------------
    @staticmethod
    def _groups(user: str) -> list[int]:
        pw = pwd.getpwnam(user)
        return os.getgrouplist(user, pw.pw_gid)

    def _spawn(self, argv: list[str], env: dict, cwd: str, job: Job, stdin=subprocess.DEVNULL,
               as_user: bool = False, umask: int = 0o077) -> subprocess.Popen:
        pw = pwd.getpwnam(job.user)
        groups = self._groups(job.user)

        def child() -> None:
            os.setgroups(groups)          # root hooks too keep the user's supplementary groups
            os.umask(umask)
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
            signal.signal(signal.SIGQUIT, signal.SIG_IGN)
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
            if as_user:
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)

        out = open(self._spool_file(job, "OU"), "ab")
        err = open(self._spool_file(job, "ER"), "ab")
        try:
            return subprocess.Popen(argv, env=env, cwd=cwd, stdin=stdin, stdout=out, stderr=err,
                                    start_new_session=True, preexec_fn=child,
                                    restore_signals=False)
        finally:
            out.close()
            err.close()

    def _spool_file(self, job: Job, kind: str) -> str:
        path = os.path.join(self.spool, f"{job.file_prefix}.{kind}")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            pw = pwd.getpwnam(job.user)
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
            os.close(fd)
        return path

    def _hook_env(self, job: Job) -> dict:
        home = pwd.getpwnam(job.user).pw_dir
        ppn = job.nodes.split("ppn=")[1].split(":")[0] if "ppn=" in job.nodes else "1"
        return {**PBS_ENVIRONMENT, "PBS_MSHOST": os.uname().nodename,
                "PBS_NODEFILE": os.path.join(self.home, "aux", job.job_id),
                "PBS_NODENUM": "0", "PBS_NP": ppn, "PBS_NUM_NODES": "1", "PBS_NUM_PPN": ppn,
                "PBS_O_WORKDIR": home, "PBS_RESOURCE_NODES": job.nodes}

    def script_path(self, job: Job) -> str:
        return os.path.join(self.mom_priv, "jobs", f"{job.file_prefix}.SC")

    def _root_hook(self, hook: str, job: Job, argv: list[str], alarm: int) -> Optional[int]:
        """The hook's exit code, or None if pbs_mom's alarm killed its session."""
        p = self._spawn([os.path.join(self.hooks, hook), *argv], self._hook_env(job),
                        self.mom_priv, job, umask=0o077 if hook == "prologue" else 0o022)
        try:
            return p.wait(timeout=alarm - 10 if alarm > 10 else alarm)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return None

    def prologue(self, job: Job) -> Optional[int]:
        return self._root_hook("prologue", job, [job.job_id, job.user, job.user, job.name,
                                                 job.resources, job.queue, job.account,
                                                 self.script_path(job)], self.alarm)

    def epilogue(self, job: Job, exit_status: int, session: int = 12345) -> Optional[int]:
        return self._root_hook("epilogue", job, [
            job.job_id, job.user, job.user, job.name, str(session), job.resources,
            "cput=00:00:00,vmem=0kb,walltime=00:00:01,mem=0kb,energy_used=0", job.queue,
            job.account, str(exit_status), self.script_path(job)], self.alarm)

    def start_starter(self, job: Job) -> subprocess.Popen:
        """The job's process: ``job_starter <login shell>``, the script's path on stdin."""
        pw = pwd.getpwnam(job.user)
        env = {"HOME": pw.pw_dir, "LOGNAME": job.user, "USER": job.user, "SHELL": pw.pw_shell,
               "PATH": "/bin:/usr/bin", "LANG": "C.UTF-8", "PBS_JOBID": job.job_id,
               "PBS_JOBNAME": job.name, "PBS_QUEUE": job.queue, "PBS_O_WORKDIR": pw.pw_dir,
               "PBS_O_HOME": pw.pw_dir, "PBS_ENVIRONMENT": "PBS_BATCH", "PBS_TASKNUM": "1",
               "PBS_NODENUM": "0", "PBS_VNODENUM": "0", "ENVIRONMENT": "BATCH"}
        if job.array_id:
            env["PBS_ARRAYID"] = job.array_id
        p = self._spawn([os.path.join(self.hooks, "job_starter"), pw.pw_shell], env, pw.pw_dir,
                        job, stdin=subprocess.PIPE, as_user=True)
        line = self.script_path(job) + (f" {job.args}" if job.args else "") + "\n"
        p.stdin.write(line.encode())
        p.stdin.close()
        return p

    @staticmethod
    def exit_status(rc: int) -> int:
        return SIG_BASE - rc if rc < 0 else rc

    # -- one job, start to end, with pbs_mom's rules ------------------------------------------
    def run(self, job: Job, max_runs: int = 6, during=None, timeout: float = 300) -> Result:
        """Queue ``job`` on this node until it ends or the node goes offline; ``during(p)`` is
        called with the running starter (e.g. to qdel it)."""
        pw = pwd.getpwnam(job.user)
        script = self.script_path(job)
        starts: list[float] = []
        try:
            while True:
                self._reset_spool(job)
                with open(script, "w") as f:
                    f.write(job.script)
                os.chown(script, pw.pw_uid, pw.pw_gid)
                os.chmod(script, 0o700)
                starts.append(time.monotonic())
                rc = self.prologue(job)
                if rc == 0:
                    break
                status = PROLOGUE_ABORT if rc == 1 else PROLOGUE_RETRY
                self.epilogue(job, status, session=0)
                if rc == 1 or len(starts) >= max_runs or self.offline():
                    return Result(status, len(starts), None, None, self._read_spool(job, "ER"),
                                  starts)
            self.tm.start(job.job_id)
            p = self.start_starter(job)
            self.tm.add_session(p.pid)
            if during is not None:
                during(p)
            status = self.exit_status(p.wait(timeout=timeout))
            used, adopted = self.tm.end()
            self._signal_adopted(signal.SIGKILL)     # kill_job at the first task's end
            self.epilogue(job, status)
            out, err = self._read_spool(job, "OU"), self._read_spool(job, "ER")
            return Result(status, len(starts), out, err, err, starts, used, adopted)
        finally:
            for path in (script, self._spool_file(job, "OU"), self._spool_file(job, "ER")):
                if os.path.exists(path):
                    os.unlink(path)

    def offline(self) -> bool:
        return self.offline_flag is not None and os.path.exists(self.offline_flag)

    def _signal_adopted(self, sig: int) -> None:
        """kill_task for each adopted task still running: every process of its session."""
        for sid in self.tm.running_sessions():
            for name in os.listdir("/proc"):
                fields = _stat(int(name)) if name.isdigit() else None
                if fields and int(fields[3]) == sid:
                    try:
                        os.kill(int(name), sig)
                    except OSError:
                        pass

    def qdel(self, p: subprocess.Popen) -> None:
        os.killpg(p.pid, signal.SIGTERM)
        self._signal_adopted(signal.SIGTERM)

    SUSPEND_DELAY_S = 5    # pbs_mom's sleep(5) between the SIGTSTP and the SIGSTOPs

    def qsig_suspend(self, p: subprocess.Popen) -> None:
        """``qsig -s suspend``: SIGTSTP to the job's first task, then SIGSTOP to every task's
        session (requests.c resume_suspend; seen on 6.1.3.h5: the job starter in state T within
        a second, the job's state S, QEMU running on)."""
        os.kill(p.pid, signal.SIGTSTP)
        time.sleep(self.SUSPEND_DELAY_S)   # pbs_mom's own delay, not a synchronisation
        os.killpg(p.pid, signal.SIGSTOP)
        self._signal_adopted(signal.SIGSTOP)

    def qsig_resume(self, p: subprocess.Popen) -> None:
        """``qsig -s resume``: SIGCONT to every task's session (seen: the job back in R)."""
        os.killpg(p.pid, signal.SIGCONT)
        self._signal_adopted(signal.SIGCONT)

    def _reset_spool(self, job: Job) -> None:
        for kind in ("OU", "ER"):
            with open(self._spool_file(job, kind), "w"):
                pass

    def _read_spool(self, job: Job, kind: str) -> str:
        with open(self._spool_file(job, kind), errors="replace") as f:
            return f.read()


def fake_pbsnodes(path: str, log: str, flag: str, rc: int = 0) -> str:
    """A pbsnodes that records its argv and, for ``-o``, marks the node offline."""
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nprintf "%s\\n" "$@" >> {log}\n'
                f'[ "$1" = -o ] && [ {rc} = 0 ] && : > {flag}\nexit {rc}\n')
    os.chmod(path, 0o755)
    return path


def remove(home: str) -> None:
    shutil.rmtree(home, ignore_errors=True)
