"""Templates: one image booted once, with no job in it, and saved; each job restores its own copy.

A template is keyed by everything the saved state depends on: the image's digest, the vCPU
count, the guest memory, the acceleration, the machine type, the emulator, the TCG cache, and
the versions of QEMU and libvirt. A template whose key no longer matches is never used.

    <state_dir>/templates/<id>/     root 0711
        meta.json                   the key, sizes and build time (root 0600)
        overlay.qcow2               the template's disk: an overlay on the image (0440, the QEMU
                                    user's group: a read-only backing file of every job's overlay)
        state.save                  libvirt's save image (root 0600: only the prologue reads it,
                                    and feeds it to libvirtd through a FIFO, hypervisor.restore_as)
    <state_dir>/templates/<id>.build.lock   held while it is built

Nothing writes a template once it is built. The template has no shares, no scratch disk and no
NIC (QEMU 7.2 refuses to save a VM with virtiofs): a job's devices are hot-plugged after the
restore into the template's spare PCIe ports.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import filelock

from ..config import Config
from ..errors import NodeError
from ..images import qemuimg
from ..util import Deadline, atomic_write_json, private_dir, read_json, root_lock
from . import hypervisor
from .domain import METADATA_NS, USER_AGENT_PORT, DomainSpec, render

FORMAT = 1
PREFIX = "vbtemplate-"          # the domain a build boots (never a job's "vibatch-" domain)
FAILED = ".failed"              # <id>.failed: a restore found its saved state unusable
SETTLE = r"""
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
for m in virtiofs ext4 virtio_net; do modprobe "$m" 2>/dev/null; done
if command -v systemctl >/dev/null 2>&1; then timeout 120 systemctl is-system-running --wait >/dev/null 2>&1; fi
sync
echo settled
"""


class TemplateError(NodeError):
    """A template could not be built, or cannot be used (the job then boots cold)."""


@dataclass(frozen=True)
class Key:
    image_digest: str
    cores: int
    memory_mb: int
    accel: str
    machine: str
    emulator: str
    tcg_tb_cache_mb: int
    libvirt_version: int
    qemu_version: int
    domain: str = ""            # digest of the template's domain XML (vibatch's own devices)
    format: int = FORMAT

    @property
    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Template:
    id: str
    dir: str
    meta: dict

    @property
    def overlay(self) -> str:
        return os.path.join(self.dir, "overlay.qcow2")

    @property
    def saved(self) -> str:
        return os.path.join(self.dir, "state.save")


def root(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "templates")


def key_for(cfg: Config, conn: Any, spec: DomainSpec, image_digest: str) -> Key:
    """The key of a template of ``spec`` (a template spec, before its name and paths)."""
    lib, qemu = hypervisor.versions(conn)
    domain = hashlib.sha256(render(spec).encode()).hexdigest()[:16]
    return Key(image_digest, len(spec.vcpu_pins), spec.memory_mb, spec.accel, cfg.vm.machine,
               cfg.vm.emulator, cfg.vm.tcg_tb_cache_mb, lib, qemu, domain)


def load(cfg: Config, tid: str) -> Optional[Template]:
    d = os.path.join(root(cfg), tid)
    try:
        meta = read_json(os.path.join(d, "meta.json"))
    except (ValueError, OSError):
        return None
    return Template(tid, d, meta) if isinstance(meta, dict) else None


def why_unusable(t: Template, key: Optional[Key]) -> Optional[str]:
    """None if ``t`` may back a job of ``key``; else the reason (also for ``template list``)."""
    if key is not None and t.meta.get("key") != asdict(key):
        have = t.meta.get("key") or {}
        changed = sorted(k for k, v in asdict(key).items() if have.get(k) != v)
        return "outdated: " + ", ".join(changed) + " changed"
    try:
        size = os.stat(t.saved, follow_symlinks=False).st_size
        os.stat(t.overlay, follow_symlinks=False)
    except OSError as e:
        return f"incomplete: {e.filename} {e.strerror}"
    if size != t.meta.get("save_bytes"):
        return f"damaged: state.save has {size} bytes, {t.meta.get('save_bytes')} were saved"
    try:
        failed = read_json(t.dir + FAILED, {})
    except ValueError:
        failed = {"reason": f"{t.id}{FAILED} is unreadable"}
    if failed:
        return f"failed: {str(failed.get('reason', ''))[:200]} (template sync rebuilds it)"
    return None


def mark_failed(cfg: Config, tid: str, reason: str) -> None:
    """A restore found the template's saved state unusable: no later job tries it again, and
    ``template sync`` (or a build) replaces it. The template's own files stay as they are."""
    atomic_write_json(os.path.join(root(cfg), tid) + FAILED,
                      {"reason": reason, "at": time.time()})


def find(cfg: Config, key: Key) -> Optional[Template]:
    t = load(cfg, key.id)
    return t if t is not None and why_unusable(t, key) is None else None


def all_templates(cfg: Config) -> list[Template]:
    try:
        names = sorted(os.listdir(root(cfg)))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if "." in name:
            continue
        t = load(cfg, name)
        out.append(t if t is not None else Template(name, os.path.join(root(cfg), name), {}))
    return out


def _lock(cfg: Config, tid: str, timeout: float = 0.0) -> filelock.FileLock:
    private_dir(root(cfg))
    return root_lock(os.path.join(root(cfg), f"{tid}.build.lock"), timeout)


def building(cfg: Config, tid: str) -> bool:
    lock = _lock(cfg, tid)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False


def remove(cfg: Config, tid: str) -> bool:
    """Delete one template (jobs restored from it keep its overlay open: unlinking is safe for
    them, as is a new build of the same key)."""
    d = os.path.join(root(cfg), tid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d + FAILED)
    if not os.path.isdir(d) or os.path.islink(d):
        return False
    shutil.rmtree(d)
    return True


# --------------------------------------------------------------------------------------------
def job_xml(saved_xml: str, spec: DomainSpec, template: Template) -> str:
    """The job's own domain, from the template's saved one: every device where the template
    had it (the ABI QEMU's stream needs), with the job's name, a new UUID and VM generation id,
    its CPUs, its overlay, console, agent socket and metadata."""
    ET.register_namespace("vb", METADATA_NS)
    dom = ET.fromstring(saved_xml)
    dom.find("name").text = spec.name
    had_genid = dom.find("genid") is not None
    for tag in ("uuid", "genid", "metadata", "cputune", "seclabel"):
        for el in dom.findall(tag):
            dom.remove(el)
    fresh = ET.fromstring(render(spec))
    for tag in ("metadata", "cputune", "seclabel"):
        el = fresh.find(tag)
        if el is not None:
            dom.insert(1, el)
    if had_genid:       # empty: libvirt makes a new one (and QEMU's stream needs the device)
        dom.insert(1, ET.Element("genid"))
    disk = next(d for d in dom.findall("devices/disk") if d.find("target").get("dev") == "vda")
    disk.find("source").set("file", spec.disk_overlay)
    for old in disk.findall("backingStore"):
        disk.remove(old)
    chain = ET.SubElement(disk, "backingStore", type="file")
    ET.SubElement(chain, "format", type="qcow2")
    ET.SubElement(chain, "source", file=template.overlay)
    base = ET.SubElement(chain, "backingStore", type="file")
    ET.SubElement(base, "format", type=spec.disk_base_format)
    ET.SubElement(base, "source", file=spec.disk_base)
    ET.SubElement(base, "backingStore")
    for log in dom.iter("log"):
        log.set("file", spec.console_log)
    for ch in dom.findall("devices/channel"):
        target, source = ch.find("target"), ch.find("source")
        if target is not None and source is not None and target.get("name") == USER_AGENT_PORT:
            source.set("path", spec.user_agent_socket)
    return ET.tostring(dom, encoding="unicode")


# --------------------------------------------------------------------------------------------
# (domain, deadline) -> its root agent, once it answers (lifecycle's wait for a boot)
Ready = Callable[[Any, Deadline], Any]


def build(cfg: Config, conn: Any, key: Key, spec: DomainSpec, image: str, ready: Ready,
          qemu_ids: tuple[int, int], log: Callable[[str], None] = lambda _m: None) -> Template:
    """Boot ``spec`` (a template spec: no shares, scratch or NIC), let it settle, save it, and
    keep it as the template of ``key``. Idempotent: a template already built is returned; a
    build already under way elsewhere raises TemplateError."""
    spec = replace(spec, name=PREFIX + key.id)
    existing = find(cfg, key)
    if existing is not None:
        return existing
    lock = _lock(cfg, key.id)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise TemplateError(f"template {key.id} is being built by another process") from None
    try:
        existing = find(cfg, key)
        if existing is not None:
            return existing
        _make_room(cfg, key.id)
        final = os.path.join(root(cfg), key.id)
        work = final + ".new"
        _clear(conn, cfg, key.id)
        os.makedirs(work, mode=0o711)
        t0 = time.monotonic()
        overlay = os.path.join(work, "overlay.qcow2")
        qemuimg.create_overlay(spec.disk_base, spec.disk_base_format, overlay)
        os.chown(overlay, *qemu_ids)
        os.chmod(overlay, 0o600)
        spec = replace(spec, disk_overlay=overlay, console_log=os.path.join(work, "console.log"),
                       user_agent_socket=os.path.join(work, "user.sock"))
        try:
            dom = conn.createXML(render(spec), 0)
        except Exception as e:  # noqa: BLE001 - libvirt's error, reported as the build's
            raise TemplateError(f"libvirt could not boot the template: {e}") from None
        deadline = Deadline(cfg.templates.build_timeout_s)
        try:
            agent = ready(dom, deadline)
            boot_s = time.monotonic() - t0
            log(f"booted in {boot_s:.1f} s; settling")
            res = agent.run("/bin/sh", ["-c", SETTLE], deadline, what="template settle")
            if res.wait_status != 0 or b"settled" not in res.out:
                raise TemplateError(f"the template did not settle: "
                                    f"{res.err.decode(errors='replace')[-300:]}")
            saved = os.path.join(work, "state.save")
            hypervisor.save(dom, saved)
        except BaseException:
            hypervisor.destroy(dom)
            raise
        os.chown(overlay, 0, qemu_ids[1])
        os.chmod(overlay, 0o440)        # a backing file now: QEMU's group reads, nobody writes
        os.chmod(saved, 0o600)
        size = os.stat(saved).st_size
        hypervisor.SavedState(saved)    # a header we can read back, or no template
        atomic_write_json(os.path.join(work, "meta.json"), {
            "key": asdict(key), "id": key.id, "image": image, "built_at": time.time(),
            "boot_s": round(boot_s, 2), "build_s": round(time.monotonic() - t0, 2),
            "save_bytes": size, "overlay_bytes": os.stat(overlay).st_blocks * 512})
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(final)
        os.rename(work, final)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(final + FAILED)
        log(f"template {key.id} built in {time.monotonic() - t0:.1f} s ({size / 1e6:.0f} MB)")
        return Template(key.id, final, read_json(os.path.join(final, "meta.json")))
    finally:
        lock.release()


def _clear(conn: Any, cfg: Config, tid: str) -> None:
    """What a killed build of ``tid`` left: its domain and its work directory."""
    dom = hypervisor.lookup(conn, PREFIX + tid)
    if dom is not None:
        hypervisor.destroy(dom)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(os.path.join(root(cfg), tid) + ".new")


def _make_room(cfg: Config, tid: str) -> None:
    """Keep at most templates.max_count: drop the oldest other ones."""
    others = sorted((t.meta.get("built_at", 0), t.id) for t in all_templates(cfg) if t.id != tid)
    while others and len(others) >= cfg.templates.max_count:
        remove(cfg, others.pop(0)[1])
    if cfg.templates.max_count == 0:
        raise TemplateError("templates.max_count is 0: no template may be kept")


def leftovers(conn: Any, cfg: Config) -> list[str]:
    """Domains and work directories of builds that died (``reap``): those nobody builds now."""
    out = []
    for name in hypervisor.list_names(conn, PREFIX):
        tid = name[len(PREFIX):]
        if not building(cfg, tid):
            _clear(conn, cfg, tid)
            out.append(f"template build {tid} (its builder died)")
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(root(cfg)):
            if name.endswith(".new") and not building(cfg, name[:-4]):
                shutil.rmtree(os.path.join(root(cfg), name), ignore_errors=True)
                out.append(f"template build {name[:-4]} (unfinished)")
    return out


def spawn_build(cfg: Config, image: str, cores: int, memory_mb: int) -> None:
    """Build a template in the background, detached from the hook (which never waits for it)."""
    spawn(cfg, "build", image, "--cores", str(cores), "--memory", str(memory_mb), "--if-missing")


def spawn(cfg: Config, *args: str) -> None:
    """``vibatch template ARGS...`` in the background, detached from its caller."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VIBATCH_CONFIG": cfg.source,
           "LC_ALL": "C.UTF-8"}
    try:
        subprocess.Popen([sys.executable, "-I", "-B", "-m", "vibatch", "template", *args],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                         cwd="/")
    except OSError as e:
        raise NodeError(f"cannot start vibatch template {args[0]}: {e.strerror}") from None

