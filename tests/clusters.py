"""Real one-node batch clusters for the end-to-end tests, from Debian packages.

Each cluster installs its packages when missing, starts its daemons by hand (no service manager
here) with a clean environment, and records what it started; ``stop`` cancels what is left,
stops exactly those processes and removes the cluster's state. One cluster runs at a time
(both bind fixed ports). Every wait has a deadline.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Optional

APT_TIMEOUT_S = 900


class ClusterError(Exception):
    pass


def wait_until(what: str, check: Callable[[], object], timeout: float, interval: float = 0.2):
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def apt_install(pkgs: list[str], debconf: str = "") -> None:
    missing = [p for p in pkgs if not installed(p)]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if debconf:
        subprocess.run(["debconf-set-selections"], input=debconf, text=True, check=True)
    policy = subprocess.run(["apt-cache", "policy", missing[0]], capture_output=True, text=True)
    if "Candidate: (none)" in policy.stdout or "Candidate:" not in policy.stdout:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"], env=env,
                       check=True, capture_output=True, timeout=APT_TIMEOUT_S)
    # the packages' init scripts must not start daemons (or an MTA): we start our own
    own_policy = not os.path.exists("/usr/sbin/policy-rc.d")
    if own_policy:
        with open("/usr/sbin/policy-rc.d", "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod("/usr/sbin/policy-rc.d", 0o755)
    try:
        r = subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q",
                            "--no-install-recommends", *missing], env=env, capture_output=True,
                           text=True, timeout=APT_TIMEOUT_S)
    finally:
        if own_policy:
            os.unlink("/usr/sbin/policy-rc.d")
    if r.returncode != 0:
        raise ClusterError(f"apt-get install {' '.join(missing)} failed:\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")


def _comm(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return None
    if st.rsplit(")", 1)[1].split()[0] == "Z":   # a zombie PID 1 has not reaped yet: gone
        return None
    return st[st.index("(") + 1:st.rindex(")")]


def stop_pid(pid: Optional[int], comm: str, timeout: float = 30) -> None:
    """TERM the process if it is still the daemon we started (never by name), KILL after
    ``timeout``."""
    if not pid or _comm(pid) != comm[:15]:
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(f"{comm} ({pid}) to stop", lambda: _comm(pid) != comm[:15], timeout)
    except ClusterError:
        os.kill(pid, signal.SIGKILL)
        wait_until(f"{comm} ({pid}) to die", lambda: _comm(pid) != comm[:15], 10)


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@contextlib.contextmanager
def running(cluster):
    """Start the cluster; stop it and remove its state however the block ends."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class SlurmCluster:
    """slurmctld + slurmd + munged on this host, configured from a dict of slurm.conf lines."""

    PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]

    def __init__(self, state: str, extra: dict[str, str], features: list[str],
                 job_submit_lua: Optional[str] = None, memory_mb: int = 4000,
                 accounting: bool = False):
        self.state, self.extra, self.features = state, extra, features
        self.lua, self.memory_mb = job_submit_lua, memory_mb
        # accounting: slurmdbd on a private MariaDB (Debian's), so that sacct answers
        self.accounting = accounting
        self.conf = os.path.join(state, "slurm.conf")
        self.node = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict:
        return {"PATH": CLEAN_PATH, "SLURM_CONF": self.conf, "LANG": "C.UTF-8"}

    def start(self) -> None:
        apt_install(self.PACKAGES + (self.DBD_PACKAGES if self.accounting else []))
        for port in (6817, 6818) + ((6819, self.DB_PORT) if self.accounting else ()):
            if not port_free(port):
                raise ClusterError(f"port {port} is taken: another Slurm runs on this host")
        shutil.rmtree(self.state, ignore_errors=True)
        for sub in ("", "ctld", "slurmd", "log", "run", "db"):
            os.makedirs(os.path.join(self.state, sub), exist_ok=True)
            os.chmod(os.path.join(self.state, sub), 0o755)
        for sub in ("ctld", "log", "run", "db"):
            shutil.chown(os.path.join(self.state, sub), "slurm", "slurm")
        self._munge()
        self._write_conf()
        if self.accounting:
            self._slurmdbd()
        for daemon, args in (("slurmctld", ["-f", self.conf]),
                             ("slurmd", ["-f", self.conf, "-N", self.node])):
            subprocess.run([f"/usr/sbin/{daemon}", *args], env=self.env, cwd="/", check=True,
                           timeout=60)
            pidfile = os.path.join(self.state, "run", f"{daemon}.pid")
            self.pids[daemon] = wait_until(f"{daemon}'s pid file", lambda p=pidfile: read_pid(p), 30)
        wait_until(f"node {self.node} to be idle", lambda: self.node_state() == "idle", 60)

    DBD_PACKAGES = ["slurmdbd", "mariadb-server-core", "mariadb-client-core"]
    DB_PORT = 6833
    DB_PASSWORD = "vibatch-test-only"

    def _slurmdbd(self) -> None:
        """A private MariaDB (its data in the cluster's state, on 127.0.0.1 only) and slurmdbd
        on it, both run as slurm; the cluster is registered before slurmctld starts."""
        db, run = os.path.join(self.state, "db"), os.path.join(self.state, "run")
        sock = os.path.join(run, "mariadb.sock")
        r = subprocess.run(["/usr/bin/mariadb-install-db", "--no-defaults", f"--datadir={db}",
                            "--user=slurm", "--auth-root-authentication-method=socket",
                            "--skip-test-db"], env=self.env, cwd="/", capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        pidfile = os.path.join(run, "mariadb.pid")
        with open(os.path.join(self.state, "log", "mariadb.log"), "wb") as log:
            subprocess.Popen(["/usr/sbin/mariadbd", "--no-defaults", f"--datadir={db}",
                              "--user=slurm", f"--socket={sock}", f"--port={self.DB_PORT}",
                              "--bind-address=127.0.0.1", "--skip-name-resolve", f"--pid-file={pidfile}",
                              "--innodb-buffer-pool-size=64M", "--skip-log-bin"],
                             env=self.env, cwd="/", stdin=subprocess.DEVNULL, stdout=log,
                             stderr=log, start_new_session=True, close_fds=True)
        self.pids["mariadbd"] = wait_until("mariadbd's pid file", lambda: read_pid(pidfile), 60)
        grant = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.DB_PASSWORD}'; "
                 "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        wait_until("mariadbd to take the grant", lambda: subprocess.run(
            ["/usr/bin/mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", grant],
            env=self.env, capture_output=True, timeout=30).returncode == 0, 60, 0.5)
        dbd = os.path.join(self.state, "slurmdbd.conf")
        with open(dbd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in {
                "AuthType": "auth/munge", "DbdHost": "localhost", "DbdAddr": "127.0.0.1",
                "SlurmUser": "slurm", "PidFile": f"{run}/slurmdbd.pid",
                "LogFile": f"{self.state}/log/slurmdbd.log", "StorageType":
                "accounting_storage/mysql", "StorageHost": "127.0.0.1",
                "StoragePort": str(self.DB_PORT), "StorageUser": "slurm",
                "StoragePass": self.DB_PASSWORD, "StorageLoc": "slurm_acct_db"}.items()))
        os.chmod(dbd, 0o600)
        shutil.chown(dbd, "slurm", "slurm")
        subprocess.run(["/usr/sbin/slurmdbd"], env={**self.env, "SLURM_CONF": self.conf},
                       cwd="/", check=True, timeout=60, capture_output=True)
        self.pids["slurmdbd"] = wait_until("slurmdbd's pid file",
                                           lambda: read_pid(f"{run}/slurmdbd.pid"), 60)
        def registered() -> bool:
            r = self.cmd("sacctmgr", "-i", "add", "cluster", "vibatch")
            return r.returncode == 0 or "already exists" in r.stdout + r.stderr
        wait_until("slurmdbd to answer and take the cluster", registered, 90, 1)

    def sacct(self, job_id: str, fields: str = "JobID,State,TotalCPU,MaxRSS,ExitCode"
              ) -> list[dict]:
        """The job's lines in slurmdbd's records (``sacct -P``), one dict per job and step."""
        r = self.cmd("sacct", "-n", "-P", "-j", job_id, "-o", fields, "--noconvert")
        keys = fields.split(",")
        return [dict(zip(keys, line.split("|"))) for line in r.stdout.splitlines() if line]

    def _munge(self) -> None:
        if not os.path.exists("/etc/munge/munge.key"):
            with open("/etc/munge/munge.key", "wb") as f:
                f.write(os.urandom(1024))
            os.chmod("/etc/munge/munge.key", 0o400)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if self._munge_answers():
            return
        with open(os.devnull, "wb") as null:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], env=self.env,
                           check=True, stdout=null, timeout=30)
        self.pids["munged"] = wait_until("munged's pid file",
                                         lambda: read_pid("/run/munge/munged.pid"), 30)
        wait_until("munged to answer", self._munge_answers, 30)

    @staticmethod
    def _munge_answers() -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                  timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _write_conf(self) -> None:
        s = self.state
        conf = {
            "ClusterName": "vibatch", "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "AuthType": "auth/munge", "CredType": "cred/munge", "SlurmUser": "slurm",
            "SlurmdUser": "root", "StateSaveLocation": f"{s}/ctld", "SlurmdSpoolDir": f"{s}/slurmd",
            "SlurmctldPidFile": f"{s}/run/slurmctld.pid", "SlurmdPidFile": f"{s}/run/slurmd.pid",
            "SlurmctldLogFile": f"{s}/log/slurmctld.log", "SlurmdLogFile": f"{s}/log/slurmd.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core_Memory",
            "SchedulerParameters": "batch_sched_delay=0", "ReturnToService": "2",
            "MpiDefault": "none", "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/filetxt", "JobCompLoc": f"{s}/log/jobcomp.log",
            "DefMemPerCPU": "256", "MinJobAge": "300", "EnforcePartLimits": "ALL",
            **({"AccountingStorageType": "accounting_storage/slurmdbd",
                "AccountingStorageHost": "127.0.0.1", "AccountingStoragePort": "6819",
                "JobAcctGatherType": "jobacct_gather/linux"} if self.accounting else {}),
            **self.extra,
        }
        if conf["ProctrackType"] == "proctrack/cgroup":
            with open(os.path.join(s, "cgroup.conf"), "w") as f:
                f.write("CgroupPlugin=autodetect\nCgroupMountpoint=/sys/fs/cgroup\n")
            os.chmod(os.path.join(s, "cgroup.conf"), 0o644)
        if self.lua:
            shutil.copy(self.lua, os.path.join(s, "job_submit.lua"))
            os.chmod(os.path.join(s, "job_submit.lua"), 0o644)
            conf["JobSubmitPlugins"] = "lua"
        lines = [f"{k}={v}" for k, v in conf.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
                     f"RealMemory={self.memory_mb} TmpDisk=1024 "
                     f"Features={','.join(self.features)} "
                     "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)

    def cmd(self, *argv: str, user: Optional[str] = None, cwd: str = "/", timeout: float = 60,
            env: Optional[dict] = None, umask: int = 0o022) -> subprocess.CompletedProcess:
        full = list(argv) if user is None else ["runuser", "-u", user, "--", *argv]
        return subprocess.run(full, env={**self.env, **(env or {})}, cwd=cwd, umask=umask,
                              capture_output=True, text=True, timeout=timeout)

    def node_state(self) -> str:
        r = self.cmd("sinfo", "-h", "-N", "-n", self.node, "-o", "%T")
        return r.stdout.strip() if r.returncode == 0 else ""

    def node_reason(self) -> str:
        return self.cmd("sinfo", "-h", "-N", "-n", self.node, "-o", "%E").stdout.strip()

    def job(self, job_id: str) -> dict:
        """``scontrol show job -o`` as a dict (fields whose value has no spaces)."""
        r = self.cmd("scontrol", "-o", "show", "job", job_id)
        out = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out.setdefault(k, v)
        return out

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict:
        def reached() -> Optional[dict]:
            job = self.job(job_id)
            return job if job.get("JobState") in states else None
        return wait_until(f"job {job_id} to reach {sorted(states)}", reached, timeout)

    def wait_finished(self, job_id: str, timeout: float = 180) -> dict:
        """Wait until the job ended and its Epilog ran (the node no longer completing)."""
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        self.wait_state(job_id, done, timeout)
        wait_until(f"job {job_id}'s epilog", lambda: "COMPLETING" not in self.job(job_id).get(
            "JobState", "") and "completing" not in self.node_state(), 120)
        return self.job(job_id)

    def stop(self) -> None:
        if self.pids.get("slurmctld"):
            ids = self.cmd("squeue", "-h", "-o", "%A").stdout.split()
            if ids:
                self.cmd("scancel", *ids)
                try:
                    wait_until("the last jobs (and their epilogs) to finish", lambda: not self.cmd(
                        "squeue", "-h", "-o", "%A").stdout.strip(), 120)
                except ClusterError:
                    pass
        for daemon in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            stop_pid(self.pids.pop(daemon, None), daemon)
        for name in ("slurmd.log", "slurmctld.log", "slurmdbd.log"):   # printed by the tests that fail
            path = os.path.join(self.state, "log", name)
            if os.path.exists(path):
                shutil.copy(path, f"/var/tmp/vibatch-tests/last-{name}")
        shutil.rmtree(self.state, ignore_errors=True)


class GridEngineCluster:
    """sge_qmaster + sge_execd (Debian's Son of Grid Engine 8.1.9) with one queue on this host,
    from a freshly initialised cell: job ids restart at 1 and no state survives ``stop``."""

    PACKAGES = ["gridengine-master", "gridengine-exec", "gridengine-client"]
    ROOT, CELL, SPOOL = "/var/lib/gridengine", "default", "/var/spool/gridengine"
    LIBEXEC = "/usr/lib/gridengine"

    def __init__(self, state: str, queue: dict[str, str], complexes: list[str]):
        self.state, self.queue_attrs, self.complexes = state, queue, complexes
        self.host = socket.gethostname()
        self.common = f"{self.ROOT}/{self.CELL}/common"
        self.pids: dict[str, int] = {}
        self.name = ""

    @property
    def env(self) -> dict:
        return {"PATH": CLEAN_PATH, "SGE_ROOT": self.ROOT, "SGE_CELL": self.CELL,
                "LANG": "C.UTF-8"}

    def cmd(self, *argv: str, user: Optional[str] = None, cwd: str = "/", timeout: float = 60,
            env: Optional[dict] = None, umask: int = 0o022) -> subprocess.CompletedProcess:
        full = list(argv) if user is None else ["runuser", "-u", user, "--", *argv]
        return subprocess.run(full, env={**self.env, **(env or {})}, cwd=cwd, umask=umask,
                              capture_output=True, text=True, timeout=timeout)

    def qconf(self, *args: str) -> str:
        r = self.cmd("qconf", *args)
        if r.returncode != 0:
            raise ClusterError(f"qconf {' '.join(args)} failed: {r.stdout}{r.stderr}")
        return r.stdout

    def start(self) -> None:
        apt_install(self.PACKAGES, debconf=(
            "gridengine-common shared/gridengineconfig boolean true\n"
            f"gridengine-common shared/gridenginecell string {self.CELL}\n"
            f"gridengine-common shared/gridenginemaster string {self.host}\n"))
        for port in (6444, 6445):
            if not port_free(port):
                raise ClusterError(f"port {port} is taken: another Grid Engine runs here")
        shutil.rmtree(self.state, ignore_errors=True)
        os.makedirs(os.path.join(self.state, "run"))
        os.chmod(self.state, 0o755)
        shutil.chown(os.path.join(self.state, "run"), "sgeadmin", "sgeadmin")
        self._fresh_cell()
        self._daemon("sge_qmaster", "qmaster.pid", "SGE_QMASTER_PIDFILE")
        wait_until("sge_qmaster to answer", lambda: self.cmd("qconf", "-sh").returncode == 0, 60)
        self._configure()
        self._daemon("sge_execd", "execd.pid", "SGE_EXECD_PIDFILE")
        wait_until("sge_execd to register", lambda: self.cmd("qconf", "-se", self.name)
                   .returncode == 0, 60)
        self._queue()
        wait_until("the queue to be available (load reported, no error)",
                   lambda: self.queue_state() == "", 90)

    def _fresh_cell(self) -> None:
        for d in (f"{self.SPOOL}/spooldb", f"{self.SPOOL}/qmaster", f"{self.SPOOL}/execd"):
            shutil.rmtree(d, ignore_errors=True)
        for f in ("accounting", "act_qmaster", "host_aliases"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.common, f))
        for d in (self.ROOT, f"{self.ROOT}/{self.CELL}", self.common,
                  f"{self.SPOOL}/qmaster/job_scripts", f"{self.SPOOL}/spooldb", f"{self.SPOOL}/execd"):
            os.makedirs(d, exist_ok=True)
            shutil.chown(d, "sgeadmin", "sgeadmin")
        if not os.path.exists(f"{self.common}/bootstrap"):
            shutil.copy("/usr/share/gridengine/default-bootstrap", f"{self.common}/bootstrap")
            shutil.chown(f"{self.common}/bootstrap", "sgeadmin", "sgeadmin")
        r = subprocess.run(["runuser", "-u", "sgeadmin", "--", "/usr/share/gridengine/scripts/init_cluster",
                            self.ROOT, self.CELL, f"{self.SPOOL}/spooldb", "sgeadmin"],
                           env=self.env, capture_output=True, text=True, timeout=120, cwd="/")
        if r.returncode != 0:
            raise ClusterError(f"init_cluster failed: {r.stdout}{r.stderr}")
        # SGE names a peer by its address's reverse name and refuses clients whose own name
        # differs (here 127.0.0.1 is "localhost" but the host calls itself "vm"): alias them
        ip = socket.gethostbyname(self.host)
        rev = socket.gethostbyaddr(ip)[0]
        if rev != self.host:
            with open(f"{self.common}/host_aliases", "w") as f:
                f.write(f"{self.host} {rev}\n")
        self.name = subprocess.run([f"{self.LIBEXEC}/gethostname", "-aname"], env=self.env,
                                   capture_output=True, text=True, check=True).stdout.strip()
        with open(f"{self.common}/act_qmaster", "w") as f:
            f.write(self.name + "\n")
        for f in os.listdir(self.common):
            shutil.chown(os.path.join(self.common, f), "sgeadmin", "sgeadmin")

    def _daemon(self, binary: str, pidfile: str, var: str) -> None:
        path = os.path.join(self.state, "run", pidfile)
        # a clean environment: the daemons pass theirs on to every job and hook
        subprocess.run([f"/usr/sbin/{binary}"], env={**self.env, var: path}, cwd="/", check=True,
                       timeout=60, capture_output=True)
        self.pids[binary] = wait_until(f"{binary}'s pid file", lambda: read_pid(path), 30)

    def _configure(self) -> None:
        cfg = os.path.join(self.state, "cfg")
        os.makedirs(cfg, exist_ok=True)
        self.cmd("qconf", "-as", self.name)
        self.cmd("qconf", "-ah", self.name)
        conf = re.sub(r"(?m)^load_report_time .*$", "load_report_time 00:00:05",
                      self.qconf("-sconf", "global"))
        # qmaster writes the accounting file every flush_time (15 s) unless told otherwise: a
        # finished job's qacct record would come up to 15 s after the job
        conf = re.sub(r"(?m)^(reporting_params .*?)\s*$",
                      r"\1 accounting_flush_time=00:00:00", conf)
        self._load("-Mconf", os.path.join(cfg, "global"), conf)
        sched = self.qconf("-ssconf")
        for key, value in (("schedule_interval", "0:0:1"), ("flush_submit_sec", "1"),
                           ("flush_finish_sec", "1")):
            sched = re.sub(rf"(?m)^{key} .*$", f"{key} {value}", sched)
        self._load("-Msconf", os.path.join(cfg, "sched"), sched)
        pe = ("pe_name smp\nslots 999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\n"
              "stop_proc_args NONE\nallocation_rule $pe_slots\ncontrol_slaves FALSE\n"
              "job_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n")
        self._load("-Ap", os.path.join(cfg, "smp"), pe)
        if self.complexes:
            self._load("-Mc", os.path.join(cfg, "complexes"),
                       self.qconf("-sc") + "".join(c + "\n" for c in self.complexes))

    def _load(self, option: str, path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        self.qconf(option, path)

    def _queue(self) -> None:
        attrs = {
            "qname": "all.q", "hostlist": self.name, "seq_no": "0", "load_thresholds": "NONE",
            "suspend_thresholds": "NONE", "nsuspend": "1", "suspend_interval": "00:05:00",
            "priority": "0", "min_cpu_interval": "00:05:00", "processors": "UNDEFINED",
            "qtype": "BATCH INTERACTIVE", "ckpt_list": "NONE", "pe_list": "smp", "rerun": "FALSE",
            "slots": str(os.cpu_count()), "tmpdir": "/tmp", "shell": "/bin/sh", "prolog": "NONE",
            "epilog": "NONE", "shell_start_mode": "posix_compliant", "starter_method": "NONE",
            "suspend_method": "NONE", "resume_method": "NONE", "terminate_method": "NONE",
            "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE",
            "xuser_lists": "NONE", "subordinate_list": "NONE", "complex_values": "NONE",
            "projects": "NONE", "xprojects": "NONE", "calendar": "NONE", "initial_state": "default",
            **{f"{p}_{r}": "INFINITY" for p in "sh" for r in
               ("rt", "cpu", "fsize", "data", "stack", "core", "rss", "vmem")},
            **self.queue_attrs,
        }
        self._load("-Aq", os.path.join(self.state, "cfg", "all.q"),
                   "".join(f"{k} {v}\n" for k, v in attrs.items()))

    def queue_state(self) -> Optional[str]:
        """The queue instance's state letters ('' when it takes jobs; None if unknown)."""
        r = self.cmd("qstat", "-f", "-q", f"all.q@{self.name}")
        for line in r.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == f"all.q@{self.name}":
                return parts[5] if len(parts) > 5 else ""
        return None

    def job_state(self, job_id: str) -> Optional[str]:
        """qstat's state column for a job ('r', 'qw', 'Eqw'...), None once it left qstat."""
        r = self.cmd("qstat", "-u", "*")
        for line in r.stdout.splitlines()[2:]:
            parts = line.split()
            if parts and parts[0] == job_id:
                return parts[4]
        return None

    def accounting(self, job_id: str, task: Optional[int] = None) -> Optional[dict]:
        """The job's (or task's) qacct record, once written (after the epilog)."""
        args = ["qacct", "-j", job_id] + (["-t", str(task)] if task else [])
        r = self.cmd(*args)
        if r.returncode != 0:
            return None
        out = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition(" ")
            if k and not k.startswith("="):
                out.setdefault(k, v.strip())
        return out

    def wait_accounted(self, job_id: str, task: Optional[int] = None, timeout: float = 180) -> dict:
        return wait_until(f"job {job_id}'s accounting record", lambda: self.accounting(job_id, task),
                          timeout)

    def stop(self) -> None:
        if self.pids.get("sge_qmaster"):
            if self.cmd("qstat", "-u", "*").stdout.strip():
                self.cmd("qdel", "-f", "-u", "*")
                with contextlib.suppress(ClusterError):
                    wait_until("the last jobs to leave", lambda: not self.cmd(
                        "qstat", "-u", "*").stdout.strip(), 60)
            self.cmd("qconf", "-ke", self.name, timeout=30)
            stop_pid(self.pids.pop("sge_execd", None), "sge_execd")
            self.cmd("qconf", "-km", timeout=30)
            stop_pid(self.pids.pop("sge_qmaster", None), "sge_qmaster")
        for binary in ("sge_execd", "sge_qmaster"):
            stop_pid(self.pids.pop(binary, None), binary)
        messages = f"{self.SPOOL}/qmaster/messages"
        if os.path.exists(messages):
            shutil.copy(messages, "/var/tmp/vibatch-tests/last-sge-qmaster-messages")
        for d in (f"{self.SPOOL}/spooldb", f"{self.SPOOL}/qmaster", f"{self.SPOOL}/execd"):
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)
