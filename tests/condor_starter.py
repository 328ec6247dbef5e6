"""A stand-in for condor_starter (and for the two startd queries the VM helper makes), for the
HTCondor contract tests. It encodes what a real HTCondor 25.0.13 starter was seen doing for a
vanilla job with USER_JOB_WRAPPER and the PREPARE_JOB and JOB_EXIT hooks (a personal pool built
from source; see docs/batch/htcondor.md), in order:

1. as root (real uid 0; effective uid HTCondor's account while it waits), under the process name
   ``condor_starter``, with ``-a <slot>`` on its command line as the startd starts it,
   it makes ``<EXECUTE>/dir_<its pid>`` and hands it to the job user (mode 0700); the startd's
   slot ad now names it (``StarterPid``; not before 25.0) and holds the job's STARTD_JOB_ATTRS;
2. it writes ``.job.ad``, ``.machine.ad`` and the chirp config into it *as the user* (0644);
3. it runs ``<Keyword>_HOOK_PREPARE_JOB`` as the user, job ad on stdin, with the starter's
   environment (CONDOR_PRIVATE_INHERIT too). ``HookStatusCode`` on its stdout overrides its exit
   status: 1-299 holds the job, 300 and more put it back to Idle; either way the job never runs;
4. it starts ``USER_JOB_WRAPPER <scratch>/<executable> <args...>`` as the user, in its own
   session, in the scratch directory (or the Iwd without file transfer), stdin /dev/null,
   stdout/stderr into files, with the job's environment plus the starter's variables and **no
   PATH**; in a mount namespace of its own (DaemonCore: ``unshare(CLONE_NEWNS|CLONE_FS)``, ``/``
   made a recursive slave, then ``<scratch>/<dir>`` bound over each ``MOUNT_UNDER_SCRATCH``
   directory and a fresh ``/dev/shm``), so nothing mounted there (by sudo and the helper too)
   is seen outside it; the hooks run in the starter's own namespace;
5. condor_rm sends the job's KillSig to the wrapper, then SIGKILL to its process group after the
   kill-signal timeout;
6. after the job it looks for ``$_CONDOR_WRAPPER_ERROR_FILE`` *as its own account*, which cannot
   enter the user's 0700 directory, so the file is never seen (23.0, which wrote the directory
   as its account, saw it and requeued the job: ``legacy_23`` in the spec);
   It tracks the job (``tracking`` in the spec) in one of two ways, both seen on this host:
   ``procd`` (condor_procd, by process tree and environment: the stock starter here, whose cgroup
   v1 code needs ``cpu,cpuacct`` mounted together) or ``cgroup`` (ProcFamilyDirectCgroupV1, on
   the usual layout: here with ``/sys/fs/cgroup/cpu,cpuacct`` a link to ``cpuacct``). With
   cgroups it makes ``htcondor/<EXECUTE, / as _>_<slot>@<host>`` in the memory, cpu,cpuacct,
   freezer and devices hierarchies (removing a stale one first), hands the leaf directories to
   the user and moves the wrapper in before it execs; the job's RemoteUserCpu/RemoteSysCpu are
   that cgroup's ``cpuacct.stat`` (USER_HZ, whole seconds), its ResidentSetSize the ``rss`` line
   of its ``memory.stat``;
   condor_suspend (``suspend`` in the spec): ``FROZEN`` into the job's ``freezer.state`` (the
   wrapper then shows state D), condor_continue ``THAWED``; under the procd SIGSTOP to every
   process of the job's family (the wrapper's process tree), then SIGCONT;
   once the wrapper has exited, with cgroups: the cgroup frozen, SIGKILL to every process in its
   memory ``cgroup.procs``, thawed, the usage read, the directories removed;
   ``cgroup2`` is not seen (this host has no v2 controllers) but played from the 25.0.13 source
   (ProcFamilyDirectCgroupV2, vanilla_proc.cpp) on this host's unified hierarchy, whose core
   files (cgroup.freeze, cgroup.events, cgroup.kill, cpu.stat) need no controller: the leaf
   ``htcondor/<EXECUTE, / as _>_<slot>@<host>``, the wrapper in its ``<basename>.scope``
   child (cgroup.procs handed to the user); condor_suspend writes ``1`` to the leaf's
   ``cgroup.freeze``, continue ``0``; at the end the leaf is frozen, ``1`` written to its
   ``cgroup.kill``, thawed, the usage read (cpu.stat's user_usec and system_usec; memory.stat
   needs the memory controller, which v2 does not have here) and the tree removed;
7. it runs the JOB_EXIT hook as the user with ``exit`` (also after the wrapper was SIGKILLed) or
   ``evict`` (after condor_rm), the job ad on stdin, the starter's environment plus the job's,
   root's PATH, CONDOR_CONFIG, CONDOR_PRIVATE_INHERIT and _CONDOR_MAINJOB_EXIT_CODE; it kills
   the hook after 30 s;
8. it removes the scratch directory.

Usage: ``python condor_starter.py -f -a slot1_1 SPEC.json``; the outcome is written as
JSON to spec["result"]. ``python condor_starter.py tool condor_status|condor_config_val ARGS``
plays those two tools, reading the fake pool that $CONDOR_CONFIG (a JSON file) describes.
Standard library only (except ``submit_requirement``, which uses HTCondor's ClassAd library).
"""
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

PR_SET_NAME = 15
CLONE_NEWNS, CLONE_FS = 0x00020000, 0x00000200
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
ERROR_FILE = ".job_wrapper_failure"
JOB_EXIT_TIMEOUT_S = 30
SLOT = "slot1_1"
# the session key DaemonCore hands its children (a real one is a long random string)
PRIVATE_INHERIT = "SessionKey:44ab0e1f5d83-secret-4c1d9b7a; Family:14fc6e9e0a"
# what the real condor_config_val prints for these when the configuration does not set them
PARAM_DEFAULTS = {"USE_GID_PROCESS_TRACKING": "false", "MIN_TRACKING_GID": "0",
                  "MAX_TRACKING_GID": "0", "PID_SNAPSHOT_INTERVAL": "15"}
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def write_as(path, data, uid, gid, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return None


def read_as(path, uid, gid):
    """The file's text as ``uid`` sees it; None when that user cannot read it."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.stdout.write(open(sys.argv[1])"
                        ".read())", path], capture_output=True, text=True, user=uid, group=gid,
                       extra_groups=[], timeout=30, env={})
    return r.stdout if r.returncode == 0 else None


def mount_under_scratch(spec, scratch, uid, gid):
    """VanillaProc::StartJob: ``(<scratch><dir>, <dir>)`` for each MOUNT_UNDER_SCRATCH directory
    (the pool's value, as condor_config_val prints it), the source made as the user, 0700."""
    with open(spec["condor_config"]) as f:
        value = json.load(f)["params"].get("MOUNT_UNDER_SCRATCH", '"/tmp,/var/tmp"')
    pairs = []
    for d in filter(None, re.split(r"[\s,]+", value.strip('"'))):
        src = scratch + d
        if not os.path.isdir(d) or src.startswith(d):
            continue
        path = scratch
        for part in d.strip("/").split("/"):
            path = os.path.join(path, part)
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
                os.chown(path, uid, gid)
        pairs.append((src, d))
    return pairs


def job_namespace(pairs, uid, gid, cgroups=(), groups=()):
    """The wrapper's start (DaemonCore's Create_Process with a FilesystemRemap): into the job's
    cgroups (cgroupify_myself), a mount namespace of its own, then the user. Runs in the child,
    before exec."""
    def enter():
        for d in cgroups:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        libc = ctypes.CDLL(None, use_errno=True)
        steps = [(libc.unshare, (CLONE_NEWNS | CLONE_FS,)),
                 (libc.mount, (b"", b"/", b"dontcare", MS_REC | MS_SLAVE, b""))]
        steps += [(libc.mount, (src.encode(), dst.encode(), None, MS_BIND, None))
                  for src, dst in pairs]
        if pairs:   # AddDevShmMapping (MOUNT_PRIVATE_DEV_SHM)
            steps.append((libc.mount, (b"/dev/shm", b"/dev/shm", b"tmpfs", 0, None)))
        for call, args in steps:
            if call(*args) != 0:
                raise OSError(ctypes.get_errno(), f"{call.__name__}{args[:2]}")
        os.setgroups(list(groups))   # with USE_GID_PROCESS_TRACKING: the family's tracking gid
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    return enter


CGROUP_ROOT = "/sys/fs/cgroup"
USER_HZ = 100


def job_cgroups(spec, slot):
    """ProcFamilyDirectCgroupV1's directories of the job, by controller (made afresh)."""
    name = f"htcondor/{spec['execute'].replace('/', '_')}_{slot}@node"
    cpu = "cpu,cpuacct" if os.path.isdir(os.path.join(CGROUP_ROOT, "cpu,cpuacct")) else "cpuacct"
    dirs = {c: os.path.join(CGROUP_ROOT, h, name) for c, h in
            (("memory", "memory"), ("cpuacct", cpu), ("freezer", "freezer"),
             ("devices", "devices"))}
    for d in dirs.values():
        remove_cgroup(d)
        os.makedirs(d, 0o755)
        os.chown(d, spec["uid"], spec["gid"])
    return dirs


def job_cgroup_v2(spec, slot):
    """ProcFamilyDirectCgroupV2's leaf of the job and the .scope the wrapper goes to (made
    afresh), in the unified hierarchy; as cgroupify_myself does it, the leaf directory, its
    cgroup.procs and its cgroup.subtree_control are handed to the job's user, the scope stays
    root's."""
    with open("/proc/self/mountinfo") as f:
        top = next(line.split()[4] for line in f
                   if line.split(" - ")[1].startswith("cgroup2 ") and line.split()[3] == "/")
    uniq = f"{spec['execute'].replace('/', '_')}_{slot}@node"
    leaf = os.path.join(top, "htcondor", uniq)
    scope = os.path.join(leaf, uniq + ".scope")
    remove_cgroup(leaf)
    os.makedirs(scope, 0o755)
    for path in (leaf, os.path.join(leaf, "cgroup.procs"),
                 os.path.join(leaf, "cgroup.subtree_control")):
        os.chown(path, spec["uid"], spec["gid"])
    return {"leaf": leaf, "scope": scope}


def freeze_v2(v2, on):
    with open(os.path.join(v2["leaf"], "cgroup.freeze"), "w") as f:
        f.write("1" if on else "0")


def kill_family_v2(v2):
    """kill_family: suspend, cgroup.kill (SIGKILL to the whole tree), continue; what was there."""
    left = cgroup_pids(v2["scope"])
    freeze_v2(v2, True)
    with open(os.path.join(v2["leaf"], "cgroup.kill"), "w") as f:
        f.write("1")
    freeze_v2(v2, False)
    return left


def cgroup_usage_v2(v2):
    with open(os.path.join(v2["leaf"], "cpu.stat")) as f:
        us = dict(line.split() for line in f)
    return {"RemoteUserCpu": int(us["user_usec"]) / 1e6,
            "RemoteSysCpu": int(us["system_usec"]) / 1e6}


def remove_cgroup(d):
    if os.path.isdir(d):
        for sub in [e.path for e in os.scandir(d) if e.is_dir()]:
            remove_cgroup(sub)
        try:
            os.rmdir(d)
        except OSError:
            pass       # the real starter logs it and goes on


def freezer(dirs, state):
    with open(os.path.join(dirs["freezer"], "freezer.state"), "w") as f:
        f.write(state)


def cgroup_pids(d):
    with open(os.path.join(d, "cgroup.procs")) as f:
        return [int(x) for x in f.read().split()]


class Procd:
    """condor_procd's view of the job's family (ProcFamilyMonitor::snapshot, ProcAPI,
    GroupTracker in the 25.0.13 source; seen on the real starter, docs/batch/htcondor.md). A
    snapshot reads every process's /proc/PID/stat, every ``every`` seconds (the family's
    PID_SNAPSHOT_INTERVAL) and before each signal to the family. A process seen before keeps
    its place (in the family or not); a new one joins the family if it is the family's first
    process, if its groups hold the tracking ``gid`` (USE_GID_PROCESS_TRACKING) or if its
    parent is a member. The family's usage is what its members showed at the last snapshot
    (utime and stime each cut to whole seconds, RSS and VSZ in KiB), plus the CPU of members
    that have exited as their last snapshot showed it. Signals go to the members, any uid."""

    def __init__(self, root, gid=None, every=15):
        self.root, self.gid, self.every = root, gid, every
        self.seen = set()         # (pid, start time) of every process a snapshot saw
        self.members = {}         # pid -> (start time, user s, sys s, rss KiB, vsz KiB)
        self.exited = [0, 0]      # user s, sys s of members that have exited
        self.max_image = 0        # KiB: the family's largest VSZ sum at a snapshot
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.timer = threading.Thread(target=self._every, daemon=True)

    def _every(self):
        while not self.stop.wait(self.every):
            self.snapshot()

    @staticmethod
    def _procs():
        hz, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE") // 1024
        out = {}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{name}/stat") as f:
                    f_ = f.read().rpartition(")")[2].split()
            except (OSError, IndexError):
                continue
            out[int(name)] = (int(f_[1]), int(f_[19]), int(f_[11]) // hz, int(f_[12]) // hz,
                              int(f_[21]) * page, int(f_[20]) // 1024)
        return out

    def _groups(self, pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                line = next(ln for ln in f if ln.startswith("Groups:"))
        except (OSError, StopIteration):
            return []
        return [int(g) for g in line.split()[1:]]

    def snapshot(self):
        procs = self._procs()
        with self.lock:
            for pid, m in list(self.members.items()):
                p = procs.get(pid)
                if p and p[1] == m[0]:
                    self.members[pid] = p[1:]
                else:
                    self.exited[0] += m[1]
                    self.exited[1] += m[2]
                    del self.members[pid]
            new = {pid: p for pid, p in procs.items() if (pid, p[1]) not in self.seen}
            for pid, p in new.items():
                if pid == self.root or (self.gid and self.gid in self._groups(pid)):
                    self.members[pid] = p[1:]
            grown = True
            while grown:            # the parent tracker, last: a parent born before its child
                grown = False
                for pid, p in new.items():
                    parent = self.members.get(p[0])
                    if pid not in self.members and parent and parent[0] <= p[1]:
                        self.members[pid] = p[1:]
                        grown = True
            self.seen.update((pid, p[1]) for pid, p in procs.items())
            self.max_image = max(self.max_image, sum(m[4] for m in self.members.values()))

    published_rss = 0             # KiB: the starter's max_rss over its updates (PublishUpdateAd)

    def signal(self, sig):
        self.snapshot()
        with self.lock:
            pids = list(reversed(self.members))   # ProcFamily::spree: the newest member first
        signal_all(pids, sig)
        return pids

    def usage(self):
        with self.lock:
            return {"RemoteUserCpu": self.exited[0] + sum(m[1] for m in self.members.values()),
                    "RemoteSysCpu": self.exited[1] + sum(m[2] for m in self.members.values()),
                    "rss": sum(m[3] for m in self.members.values()), "ImageSize": self.max_image}


def publish_updates(procd, at):
    """The starter's periodic updates to the shadow, ``at`` seconds after the job's start
    (STARTER_INITIAL_UPDATE_INTERVAL 8, then STARTER_UPDATE_INTERVAL, 300): each carries the
    largest family RSS it has seen (what the procd's last snapshot gave). One more goes when
    the wrapper has exited, before the end-of-job kill (main)."""
    start = time.monotonic()
    for t in at:
        if procd.stop.wait(max(0.0, start + t - time.monotonic())):
            return
        procd.published_rss = max(procd.published_rss, procd.usage()["rss"])


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def suspend_and_continue(spec, iwd, dirs, v2, procd):
    """condor_suspend once the job has written ``when``; condor_continue once the test wrote
    ``resume_when`` (a bounded wait)."""
    susp = spec["suspend"]
    if not wait_for(os.path.join(iwd, susp["when"]), susp.get("within", 180)):
        return None
    seen = {}
    if v2:
        freeze_v2(v2, True)
        seen["root_in_job_cgroup"] = [p for p in cgroup_pids(v2["scope"]) if owner(p) == 0]
    elif dirs:
        freezer(dirs, "FROZEN")
    else:
        procd.signal(signal.SIGSTOP)
    with open(susp["marker"], "w") as f:
        f.write("suspended\n")
    waited = wait_for(susp["resume_when"], susp.get("for_at_most", 120))
    if v2:
        freeze_v2(v2, False)
    elif dirs:
        freezer(dirs, "THAWED")
    else:
        procd.signal(signal.SIGCONT)
    return dict(seen, resumed_by_test=waited)


def owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def cgroup_usage(dirs):
    """What ProcFamilyDirectCgroupV1::get_usage reports: cpuacct.stat's user and system in
    whole seconds, and the memory.stat ``rss`` line (KiB)."""
    with open(os.path.join(dirs["cpuacct"], "cpuacct.stat")) as f:
        hz = dict(line.split() for line in f)
    with open(os.path.join(dirs["memory"], "memory.stat")) as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("rss "))
    return {"RemoteUserCpu": int(hz["user"]) // USER_HZ,
            "RemoteSysCpu": int(hz["system"]) // USER_HZ, "ResidentSetSize": rss // 1024}


def kill_family(dirs):
    """After the wrapper exited: freeze, SIGKILL whatever the memory cgroup still holds, thaw."""
    freezer(dirs, "FROZEN")
    left = cgroup_pids(dirs["memory"])
    signal_all(left, signal.SIGKILL)
    freezer(dirs, "THAWED")
    return left


def wait_for(path, timeout):
    """A bounded wait for the job to reach its steady state (it creates ``path``)."""
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def ad_lines(text):
    """``Name = expr`` lines of a ClassAd in the long format, by attribute name."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)$", line)
        if m:
            out[m[1]] = m[2]
    return out


def hook_status(rc, stdout):
    """StarterHookMgr: a HookStatusCode on stdout overrides the exit status (not a signal)."""
    if rc < 0:
        return rc
    m = re.search(r"^\s*HookStatusCode\s*=\s*(\d+)\s*$", stdout, re.M | re.I)
    return int(m[1]) if m else rc


class Privs:
    """Real uid 0 throughout; effective uid HTCondor's account except while acting as root."""

    def __init__(self, duid, dgid):
        self.duid, self.dgid = duid, dgid

    def condor(self):
        os.setegid(self.dgid)
        os.seteuid(self.duid)

    def root(self):
        os.seteuid(0)
        os.setegid(0)


def main():
    args = sys.argv[1:]
    if args[:1] == ["tool"]:
        return tool(args[1], args[2:])
    slot = args[args.index("-a") + 1] if "-a" in args else SLOT
    with open(args[-1]) as f:
        spec = json.load(f)
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"condor_starter", 0, 0, 0)
    uid, gid = spec["uid"], spec["gid"]
    duid, dgid = spec["daemon_uid"], spec["daemon_gid"]
    privs = Privs(duid, dgid)
    legacy = spec.get("legacy_23")
    scratch = os.path.join(spec["execute"], f"dir_{os.getpid()}")
    os.mkdir(scratch, 0o700)
    os.chown(scratch, duid, dgid)
    job_ad_path = os.path.join(scratch, ".job.ad")
    machine_ad_path = os.path.join(scratch, ".machine.ad")
    chirp_path = os.path.join(scratch, ".chirp.config")
    ad_owner = (duid, dgid) if legacy else (uid, gid)   # 24.0 on: the ads are the user's
    if legacy:
        write_as(job_ad_path, spec["job_ad"], *ad_owner, 0o644)
        write_as(machine_ad_path, spec["machine_ad"], *ad_owner, 0o644)
    os.chown(scratch, uid, gid)
    if not legacy:
        write_as(job_ad_path, spec["job_ad"], *ad_owner, 0o644)
        write_as(machine_ad_path, spec["machine_ad"], *ad_owner, 0o644)
    write_as(chirp_path, "127.0.0.1 40001 chirp-cookie\n", uid, gid, 0o600)
    publish_slot(spec, slot, scratch)
    # file transfer puts the executable and inputs into the scratch directory, as the user; a job
    # without file transfer runs its executable from the shared file system (its Iwd here)
    files_dir = spec.get("iwd") or scratch
    for name, (text, mode) in spec["files"].items():
        write_as(os.path.join(files_dir, name), text, uid, gid, mode)
    if spec.get("tamper"):     # the job's user rewrites its ads before the VM boots
        for name, text in spec["tamper"].items():
            path = os.path.join(scratch, name)
            os.unlink(path)
            write_as(path, text, uid, gid, 0o644)
    iwd = spec.get("iwd") or scratch
    starter_env = {   # Starter::PublishToEnv, as the hooks and the wrapper get it
        "BATCH_SYSTEM": "HTCondor", "_CONDOR_SCRATCH_DIR": scratch, "_CONDOR_SLOT": slot,
        "_CONDOR_JOB_AD": job_ad_path, "_CONDOR_MACHINE_AD": machine_ad_path,
        "_CONDOR_JOB_IWD": iwd, "_CONDOR_BIN": "/usr/bin", "_CONDOR_CHIRP_CONFIG": chirp_path,
        "CONDOR_STARTER_PID": str(os.getpid()), "TMPDIR": "/tmp",
        f"_CONDOR_ANCESTOR_{os.getppid()}": f"{os.getppid()}:1764540000:1094218790",
        f"_CONDOR_ANCESTOR_{os.getpid()}": f"{os.getpid()}:1764540001:2052466453",
        "OMP_NUM_THREADS": str(spec.get("cpus", 1))}
    # the hooks: DaemonCore children, with the master's environment and HTCondor's secrets
    hook_env = dict(starter_env, PATH=ROOT_PATH, CONDOR_CONFIG=spec.get("condor_config", ""),
                    TMPDIR=scratch, CONDOR_PRIVATE_INHERIT=PRIVATE_INHERIT,
                    CONDOR_PRIVATE_SHARED_PORT_COOKIE="25de6dbfae8b0a27-cookie",
                    CONDOR_INHERIT=f"{os.getpid()} <127.0.0.1:40149?addrs=127.0.0.1-40149> 0 1",
                    CONDOR_PARENT_ID=f"node:{os.getpid()}:1764540001")
    job_ad = read(job_ad_path)
    result = {"pid": os.getpid(), "scratch": scratch, "status": None, "reason": None,
              "outcome": "completed", "stdout": None, "stderr": None, "error_file": None,
              "prepare_job": None, "job_exit": None, "never_started": False, "removal_s": None}

    if spec.get("prepare_job"):
        privs.condor()
        try:
            h = run_hook(privs, [spec["prepare_job"]], job_ad, hook_env, scratch, uid,
                         gid, timeout=spec.get("job_timeout", 300))
        finally:
            privs.root()
        code = hook_status(h["rc"], h["stdout"]) if h["rc"] is not None else -9
        result["prepare_job"] = dict(h, status=code)
        if code != 0:   # notifyStarterError, RemoteShutdownFast: the job never runs
            result["outcome"] = "held" if 0 < code < 300 else "requeued"
            finish(spec, result, scratch)
            return 0

    env = dict(spec["env"], **starter_env)
    env["_CONDOR_WRAPPER_ERROR_FILE"] = os.path.join(scratch, ERROR_FILE)
    env.pop("PATH", None)          # the submit file sets none: the wrapper gets no PATH
    out_path, err_path = os.path.join(scratch, "_condor_stdout"), os.path.join(scratch,
                                                                               "_condor_stderr")
    write_as(out_path, b"", uid, gid, 0o644)
    write_as(err_path, b"", uid, gid, 0o644)
    executable = os.path.join(files_dir, spec["executable"])
    pairs = mount_under_scratch(spec, scratch, uid, gid)
    dirs = job_cgroups(spec, slot) if spec.get("tracking") == "cgroup" else None
    v2 = job_cgroup_v2(spec, slot) if spec.get("tracking") == "cgroup2" else None
    enter = list(dirs.values()) if dirs else [v2["scope"]] if v2 else []
    groups = [spec["tracking_gid"]] if spec.get("tracking_gid") else []
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        job = subprocess.Popen([spec["wrapper"], executable, *spec["args"]], env=env, cwd=iwd,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               preexec_fn=job_namespace(pairs, uid, gid, enter, groups),
                               start_new_session=True)
    procd = None
    if not (dirs or v2):    # DaemonCore registers the family, taking its first snapshot
        procd = Procd(job.pid, spec.get("tracking_gid"), spec.get("snapshot_s", 15))
        procd.snapshot()
        procd.timer.start()
        threading.Thread(target=publish_updates, args=(procd, spec.get("updates", [8])),
                         daemon=True).start()
    if spec.get("suspend"):
        result["suspend"] = suspend_and_continue(spec, iwd, dirs, v2, procd)
    reason, removed_at = "exit", None
    remove = spec.get("remove")
    if remove:     # condor_rm once the job is running: KillSig, then SIGKILL after the timeout
        result["never_started"] = not wait_for(os.path.join(iwd, remove["when"]),
                                               remove.get("within", 120))
        if remove.get("kill_wrapper"):    # someone SIGKILLs the wrapper: the reason is "exit"
            os.kill(job.pid, signal.SIGKILL)
        else:
            reason, removed_at = "evict", time.monotonic()
            job.send_signal(remove.get("kill_sig", signal.SIGTERM))   # the job's KillSig
            try:
                job.wait(timeout=remove["kill_sig_timeout"])
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
    privs.condor()
    try:
        status = job.wait(timeout=spec.get("job_timeout", 300))
    except subprocess.TimeoutExpired:
        privs.root()
        os.killpg(job.pid, signal.SIGKILL)
        status = job.wait()
    finally:
        privs.root()
    ended = time.monotonic()
    if dirs:   # JobReaper: killFamilyIfWarranted, recordFinalUsage, then the cgroups go
        result["killed_at_end"] = kill_family(dirs)
        result["usage"] = cgroup_usage(dirs)
        for d in dirs.values():
            remove_cgroup(d)
    if procd:  # OsProc::JobReaper's update to the shadow (what the last snapshot saw), then
        # killFamilyIfWarranted (a snapshot, then SIGKILL), then recordFinalUsage
        procd.published_rss = max(procd.published_rss, procd.usage()["rss"])
        result["killed_at_end"] = procd.signal(signal.SIGKILL)
        procd.stop.set()
        usage = procd.usage()
        procd.published_rss = max(procd.published_rss, usage.pop("rss"))
        result["usage"] = dict(usage, ResidentSetSize=procd.published_rss)
    if v2:
        result["killed_at_end"] = kill_family_v2(v2)
        result["usage"] = cgroup_usage_v2(v2)
        remove_cgroup(v2["leaf"])
    # the starter stats the error file as its own account
    error_file = read(os.path.join(scratch, ERROR_FILE))
    seen = read_as(os.path.join(scratch, ERROR_FILE), duid, dgid)
    result.update(status=status, reason=reason, error_file=error_file, error_file_seen=seen,
                  stdout=read(out_path), stderr=read(err_path),
                  removal_s=round(ended - removed_at, 2) if removed_at is not None else None)
    if seen is not None and status != 0:
        result["outcome"] = "requeued"
    if spec.get("job_exit"):
        exit_env = dict(env, **hook_env)
        exit_env["_CONDOR_MAINJOB_EXIT_CODE"] = str(status if status >= 0 else 128 - status)
        privs.condor()
        try:
            result["job_exit"] = run_hook(privs, [spec["job_exit"], reason], job_ad, exit_env,
                                          scratch, uid, gid, timeout=JOB_EXIT_TIMEOUT_S)
        finally:
            privs.root()
    finish(spec, result, scratch)
    return 0


def run_hook(privs, argv, stdin, env, cwd, uid, gid, timeout):
    privs.root()
    try:
        h = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=cwd, user=uid, group=gid,
                             extra_groups=[])
    finally:
        privs.condor()
    try:
        out, err = h.communicate(stdin.encode(), timeout=timeout)
        return {"rc": h.returncode, "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace")}
    except subprocess.TimeoutExpired:
        privs.root()
        h.kill()
        h.communicate()
        return {"rc": None, "stdout": "", "stderr": "killed after the hook's timeout"}


def finish(spec, result, scratch):
    unpublish_slot(spec)
    if not spec.get("keep_scratch"):
        shutil.rmtree(scratch, ignore_errors=True)
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------
# The startd's view: the slot ad a real startd answers `condor_status -direct` with
def slot_path(spec):
    return os.path.join(spec["startd_dir"], f"{spec['slot_ad_name']}.ad")


def publish_slot(spec, slot, scratch):
    """Claim::publish and STARTD_JOB_ATTRS: the claim's job id, the slot's size, the job's
    listed attributes (from the schedd's copy of the job ad, not the scratch directory's)."""
    job = ad_lines(spec["job_ad"])
    machine = ad_lines(spec["machine_ad"])
    lines = [f'Name = "{slot}@node"', 'State = "Claimed"', 'Activity = "Busy"',
             f"Cpus = {machine.get('Cpus', '1')}", f"Memory = {machine.get('Memory', '512')}",
             f'JobId = "{job["ClusterId"]}.{job["ProcId"]}"']
    for attr in ("GlobalJobId", "AccountingGroup", "RemoteOwner"):
        if attr in job:
            lines.append(f"{attr} = {job[attr]}")
    if not spec.get("no_starter_pid"):    # 25.0 on
        lines.append(f"StarterPid = {os.getpid()}")
    for attr in spec.get("startd_job_attrs", ()):
        if attr in job:
            lines.append(f"{attr} = {job[attr]}")
    spec["slot_ad_name"] = slot
    write_as(slot_path(spec), "\n".join(lines) + "\n", spec["daemon_uid"], spec["daemon_gid"],
             0o644)


def unpublish_slot(spec):
    try:
        os.unlink(slot_path(spec))
    except (FileNotFoundError, KeyError):
        pass


def tool(name, args):
    """condor_config_val NAME... / condor_status -direct ADDR -startd -l, on the fake pool."""
    with open(os.environ["CONDOR_CONFIG"]) as f:
        pool = json.load(f)
    if name == "condor_config_val":
        subsystem = None
        if args[:1] == ["-subsystem"]:
            subsystem, args = args[1], args[2:]
        params = dict(PARAM_DEFAULTS, **pool["params"])
        for param in args:
            value = params.get(f"{subsystem}.{param}", params.get(param))
            if value is None:
                print(f"Not defined: {param}", file=sys.stderr)
                return 1
            print(value)
        return 0
    if name == "condor_status":
        with open(pool["params"]["STARTD_ADDRESS_FILE"]) as f:
            address = f.readline().strip()
        if args != ["-direct", address, "-l"]:    # -startd would ask for the daemon's own ad
            print(f"condor_status: this stand-in answers only -direct {address} -l",
                  file=sys.stderr)
            return 1
        idle = '\nName = "slot2@node"\nState = "Unclaimed"\nActivity = "Idle"\nCpus = 1\n'
        ads = [read(os.path.join(pool["startd_dir"], n)) for n in
               sorted(os.listdir(pool["startd_dir"]))]
        sys.stdout.write("\n".join([a for a in ads if a] + [idle]))
        return 0
    return 2


def submit_requirement(expr, reason, job_ad_text, schedd_ad_text='MyType = "Scheduler"\n'):
    """How the schedd evaluates SUBMIT_REQUIREMENT_<name>: MY is the schedd's own ad, TARGET the
    job. Returns (accepted, the reason text or None)."""
    import classad2
    schedd, job = classad2.parseOne(schedd_ad_text), classad2.parseOne(job_ad_text)
    ok = classad2.ExprTree(expr).eval(schedd, job) is True
    return ok, None if ok else classad2.ExprTree(reason).eval(schedd, job)


if __name__ == "__main__":
    sys.exit(main())
