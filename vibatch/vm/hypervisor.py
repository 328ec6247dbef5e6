"""libvirt-python, wrapped: one connection, errors matched by code and turned into ours."""
from __future__ import annotations

from typing import Any, Optional

import libvirt

from ..errors import HypervisorError

_GONE = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


def connect(uri: str) -> libvirt.virConnect:
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: {e.get_error_message()} "
                              "(is libvirtd running?)") from None


def lookup(conn: libvirt.virConnect, name: str) -> Optional[libvirt.virDomain]:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(f"libvirt lookup of {name}: {e.get_error_message()}") from None


def start_capped(conn: libvirt.virConnect, xml: str, hard_limit_mb: int) -> libvirt.virDomain:
    """Create the transient domain paused, set its hard memory limit live, then resume.

    ``<memtune><hard_limit>`` in the XML makes libvirt raise RLIMIT_MEMLOCK, which needs
    CAP_SYS_RESOURCE; setting the cgroup limit on the paused domain does not, and is enforced.
    """
    try:
        dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"libvirt could not start the VM: {e.get_error_message()}") from None
    try:
        dom.setMemoryParameters({libvirt.VIR_DOMAIN_MEMORY_HARD_LIMIT: hard_limit_mb * 1024},
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)
        dom.resume()
    except libvirt.libvirtError as e:
        destroy(dom)
        raise HypervisorError(f"could not cap and start the VM: {e.get_error_message()}") from None
    return dom


def destroy(dom: libvirt.virDomain) -> bool:
    """Destroy; True if it was running. A domain that is already gone is not an error."""
    try:
        dom.destroy()
        return True
    except libvirt.libvirtError as e:
        if e.get_error_code() in _GONE:
            return False
        raise HypervisorError(f"could not destroy {dom.name()}: {e.get_error_message()}") from None


def is_active(dom: libvirt.virDomain) -> bool:
    """The domain still runs; False once it is gone (QEMU died, destroyed)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as e:
        if e.get_error_code() in _GONE:
            return False
        raise HypervisorError(f"libvirt: {e.get_error_message()}") from None


def cpu_time_s(dom: libvirt.virDomain) -> Optional[float]:
    try:
        return dom.getCPUStats(True)[0]["cpu_time"] / 1e9
    except (libvirt.libvirtError, KeyError, IndexError):
        return None


def xml_desc(dom: libvirt.virDomain) -> Optional[str]:
    try:
        return dom.XMLDesc(0)
    except libvirt.libvirtError as e:
        if e.get_error_code() in _GONE:
            return None
        raise HypervisorError(f"libvirt: {e.get_error_message()}") from None


def list_names(conn: libvirt.virConnect, prefix: str) -> list[str]:
    try:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(prefix))
    except libvirt.libvirtError as e:
        raise HypervisorError(f"libvirt: {e.get_error_message()}") from None
