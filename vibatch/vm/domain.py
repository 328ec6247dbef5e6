"""Domain XML for one job's VM, built with ElementTree from a typed spec.

``render(spec)`` needs no libvirt, so the XML is compared against golden files in the tests.
The hard memory cap is not in the XML: ``<memtune><hard_limit>`` at define time makes libvirt
raise RLIMIT_MEMLOCK, which needs CAP_SYS_RESOURCE; ``hypervisor.start_capped`` sets it live on
the paused domain instead.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

METADATA_NS = "https://vibatch.readthedocs.io/xmlns/job/1"
GUEST_AGENT_PORT = "org.qemu.guest_agent.0"
USER_AGENT_PORT = "org.vibatch.user.0"
WORKDIR_TAG = "vbjob"
IO_TAG = "vbio"


@dataclass(frozen=True)
class Share:
    source: str         # what libvirt passes the launcher as -o source=: the share's spec file
    tag: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    accel: str                      # "kvm" or "tcg"
    vcpu_pins: tuple[int, ...]      # host CPU of vCPU i
    memory_mb: int
    disk_overlay: str
    disk_base: str
    disk_base_format: str
    console_log: str
    user_agent_socket: str
    shares: tuple[Share, ...]
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: str = ""
    machine: str = "q35"
    emulator: str = "/usr/bin/qemu-system-x86_64"
    virtiofsd: str = "/opt/vibatch/hooks/libvirt/virtiofsd"   # libvirt starts it per share
    tcg_tb_cache_mb: int = 64
    network: str = "none"                       # none | user | nat | bridge (network.py)
    network_bridge: str = ""                    # the bridge a nat/bridge NIC is on
    mac: str = ""                               # the NIC's MAC (the guest setup finds it by it)
    scratch_disk: Optional[str] = None          # the job's scratch disk (raw, sparse)
    scratch_serial: str = "vbscratch"           # how the guest finds it (/sys/block/*/serial)
    metadata: tuple[tuple[str, str], ...] = ()   # (key, value) recorded in <metadata>
    # a template (template.py): shared memory for the shares hot-plugged after each restore,
    # a VM generation id libvirt renews at every restore, and free PCIe ports to plug into
    template: bool = False
    cpu_weight: int = 0                         # <cputune><shares> (0: libvirt's default)
    process_ids: Optional[tuple[int, int]] = None   # QEMU's uid and a gid it runs as (batch/gridengine.py)

    def hotplugged(self) -> list[ET.Element]:
        """The devices a restored template gets after the restore: shares, scratch, NIC."""
        return [*([scratch_disk(self)] if self.scratch_disk else []),
                *(filesystem(self, share) for share in self.shares),
                *([interface(self)] if self.network in ("user", "nat", "bridge") else [])]


SPARE_PORTS = 8       # PCIe root ports a template keeps free for its job's hot-plugged devices


def _sub(parent: ET.Element, tag: str, text: Optional[str] = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def build(spec: DomainSpec) -> ET.Element:
    dom = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(dom, "name", spec.name)
    meta = _sub(dom, "metadata")
    job = ET.SubElement(meta, f"{{{METADATA_NS}}}job")
    for key, value in spec.metadata:
        _sub(job, f"{{{METADATA_NS}}}{key}", value)
    _sub(dom, "memory", str(spec.memory_mb), unit="MiB")
    _sub(dom, "vcpu", str(len(spec.vcpu_pins)), placement="static")
    cputune = _sub(dom, "cputune")
    for i, cpu in enumerate(spec.vcpu_pins):
        _sub(cputune, "vcpupin", vcpu=str(i), cpuset=str(cpu))
    _sub(cputune, "emulatorpin", cpuset=",".join(str(c) for c in spec.vcpu_pins))
    if spec.cpu_weight:
        _sub(cputune, "shares", str(spec.cpu_weight))
    if spec.shares or spec.template:  # virtiofs needs shared guest memory
        mb = _sub(dom, "memoryBacking")
        _sub(mb, "source", type="memfd")
        _sub(mb, "access", mode="shared")
    if len(spec.vcpu_pins) > 1:
        cpu = _sub(dom, "cpu", mode="host-passthrough" if spec.accel == "kvm" else "custom")
        if spec.accel != "kvm":
            _sub(cpu, "model", "qemu64", fallback="allow")
        _sub(cpu, "topology", sockets="1", dies="1", cores=str(len(spec.vcpu_pins)), threads="1")
    elif spec.accel == "kvm":
        _sub(dom, "cpu", mode="host-passthrough")

    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    if spec.kernel:
        _sub(os_el, "kernel", spec.kernel)
        if spec.initrd:
            _sub(os_el, "initrd", spec.initrd)
        if spec.cmdline:
            _sub(os_el, "cmdline", spec.cmdline)
    else:
        _sub(os_el, "boot", dev="hd")
    features = _sub(dom, "features")
    _sub(features, "acpi")
    if spec.accel == "tcg":
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(spec.tcg_tb_cache_mb), unit="MiB")
    _sub(dom, "clock", offset="utc")
    if spec.template:
        _sub(dom, "genid")     # libvirt gives every restore of the template a new one
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(dom, event, "destroy")
    # No DAC relabelling at all: libvirt would otherwise chown the library's kernel, initrd and
    # base image to the QEMU user at every start (and the base never back). The lifecycle hands
    # the overlay to the QEMU user itself; everything else QEMU opens is world-readable.
    dom.append(process_label(spec.process_ids))

    dev = _sub(dom, "devices")
    _sub(dev, "emulator", spec.emulator)
    disk = _sub(dev, "disk", type="file", device="disk")
    # a full host filesystem gives the guest I/O errors (the job fails), never a paused VM
    _sub(disk, "driver", name="qemu", type="qcow2", cache="unsafe", discard="unmap",
         error_policy="report")
    _sub(disk, "source", file=spec.disk_overlay)
    backing = _sub(disk, "backingStore", type="file")
    _sub(backing, "format", type=spec.disk_base_format)
    _sub(backing, "source", file=spec.disk_base)
    _sub(backing, "backingStore")
    _sub(disk, "target", dev="vda", bus="virtio")
    if not spec.template:
        dev.extend(spec.hotplugged())
    else:
        for i in range(SPARE_PORTS):   # the first indexes (libvirt fills any gap with more)
            _sub(dev, "controller", type="pci", model="pcie-root-port", index=str(1 + i))
    # the console goes through virtlogd, which rotates it (virtlogd.conf max_size, max_backups):
    # a guest printing without end fills at most that much of the state filesystem
    serial = _sub(dev, "serial", type="pty")
    _sub(serial, "log", file=spec.console_log, append="off")
    _sub(serial, "target", port="0")
    root_agent = _sub(dev, "channel", type="unix")
    _sub(root_agent, "target", type="virtio", name=GUEST_AGENT_PORT)
    user_agent = _sub(dev, "channel", type="unix")
    _sub(user_agent, "source", mode="bind", path=spec.user_agent_socket)
    _sub(user_agent, "target", type="virtio", name=USER_AGENT_PORT)
    _sub(dev, "controller", type="usb", model="none")
    _sub(dev, "memballoon", model="none")
    rng = _sub(dev, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    return dom


def process_label(ids: Optional[tuple[int, int]]) -> ET.Element:
    """No relabelling (above); with ``ids``, QEMU runs as that uid and gid (libvirt adds the gid
    to the uid's own groups): the batch system's job group (Grid Engine's add_grp_id)."""
    if ids is None:
        return ET.Element("seclabel", type="none", model="dac")
    label = ET.Element("seclabel", type="static", model="dac", relabel="no")
    _sub(label, "label", f"+{int(ids[0])}:+{int(ids[1])}")
    return label


def scratch_disk(spec: DomainSpec) -> ET.Element:
    disk = ET.Element("disk", type="file", device="disk")
    _sub(disk, "driver", name="qemu", type="raw", cache="unsafe", discard="unmap",
         error_policy="report")
    _sub(disk, "source", file=spec.scratch_disk or "")
    _sub(disk, "backingStore")
    _sub(disk, "target", dev="vdb", bus="virtio")
    _sub(disk, "serial", spec.scratch_serial)
    return disk


def filesystem(spec: DomainSpec, share: Share) -> ET.Element:
    """libvirtd starts the <binary> (vibatch's launcher, share.py) as root for each share; it
    serves the share as the job's user, not as root."""
    fs = ET.Element("filesystem", type="mount", accessmode="passthrough")
    _sub(fs, "driver", type="virtiofs", queue="1024")
    binary = _sub(fs, "binary", path=spec.virtiofsd)
    _sub(binary, "cache", mode="none")
    _sub(fs, "source", dir=share.source)
    _sub(fs, "target", dir=share.tag)
    return fs


def interface(spec: DomainSpec) -> ET.Element:
    iface = ET.Element("interface", type="user" if spec.network == "user" else "bridge")
    if spec.network != "user":
        _sub(iface, "source", bridge=spec.network_bridge)
    if spec.mac:
        _sub(iface, "mac", address=spec.mac)
    _sub(iface, "model", type="virtio")
    if spec.network != "user":      # no frame from this VM's tap reaches another port's
        _sub(iface, "port", isolated="yes")
    return iface


def to_xml(el: ET.Element) -> str:
    ET.register_namespace("vb", METADATA_NS)
    ET.indent(el, space="  ")
    return ET.tostring(el, encoding="unicode") + "\n"


def render(spec: DomainSpec) -> str:
    return to_xml(build(spec))


def read_metadata(xml: str) -> dict[str, str]:
    """The <metadata> fields vibatch recorded in a running domain's XML."""
    root = ET.fromstring(xml)
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    if job is None:
        return {}
    return {child.tag.split("}", 1)[1]: child.text or "" for child in job}
