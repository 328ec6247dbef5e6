"""HTCondor: ``USER_JOB_WRAPPER``, the starter's ``PREPARE_JOB`` and ``JOB_EXIT`` hooks, all run
as the job user, with a root helper (``vm-helper``, reached through sudo) that boots and tears down
the job's VM. What a real condor_starter does (seen on HTCondor 25.0.13, built from source; see
docs/batch/htcondor.md and tests/condor_starter.py):

- condor_starter (real uid root, effective uid HTCondor's account) makes the scratch directory
  ``$(EXECUTE)/dir_<its pid>``, hands it to the job user (0700), and since 24.0 writes
  ``.job.ad`` and ``.machine.ad`` into it *as the user*. So the ad files are the user's: the
  helper never reads them.
- ``<Keyword>_HOOK_PREPARE_JOB`` runs as the user, after file transfer, with the job ad on stdin.
  A ``HookStatusCode`` of 300 or more on its stdout is a shadow exception: the job goes back to
  Idle. 1 to 299 holds the job. This is the only way a node fault requeues the job on 24 and 25:
  the starter looks for ``$_CONDOR_WRAPPER_ERROR_FILE`` as its own account, which cannot enter
  the user's 0700 scratch directory (23.0 wrote the directory as its account and did see it).
- ``USER_JOB_WRAPPER`` runs as the user with argv ``<scratch>/<executable> <args>``, no PATH, in
  its own session, stdin /dev/null, cwd the scratch directory (or the Iwd without file
  transfer), in a mount namespace of its own (MOUNT_UNDER_SCRATCH), which the helper it calls
  leaves for its starter's. Its exit status is the job's; condor_rm's KillSig goes to it.
- ``<Keyword>_HOOK_JOB_EXIT`` runs as the user after the job (``exit``, also after SIGKILL, or
  ``evict`` after condor_rm), with the starter's environment, which holds HTCondor's session key
  (``CONDOR_PRIVATE_INHERIT``); the starter waits 30 s for it.

The helper believes nothing the user says. It finds the root condor_starter among its own
ancestors and checks that the process the starter runs is the sudo caller's; the scratch
directory must be that starter's. The job (id, cores, memory, OS, Iwd) comes from the local
startd's own slot ad, asked for by root at the address HTCondor's account wrote in LOG, for the
slot whose ``StarterPid`` (25.0 on) or ``-slot-name`` (the starter's command line, written by
the startd) is that starter's. The VM's life is bound to the starter: the wrapper ends it when
the job ends, the JOB_EXIT hook when the starter removes or evicts the job, and ``vibatch reap``
once the starter is gone.

The OS is chosen with a job attribute, ``+VibatchImage = "el9"`` in the submit file.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import signal
import stat
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import psutil

from .. import proc
from ..config import Config
from ..errors import Fault, NodeError, ResourceRequestError, VibatchError
from ..util import log_error
from ..core.jobdir import JobPaths
from ..core.request import JobRequest, check_job_id, make_request, resolve_user
from .base import AS_IS, BatchSystem, Call, HookTimeout, exits, main, run_root
from .htcondor_usage import FINAL_WAIT_MAX_S, Tracking, final_snapshot, take, tracking_gid
from .kit import STARTER_FAILED, exec_job, fit_vm, read_request
SUDO = "/usr/bin/sudo"
SUDO_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}   # nothing of the job's reaches sudo
TOOL_ENV_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STARTER_NAME = "condor_starter"
IMAGE_ATTR = "VibatchImage"
# The job attributes the startd must copy into the slot ad (STARTD_JOB_ATTRS) for the helper.
SLOT_JOB_ATTRS = (IMAGE_ATTR, "Iwd", "AllowedJobDuration")
AD_MAX_BYTES = 1 << 20
TOOL_TIMEOUT_S = 30
MAX_ANCESTRY = 64
CLONE_NEWNS = 0x00020000
# the mount API (Linux 5.2; the same syscall numbers on every architecture)
SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429
AT_FDCWD, OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH = -100, 1, 4
PREPARE_ALARM_S = 600     # the helper's own deadline for booting; the hooks have none
FINISH_ALARM_S = 25       # the starter waits 30 s for the JOB_EXIT hook
SUDO_MARGIN_S = 15
# HTCondor's secrets in the starter's environment (the hooks get it; DaemonCore's session key
# CONDOR_PRIVATE_INHERIT, the shared port cookie, the parent's address): never passed on.
SECRET_ENV_PREFIXES = ("CONDOR_PRIVATE_", "CONDOR_INHERIT")
# What HTCondor sees (docs/batch/htcondor.md). A job fault: the job completes with 125 and the
# reason in its error output. A node fault in PREPARE_JOB: HookStatusCode 300 (>= 300), a shadow
# exception, and the job goes back to Idle (the hook itself exits 0). A node fault in the
# wrapper: exit 1 (HTCondor 23 requeues it, reading the error file; 24 and 25 cannot read that
# file and end the job). The helper's codes pass between our hooks and our helper only.
EXIT = {
    "wrapper": exits(ok=AS_IS, job=STARTER_FAILED, node=1),
    "prepare_job": exits(ok=0, job=0, node=300),     # the HookStatusCode it prints
    "helper": exits(ok=0, job=3, node=4),
}


# ---------------------------------------------------------------------------------------------
# ClassAds
def _classad():
    try:
        import classad2  # noqa: PLC0415 - only HTCondor nodes need the htcondor package
    except ImportError:
        raise NodeError("the htcondor Python package (its ClassAd parser) is missing from "
                        "vibatch's environment: pip install 'vibatch[htcondor]'") from None
    return classad2


def parse_ads(text: str, what: str) -> list:
    """The ClassAds in ``condor_status -l`` output (blank-line separated), HTCondor's parser."""
    classad2 = _classad()
    try:
        ads = [ad for ad in classad2.parseAds(text) if len(ad)]
    except Exception as e:  # noqa: BLE001 - the parser's own exception types vary by release
        raise NodeError(f"{what}: not ClassAds ({e})") from None
    return ads


def parse_ad(data: bytes, what: str) -> Any:
    """One ClassAd in the ``condor_q -l`` format."""
    classad2 = _classad()
    try:
        ad = classad2.parseOne(data.decode("utf-8", errors="replace"))
    except Exception as e:  # noqa: BLE001
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
    """``<ClusterId>.<ProcId>@<schedd>``: unique on the node even across access points. A job
    ad has ClusterId and ProcId; the startd's slot ad has JobId ``"<cluster>.<proc>"``."""
    cluster, procid = ad_int(ad, "ClusterId"), ad_int(ad, "ProcId")
    if cluster is None or procid is None:
        m = re.fullmatch(r"(\d+)\.(\d+)", ad_str(ad, "JobId") or "")
        if not m:
            raise NodeError("the ad has no ClusterId/ProcId (nor a JobId)")
        cluster, procid = int(m[1]), int(m[2])
    schedd = (ad_str(ad, "GlobalJobId") or "").split("#", 1)[0]
    schedd = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.@+:-]", "_", schedd)).strip(".")[:96]
    return check_job_id(f"{cluster}.{procid}@{schedd}" if schedd else f"{cluster}.{procid}")


def job_from_ads(cfg: Config, job_ad: Any, machine_ad: Any, user: str, workdir: str) -> JobRequest:
    """The slot's cores and memory: what HTCondor provisioned (which may exceed the request),
    from the machine ad alone. The helper passes the startd's slot ad as both: it holds the
    slot's Cpus and Memory and the job's attributes in STARTD_JOB_ATTRS. Without them the VM is
    not sized at all: RequestCpus and RequestMemory are expressions the user wrote, and what they
    evaluate to is not what the startd gave the slot (docs/security.md)."""
    image = _value(job_ad, IMAGE_ATTR)
    if IMAGE_ATTR in job_ad and not (isinstance(image, str) and image):
        raise ResourceRequestError(f"the job attribute {IMAGE_ATTR} must be an OS or image name "
                                   f"in quotes, such as +{IMAGE_ATTR} = \"el9\"")
    cores, memory = ad_int(machine_ad, "Cpus"), ad_int(machine_ad, "Memory")
    if not cores or not memory or cores < 0 or memory < 0:
        raise NodeError("the startd's slot ad has no Cpus and Memory; refusing to size the VM "
                        "from the job's own RequestCpus/RequestMemory (the user's expressions)")
    walltime = ad_int(job_ad, "AllowedJobDuration")
    return make_request(job_id=job_id_of(job_ad), user=user, cores=cores, memory_mb=memory,
                        workdir=workdir, image=image or None,
                        walltime_s=walltime if walltime and walltime > 0 else None,
                        account=ad_str(job_ad, "AccountingGroup") or ad_str(job_ad, "AcctGroup"))


def config_fragment(names: Sequence[str], daemon: str) -> str:
    """HTCondor configuration from ``vibatch image offer --format htcondor-startd|schedd``.

    startd (execute points): advertise the names this node offers as ``VibatchImages`` and
    start only jobs that ask for none or for one of them, so the negotiator never sends a job
    to a node that lacks its OS. schedd (access points): refuse any other name at submit; the
    schedd evaluates SUBMIT_REQUIREMENT with MY bound to its own ad, so the job is TARGET.
    Names are compared case-sensitively everywhere (stringListMember), as the helper does."""
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
            f"string(TARGET.{IMAGE_ATTR}), \"\\\" (names are case-sensitive); choose one of: "
            f"{choices}\")\n")


START_CLAUSE = (f"TARGET.{IMAGE_ATTR} is undefined || "
                f"stringListMember(TARGET.{IMAGE_ATTR}, MY.VibatchImages)")
SUBMIT_CLAUSE = (f'TARGET.{IMAGE_ATTR} is undefined || (isString(TARGET.{IMAGE_ATTR}) && '
                 f'stringListMember(TARGET.{IMAGE_ATTR}, "{{names}}"))')


# ---------------------------------------------------------------------------------------------
# The root helper: who is calling, and what may be believed
@dataclass(frozen=True)
class Caller:
    uid: int
    starter_pid: int
    job_pid: int = 0     # the starter's child we descend from: the wrapper, or a hook


def find_caller(environ: dict) -> Caller:
    """The sudo caller, which must be the process a root condor_starter runs (a hook or the
    wrapper): sudo's SUDO_UID, and our ancestry up to that starter (real uid 0)."""
    sudo_uid = environ.get("SUDO_UID", "")
    if not sudo_uid.isdigit() or int(sudo_uid) == 0:
        raise NodeError("the VM helper runs only through sudo, called by a job's user "
                        "(SUDO_UID is missing or root)")
    uid = int(sudo_uid)
    below: list[tuple[int, int]] = []    # (pid, real uid) from our parent upwards
    try:
        p: Optional[psutil.Process] = psutil.Process(os.getppid())
        for _ in range(MAX_ANCESTRY):
            if p is None:
                break
            if p.name() == STARTER_NAME and p.uids().real == 0:
                if not below or below[-1][1] != uid:
                    raise NodeError(f"condor_starter {p.pid} does not run this job as uid {uid}")
                return Caller(uid, p.pid, below[-1][0])
            below.append((p.pid, p.uids().real))
            p = p.parent()
    except psutil.Error:
        pass
    raise NodeError("the VM helper was not called from an HTCondor job: no root condor_starter "
                    "among its ancestors (USE_PID_NAMESPACES hides it)")


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNS) != 0:
        raise NodeError(f"cannot enter {what}: {os.strerror(ctypes.get_errno())}")


def enter_mount_namespace(caller: Caller) -> Optional[int]:
    """Act in the mount namespace of the caller's starter, where the hooks run; return a
    descriptor of the one left (None: we were there). The starter runs the wrapper, and so sudo
    and this helper, in the job's own namespace (MOUNT_UNDER_SCRATCH makes one): libvirtd and
    the share launcher it starts never see a mount made there, such as the job's I/O tmpfs, and
    the VM cannot start (seen on 25.0.13)."""
    pid = caller.starter_pid
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        left = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NodeError(f"condor_starter {pid}'s mount namespace: {e.strerror}") from None
    try:
        theirs, ours = os.fstat(fd), os.fstat(left)
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            os.close(left)
            return None
        try:    # the namespace we hold is that of the root starter find_caller saw
            p = psutil.Process(pid)
            if p.name() != STARTER_NAME or p.uids().real != 0:
                raise psutil.NoSuchProcess(pid)
        except psutil.Error:
            raise NodeError(f"condor_starter {pid} ended while the VM helper ran") from None
        _setns(fd, f"condor_starter {pid}'s mount namespace")
    except BaseException:
        os.close(left)
        raise
    finally:
        os.close(fd)
    return left


def lend_mount(path: str, ns: int) -> None:
    """Show the mount at ``path`` at the same path in the mount namespace ``ns`` too (a clone:
    the same files), and come back. The wrapper, in the job's namespace, reads the job's output
    from the I/O tmpfs the prologue mounted in the starter's. A host whose / is a shared mount
    (systemd's default) has propagated it there already; one whose / is private has not."""
    libc = ctypes.CDLL(None, use_errno=True)
    tree = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC)
    if tree < 0:
        raise NodeError(f"cannot clone the mount at {path}: {os.strerror(ctypes.get_errno())}")
    back = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(ns, "the job's mount namespace")
        try:
            if not os.path.ismount(path) and libc.syscall(
                    SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, path.encode(),
                    MOVE_MOUNT_F_EMPTY_PATH) != 0:
                raise NodeError(f"cannot mount {path} in the job's mount namespace: "
                                f"{os.strerror(ctypes.get_errno())}")
        finally:
            _setns(back, "the starter's mount namespace again")
    finally:
        os.close(back)
        os.close(tree)


def trusted_uids(cfg) -> set[int]:
    """Who may own EXECUTE and the startd's address file: root and HTCondor's own account."""
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


class Condor:
    """HTCondor's own tools, run by root with an explicit environment: the site's CONDOR_CONFIG
    (from vibatch's config, never from the caller) and a system PATH."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.env = {"CONDOR_CONFIG": cfg.htcondor.condor_config, "PATH": TOOL_ENV_PATH}

    def run(self, tool: str, args: Sequence[str]) -> str:
        res = proc.run([os.path.join(self.cfg.htcondor.bin_dir, tool), *args],
                       timeout=TOOL_TIMEOUT_S, check=False, env=self.env)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no error output"])[-1]
            raise NodeError(f"{tool} {' '.join(args)} failed (exit {res.returncode}): {last}")
        return res.stdout

    def params(self, *names: str, subsystem: Optional[str] = None) -> list[str]:
        """The values of ``names`` (as ``subsystem``, HTCondor's daemon, sees them)."""
        out = self.run("condor_config_val",
                       [*(["-subsystem", subsystem] if subsystem else []), *names]).splitlines()
        if len(out) != len(names):
            raise NodeError(f"condor_config_val {' '.join(names)}: expected {len(names)} lines, "
                            f"got {len(out)}")
        return [line.strip() for line in out]


def mount_under_scratch_conflicts(value: str, paths: Sequence[str]) -> list[str]:
    """The paths that lie in a directory MOUNT_UNDER_SCRATCH names: the starter gives each job
    (and so the wrapper, sudo and this helper) a private, job-writable copy of it."""
    dirs = [d.rstrip("/") for d in re.split(r"[\s,]+", value.strip('"')) if d.startswith("/")]
    return [f"{p} (in {d})" for p in paths for d in dirs
            if d and (p == d or p.startswith(d + "/"))]


def check_mounts(cfg, config_path: str, value: str) -> None:
    paths = [cfg.state_dir, cfg.run_dir, cfg.library_dir, os.path.dirname(cfg.accounting_file),
             config_path, sys.prefix, cfg.htcondor.bin_dir, cfg.htcondor.condor_config]
    value = value.strip('"')    # condor_config_val prints the default in quotes
    bad = mount_under_scratch_conflicts(value, [os.path.abspath(p) for p in paths])
    if bad:
        raise NodeError(f"MOUNT_UNDER_SCRATCH = {value} gives each job a private copy of "
                        f"{', '.join(bad)}: vibatch and HTCondor's tools must live elsewhere")


def read_address_file(path: str, trusted: set[int]) -> str:
    """The startd's address (a sinful string), as HTCondor's account wrote it in LOG."""
    if not os.path.isabs(path):
        raise NodeError(f"STARTD_ADDRESS_FILE {path!r} is not an absolute path")
    try:
        pst = os.stat(os.path.dirname(path))
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise NodeError(f"the startd's address file {path}: {e.strerror} (is the startd "
                        "running?)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in trusted or st.st_mode & 0o022 \
                or pst.st_uid not in trusted or pst.st_mode & 0o022:
            raise NodeError(f"{path}: the startd's address file and its directory must belong "
                            "to root or htcondor.daemon_user and be writable by no one else")
        data = os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)
    first = (data.splitlines() or [""])[0].strip()
    if not re.fullmatch(r"<[^<>\s]+>", first):
        raise NodeError(f"{path}: no startd address in it")
    return first


def slot_name_of(starter_pid: int) -> Optional[str]:
    """``-slot-name NAME`` from the starter's command line (the startd wrote it; only root can
    change a root process's memory). HTCondor 23 and 24 have no StarterPid in the slot ad."""
    try:
        with open(f"/proc/{starter_pid}/cmdline", "rb") as f:
            argv = f.read(65536).decode(errors="replace").split("\0")
    except OSError:
        return None
    for flag in ("-slot-name", "-a"):
        if flag in argv[:-1]:
            name = argv[argv.index(flag) + 1]
            if re.fullmatch(r"slot\d+(_\d+)?", name):
                return name
    return None


def pick_slot(ads: Sequence[Any], starter_pid: int, slot_name: Optional[str]) -> Any:
    """The one slot ad whose StarterPid is the starter's (25.0 on); before 25.0, the one named
    as the starter's command line says, which has no StarterPid."""
    mine = [ad for ad in ads if ad_int(ad, "StarterPid") == starter_pid]
    if not mine:
        mine = [ad for ad in ads if slot_name and "StarterPid" not in ad
                and (ad_str(ad, "Name") or "").split("@", 1)[0] == slot_name]
    if len(mine) != 1:
        raise NodeError(f"the startd has {len(mine)} slots running condor_starter {starter_pid} "
                        f"(slot {slot_name or '?'}; expected one)")
    ad = mine[0]
    if ad_str(ad, "State") != "Claimed" or not ad_str(ad, "JobId"):
        raise NodeError(f"slot {ad_str(ad, 'Name')} is not running a job (State "
                        f"{ad_str(ad, 'State')})")
    if "Iwd" not in ad:
        raise NodeError(f"the slot ad lacks the job's attributes: add "
                        f"'STARTD_JOB_ATTRS = $(STARTD_JOB_ATTRS) {' '.join(SLOT_JOB_ATTRS)}' "
                        "to the execute point's configuration (docs/batch/htcondor.md)")
    return ad


def slot_ad(caller: Caller, trusted: set[int], condor: Condor, address_file: str) -> Any:
    """The startd's own ad for the slot that runs the caller's starter, asked for directly at
    the address HTCondor's account wrote (not through the collector)."""
    address = read_address_file(address_file, trusted)
    ads = parse_ads(condor.run("condor_status", ["-direct", address, "-l"]),
                    "the startd's slot ads")
    return pick_slot(ads, caller.starter_pid, slot_name_of(caller.starter_pid))


def helper_prepare(core: Any, config_path: str, scratch: str, cwd: str, environ: dict,
                   wrapper: bool = False) -> None:
    """Boot the VM of the caller's job (once: a second call, from the wrapper after the
    PREPARE_JOB hook, finds it) and print its job id. Called by the wrapper (``--wrapper``):
    the VM then joins the job's cgroups and gets its suspend watcher (htcondor_usage.py)."""
    caller = find_caller(environ)
    job_ns = enter_mount_namespace(caller)
    try:
        job_id, counted = _prepare(core, config_path, scratch, cwd, caller, job_ns, wrapper)
        if wrapper:
            take(core.cfg, job_id, caller.job_pid, caller.starter_pid, caller.uid, counted)
        print(job_id)
    finally:
        if job_ns is not None:
            os.close(job_ns)


def _prepare(core: Any, config_path: str, scratch: str, cwd: str, caller: Caller,
             job_ns: Optional[int], wrapper: bool) -> tuple[str, Optional[Tracking]]:
    """(the job id, and whether condor_procd counts the VM by the job's tracking group)."""
    cfg = core.cfg
    held = core.jobs_held_by(caller.starter_pid)
    if held:
        return held[0], None
    trusted = trusted_uids(cfg)
    dfd, where = open_scratch(scratch, caller, trusted, cfg.htcondor.daemon_user)
    os.close(dfd)
    condor = Condor(cfg)
    address_file, mounts = condor.params("STARTD_ADDRESS_FILE", "MOUNT_UNDER_SCRATCH")
    check_mounts(cfg, config_path, mounts)
    ad = slot_ad(caller, trusted, condor, address_file)
    iwd = ad_str(ad, "Iwd")
    # HTCondor starts the job in its scratch directory (file transfer) or in its Iwd (shared
    # file system); the VM shares that one directory.
    workdir = os.path.realpath(cwd)
    if workdir not in (where, os.path.realpath(iwd) if iwd else where):
        raise NodeError(f"the job was started in {cwd}, neither its scratch directory nor its Iwd")
    # a run of this job whose starter died leaves its id taken: end that run. Only this job's:
    # a node-wide reap here would take another job's prologue that has not written its state.
    job_id = job_id_of(ad)
    if core.holder_ended(job_id):
        core.epilogue(job_id, None)
    user = resolve_user(str(caller.uid)).name
    req = read_request(lambda: job_from_ads(cfg, ad, ad, user, workdir))
    # only the wrapper boots the VM once the job's process family exists
    req, counted = counted_by_procd(cfg, condor, caller, req, in_family=wrapper)
    core.prologue(req, holder=caller.starter_pid)
    if job_ns is not None:   # called by the wrapper (no PREPARE_JOB hook)
        try:
            lend_mount(JobPaths.of(cfg, req.job_id).io, job_ns)
        except NodeError:
            core.epilogue(req.job_id, None)   # the wrapper ends no VM it was not told of
            raise
    return req.job_id, counted


def counted_by_procd(cfg: Config, condor: Condor, caller: Caller, req: JobRequest,
                     in_family: bool = True) -> tuple[JobRequest, Optional[Tracking]]:
    """Under condor_procd with USE_GID_PROCESS_TRACKING, the starter gives the job's first
    process (the wrapper) a tracking group, and the procd counts every process it has not seen
    before that carries the group: QEMU and the share launchers get it (``process_gid``), and
    the job's CPU and memory in its ad are then the VM's. HTCondor's memory policies compare
    that memory (MemoryUsage) with the slot's Memory, so the whole VM is made to fit in it
    (kit.fit_vm). Anything short of that leaves the VM out of the job's usage, as without the
    group (logged): never the job's failure. Only where the wrapper boots the VM: before it
    runs (the PREPARE_JOB hook, ``in_family`` false) there is no family yet, and the procd
    never takes a process it has seen before: that is logged, once per job."""
    def uncounted(why: Exception) -> tuple[JobRequest, Optional[Tracking]]:
        log_error(f"htcondor: job {req.job_id}: the VM stays out of its usage", why)
        return req, None
    try:
        use, low, high, every = condor.params(
            "USE_GID_PROCESS_TRACKING", "MIN_TRACKING_GID", "MAX_TRACKING_GID",
            "PID_SNAPSHOT_INTERVAL", subsystem="STARTER")
        if use.lower() in ("false", "0"):      # HTCondor's own spellings of a boolean
            return req, None
        if use.lower() not in ("true", "1"):
            raise NodeError(f"USE_GID_PROCESS_TRACKING is {use!r}, not true or false")
        if not (low.isdigit() and high.isdigit() and every.isdigit()) \
                or not 0 < int(low) <= int(high):
            raise NodeError(f"USE_GID_PROCESS_TRACKING is on, but MIN_TRACKING_GID "
                            f"{low!r}, MAX_TRACKING_GID {high!r} or PID_SNAPSHOT_INTERVAL "
                            f"{every!r} is not a valid number")
        if not in_family:
            raise NodeError("USE_GID_PROCESS_TRACKING is on, but the PREPARE_JOB hook boots the "
                            "VM before the job's process family exists, so the procd never "
                            "counts it (without the hook the wrapper boots it, and it is)")
        gid = tracking_gid(caller.job_pid, int(low), int(high))
        fitted = fit_vm(cfg, req, req.memory_mb, f"the slot's {req.memory_mb} MiB")
    except (NodeError, ResourceRequestError, OSError, ValueError) as e:
        return uncounted(e)
    return dataclasses.replace(fitted, process_gid=gid), Tracking(gid, int(every))


def helper_finish(core: Any, environ: dict, wrapper: bool = False) -> list[str]:
    """End the VMs of the caller's starter (none: nothing to do). Called by the wrapper
    (``--wrapper``), once the job in a VM that condor_procd counts has ended: first the
    procd's last look at it (htcondor_usage.final_snapshot)."""
    caller = find_caller(environ)
    job_ns = enter_mount_namespace(caller)
    if job_ns is not None:
        os.close(job_ns)
    jobs = core.jobs_held_by(caller.starter_pid)
    for job_id in jobs:
        if wrapper:
            try:
                final_snapshot(core.cfg, job_id)
            except HookTimeout:
                pass    # stopped with the job (condor_suspend) past our alarm: the wait is over
            signal.alarm(FINISH_ALARM_S)   # the epilogue's own time, whatever the wait took
        core.epilogue(job_id, None)
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
    return proc.run([SUDO, "-n", helper, verb, *args], timeout=timeout, check=False,
                    env=dict(SUDO_ENV))


def _helper_message(res: proc.Result) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    return "\n".join(lines) or f"sudo {res.argv[2]} exited with status {res.returncode}"


def _finish(helper: str, timeout: float, wrapper: bool = False) -> Optional[str]:
    """Have the helper end the VMs of our starter; None, or why it could not."""
    try:
        res = _helper(helper, "finish", ["--wrapper"] if wrapper else [], timeout)
    except VibatchError as e:
        return e.message
    return None if res.returncode == 0 else _helper_message(res)


def _drain_stdin() -> None:
    try:
        sys.stdin.buffer.read(AD_MAX_BYTES)   # the job ad; not needed, but drain the pipe
    except (OSError, ValueError):
        pass


def _helper_fault(returncode: int) -> Optional[Fault]:
    """What the helper's exit code says (anything it never exits with: the node's fault)."""
    return {code: fault for fault, code in EXIT["helper"].items()}.get(returncode, Fault.NODE)


def _classad_string(text: str) -> str:
    return '"' + _one_line(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare_job(helper: str, environ: dict) -> int:
    """The starter's PREPARE_JOB hook: boot the VM before the wrapper runs, so that a node
    fault can put the job back to Idle (HookStatusCode 300). A job fault is left to the
    wrapper, which reports it in the job's own error output."""
    _drain_stdin()
    scratch = environ.get("_CONDOR_SCRATCH_DIR", "")
    try:
        os.chdir(environ.get("_CONDOR_JOB_IWD") or scratch)   # where the job will start
    except OSError:
        pass
    message = ""
    try:
        res = _helper(helper, "prepare", ["--scratch", scratch], PREPARE_ALARM_S + SUDO_MARGIN_S)
        fault = _helper_fault(res.returncode)
        if fault is not None:
            message = _helper_message(res)
    except VibatchError as e:
        fault, message = Fault.NODE, f"the VM helper: {e.message}"
    first = (message.splitlines() or [""])[0]
    status = EXIT["prepare_job"][fault]
    if fault is Fault.NODE:
        print(f"vibatch: htcondor prepare_job (node fault; the job goes back to Idle): {message}",
              file=sys.stderr)
        # the first line (the console tail stays in the StarterLog): into the job's event log
        print(f"HookStatusCode = {status}\nHookStatusMessage = "
              f"{_classad_string(first + ' (the job goes back to Idle)')}")
    elif fault is Fault.JOB:   # a warning in the job's event log; the wrapper fails it
        print(f"HookStatusCode = {status}\nHookStatusMessage = {_classad_string(first)}")
    return 0


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


def wrapper(call: Call) -> int:
    """USER_JOB_WRAPPER: boot the VM through the helper (it finds the one PREPARE_JOB booted),
    run the job in it, end it."""
    helper, argv, environ = call.helper, call.args, call.env
    codes = EXIT["wrapper"]
    err_file = environ.get("_CONDOR_WRAPPER_ERROR_FILE", "")
    scratch = environ.get("_CONDOR_SCRATCH_DIR", "")
    for name in [n for n in os.environ if n.startswith(SECRET_ENV_PREFIXES)]:
        del os.environ[name]     # the guest gets the job's environment, never HTCondor's keys

    def node_fault(message: str) -> int:
        print(f"vibatch: htcondor wrapper (node fault): {message}\nvibatch: the job ends with "
              f"exit {codes[Fault.NODE]}; HTCondor 24 and later do not rerun it (only a "
              "node fault in the PREPARE_JOB hook sends a job back to Idle)", file=sys.stderr)
        if err_file:   # HTCondor 23 reads it and reruns the job; one line, copied into its ad
            try:
                with open(err_file, "w") as f:
                    f.write(f"vibatch: {_one_line(message)}\n")
            except OSError as e:
                print(f"vibatch: htcondor wrapper: cannot write {err_file}: {e.strerror}",
                      file=sys.stderr)
        return codes[Fault.NODE]

    if not argv:
        return node_fault("called without the job's executable (is this USER_JOB_WRAPPER?)")
    if not scratch or not helper:
        return node_fault("no $_CONDOR_SCRATCH_DIR, or the shim names no helper")
    if _no_new_privs():
        return node_fault("the job runs with no_new_privs (DISABLE_SETUID = true?), so sudo "
                          "cannot start the VM helper")
    pending = _Pending()
    try:
        res = _helper(helper, "prepare", ["--scratch", scratch, "--wrapper"],
                      PREPARE_ALARM_S + SUDO_MARGIN_S)
    except VibatchError as e:
        return node_fault(f"the VM helper: {e.message}")
    finally:
        pending.restore()
    fault = _helper_fault(res.returncode)
    if fault is Fault.JOB:
        print(_helper_message(res), file=sys.stderr)
        return codes[Fault.JOB]
    if fault is Fault.NODE:
        return node_fault(_helper_message(res))
    try:
        if pending.signals:     # removed or vacated while booting: do not start the job
            return 128 + pending.signals[0]
        try:
            job_id = check_job_id((res.stdout.strip().splitlines() or [""])[-1])
            return exec_job(call.cfg(), job_id, list(argv))
        except VibatchError as e:
            print(f"vibatch: htcondor wrapper: {e.message}", file=sys.stderr)
            return codes[Fault.JOB]
        except Exception as e:  # noqa: BLE001 - the job ran (or began to): never run it twice
            print(f"vibatch: htcondor wrapper: {type(e).__name__}: {e}", file=sys.stderr)
            return codes[Fault.JOB]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # finish even if signalled again
        # the procd's last look at a VM it counts, after condor_rm or a vacate too: else the
        # job's user could end their own job by a signal and have its VM's last CPU uncounted.
        # A starter that SIGKILLs us first takes its own snapshot before it kills
        why = _finish(helper, FINISH_ALARM_S + FINAL_WAIT_MAX_S + SUDO_MARGIN_S, wrapper=True)
        if why is not None:
            print(f"vibatch: htcondor: ending the VM failed; the JOB_EXIT hook or `vibatch "
                  f"reap` will: {why}", file=sys.stderr)


def job_exit(helper: str, argv: Sequence[str]) -> int:
    """The starter's JOB_EXIT hook: whatever the reason (exit, evict...), the job's VM ends.
    Its exit code changes nothing in HTCondor; its stderr goes to the StarterLog."""
    _drain_stdin()
    why = _finish(helper, FINISH_ALARM_S + 3)
    if why is None:
        return 0
    print(f"vibatch: htcondor job exit ({argv[0] if argv else '?'}): {why}", file=sys.stderr)
    return 1


class HTCondor(BatchSystem):
    """No root prologue or epilogue: the job user's hooks reach a root helper through sudo."""

    name = "htcondor"
    EXIT = EXIT
    prologue_hook = epilogue_hook = starter_hook = None
    default_alarm_s = PREPARE_ALARM_S
    offer_formats = {"htcondor-startd": lambda names: config_fragment(names, "startd"),
                     "htcondor-schedd": lambda names: config_fragment(names, "schedd")}
    usage = ("[--config PATH] [--helper PATH] wrapper EXECUTABLE [ARGS...] | prepare_job | "
             "job_exit REASON | helper prepare --scratch DIR [--wrapper] | helper finish [--wrapper]")

    def other_hook(self, call: Call) -> Optional[int]:
        if call.hook == "wrapper":       # as the job user, with the job's environment
            return wrapper(call)
        if call.hook == "prepare_job":   # as the job user, with the starter's environment
            return prepare_job(call.helper, call.env)
        if call.hook == "job_exit":      # as the job user
            return job_exit(call.helper, call.args)
        if call.hook == "helper" and call.args[:1] in (["prepare"], ["finish"]):   # root, sudo
            if call.args[0] == "finish" and call.args[1:] not in ([], ["--wrapper"]):
                return None
            return self.helper(call, call.args[0])
        return None

    def helper(self, call: Call, verb: str) -> int:
        args = call.args
        scratch = args[2] if len(args) >= 3 and args[1] == "--scratch" else ""

        def body(core: Any) -> None:
            if verb == "prepare":
                helper_prepare(core, call.config_path, scratch, call.cwd, call.env,
                               wrapper="--wrapper" in args[3:])
            else:
                helper_finish(core, call.env, wrapper=args[1:] == ["--wrapper"])

        alarm = call.alarm(self.default_alarm_s) if verb == "prepare" else \
            FINISH_ALARM_S + (FINAL_WAIT_MAX_S if args[1:] == ["--wrapper"] else 0)
        return run_root(self, call, body, alarm, what=verb)


SYSTEM = HTCondor()

if __name__ == "__main__":
    sys.exit(main(SYSTEM))
