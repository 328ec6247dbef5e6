"""Real one-node batch clusters for the end-to-end tests, from Debian packages.

Each cluster installs its packages when missing, starts its daemons by hand (no service manager
here) with a clean environment, and records what it started; ``stop`` cancels what is left,
stops exactly those processes and removes the cluster's state. One cluster runs at a time
(both bind fixed ports). Every wait has a deadline.
"""
from __future__ import annotations

import os
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


class SlurmCluster:
    """slurmctld + slurmd + munged on this host, configured from a dict of slurm.conf lines."""

    PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]

    def __init__(self, state: str, extra: dict[str, str], features: list[str],
                 job_submit_lua: Optional[str] = None, memory_mb: int = 4000):
        self.state, self.extra, self.features = state, extra, features
        self.lua, self.memory_mb = job_submit_lua, memory_mb
        self.conf = os.path.join(state, "slurm.conf")
        self.node = socket.gethostname().split(".")[0]
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict:
        return {"PATH": CLEAN_PATH, "SLURM_CONF": self.conf, "LANG": "C.UTF-8"}

    def start(self) -> None:
        apt_install(self.PACKAGES)
        for port in (6817, 6818):
            if not port_free(port):
                raise ClusterError(f"port {port} is taken: another Slurm runs on this host")
        shutil.rmtree(self.state, ignore_errors=True)
        for sub in ("", "ctld", "slurmd", "log", "run"):
            os.makedirs(os.path.join(self.state, sub), exist_ok=True)
            os.chmod(os.path.join(self.state, sub), 0o755)
        for sub in ("ctld", "log", "run"):
            shutil.chown(os.path.join(self.state, sub), "slurm", "slurm")
        self._munge()
        self._write_conf()
        for daemon, args in (("slurmctld", ["-f", self.conf]),
                             ("slurmd", ["-f", self.conf, "-N", self.node])):
            subprocess.run([f"/usr/sbin/{daemon}", *args], env=self.env, cwd="/", check=True,
                           timeout=60)
            pidfile = os.path.join(self.state, "run", f"{daemon}.pid")
            self.pids[daemon] = wait_until(f"{daemon}'s pid file", lambda p=pidfile: read_pid(p), 30)
        wait_until(f"node {self.node} to be idle", lambda: self.node_state() == "idle", 60)

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
            **self.extra,
        }
        if self.lua:
            shutil.copy(self.lua, os.path.join(s, "job_submit.lua"))
            os.chmod(os.path.join(s, "job_submit.lua"), 0o644)
            conf["JobSubmitPlugins"] = "lua"
        lines = [f"{k}={v}" for k, v in conf.items()]
        lines.append(f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
                     f"RealMemory={self.memory_mb} Features={','.join(self.features)} "
                     "State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)

    def cmd(self, *argv: str, user: Optional[str] = None, cwd: str = "/", timeout: float = 60,
            env: Optional[dict] = None) -> subprocess.CompletedProcess:
        full = list(argv) if user is None else ["runuser", "-u", user, "--", *argv]
        return subprocess.run(full, env={**self.env, **(env or {})}, cwd=cwd,
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
        return wait_until(f"job {job_id} to reach {sorted(states)}",
                          lambda: (lambda j: j if j.get("JobState") in states else None)(
                              self.job(job_id)), timeout)

    def wait_finished(self, job_id: str, timeout: float = 180) -> dict:
        """Wait until the job ended and its Epilog ran (the node no longer completing)."""
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        job = self.wait_state(job_id, done, timeout)
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
        for daemon in ("slurmd", "slurmctld", "munged"):
            stop_pid(self.pids.pop(daemon, None), daemon)
        for name in ("slurmd.log", "slurmctld.log"):   # printed by the tests that fail
            path = os.path.join(self.state, "log", name)
            if os.path.exists(path):
                shutil.copy(path, f"/var/tmp/vibatch-tests/last-{name}")
        shutil.rmtree(self.state, ignore_errors=True)
