"""``vibatch doctor [--boot]``: is this node ready for jobs? One line per check, with the fix.

Each check gives PASS, WARN (jobs run, but the admin should know), FAIL (jobs will fail, or the
node is unsafe) or SKIP (a batch system that is not on this node). The command exits non-zero on
any FAIL. Nothing here changes the node, except ``--boot``, which runs one test job the way
``vibatch image test`` does.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from .. import config as config_mod, proc, safeio
from ..config import Config
from .. import batch
from ..errors import VibatchError
from ..images import offerfile
from ..vm import accel, emulator

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
HOOKS_DIR = "/opt/vibatch/hooks"          # where etc/setup-node.sh installs the hook shims
SLURM_CONFS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf")
MOM_PRIVS = ("/var/spool/torque/mom_priv", "/var/spool/pbs/mom_priv")
QCONF = "/usr/bin/qconf"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"
TOOL_TIMEOUT_S = 10.0
HOOK_MAX = 1 << 20
EXIT_FAILED = 36                          # errors.EXIT_CODES


@dataclass
class Check:
    name: str
    level: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level}  {self.name}: {self.detail}" + (f"\n      fix: {self.fix}"
                                                             if self.fix else "")


@dataclass
class Places:
    """Where doctor looks for each batch system's configuration (tests point it elsewhere)."""
    hooks_dir: str = HOOKS_DIR
    slurm_confs: Sequence[str] = SLURM_CONFS
    mom_privs: Sequence[str] = MOM_PRIVS
    qconf: str = QCONF
    virtlogd_sock: str = VIRTLOGD_SOCK


def run(cfg: Config, config_error: str = "", boot: bool = False,
        places: Optional[Places] = None) -> Iterator[Check]:
    places = places or Places()
    yield (Check("config", FAIL, config_error, "correct what the message names (the other "
                 "checks ran with the defaults); `vibatch check-config` shows what is read")
           if config_error
           else Check("config", PASS, f"{cfg.source} is valid"))
    for name, fn in (("acceleration", _accel), ("emulator", _emulator), ("libvirtd", _libvirtd),
                     ("virtlogd", lambda c: _virtlogd(c, places.virtlogd_sock)),
                     ("virtiofsd", _virtiofsd), ("share launcher", _launcher),
                     ("cgroups", _cgroups), ("disk", _disk), ("clock", _clock)):
        yield from _safely(name, fn, cfg)
    yield from _safely("hooks (slurm)", lambda c: _slurm(c, places), cfg)
    yield from _safely("hooks (gridengine)", lambda c: _gridengine(c, places), cfg)
    yield from _safely("hooks (torque)", lambda c: _torque(c, places), cfg)
    yield from _safely("images", _images, cfg)
    if boot:
        yield from _safely("test job", _boot, cfg)


def _safely(name: str, fn: Callable[[Config], object], cfg: Config) -> Iterator[Check]:
    """A check that breaks is a FAIL of that check, not the end of the others."""
    try:
        out = fn(cfg)
        yield from ([out] if isinstance(out, Check) else out)   # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - a check that breaks (libvirt, a tool) is its FAIL
        yield Check(name, FAIL, f"{type(e).__name__}: {e}")


# --- the hypervisor ---------------------------------------------------------------------------
def _accel(cfg: Config) -> Check:
    name = "acceleration"
    if cfg.vm.acceleration in ("kvm", "tcg"):
        return Check(name, PASS, f"{cfg.vm.acceleration.upper()}, set by vm.acceleration (no "
                     "probe)")
    known = accel.cached(cfg.state_dir, cfg.vm.emulator)
    if known is None:
        why = ("/dev/kvm is missing or not accessible: jobs will run under TCG"
               if not os.access("/dev/kvm", os.R_OK | os.W_OK) else
               "not probed since the kernel, QEMU or /dev/kvm last changed")
        return Check(name, WARN, why, "the first job probes it (a guest kernel booted under "
                     "KVM, up to 10 s); `vibatch doctor --boot` runs one now")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(known.get("probed_at", 0)))
    if known["accel"] == "kvm":
        return Check(name, PASS, f"KVM: {known.get('reason', '')} (probed {when})")
    return Check(name, WARN, f"TCG (software emulation, several times slower): "
                 f"{known.get('reason', '')} (probed {when})",
                 "expected where KVM is unusable (nested virtualisation without it, no /dev/kvm)"
                 "; for speed enable KVM on the host and delete "
                 f"{os.path.join(cfg.state_dir, 'accel.json')} to probe again")


def _emulator(cfg: Config) -> Check:
    path = cfg.vm.emulator
    why = _unsafe(path)
    if why:
        return Check("emulator", FAIL, f"vm.emulator: {why}",
                     f"etc/setup-node.sh builds vibatch's QEMU into {config_mod.VIBATCH_QEMU}; "
                     "libvirtd starts it for every VM, and root runs it in the KVM probe")
    if signal.SIGUSR2 not in emulator.ignored_signals(os.path.realpath(path)):
        return Check("emulator", WARN, f"vm.emulator {path} is ended by SIGUSR2: under Grid "
                     "Engine a `qsub -notify` warning ends the job's VM at once",
                     f"set vm.emulator to {config_mod.VIBATCH_QEMU} (etc/setup-node.sh builds "
                     "it; qemu/vibatch_qemu.c)")
    return Check("emulator", PASS, f"{path} runs QEMU and ignores SIGUSR2 (Grid Engine's "
                 "-notify warning leaves the VM running)")


def _libvirtd(cfg: Config) -> Check:
    from ..vm import hypervisor  # noqa: PLC0415 - only here and in --boot
    conn = hypervisor.connect(cfg.libvirt_uri)
    try:
        ver = conn.getLibVersion()
        running = len(hypervisor.list_names(conn, ""))
    finally:
        conn.close()
    return Check("libvirtd", PASS, f"{cfg.libvirt_uri} answers (libvirt "
                 f"{ver // 1000000}.{ver // 1000 % 1000}.{ver % 1000}, {running} domain(s))")


def _virtlogd(cfg: Config, path: str) -> Check:
    if not cfg.libvirt_uri.startswith("qemu:///system"):
        return Check("virtlogd", SKIP, f"{cfg.libvirt_uri} is not qemu:///system")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(path)
    except OSError as e:
        return Check("virtlogd", FAIL, f"{path}: {e.strerror or e}", "start virtlogd "
                     "(`virtlogd -d`, or systemctl start virtlogd): libvirt needs it to start "
                     "any VM")
    finally:
        s.close()
    return Check("virtlogd", PASS, f"{path} accepts connections")


def _virtiofsd(cfg: Config) -> Check:
    path = cfg.vm.virtiofsd
    try:
        st = os.stat(path)
    except OSError as e:
        return Check("virtiofsd", FAIL, f"vm.virtiofsd {path}: {e.strerror}",
                     "apt-get install virtiofsd (or qemu-system-common on older releases), then "
                     "point vm.virtiofsd at it")
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        return Check("virtiofsd", FAIL, f"vm.virtiofsd {path} is not an executable file",
                     "point vm.virtiofsd at the virtiofsd binary")
    return Check("virtiofsd", PASS, f"{path}")


def _launcher(cfg: Config) -> Check:
    path = cfg.vm.share_launcher
    why = _unsafe(path)
    if why:
        return Check("share launcher", FAIL, f"vm.share_launcher: {why}",
                     "etc/setup-node.sh installs it root-owned 0500 under "
                     f"{HOOKS_DIR}/libvirt; libvirtd runs it as root for every share")
    return Check("share launcher", PASS, f"{path}, root-owned, writable by root only")


def _unsafe(path: str) -> str:
    """Why root should not run ``path`` ("" if it is a root-owned executable that only root
    can change, in directories only root can change)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o100:
        return f"{path} is not an executable file"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return (f"{real} is owned by uid {st.st_uid}, mode {stat.filemode(st.st_mode)}: root "
                "runs it, so only root may change it")
    d = os.path.dirname(real)
    while True:
        dst = os.stat(d)
        if dst.st_uid != 0 or (dst.st_mode & 0o022 and not dst.st_mode & stat.S_ISVTX):
            return (f"directory {d} (of {real}) is owned by uid {dst.st_uid}, mode "
                    f"{stat.filemode(dst.st_mode)}: another user could replace the file")
        if d == "/":
            return ""
        d = os.path.dirname(d)


# --- the host ---------------------------------------------------------------------------------
def _cgroups(cfg: Config, root: str = "/sys/fs/cgroup") -> Check:
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        with open(os.path.join(root, "cgroup.controllers")) as f:
            have = set(f.read().split())
        layout = "v2 (unified)"
    else:
        have = {n for n in ("memory", "cpuset", "cpu") if os.path.isdir(os.path.join(root, n))}
        layout = "v1 (hybrid, with v2 at unified/)" if os.path.isdir(
            os.path.join(root, "unified")) else "v1"
    partition = next((p for p in ("machine.slice", "machine")
                      if os.path.isdir(os.path.join(root, "memory" if "v1" in layout else "",
                                                    p))), None)
    where = f"libvirt's machines under {partition}" if partition else \
        "no machine partition yet (libvirt makes it with the first VM)"
    missing = sorted({"memory", "cpuset"} - have)
    if missing:
        return Check("cgroups", FAIL, f"{layout}; controller(s) {', '.join(missing)} missing",
                     "enable them (v2: cgroup_enable / subtree_control; v1: mount them): "
                     "vibatch caps each VM's memory and pins its CPUs through libvirt's cgroups")
    return Check("cgroups", PASS, f"{layout}, memory and cpuset controllers present; {where}")


def _disk(cfg: Config) -> Iterator[Check]:
    reserve = cfg.host.reserved_disk_mb << 20
    seen = set()
    for what, path in (("state_dir", cfg.state_dir), ("library_dir", cfg.library_dir)):
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        dev = os.stat(probe).st_dev
        if dev in seen:
            continue
        seen.add(dev)
        du = shutil.disk_usage(probe)
        text = f"{what} {path}: {du.free / 2**30:.1f} GiB free of {du.total / 2**30:.1f} GiB"
        if du.free < reserve:
            yield Check("disk", FAIL, text + f", less than host.reserved_disk_mb "
                        f"({cfg.host.reserved_disk_mb} MiB): every job is refused",
                        "free space there, or lower host.reserved_disk_mb")
        elif du.free < 2 * reserve or du.free < du.total // 10:
            yield Check("disk", WARN, text + " (nearly full)", "free space before jobs fail")
        else:
            yield Check("disk", PASS, text)


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("_rest", ctypes.c_char * 256)]


TIME_ERROR = 5      # adjtimex(2): the clock is not synchronised
STA_UNSYNC = 0x40


def clock_state() -> tuple[int, int, int]:
    """(adjtimex's return value, status bits, estimated error in µs): reads only (modes 0)."""
    tx = _Timex()
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.adjtimex(ctypes.byref(tx))
    if rc < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return rc, tx.status, tx.esterror


def _clock(cfg: Config) -> Check:
    rc, status, esterror = clock_state()
    if rc == TIME_ERROR or status & STA_UNSYNC:
        return Check("clock", WARN, "not synchronised (the kernel's adjtimex says so); "
                     "accounting times, catalog expiry and the batch system's timestamps drift",
                     "run an NTP client (chrony, ntpsec, systemd-timesyncd)")
    return Check("clock", PASS, f"synchronised (estimated error {esterror} µs)")


# --- the batch systems' hooks -----------------------------------------------------------------
def _hook(name: str, path: str, system: str, places: Places) -> Check:
    """Is ``path`` (a hook the batch system runs as root) safe, and is it vibatch's?"""
    why = _unsafe(path)
    if why:
        return Check(name, FAIL, why, f"install vibatch's hook root-owned, mode 0500 (e.g. from "
                     f"{places.hooks_dir}/{system}), in root-owned directories")
    ours = os.path.join(places.hooks_dir, system)
    shims = [os.path.join(ours, f) for f in (sorted(os.listdir(ours)) if os.path.isdir(ours)
                                             else [])]
    body = safeio.read_bounded(os.path.realpath(path), HOOK_MAX)
    if any(os.path.realpath(path) == os.path.realpath(s) or
           (body is not None and body == safeio.read_bounded(s, HOOK_MAX)) for s in shims):
        return Check(name, PASS, f"{path}: vibatch's, root-owned, writable by root only")
    return Check(name, WARN, f"{path} is safe but is not one of vibatch's hooks in {ours}",
                 "if it is a site wrapper, make sure it runs vibatch's hook")


def slurm_conf(places: Places) -> Optional[str]:
    env = os.environ.get("SLURM_CONF")
    for path in ([env] if env else []) + list(places.slurm_confs):
        if os.path.isfile(path):
            return path
    return None


def parse_slurm_conf(text: str) -> dict[str, str]:
    """Key=value lines of slurm.conf (keys lower-cased, comments dropped; the last one wins)."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        for item in line.split():
            key, sep, value = item.partition("=")
            if sep:
                out[key.lower()] = value
    return out


def _slurm(cfg: Config, places: Places) -> Iterator[Check]:
    path = slurm_conf(places)
    if path is None:
        yield Check("hooks (slurm)", SKIP, "no slurm.conf here")
        return
    data = safeio.read_bounded(path, HOOK_MAX)
    conf = parse_slurm_conf((data or b"").decode(errors="replace"))
    for key, shim in (("prolog", "prolog"), ("epilog", "epilog")):
        value = conf.get(key, "")
        name = f"slurm {key.capitalize()}"
        if not value:
            yield Check(name, FAIL, f"{path} sets no {key.capitalize()}",
                        f"{key.capitalize()}={places.hooks_dir}/slurm/{shim} in {path} "
                        "(docs/batch/slurm.md)")
            continue
        for one in value.split(","):
            yield _hook(name, one, "slurm", places)
    flags = {f.lower() for f in conf.get("prologflags", "").split(",")}
    if "alloc" not in flags:
        yield Check("slurm PrologFlags", FAIL, f"{path}: PrologFlags lacks Alloc: the Prolog "
                    "would run only when the first step starts, after the job's script",
                    f"PrologFlags=Alloc in {path}")
    text = (data or b"").decode(errors="replace")
    yield from _safely("offer file (slurm)", lambda c: _offer(c, path), cfg)
    yield from _safely("node Features (slurm)", lambda c: _features(c, path, text), cfg)


LUA_OFFER = re.compile(r'^\s*local\s+OFFER_FILE\s*=\s*"([^"]+)"', re.M)


def _offer(cfg: Config, slurm_conf_path: str) -> Iterator[Check]:
    """Does the offer file job_submit.lua reads (or batch.offer_file) say what this node
    offers? A stale one refuses new images at submit and lets removed ones through."""
    lua = safeio.read_bounded(os.path.join(os.path.dirname(slurm_conf_path), "job_submit.lua"),
                              HOOK_MAX)
    m = LUA_OFFER.search((lua or b"").decode(errors="replace"))
    path = m.group(1) if m else cfg.batch.offer_file
    if not path:
        yield Check("offer file (slurm)", SKIP, "no job_submit.lua next to slurm.conf and no "
                    "batch.offer_file")
        return
    why = offerfile.stale(cfg, path)
    if why:
        yield Check("offer file (slurm)", WARN, why + ": job_submit.lua checks jobs' OS against "
                    "it", f"set batch.offer_file: {path} (image add/remove/sync and every Prolog "
                    f"then rewrite it), or run `vibatch image offer --output {path}` now")
    else:
        yield Check("offer file (slurm)", PASS, f"{path} lists what this node offers")


def _features(cfg: Config, path: str, text: str) -> Iterator[Check]:
    """With --constraint picking the OS, this node's Features= must name every offered OS."""
    node = socket.gethostname().split(".")[0]
    features = batch.system("slurm").node_features(text, node)
    offered = offerfile.text(cfg).split()
    if features is None or not features & set(offered):
        yield Check("node Features (slurm)", SKIP, f"{path}: node {node} has no Features= that "
                    "names an image (users do not pick the OS with --constraint)")
        return
    missing = [n for n in offered if n not in features]
    if missing:
        yield Check("node Features (slurm)", WARN, f"{path}: node {node}'s Features= lacks "
                    f"{', '.join(missing)}, which this node offers: --constraint cannot ask "
                    "for them", f"add them to Features= of NodeName={node} and run "
                    "`scontrol reconfigure`")
    else:
        yield Check("node Features (slurm)", PASS, f"node {node}'s Features= names every image "
                    "and alias this node offers")


def _gridengine(cfg: Config, places: Places) -> Iterator[Check]:
    if not os.access(places.qconf, os.X_OK):
        yield Check("hooks (gridengine)", SKIP, f"no {places.qconf} here")
        return
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    for var in ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT"):
        if var in os.environ:   # an admin's shell; the Debian wrapper finds them otherwise
            env[var] = os.environ[var]
    r = proc.run([places.qconf, "-sql"], timeout=TOOL_TIMEOUT_S, check=False, env=env, cwd="/")
    if r.returncode != 0:
        yield Check("hooks (gridengine)", WARN, "qconf -sql failed: " + (
            r.stderr.strip().splitlines() or ["no message"])[-1],
            "start sge_qmaster (or set SGE_ROOT/SGE_CELL), then run doctor again")
        return
    used = 0
    for queue in r.stdout.split():
        q = proc.run([places.qconf, "-sq", queue], timeout=TOOL_TIMEOUT_S, env=env, cwd="/")
        conf = {}
        for line in q.stdout.splitlines():
            key, _, value = line.strip().partition(" ")
            conf[key] = value.strip()
        for key in ("prolog", "epilog", "starter_method"):
            value = conf.get(key, "NONE")
            if value == "NONE":
                continue
            used += 1
            cmd = value.split()[0]
            user, at, path = cmd.rpartition("@")
            check = _hook(f"gridengine {queue} {key}", path if at else cmd, "gridengine", places)
            if key != "starter_method" and user != "root" and check.level == PASS:
                check = Check(check.name, FAIL, f"{value!r} runs as the job owner; vibatch's "
                              "prolog and epilog must run as root",
                              f"qconf -mq {queue}: {key} root@{path or cmd} …")
            yield check
    if not used:
        yield Check("hooks (gridengine)", WARN, "no queue has a prolog, epilog or starter_method",
                    "qconf -mq QUEUE as in docs/batch/gridengine.md, for the queues that run "
                    "jobs in VMs")


def _torque(cfg: Config, places: Places) -> Iterator[Check]:
    mom = next((p for p in ([os.path.join(os.environ["PBS_HOME"], "mom_priv")]
                            if os.environ.get("PBS_HOME") else []) + list(places.mom_privs)
                if os.path.isdir(p)), None)
    if mom is None:
        yield Check("hooks (torque)", SKIP, "no mom_priv here")
        return
    for name in ("prologue", "epilogue"):
        path = os.path.join(mom, name)
        if not os.path.lexists(path):
            yield Check(f"torque {name}", FAIL, f"no {path}",
                        f"install -o root -g root -m 0500 {places.hooks_dir}/torque/{name} "
                        f"{path} (docs/batch/torque.md)")
            continue
        yield _hook(f"torque {name}", path, "torque", places)
    config = safeio.read_bounded(os.path.join(mom, "config"), HOOK_MAX) or b""
    starter = next((line.split()[1] for line in config.decode(errors="replace").splitlines()
                    if line.strip().startswith("$job_starter ") and len(line.split()) > 1), None)
    if starter is None:
        yield Check("torque $job_starter", FAIL, f"{mom}/config sets no $job_starter",
                    f"$job_starter {places.hooks_dir}/torque/job_starter in {mom}/config")
    else:
        yield _hook("torque $job_starter", starter, "torque", places)


# --- the library and a test job ---------------------------------------------------------------
def _images(cfg: Config) -> Iterator[Check]:
    from ..images.library import Library  # noqa: PLC0415
    lib = Library(cfg.library_dir, cfg.state_dir, cfg.lock_timeout_s)
    images = lib.images()
    if not images:
        yield Check("images", FAIL, f"the library {cfg.library_dir} is empty: no job can run",
                    "vibatch image add … or vibatch image sync (docs/images.md)")
        return
    if cfg.images.default and cfg.images.default not in lib.names() and \
            cfg.images.aliases.get(cfg.images.default) not in lib.names():
        yield Check("images", FAIL, f"images.default {cfg.images.default!r} is not in the "
                    "library: jobs that name no image fail", "add it, or change images.default")
    now = time.time()
    limit = cfg.images.verify_interval_h * 3600
    for img in images:
        name = f"image {img.name}"
        q = lib.quarantined(img)
        if q:
            yield Check(name, FAIL, f"quarantined: {q.get('reason', '?')}",
                        f"replace it (vibatch image add --replace / sync) or `vibatch image "
                        f"verify {img.name}` once its files are good again")
            continue
        when = lib.last_verified(img)   # the cached verification: no rehash here
        if when is None:
            yield Check(name, WARN, "never hashed in full with its present files (the next job "
                        "that uses it hashes it first)", f"vibatch image verify {img.name}")
        elif limit and now - when > limit:
            yield Check(name, WARN, f"last verified {(now - when) / 3600:.0f} h ago, more than "
                        f"images.verify_interval_h ({cfg.images.verify_interval_h:g} h)",
                        "run `vibatch image verify --due` from cron")
        else:
            yield Check(name, PASS, f"verified {(now - when) / 3600:.1f} h ago")


def _boot(cfg: Config) -> Check:
    """One test job, the way ``vibatch image test`` runs it, on the image a job would get."""
    from ..core import lifecycle  # noqa: PLC0415
    from ..images.policy import resolve  # noqa: PLC0415
    from . import imagetest  # noqa: PLC0415
    node = lifecycle.Node(cfg)
    try:
        image = resolve(cfg, node.library, None).image
        result = imagetest.run(node, image)
    finally:
        node.close()
    failed = [c for c in result.checks if not c.ok]
    if failed:
        return Check("test job", FAIL, f"image {image.name}: " + "; ".join(
            f"{c.name}: {c.detail.splitlines()[0] if c.detail else ''}" for c in failed),
            f"`vibatch image test {image.name}` shows each check in full")
    return Check("test job", PASS, f"image {image.name} booted; all {len(result.checks)} "
                 "checks of `vibatch image test` passed")


def main(config_path: Optional[str], boot: bool, out: Callable[[str], None] = print) -> int:
    error = ""
    try:
        cfg = config_mod.load(config_path)
    except VibatchError as e:
        error, cfg = e.message, config_mod.parse({}, "<defaults>")
    fails = warns = 0
    for check in run(cfg, error, boot):
        out(check.line())
        fails += check.level == FAIL
        warns += check.level == WARN
    out(f"doctor: {fails} failed, {warns} warning(s)")
    return EXIT_FAILED if fails else 0
