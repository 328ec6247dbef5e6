"""Strict configuration: one YAML file, validated once, passed explicitly.

An unknown key, a wrong type or a value out of range raises ConfigError naming the file, the key
and the reason. Nothing here is a module-level global: ``load()`` returns a ``Config``.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import yaml

from .errors import ConfigError
from .names import valid_name, valid_sha512

DEFAULT_PATH = "/etc/vibatch/vibatch.yaml"
ENV_VAR = "VIBATCH_CONFIG"
VIBATCH_QEMU = "/opt/vibatch/lib/vibatch-qemu"   # etc/setup-node.sh builds it (qemu/vibatch_qemu.c)

DEFAULT_ENV_EXCLUDE = [
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONPATH", "PYTHONHOME",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
    "DISPLAY", "XAUTHORITY", "DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_SESSION_ID",
    "KRB5CCNAME", "MAIL", "OLDPWD", "PWD", "SHLVL", "_", "TERMCAP", "TMPDIR",
    "VIBATCH_CONFIG",
]


@dataclass(frozen=True)
class HostConfig:
    reserved_cpus: tuple = ()          # host CPU ids never given to jobs
    reserved_memory_mb: int = 1024     # memory kept for the host
    reserved_disk_mb: int = 2048       # free space kept on the state filesystem for the host
    cpus: tuple = ()                   # host CPU ids usable at all (empty: all online)


@dataclass(frozen=True)
class JobLimits:
    default_cores: int = 1
    max_cores: int = 0                 # 0: as many as the node can give
    default_memory_mb: int = 512
    min_memory_mb: int = 128
    max_memory_mb: int = 0             # 0: as much as the node can give
    max_disk_gb: int = 0               # largest disk an image may give a job (0: no limit)
    io_max_mb: int = 256               # size of a job's I/O folder (a tmpfs: host memory)


@dataclass(frozen=True)
class VmConfig:
    boot_timeout_s: float = 60.0
    setup_timeout_s: float = 30.0
    acceleration: str = "auto"         # auto | kvm | tcg
    memory_overhead_mb: int = 256      # QEMU's own memory on top of the guest's, in the hard cap
    tcg_tb_cache_mb: int = 64          # TCG translation cache (counts against the cap)
    machine: str = "q35"
    emulator: str = VIBATCH_QEMU       # QEMU, ignoring SIGUSR2 (qemu/vibatch_qemu.c)
    virtiofsd: str = "/usr/lib/qemu/virtiofsd"           # run by the launcher as the job user
    share_launcher: str = "/opt/vibatch/hooks/libvirt/virtiofsd"   # what libvirt starts
    qemu_user: str = "libvirt-qemu"    # the user libvirt runs QEMU as (qemu.conf "user")
    network: str = "none"              # the default mode: none | user | nat | bridge (network.py)
    console_tail_lines: int = 30


@dataclass(frozen=True)
class ExecConfig:
    env_exclude: tuple = tuple(DEFAULT_ENV_EXCLUDE)
    guest_path: str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImagesConfig:
    default: str = ""                  # site default image or alias ("": jobs must name one)
    aliases: dict = field(default_factory=dict)          # OS name -> image name
    queue_defaults: dict = field(default_factory=dict)   # queue/partition -> image or alias
    allow_groups: dict = field(default_factory=dict)     # unix group -> images/aliases it may use
    allow_accounts: dict = field(default_factory=dict)   # account -> images/aliases it may use
    # the user chooses the account (sbatch -A, qsub -A): allow_accounts is honoured only when the
    # admin states that the batch system lets users charge only accounts they belong to
    accounts_enforced: bool = False
    blocked: tuple = ()                # image names or sha512:<hex> digests no job may use
    max_virtual_size_gb: int = 100     # largest virtual disk size accepted into the library
    verify_interval_h: float = 168.0   # `image verify --due` rehashes versions older than this
    trusted_keys: tuple = ()           # endorsers' Ed25519 public keys, "ed25519:<base64>"
    catalogs: tuple = ()               # catalog URLs `vibatch image sync` uses by default
    download_timeout_s: float = 3600.0  # per file, whole download
    connect_timeout_s: float = 30.0    # per network read


@dataclass(frozen=True)
class BatchConfig:
    # the root hooks' deadline, below the batch system's own hook timeout (Slurm's
    # PrologEpilogTimeout, Torque's $prologalarm): 0 keeps each system's default. A shim's
    # --alarm N wins over it.
    hook_alarm_s: int = 0
    # the names jobs may ask for (`vibatch image offer`), rewritten by `image add/remove/sync`
    # and by every Slurm Prolog when they changed ("": none); Slurm's job_submit.lua reads it
    offer_file: str = ""
    # a job with a time limit is ended this long after it, by its guest and by `vibatch reap`
    walltime_grace_s: int = 300


@dataclass(frozen=True)
class HTCondorConfig:
    daemon_user: str = "condor"        # HTCondor's account (CONDOR_IDS): owns EXECUTE and LOG
    condor_config: str = "/etc/condor/condor_config"   # CONDOR_CONFIG for the tools the helper runs
    bin_dir: str = "/usr/bin"          # where condor_config_val and condor_status are


@dataclass(frozen=True)
class TorqueConfig:
    pbsnodes: str = "/usr/local/bin/pbsnodes"  # "": never take the node out, fail the job instead
    node_name: str = ""                # this node in pbs_server's nodes file ("": the host name)
    max_node_faults: int = 3           # node faults of one job here before the node is taken out
    fault_backoff_s: float = 10.0      # wait before the first requeue, doubled for each next one
    mom_manager_port: int = 15003      # pbs_mom's TM port: the VM is adopted there (0: never)


@dataclass(frozen=True)
class FeaturesConfig:
    hs06: float = 0.0                  # the node's HEPSPEC06 total (0: not published)


@dataclass(frozen=True)
class NetworkConfig:
    allow: tuple = ()                  # what user/nat guests may reach: CIDR[:PORT[/udp]]
    dns: str = ""                      # the guests' resolver ("": user mode's own, nat: none)
    nat_subnet: str = "10.213.0.0/24"  # vibatch's bridge takes .1, a job's VM .(10 + first CPU)
    nat_bridge: str = "vbnat0"
    bridge: str = ""                   # the site's bridge, for vm.network: bridge
    groups: dict = field(default_factory=dict)   # mode -> groups whose jobs may ask for it


@dataclass(frozen=True)
class Allow:
    """One ``network.allow`` entry."""

    net: ipaddress.IPv4Network
    port: Optional[int] = None
    proto: str = "tcp"

    def match(self) -> list[str]:
        """iptables match arguments."""
        out = ["-d", str(self.net)]
        if self.port is not None:
            out += ["-p", self.proto, "--dport", str(self.port)]
        return out


_ALLOW = re.compile(r"^([0-9.]+(?:/\d{1,2})?)(?::(\d{1,5})(?:/(tcp|udp))?)?$")


def parse_allow(text: str) -> Allow:
    """``CIDR``, ``CIDR:PORT`` or ``CIDR:PORT/udp`` (an address alone is a /32); ValueError."""
    m = _ALLOW.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not CIDR, CIDR:PORT or CIDR:PORT/udp")
    net = ipaddress.IPv4Network(m.group(1), strict=False)
    port = int(m.group(2)) if m.group(2) else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not 1-65535")
    return Allow(net, port, m.group(3) or "tcp")


def _parses(fn, v) -> bool:
    try:
        fn(v)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class SiteShare:
    """A host directory shared read-only into guests at the same path (``shares:``)."""

    path: str
    images: tuple = ()                 # image names or aliases it is for (empty: every image)


@dataclass(frozen=True)
class ScratchConfig:
    default_gb: float = 0.0            # a job's scratch disk when the batch system grants none
    max_gb: float = 100.0              # the largest scratch disk a job may get
    mount: str = "/scratch"            # where the guest mounts it; the job's $TMPDIR


@dataclass(frozen=True)
class TemplateShape:
    cores: int
    memory_mb: int
    images: tuple = ()                 # image names or aliases (empty: every image)


@dataclass(frozen=True)
class TemplatesConfig:
    """Warm start (vm/template.py): jobs restored from a saved boot of their image and shape."""
    enabled: bool = True               # restore a job from a ready template of its shape
    on_first_use: bool = False         # a job that finds none starts a background build of it
    shapes: tuple = ()                 # TemplateShape: what `vibatch template sync` keeps ready
    max_count: int = 16                # templates kept on this node at most
    build_timeout_s: float = 600.0     # a build's boot, settle and save, at most


@dataclass(frozen=True)
class MetricsConfig:
    # Prometheus textfile (node_exporter's textfile collector); relative: under state_dir;
    # "": no textfile
    textfile: str = "metrics/vibatch.prom"


@dataclass(frozen=True)
class LogsConfig:
    phases: str = "syslog"             # one line per hook phase: syslog | an absolute path | ""


@dataclass(frozen=True)
class Config:
    libvirt_uri: str = "qemu:///system"
    state_dir: str = "/var/lib/vibatch"
    run_dir: str = "/run/vibatch"
    library_dir: str = "/var/lib/vibatch/images"
    accounting_file: str = "/var/log/vibatch/accounting.jsonl"
    accounting_group: str = ""         # the admins' group that may read it ("": root only)
    lock_timeout_s: float = 30.0
    host: HostConfig = field(default_factory=HostConfig)
    jobs: JobLimits = field(default_factory=JobLimits)
    vm: VmConfig = field(default_factory=VmConfig)
    exec: ExecConfig = field(default_factory=ExecConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    htcondor: HTCondorConfig = field(default_factory=HTCondorConfig)
    torque: TorqueConfig = field(default_factory=TorqueConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    shares: tuple = ()                 # SiteShare, in the config's order
    source: str = "<defaults>"


# per-key checks: (type, check, reason); lists are stored as tuples
_POSITIVE = (lambda v: v > 0, "must be greater than 0")
_NONNEG = (lambda v: v >= 0, "must be 0 or more")
_ABS = (lambda v: os.path.isabs(v), "must be an absolute path")
NETWORK_MODES = ("none", "user", "nat", "bridge")     # vm.network (vm/network.py)
_CHECKS: dict[str, tuple] = {
    "libvirt_uri": (str, lambda v: "://" in v, "must be a libvirt URI such as qemu:///system"),
    "state_dir": (str,) + _ABS, "run_dir": (str,) + _ABS, "library_dir": (str,) + _ABS,
    "accounting_file": (str,) + _ABS,
    "accounting_group": (str, lambda v: v == "" or valid_name(v),
                         "must name a unix group (or be empty: root only)"),
    "lock_timeout_s": (float,) + _POSITIVE,
    "host.reserved_cpus": (list, lambda v: all(isinstance(c, int) and c >= 0 for c in v),
                           "must be a list of CPU ids (integers >= 0)"),
    "host.cpus": (list, lambda v: all(isinstance(c, int) and c >= 0 for c in v),
                  "must be a list of CPU ids (integers >= 0)"),
    "host.reserved_memory_mb": (int,) + _NONNEG,
    "host.reserved_disk_mb": (int,) + _NONNEG,
    "jobs.max_disk_gb": (int,) + _NONNEG,
    "jobs.io_max_mb": (int, lambda v: 1 <= v <= 65536, "must be between 1 and 65536"),
    "jobs.default_cores": (int,) + _POSITIVE, "jobs.max_cores": (int,) + _NONNEG,
    "jobs.default_memory_mb": (int, lambda v: v >= 64, "must be at least 64"),
    "jobs.min_memory_mb": (int, lambda v: v >= 64, "must be at least 64"),
    "jobs.max_memory_mb": (int,) + _NONNEG,
    "features.hs06": (float,) + _NONNEG,
    "vm.boot_timeout_s": (float, lambda v: 1 <= v <= 3600, "must be between 1 and 3600"),
    "vm.setup_timeout_s": (float, lambda v: 1 <= v <= 3600, "must be between 1 and 3600"),
    "vm.acceleration": (str, lambda v: v in ("auto", "kvm", "tcg"), "must be auto, kvm or tcg"),
    "vm.memory_overhead_mb": (int, lambda v: v >= 64, "must be at least 64"),
    "vm.tcg_tb_cache_mb": (int, lambda v: 16 <= v <= 2048, "must be between 16 and 2048"),
    "vm.machine": (str, lambda v: v in ("q35", "pc"), "must be q35 or pc"),
    "vm.emulator": (str,) + _ABS, "vm.virtiofsd": (str,) + _ABS,
    "vm.share_launcher": (str,) + _ABS,
    "vm.qemu_user": (str, lambda v: bool(v), "must name the user libvirt runs QEMU as"),
    "vm.network": (str, lambda v: v in NETWORK_MODES,
                   "must be none, user, nat or bridge"),
    "vm.console_tail_lines": (int, lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
    "exec.env_exclude": (list, lambda v: all(isinstance(s, str) and s for s in v),
                         "must be a list of variable names"),
    "exec.guest_path": (str, lambda v: v.startswith("/"), "must be a PATH of absolute directories"),
}
_refs = valid_name


def _digest(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("sha512:") and valid_sha512(v[len("sha512:"):])


def _map_of(check) -> Any:
    return lambda v: all(isinstance(k, str) and k and check(x) for k, x in v.items())


def _key(v: Any) -> bool:
    if not isinstance(v, str) or not v.startswith("ed25519:"):
        return False
    try:
        return len(base64.b64decode(v[8:], validate=True)) == 32
    except (ValueError, binascii.Error):
        return False


_CHECKS.update({
    "images.default": (str, lambda v: v == "" or _refs(v), "must be an image name or alias"),
    "images.aliases": (dict, _map_of(_refs), "must map OS names to image names"),
    "images.queue_defaults": (dict, _map_of(_refs), "must map queue names to images or aliases"),
    "images.allow_groups": (dict, _map_of(lambda x: isinstance(x, list) and all(map(_refs, x))),
                            "must map group names to lists of images or aliases"),
    "images.allow_accounts": (dict, _map_of(lambda x: isinstance(x, list) and all(map(_refs, x))),
                              "must map account names to lists of images or aliases"),
    "images.blocked": (list, lambda v: all(_refs(x) or _digest(x) for x in v),
                       "must list image names or sha512:<128 hex digits> digests"),
    "images.accounts_enforced": (bool, lambda v: True, ""),
    "images.max_virtual_size_gb": (int,) + _POSITIVE,
    "images.verify_interval_h": (float,) + _NONNEG,
    "images.trusted_keys": (list, lambda v: all(map(_key, v)),
                            "must list Ed25519 public keys as ed25519:<base64 of 32 bytes> "
                            "(printed by `vibatch catalog keygen`)"),
    "images.catalogs": (list, lambda v: all(isinstance(x, str) and
                                            x.split("://", 1)[0] in ("file", "http", "https")
                                            for x in v),
                        "must list file://, http:// or https:// URLs"),
    "images.download_timeout_s": (float,) + _POSITIVE,
    "images.connect_timeout_s": (float,) + _POSITIVE,
})
_CHECKS.update({
    "batch.hook_alarm_s": (int, lambda v: v == 0 or 10 <= v <= 86400,
                           "must be 0 (each system's default) or between 10 and 86400"),
    "batch.offer_file": (str, lambda v: v == "" or os.path.isabs(v),
                         "must be an absolute path, or \"\" for none"),
    "batch.walltime_grace_s": (int, lambda v: 30 <= v <= 86400, "must be between 30 and 86400"),
})
_CHECKS["htcondor.daemon_user"] = (str, lambda v: bool(v), "must name HTCondor's daemon account "
                                   "(CONDOR_IDS; usually condor)")
_CHECKS.update({
    "torque.pbsnodes": (str, lambda v: v == "" or os.path.isabs(v),
                        "must be an absolute path, or \"\" to never take the node out"),
    "torque.node_name": (str, lambda v: "/" not in v and not v.startswith("-"),
                         "must be a node name as pbs_server knows it (\"\": the host name)"),
    "torque.max_node_faults": (int,) + _POSITIVE,
    "torque.fault_backoff_s": (float, lambda v: 0 <= v <= 120, "must be between 0 and 120"),
    "torque.mom_manager_port": (int, lambda v: 0 <= v <= 65535,
                                "must be pbs_mom's manager port (pbsnodes: mom_manager_port), "
                                "or 0 to keep the VM out of the job's resources_used"),
})
_CHECKS["htcondor.condor_config"] = (str, os.path.isabs, "must be an absolute path")
_CHECKS["htcondor.bin_dir"] = (str, os.path.isabs, "must be an absolute path")
_CHECKS["metrics.textfile"] = (str, lambda v: v == "" or (v.endswith(".prom") and
                                                         ".." not in v.split("/")),
                               "must be a file name ending in .prom (absolute, or relative to "
                               "state_dir), or \"\" for no textfile")
_CHECKS["logs.phases"] = (str, lambda v: v in ("", "syslog") or os.path.isabs(v),
                          "must be syslog, an absolute path, or \"\" for no phase log")
_CHECKS["scratch.default_gb"] = (float,) + _NONNEG
_CHECKS["scratch.max_gb"] = (float,) + _NONNEG
_CHECKS["scratch.mount"] = (str, lambda v: _guest_path_ok(v) is None,
                            "must be an absolute, normalised path outside the guest's system "
                            "directories")
_CHECKS["shares"] = (list, lambda v: True, "")
_CHECKS.update({
    "templates.enabled": (bool, lambda v: True, ""),
    "templates.on_first_use": (bool, lambda v: True, ""),
    "templates.shapes": (list, lambda v: True, ""),     # checked whole by _template_shapes
    "templates.max_count": (int, lambda v: 0 <= v <= 1000, "must be between 0 and 1000"),
    "templates.build_timeout_s": (float, lambda v: 10 <= v <= 7200,
                                  "must be between 10 and 7200"),
})
_IFNAME = (str, lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", v) is not None,
           "must be a network interface name (at most 15 letters, digits, _ . -)")
_CHECKS.update({
    "network.allow": (list, lambda v: all(_parses(parse_allow, x) for x in v),
                      "must list CIDR, CIDR:PORT or CIDR:PORT/udp entries"),
    "network.dns": (str, lambda v: v == "" or _parses(ipaddress.IPv4Address, v),
                    "must be an IPv4 address (or \"\")"),
    "network.nat_subnet": (str, lambda v: _parses(lambda x: ipaddress.IPv4Network(x, strict=True),
                                                  v), "must be an IPv4 network such as 10.213.0.0/24"),
    "network.nat_bridge": _IFNAME, "network.bridge": _IFNAME,
    "network.groups": (dict, lambda v: all(k in ("user", "nat", "bridge") and isinstance(x, list)
                                           and all(isinstance(g, str) and g for g in x)
                                           for k, x in v.items()),
                       "must map user, nat or bridge to lists of unix groups"),
})
_SECTIONS = {"host": HostConfig, "jobs": JobLimits, "vm": VmConfig, "exec": ExecConfig,
             "images": ImagesConfig, "batch": BatchConfig, "htcondor": HTCondorConfig, "torque": TorqueConfig,
             "features": FeaturesConfig, "metrics": MetricsConfig, "logs": LogsConfig,
             "scratch": ScratchConfig, "network": NetworkConfig, "templates": TemplatesConfig}
# where a share or the scratch disk may not be mounted in the guest: its own system directories
# themselves (a share below /etc, such as /etc/grid-security/certificates, is fine)
_GUEST_OWN = {"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32",
              "/proc", "/root", "/run", "/sbin", "/sys", "/usr", "/var", "/tmp", "/home",
              "/var/lib", "/var/log", "/var/tmp", "/usr/bin", "/usr/lib", "/usr/sbin"}
_GUEST_TREES = ("/dev", "/proc", "/sys", "/run", "/boot")


def _guest_path_ok(path: str) -> Optional[str]:
    """Why ``path`` cannot be a mount point in the guest, or None."""
    if not os.path.isabs(path) or os.path.normpath(path) != path or path.startswith("//"):
        return "is not an absolute, normalised path"
    if any(ord(c) < 33 or ord(c) == 127 or c in ",\\" for c in path) or len(path) > 256:
        return "holds a space, a comma, a backslash or a control character, or is too long"
    if path in _GUEST_OWN or any(path.startswith(t + "/") for t in _GUEST_TREES):
        return "is, or is inside, a directory the guest needs for itself"
    return None


def paths_overlap(a: str, b: str) -> bool:
    """One normalised absolute path is the other, or below it: mounting both would nest."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _site_shares(source: str, items: tuple, scratch_mount: str) -> tuple:
    out: list[SiteShare] = []
    for i, item in enumerate(items):
        where = f"{source}: shares[{i}]"
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "images"}:
            raise ConfigError(f"{where}: expected a mapping with path (and optionally images), "
                              f"got {item!r}")
        path, images = item["path"], item.get("images", [])
        if not isinstance(path, str):
            raise ConfigError(f"{where}.path: expected str, got {type(path).__name__}")
        why = _guest_path_ok(path)
        if why:
            raise ConfigError(f"{where}.path: {path!r} {why}")
        if not isinstance(images, list) or not all(isinstance(x, str) and _refs(x)
                                                   for x in images):
            raise ConfigError(f"{where}.images: must be a list of image names or aliases")
        for other in [s.path for s in out] + [scratch_mount]:
            if paths_overlap(path, other):
                raise ConfigError(f"{where}.path: {path} overlaps {other} (another share or "
                                  "scratch.mount): shares may not nest")
        out.append(SiteShare(path, tuple(images)))
    return tuple(out)


def _template_shapes(source: str, items: tuple) -> tuple:
    out = []
    for i, item in enumerate(items):
        where = f"{source}: templates.shapes[{i}]"
        if not isinstance(item, dict) or set(item) - {"cores", "memory_mb", "images"} or \
                not {"cores", "memory_mb"} <= set(item):
            raise ConfigError(f"{where}: expected a mapping with cores and memory_mb (and "
                              f"optionally images), got {item!r}")
        for key in ("cores", "memory_mb"):
            v = item[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "cores" else 64):
                raise ConfigError(f"{where}.{key}: {v!r} must be an integer of at least "
                                  f"{1 if key == 'cores' else 64}")
        images = item.get("images", [])
        if not isinstance(images, list) or not all(isinstance(x, str) and _refs(x)
                                                   for x in images):
            raise ConfigError(f"{where}.images: must be a list of image names or aliases")
        out.append(TemplateShape(item["cores"], item["memory_mb"], tuple(images)))
    return tuple(out)


def _check(source: str, key: str, value: Any) -> Any:
    typ, ok, reason = _CHECKS[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
        raise ConfigError(f"{source}: {key}: expected {typ.__name__}, got {type(value).__name__} "
                          f"({value!r})")
    if not ok(value):
        raise ConfigError(f"{source}: {key}: {value!r} {reason}")
    if typ is list:
        return tuple(value)
    if typ is dict:
        return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _build(source: str, cls: type, data: dict, prefix: str) -> Any:
    names = {f.name for f in fields(cls)} - {"source"} - set(_SECTIONS if cls is Config else ())
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + str(key)
        if cls is Config and key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {full}: expected a mapping, got {type(value).__name__}")
            kwargs[key] = _build(source, _SECTIONS[key], value, full + ".")
        elif key in names:
            kwargs[key] = _check(source, full, value)
        else:
            raise ConfigError(f"{source}: {full}: unknown key")
    return cls(**kwargs)


def parse(data: Any, source: str) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    cfg = _build(source, Config, data, "")
    cfg = Config(**{**{f.name: getattr(cfg, f.name) for f in fields(Config)}, "source": source,
                    "shares": _site_shares(source, cfg.shares, cfg.scratch.mount),
                    "templates": replace(cfg.templates, shapes=_template_shapes(
                        source, cfg.templates.shapes))})
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: Config) -> None:
    j = cfg.jobs
    if j.max_cores and j.default_cores > j.max_cores:
        raise ConfigError(f"{cfg.source}: jobs.default_cores: {j.default_cores} is more than "
                          f"jobs.max_cores ({j.max_cores})")
    if j.max_memory_mb and j.default_memory_mb > j.max_memory_mb:
        raise ConfigError(f"{cfg.source}: jobs.default_memory_mb: {j.default_memory_mb} is more "
                          f"than jobs.max_memory_mb ({j.max_memory_mb})")
    if j.default_memory_mb < j.min_memory_mb:
        raise ConfigError(f"{cfg.source}: jobs.default_memory_mb: {j.default_memory_mb} is less "
                          f"than jobs.min_memory_mb ({j.min_memory_mb})")
    for alias, target in cfg.images.aliases.items():
        if target in cfg.images.aliases:
            raise ConfigError(f"{cfg.source}: images.aliases: {alias!r} points at another alias "
                              f"{target!r}; aliases name images directly")
    if cfg.images.allow_accounts and not cfg.images.accounts_enforced:
        raise ConfigError(f"{cfg.source}: images.allow_accounts: a job's account is the user's "
                          "choice (sbatch -A, qsub -A, AccountingGroup); set "
                          "images.accounts_enforced: true only if the batch system refuses "
                          "accounts the user does not belong to (see docs/security.md)")
    if cfg.scratch.max_gb and cfg.scratch.default_gb > cfg.scratch.max_gb:
        raise ConfigError(f"{cfg.source}: scratch.default_gb: {cfg.scratch.default_gb:g} is more "
                          f"than scratch.max_gb ({cfg.scratch.max_gb:g})")
    net = ipaddress.IPv4Network(cfg.network.nat_subnet)
    need = 10 + max(cfg.host.cpus or [os.cpu_count() or 1]) + 2
    if net.num_addresses < need:
        raise ConfigError(f"{cfg.source}: network.nat_subnet: {net} has fewer than {need} "
                          "addresses (the bridge's, and one per CPU from host part 10)")
    if "bridge" in (cfg.vm.network, *cfg.network.groups) and not cfg.network.bridge:
        raise ConfigError(f"{cfg.source}: network.bridge: the bridge mode needs the site's "
                          "bridge named here")
    if cfg.host.cpus and set(cfg.host.reserved_cpus) >= set(cfg.host.cpus):
        raise ConfigError(f"{cfg.source}: host.reserved_cpus: reserves every CPU in host.cpus")


def load(path: Optional[str] = None) -> Config:
    """Load the file named by ``path``, $VIBATCH_CONFIG or /etc/vibatch/vibatch.yaml."""
    path = path or os.environ.get(ENV_VAR) or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: configuration file is not readable") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse(data, path)
