"""HTCondor: ``USER_JOB_WRAPPER`` and the starter's ``JOB_EXIT`` hook, both run as the job user,
with a root helper (``vm-helper``, reached through sudo) that boots and tears down the job's VM.

The contract (HTCondor manual: admin-manual/configuration/starter.rst and hooks.rst,
users-manual/env-of-job.rst; condor_starter's source; see docs/batch/htcondor.md):

- condor_starter (real uid root) makes the scratch directory ``$(EXECUTE)/dir_<its pid>``,
  writes ``.job.ad`` and ``.machine.ad`` into it as HTCondor's account, hands the directory to
  the job user and starts ``USER_JOB_WRAPPER`` as the job user, in the job's initial working
  directory, with the job's environment plus ``_CONDOR_SCRATCH_DIR``, ``_CONDOR_JOB_AD``,
  ``_CONDOR_MACHINE_AD``, ``_CONDOR_WRAPPER_ERROR_FILE`` and ``BATCH_SYSTEM=HTCondor``. argv is
  the job's executable (full path) and its arguments. The wrapper stands for the job: its exit
  status becomes the job's, and the starter's signals (condor_rm, vacate) go to it.
- A wrapper that cannot run the job writes ``$_CONDOR_WRAPPER_ERROR_FILE`` and exits non-zero:
  the job goes back to Idle (to run again), and the file's text goes to the StarterLog.
- ``<Keyword>_HOOK_JOB_EXIT`` runs as the job user once the job has ended, with argv
  ``exit|remove|hold|evict`` and the job ad on stdin; the starter waits
  ``<Keyword>_HOOK_JOB_EXIT_TIMEOUT`` (30 s) for it.

Booting a VM needs root, which the job user reaches only through the helper. The helper believes
nothing the user says: it finds the root condor_starter among its own ancestors, checks that the
process the starter runs is the sudo caller's, and takes the scratch directory from the
starter's pid and the job (id, cores, memory, requested image) from ad files that HTCondor's
account wrote. The VM's life is bound to that starter: the wrapper ends it when the job ends, the
JOB_EXIT hook when the starter removes or evicts the job, and ``vibatch reap`` once the starter
is gone.

The OS is chosen with a job attribute, ``+VibatchImage = "el9"`` in the submit file.
"""
from __future__ import annotations

import os
import re
import signal
import stat
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import psutil

from .. import config as config_mod
from .. import lifecycle, proc
from ..accel import lift_limits
from ..errors import NodeError, ResourceRequestError, VibatchError
from ..request import check_job_id, resolve_user
from . import (BatchJob, Outcome, clean_env_path, epilogue, exec_job, parse_shim_args,
               prologue, run_hook)

SYSTEM = "htcondor"
SUDO = "/usr/bin/sudo"
STARTER_NAME = "condor_starter"
JOB_AD, MACHINE_AD = ".job.ad", ".machine.ad"
IMAGE_ATTR = "VibatchImage"
AD_MAX_BYTES = 1 << 20
MAX_ANCESTRY = 64
PREPARE_ALARM_S = 600     # the helper's own deadline for booting; USER_JOB_WRAPPER has none
FINISH_ALARM_S = 25       # the starter waits 30 s for the JOB_EXIT hook
SUDO_MARGIN_S = 15
# Between our wrapper and our helper only: HTCondor never sees these.
HELPER_EXIT = {Outcome.OK: 0, Outcome.JOB_FAULT: 3, Outcome.NODE_FAULT: 4}
# What HTCondor sees from the wrapper (docs/batch/htcondor.md). A job fault: the job completes
# with this code and the reason in its error output. A node fault: the error file plus a
# non-zero code put the job back to Idle, to run again.
WRAPPER_JOB_FAULT_EXIT = 125
WRAPPER_NODE_FAULT_EXIT = 1


class AdTampered(ResourceRequestError):
    """An ad file in the scratch directory was replaced by the job's user."""


# ---------------------------------------------------------------------------------------------
# ClassAds
def parse_ad(data: bytes, what: str) -> Any:
    """One ClassAd in the ``condor_q -l`` format the starter writes, with HTCondor's parser."""
    try:
        import classad2  # noqa: PLC0415 - only HTCondor nodes need the htcondor package
    except ImportError:
        raise NodeError("the htcondor Python package (its ClassAd parser) is missing from "
                        "vibatch's environment: pip install 'vibatch[htcondor]'") from None
    try:
        ad = classad2.parseOne(data.decode("utf-8", errors="replace"))
    except Exception as e:  # noqa: BLE001 - the parser's own exception types vary by release
        raise NodeError(f"{what}: not a ClassAd ({e})") from None
    if len(ad) == 0:
        raise NodeError(f"{what}: not a ClassAd (no attributes parsed)")
    return ad


def _value(ad: Any, attr: str) -> Any:
    """The attribute's evaluated value; None when absent, undefined or an error."""
    if ad is None or attr not in ad:
        return None
    try:
        v = ad.eval(attr)
    except Exception:  # noqa: BLE001
        return None
    return v if isinstance(v, (str, int, float)) else None   # bool is an int; checked below


def ad_int(ad: Any, attr: str) -> Optional[int]:
    v = _value(ad, attr)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        return None
    return int(v)


def ad_str(ad: Any, attr: str) -> Optional[str]:
    v = _value(ad, attr)
    return v if isinstance(v, str) and v else None


def job_id_of(ad: Any) -> str:
    """``<ClusterId>.<ProcId>@<schedd>``: unique on the node even across access points."""
    cluster, procid = ad_int(ad, "ClusterId"), ad_int(ad, "ProcId")
    if cluster is None or procid is None:
        raise NodeError("the job ad has no ClusterId/ProcId")
    schedd = (ad_str(ad, "GlobalJobId") or "").split("#", 1)[0]
    schedd = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.@+:-]", "_", schedd)).strip(".")[:96]
    return check_job_id(f"{cluster}.{procid}@{schedd}" if schedd else f"{cluster}.{procid}")


def job_from_ads(cfg, job_ad: Any, machine_ad: Any, user: str, workdir: str) -> BatchJob:
    """The slot's cores and memory (the machine ad: what HTCondor provisioned, which may exceed
    the request), else the job's request, else the site's defaults."""
    image = _value(job_ad, IMAGE_ATTR)
    if IMAGE_ATTR in job_ad and not (isinstance(image, str) and image):
        raise ResourceRequestError(f"the job attribute {IMAGE_ATTR} must be an OS or image name "
                                   f"in quotes, such as +{IMAGE_ATTR} = \"el9\"")
    cores = ad_int(machine_ad, "Cpus") or ad_int(job_ad, "RequestCpus") or cfg.jobs.default_cores
    memory = (ad_int(machine_ad, "Memory") or ad_int(job_ad, "RequestMemory")
              or cfg.jobs.default_memory_mb)
    walltime = ad_int(job_ad, "AllowedJobDuration")
    return BatchJob(job_id=job_id_of(job_ad), user=user, cores=cores, memory_mb=memory,
                    workdir=workdir, image=image or None,
                    walltime_s=walltime if walltime and walltime > 0 else None,
                    account=ad_str(job_ad, "AccountingGroup") or ad_str(job_ad, "AcctGroup"))


def config_fragment(names: Sequence[str], daemon: str) -> str:
    """HTCondor configuration from ``vibatch image offer --format htcondor-startd|schedd``.

    startd (execute points): advertise the names this node offers as ``VibatchImages`` and
    start only jobs that ask for none or for one of them, so the negotiator never sends a job
    to a node that lacks its OS. schedd (access points): refuse any other name at submit."""
    listed = ",".join(names)   # image names and aliases: letters, digits, '.', '_', '-' only
    if daemon == "startd":
        return (f"# vibatch image offer --format htcondor-startd: execute point configuration\n"
                f'VibatchImages = "{listed}"\n'
                f"STARTD_ATTRS = $(STARTD_ATTRS) VibatchImages\n"
                f"START = ($(START)) && ({START_CLAUSE})\n")
    choices = ", ".join(names) or "none: this node offers no image"
    return (f"# vibatch image offer --format htcondor-schedd: access point configuration\n"
            f"SUBMIT_REQUIREMENT_NAMES = $(SUBMIT_REQUIREMENT_NAMES) {IMAGE_ATTR}\n"
            f"SUBMIT_REQUIREMENT_{IMAGE_ATTR} = {SUBMIT_CLAUSE.format(names=listed)}\n"
            f"SUBMIT_REQUIREMENT_{IMAGE_ATTR}_REASON = strcat(\"vibatch: unknown OS \\\"\", "
            f"MY.{IMAGE_ATTR}, \"\\\"; choose one of: {choices}\")\n")


START_CLAUSE = (f"TARGET.{IMAGE_ATTR} is undefined || "
                f"stringListIMember(TARGET.{IMAGE_ATTR}, MY.VibatchImages)")
SUBMIT_CLAUSE = (f'MY.{IMAGE_ATTR} is undefined || stringListIMember(MY.{IMAGE_ATTR}, '
                 '"{names}")')


# ---------------------------------------------------------------------------------------------
# The root helper: who is calling, and what may be believed
@dataclass(frozen=True)
class Caller:
    uid: int
    starter_pid: int


def find_caller(environ: dict) -> Caller:
    """The sudo caller, which must be the process a root condor_starter runs (the wrapper or
    the JOB_EXIT hook): sudo's SUDO_UID, and our ancestry up to that starter."""
    sudo_uid = environ.get("SUDO_UID", "")
    if not sudo_uid.isdigit() or int(sudo_uid) == 0:
        raise NodeError("the VM helper runs only through sudo, called by a job's user "
                        "(SUDO_UID is missing or root)")
    uid = int(sudo_uid)
    below: list[int] = []    # real uids from our parent upwards
    try:
        p: Optional[psutil.Process] = psutil.Process(os.getppid())
        for _ in range(MAX_ANCESTRY):
            if p is None:
                break
            if p.name() == STARTER_NAME and p.uids().real == 0:
                if not below or below[-1] != uid:
                    raise NodeError(f"condor_starter {p.pid} does not run this job as uid {uid}")
                return Caller(uid, p.pid)
            below.append(p.uids().real)
            p = p.parent()
    except psutil.Error:
        pass
    raise NodeError("the VM helper was not called from an HTCondor job: no root condor_starter "
                    "among its ancestors (USE_PID_NAMESPACES hides it)")


def trusted_uids(cfg) -> set[int]:
    """Who may have written the ad files: root and HTCondor's own account."""
    import pwd  # noqa: PLC0415
    uids = {0}
    try:
        uids.add(pwd.getpwnam(cfg.htcondor.daemon_user).pw_uid)
    except KeyError:
        pass
    return uids


def open_scratch(scratch: str, caller: Caller, trusted: set[int],
                 daemon_user: str) -> tuple[int, str]:
    """A directory fd on the starter's scratch directory, ``<EXECUTE>/dir_<starter pid>``, in
    an EXECUTE directory only HTCondor can write, handed to the job's user; and its real path."""
    real = os.path.realpath(scratch) if scratch else ""
    expected = f"dir_{caller.starter_pid}"
    if not os.path.isabs(scratch) or os.path.basename(real) != expected:
        raise NodeError(f"scratch directory {scratch!r} is not condor_starter "
                        f"{caller.starter_pid}'s (expected <EXECUTE>/{expected})")
    parent = os.path.dirname(real)
    try:
        pst = os.stat(parent)
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise NodeError(f"scratch directory {real}: {e.strerror}") from None
    if pst.st_uid not in trusted or pst.st_mode & 0o022:
        os.close(fd)
        raise NodeError(f"{parent}: HTCondor's EXECUTE directory must belong to root or "
                        f"{daemon_user} and be writable by no one else")
    if os.fstat(fd).st_uid != caller.uid:
        os.close(fd)
        raise NodeError(f"scratch directory {real} does not belong to the job's user")
    return fd, real


def read_trusted(dir_fd: int, name: str, where: str, trusted: set[int], caller: Caller,
                 required: bool) -> Optional[bytes]:
    """An ad file as HTCondor's account wrote it: a regular file it owns, with one link,
    writable by no one else. One the job's user put there is the job's fault."""
    path = f"{where}/{name}"
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        if required:
            raise NodeError(f"{path}: missing (condor_starter writes it before the job)") from None
        return None
    except OSError as e:
        raise AdTampered(f"{path}: cannot be trusted ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if st.st_uid == caller.uid:
            raise AdTampered(f"{path} was replaced by the job's user; refusing to trust it")
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in trusted or st.st_nlink != 1 \
                or st.st_mode & 0o022:
            raise NodeError(f"{path}: not as HTCondor writes it (owner uid {st.st_uid}, "
                            f"{st.st_nlink} links, mode {stat.S_IMODE(st.st_mode):o}); is "
                            "htcondor.daemon_user HTCondor's account?")
        if st.st_size > AD_MAX_BYTES:
            raise NodeError(f"{path}: larger than {AD_MAX_BYTES} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(AD_MAX_BYTES + 1)
    finally:
        os.close(fd)


def helper_prepare(cfg, scratch: str, cwd: str, environ: dict) -> dict:
    caller = find_caller(environ)
    trusted = trusted_uids(cfg)
    dfd, where = open_scratch(scratch, caller, trusted, cfg.htcondor.daemon_user)
    try:
        job_ad = parse_ad(read_trusted(dfd, JOB_AD, where, trusted, caller, True), JOB_AD)
        mdata = read_trusted(dfd, MACHINE_AD, where, trusted, caller, False)
        machine_ad = parse_ad(mdata, MACHINE_AD) if mdata is not None else None
    finally:
        os.close(dfd)
    iwd = ad_str(job_ad, "Iwd")
    # HTCondor starts the job in its scratch directory (file transfer) or in its Iwd (shared
    # file system); the VM shares that one directory.
    workdir = os.path.realpath(cwd)
    if workdir not in (where, os.path.realpath(iwd) if iwd else where):
        raise NodeError(f"the job was started in {cwd}, neither its scratch directory nor its Iwd")
    job = job_from_ads(cfg, job_ad, machine_ad, resolve_user(str(caller.uid)).name, workdir)
    node = lifecycle.Node(cfg)
    try:
        lifecycle.reap(node)   # a run of this job whose starter died leaves its id taken
    finally:
        node.close()
    return prologue(cfg, job, holder=caller.starter_pid)


def helper_finish(cfg, environ: dict) -> list[str]:
    """End the VMs of the caller's starter (none: nothing to do)."""
    caller = find_caller(environ)
    jobs = lifecycle.jobs_held_by(cfg, caller.starter_pid)
    for job_id in jobs:
        epilogue(cfg, job_id, None)
    return jobs


# ---------------------------------------------------------------------------------------------
# The job user's side
def _one_line(text: str) -> str:
    return " ".join(text.split())


def _no_new_privs() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.split() == ["NoNewPrivs:", "1"] for line in f)
    except OSError:
        return False


def _helper(helper: str, verb: str, args: Sequence[str], timeout: float) -> proc.Result:
    return proc.run([SUDO, "-n", helper, verb, *args], timeout=timeout, check=False)


def _helper_message(res: proc.Result) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return "\n".join(lines) or f"sudo {res.argv[2]} exited with status {res.returncode}"


def _finish(helper: str, timeout: float) -> Optional[str]:
    """Have the helper end the VMs of our starter; None, or why it could not."""
    try:
        res = _helper(helper, "finish", [], timeout)
    except VibatchError as e:
        return e.message
    return None if res.returncode == 0 else _helper_message(res)


class _Pending:
    """Signals that arrive while the VM boots: acted on once the helper is done."""

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.old = {s: signal.signal(s, self._on) for s in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGHUP, signal.SIGQUIT)}

    def _on(self, signum: int, _frame) -> None:
        self.signals.append(signum)

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def wrapper(config_path: str, helper: str, argv: Sequence[str], environ: dict) -> int:
    err_file = environ.get("_CONDOR_WRAPPER_ERROR_FILE", "")
    scratch = environ.get("_CONDOR_SCRATCH_DIR", "")

    def node_fault(message: str) -> int:
        print(f"vibatch: htcondor wrapper (node fault, the job will run again): {message}",
              file=sys.stderr)
        if err_file:   # one line: HTCondor copies it into the StarterLog and the job's ad
            try:
                with open(err_file, "w") as f:
                    f.write(f"vibatch: {_one_line(message)}\n")
            except OSError as e:
                print(f"vibatch: htcondor wrapper: cannot write {err_file}: {e.strerror}",
                      file=sys.stderr)
        return WRAPPER_NODE_FAULT_EXIT

    if not argv:
        return node_fault("called without the job's executable (is this USER_JOB_WRAPPER?)")
    if not scratch or not helper:
        return node_fault("no $_CONDOR_SCRATCH_DIR, or the shim names no helper")
    if _no_new_privs():
        return node_fault("the job runs with no_new_privs (DISABLE_SETUID = true?), so sudo "
                          "cannot start the VM helper")
    pending = _Pending()
    try:
        res = _helper(helper, "prepare", ["--scratch", scratch], PREPARE_ALARM_S + SUDO_MARGIN_S)
    except VibatchError as e:
        return node_fault(f"the VM helper: {e.message}")
    finally:
        pending.restore()
    if res.returncode == HELPER_EXIT[Outcome.JOB_FAULT]:
        print(_helper_message(res), file=sys.stderr)
        return WRAPPER_JOB_FAULT_EXIT
    if res.returncode != 0:
        return node_fault(_helper_message(res))
    try:
        if pending.signals:     # removed or vacated while booting: do not start the job
            return 128 + pending.signals[0]
        try:
            cfg = config_mod.load(config_path)
            with open(os.path.join(scratch, JOB_AD), "rb") as f:
                job_id = job_id_of(parse_ad(f.read(AD_MAX_BYTES + 1), JOB_AD))
            return exec_job(cfg, job_id, list(argv))
        except VibatchError as e:
            print(f"vibatch: htcondor wrapper: {e.message}", file=sys.stderr)
            return WRAPPER_JOB_FAULT_EXIT
        except Exception as e:  # noqa: BLE001 - the job ran (or began to): never run it twice
            print(f"vibatch: htcondor wrapper: {type(e).__name__}: {e}", file=sys.stderr)
            return WRAPPER_JOB_FAULT_EXIT
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # finish even if signalled again
        why = _finish(helper, FINISH_ALARM_S + SUDO_MARGIN_S)
        if why is not None:
            print(f"vibatch: htcondor: ending the VM failed; the JOB_EXIT hook or `vibatch "
                  f"reap` will: {why}", file=sys.stderr)


def job_exit(helper: str, argv: Sequence[str]) -> int:
    """The starter's JOB_EXIT hook: whatever the reason (exit, remove, hold, evict), the
    job's VM ends. Its exit code changes nothing in HTCondor; its stderr goes to the
    StarterLog."""
    try:
        sys.stdin.buffer.read(AD_MAX_BYTES)   # the job ad; not needed, but drain the pipe
    except (OSError, ValueError):
        pass
    why = _finish(helper, FINISH_ALARM_S + 3)
    if why is None:
        return 0
    print(f"vibatch: htcondor job exit ({argv[0] if argv else '?'}): {why}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    call = parse_shim_args(sys.argv[1:] if argv is None else argv, PREPARE_ALARM_S)
    hook, args = call.hook, call.args
    if hook == "wrapper":     # as the job user, with the job's environment
        return wrapper(call.config_path, call.helper, args, dict(os.environ))
    if hook == "job_exit":    # as the job user
        return job_exit(call.helper, args)
    if hook == "helper" and args[:1] in (["prepare"], ["finish"]):   # root, through sudo
        environ, verb = dict(os.environ), args[0]
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = ""
        clean_env_path()
        lift_limits()        # the job's limits, inherited through the wrapper
        os.chdir("/")
        scratch = args[2] if len(args) >= 3 and args[1] == "--scratch" else ""

        def body() -> None:
            cfg = config_mod.load(call.config_path)
            if verb == "prepare":
                helper_prepare(cfg, scratch, cwd, environ)
            else:
                helper_finish(cfg, environ)

        alarm = call.alarm_s if verb == "prepare" else FINISH_ALARM_S
        return run_hook(SYSTEM, verb, body, HELPER_EXIT, alarm_s=alarm)
    print("usage: python -I -m vibatch.batch.htcondor [--config PATH] [--helper PATH] "
          "wrapper EXECUTABLE [ARGS...] | job_exit REASON | helper prepare --scratch DIR | "
          "helper finish", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
