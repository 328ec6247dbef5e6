"""libvirt-python, wrapped: one connection, errors matched by code and turned into ours."""
from __future__ import annotations

import os
import struct
import threading
import xml.etree.ElementTree as ET
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
    cap_and_resume(dom, hard_limit_mb)
    return dom


def cap_and_resume(dom: libvirt.virDomain, hard_limit_mb: int) -> None:
    try:
        dom.setMemoryParameters({libvirt.VIR_DOMAIN_MEMORY_HARD_LIMIT: hard_limit_mb * 1024},
                                libvirt.VIR_DOMAIN_AFFECT_LIVE)
        dom.resume()
    except libvirt.libvirtError as e:
        destroy(dom)
        raise HypervisorError(f"could not cap and start the VM: {e.get_error_message()}") from None


# libvirt's save image (src/qemu/qemu_saveimage.h, format version 2): a header, the domain XML
# and a cookie (NUL-terminated, padded to data_len), then QEMU's migration stream
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16sIIIII14I")   # magic version data_len was_running format cookie
SAVE_DATA_MAX = 16 << 20


class SavedState:
    """A saved domain's file, parsed: its XML, its cookie, and where QEMU's stream starts."""

    def __init__(self, path: str):
        self.path = path
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            head = os.pread(fd, SAVE_HEADER.size, 0)
            self.size = os.fstat(fd).st_size
            if len(head) != SAVE_HEADER.size:
                raise HypervisorError(f"{path}: truncated save header")
            magic, version, data_len, self.was_running, fmt, cookie_at, *_ = \
                SAVE_HEADER.unpack(head)
            if magic != SAVE_MAGIC or version != 2 or fmt != 0 or not 0 < data_len <= \
                    SAVE_DATA_MAX or cookie_at > data_len:
                raise HypervisorError(f"{path}: not a complete, uncompressed libvirt save image "
                                      f"(magic {magic[:16]!r}, version {version}, format {fmt})")
            data = os.pread(fd, data_len, SAVE_HEADER.size)
        finally:
            os.close(fd)
        if len(data) != data_len:
            raise HypervisorError(f"{path}: truncated save header")
        xml_part = data[:cookie_at] if cookie_at else data
        self.xml = xml_part.split(b"\0", 1)[0].decode()
        self.cookie = data[cookie_at:].split(b"\0", 1)[0] if cookie_at else b""
        self.stream_at = SAVE_HEADER.size + data_len
        if self.size <= self.stream_at:
            raise HypervisorError(f"{path}: no memory state after the header")

    def header_for(self, xml: str) -> bytes:
        """The header and data of a save image of the same state under another domain XML."""
        body = xml.encode() + b"\0"
        cookie = self.cookie + b"\0" if self.cookie else b""
        data = body + cookie
        return SAVE_HEADER.pack(SAVE_MAGIC, 2, len(data), self.was_running, 0,
                                len(body) if cookie else 0, *([0] * 14)) + data


def restore_as(conn: libvirt.virConnect, saved: SavedState, xml: str, fifo: str,
               feed_timeout: float) -> libvirt.virDomain:
    """Restore ``saved`` paused, as the domain ``xml`` describes (its own name and UUID).

    libvirt's restore keeps the saved name and UUID, so one file could back one live domain
    only. So libvirtd is handed a FIFO instead, fed here with a header carrying ``xml`` and
    then the saved file's own QEMU stream (spliced, not copied): the saved file is only ever
    read, by this process."""
    os.mkfifo(fifo, 0o600)
    result: dict[str, Any] = {}

    def feed() -> None:
        try:
            out = os.open(fifo, os.O_WRONLY | os.O_CLOEXEC)   # until libvirtd (or we) open it
        except OSError as e:
            result["error"] = e
            return
        try:
            os.write(out, saved.header_for(xml))
            with open(saved.path, "rb") as src:
                at, left = saved.stream_at, saved.size - saved.stream_at
                while left:
                    n = os.splice(src.fileno(), out, min(left, 1 << 20), offset_src=at)
                    if n == 0:
                        raise OSError(f"{saved.path} ended early")
                    at, left = at + n, left - n
        except OSError as e:   # libvirtd closed its end: the restore failed (reported below)
            result["error"] = e
        finally:
            os.close(out)

    feeder = threading.Thread(target=feed, name="restore-feed", daemon=True)
    feeder.start()
    try:
        try:
            conn.restoreFlags(fifo, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"libvirt could not restore the template: "
                                  f"{e.get_error_message()}") from None
    finally:
        if feeder.is_alive():   # libvirtd never opened it: let the feeder open and fail
            try:
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.close(fd)
            except OSError:
                pass
        feeder.join(feed_timeout)
        os.unlink(fifo)
    name = ET.fromstring(xml).findtext("name") or ""
    dom = lookup(conn, name)
    if dom is None:
        raise HypervisorError(f"the restored domain {name} is gone")
    if "error" in result:
        destroy(dom)
        raise HypervisorError(f"feeding the saved state failed: {result['error']}")
    return dom


def attach_live(dom: libvirt.virDomain, xml: str) -> None:
    try:
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"could not plug a device into the VM: "
                              f"{e.get_error_message()}") from None


def save(dom: libvirt.virDomain, path: str) -> None:
    try:
        dom.save(path)
    except libvirt.libvirtError as e:
        raise HypervisorError(f"could not save {dom.name()}: {e.get_error_message()}") from None


def versions(conn: libvirt.virConnect) -> tuple[int, int]:
    """(libvirt's version, the hypervisor's): what a saved state depends on."""
    try:
        return conn.getLibVersion(), conn.getVersion()
    except libvirt.libvirtError as e:
        raise HypervisorError(f"libvirt: {e.get_error_message()}") from None


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
