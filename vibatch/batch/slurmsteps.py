"""Slurm steps in the job's VM: what the SPANK plugin (spank/vibatch_spank.c) hands the
forwarder, and ``srun`` called from inside the guest.

- **A task** of any step (the batch script's included) is exec'd by the plugin as
  ``python -I -B -m vibatch.batch.slurm --config C task FD JOBID batch|step -- ARGV``, with a
  fixed environment; the task's own environment (the user's) is in the memfd FD, read here as
  data only (``read_task_env``) and given to the guest.
- **srun in the guest.** The guest has no Slurm. While a forwarder runs a task, it puts an
  ``srun`` first on the guest's PATH (``StepRelay``): a shell script that leaves its arguments,
  its working directory and its environment in the job's I/O folder and waits. The forwarder (on
  the host, as the job's user, inside the job's step) runs Slurm's own ``srun`` with them; Slurm
  makes a real step, whose tasks the plugin sends into the same VM. Its output comes back
  through the I/O folder when it ends, and its exit status becomes the guest ``srun``'s.
  What the guest asks for cannot run anything on the host: ``srun`` is run by absolute path,
  with the node's own ``SLURM_CONF``, without the variables that steer the dynamic loader, and
  the options that run a program locally or after the task (``--prolog``, ``--epilog``,
  ``--task-prolog``, ``--task-epilog``, in any abbreviation, or by their variables) are refused.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
from typing import Mapping, Optional, Sequence

from .. import safeio
from ..errors import JobError, NodeError

SRUN = "/usr/bin/srun"
ENV_LIMIT = 8 << 20          # a task's environment, at most (Linux's own limit is lower)
REQUEST_LIMIT = 4 << 20      # one guest srun's arguments (or its environment), at most
FIXED_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# srun options that run a user's program on the host: --prolog/--epilog where srun runs,
# --task-epilog in slurmstepd after the task (--task-prolog never runs: the plugin execs first)
HOST_RUNNING = ("prolog", "epilog", "task-prolog", "task-epilog")
HOST_RUNNING_ENV = ("SLURM_PROLOG", "SLURM_EPILOG", "SLURM_TASK_PROLOG", "SLURM_TASK_EPILOG")
# what glibc's dynamic loader and libc take from the environment (glibc's unsecure-envvars.h,
# the list it clears for set-user-id programs), and what srun takes its config from
LOADER_ENV_PREFIXES = ("LD_",)
LOADER_ENV = ("GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
              "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS",
              "TMPDIR", "TZDIR", "GLIBC_TUNABLES", "SLURM_CONF")


def read_task_env(fd: int) -> dict[str, str]:
    """The task's environment from the plugin's memfd (NUL-separated ``NAME=value``), closed
    after; anything but a regular anonymous file, or more than ``ENV_LIMIT``, is refused."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobError(f"the task's environment (descriptor {fd}) is not a file")
        data = b""
        while len(data) <= ENV_LIMIT:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise JobError(f"cannot read the task's environment (descriptor {fd}): {e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(data) > ENV_LIMIT:
        raise JobError(f"the task's environment is larger than {ENV_LIMIT >> 20} MiB")
    return parse_env(data)


def parse_env(data: bytes) -> dict[str, str]:
    env = {}
    for item in data.split(b"\0"):
        name, sep, value = item.decode(errors="surrogateescape").partition("=")
        if sep and name:
            env[name] = value
    return env


def refused_option(args: Sequence[str]) -> Optional[str]:
    """The first argument that names (or abbreviates: srun's getopt takes any unambiguous
    prefix) an option running a program on the host. Every argument is looked at, the
    command's own too: an option's value may be a separate argument, so where srun's options
    end cannot be told without srun's own table."""
    for arg in args:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0]
        if name and any(full.startswith(name) for full in HOST_RUNNING):
            return arg
    return None


def srun_env(guest: Mapping[str, str], slurm_conf: Optional[str]) -> dict[str, str]:
    """Host ``srun``'s environment: the guest's (srun passes it to the step's tasks, which go
    back into the guest), less what would steer srun or the loader on the host, with the node's
    own ``SLURM_CONF``."""
    env = {k: v for k, v in guest.items()
           if not k.startswith(LOADER_ENV_PREFIXES) and k not in LOADER_ENV}
    env["PATH"] = FIXED_PATH + ":" + env["PATH"] if env.get("PATH") else FIXED_PATH
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


# The guest's srun (busybox sh or any POSIX sh). D: this forwarder's request folder in the
# guest. A request is ID.argv (cwd, then the arguments, NUL-separated) and ID.env; ID.req
# says both are complete. The host leaves ID.out and ID.err, then ID.rc.
SHIM = """#!/bin/sh
# srun in a vibatch VM: Slurm's srun runs on the host, in this job, and its tasks run here.
D='{guest_dir}'
id=$$-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')
{{ printf '%s\\0' "$(pwd)"; for a in "$@"; do printf '%s\\0' "$a"; done; }} >"$D/$id.argv" &&
cat /proc/self/environ >"$D/$id.env" && : >"$D/$id.req" || {{
  echo "srun (vibatch): cannot reach the job's forwarder through $D" >&2; exit 125; }}
while [ ! -e "$D/$id.rc" ]; do sleep 0.05; done
cat "$D/$id.out"; cat "$D/$id.err" >&2
rc=$(cat "$D/$id.rc"); rm -f "$D/$id.argv" "$D/$id.env" "$D/$id.out" "$D/$id.err" "$D/$id.rc"
exit "${{rc:-125}}"
"""


class StepRelay:
    """Serves the guest's ``srun`` for one forwarder (see the module's doc): ``poll`` from the
    forwarder's wait loop, ``close`` when its task has ended."""

    def __init__(self, io_host: str, io_guest: str, workdir: str,
                 slurm_conf: Optional[str], srun: str = SRUN):
        token = secrets.token_hex(6)
        self.host = os.path.join(io_host, ".srun", token)
        self.guest = f"{io_guest}/.srun/{token}"
        self.workdir, self.slurm_conf, self.srun = workdir, slurm_conf, srun
        self.running: dict[str, tuple[subprocess.Popen, list]] = {}
        for path in (os.path.dirname(self.host), self.host, os.path.join(self.host, "bin")):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise JobError(f"{path} is not a directory (made in the guest?)")
        shim = os.path.join(self.host, "bin", "srun")
        fd = os.open(shim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(SHIM.format(guest_dir=self.guest))

    @property
    def guest_bin(self) -> str:
        return f"{self.guest}/bin"

    def poll(self) -> None:
        try:
            names = os.listdir(self.host)
        except OSError:
            return
        for name in names:
            if name.endswith(".req"):
                self._start(name[:-4])
        for rid, (p, files) in list(self.running.items()):
            if p.poll() is not None:
                self._finish(rid, p.returncode, files)

    def _path(self, rid: str, ext: str) -> str:
        return os.path.join(self.host, f"{rid}.{ext}")

    def _start(self, rid: str) -> None:
        try:
            os.unlink(self._path(rid, "req"))
        except OSError:
            return
        argv = safeio.read_bounded(self._path(rid, "argv"), REQUEST_LIMIT + 1)
        env = safeio.read_bounded(self._path(rid, "env"), REQUEST_LIMIT + 1)
        files = []
        try:
            for ext in ("out", "err"):
                files.append(os.open(self._path(rid, ext),
                                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600))
            if argv is None or env is None or len(argv) > REQUEST_LIMIT or len(env) > REQUEST_LIMIT:
                raise JobError("the request is missing or too large")
            cwd, *args = [a.decode(errors="surrogateescape") for a in argv.split(b"\0")[:-1]]
            bad = refused_option(args)
            if bad is not None:
                raise JobError(f"{bad}: srun options that run a program on the host are not "
                               "allowed in a VM (--prolog, --epilog, --task-prolog, "
                               "--task-epilog)")
            guest_env = parse_env(env)
            for name in HOST_RUNNING_ENV:
                if guest_env.get(name):
                    raise JobError(f"{name} is set: srun options that run a program on the "
                                   "host are not allowed in a VM")
            p = subprocess.Popen([self.srun, *args], env=srun_env(guest_env, self.slurm_conf),
                                 cwd=self._cwd(cwd), stdin=subprocess.DEVNULL,
                                 stdout=files[0], stderr=files[1])
        except (JobError, OSError, ValueError) as e:
            why = e.message if isinstance(e, JobError) else str(e)
            if len(files) == 2:
                os.write(files[1], f"srun (vibatch): {why}\n".encode())
            self._finish(rid, 125, files)
            return
        self.running[rid] = (p, files)

    def _cwd(self, cwd: str) -> str:
        """The guest's cwd where it is the same on the host (in the shared work dir)."""
        wd = self.workdir.rstrip("/")
        return cwd if cwd == self.workdir or cwd.startswith(wd + "/") else self.workdir

    def _finish(self, rid: str, returncode: int, files: list) -> None:
        for fd in files:
            os.close(fd)
        self.running.pop(rid, None)
        status = 128 - returncode if returncode < 0 else returncode   # killed by signal N
        with contextlib.suppress(OSError):
            for ext in ("argv", "env"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(rid, ext))
            tmp = self._path(rid, "rc.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"{status}\n")
            os.replace(tmp, self._path(rid, "rc"))

    def close(self) -> None:
        """The task ended: stop the sruns it left running (their steps end with them) and
        remove this forwarder's folder."""
        for p, files in self.running.values():
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            for fd in files:
                os.close(fd)
        self.running.clear()
        with contextlib.suppress(OSError, NodeError):
            safeio.rmtree(self.host)
