"""The image library: one directory per image with its files and a manifest.

    <library_dir>/<name>/manifest.json   what the image is and the sha256 of each file
    <library_dir>/<name>/disk.qcow2      root-owned, read-only (0444)
    <library_dir>/<name>/vmlinux, initrd (for kernel-boot images)

Before a job uses an image, ``ensure_verified`` checks each file against its recorded digest. A
full hash of a multi-GB image is too slow for every job, so the result is cached per file, keyed
by the file's identity (device, inode, size, mtime and ctime): while that identity is unchanged,
the cached result stands. Any write, chmod, chown, rename or replacement changes it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Optional

import filelock

from . import qemuimg
from .errors import ImageIntegrityError, JobError, UnknownImage
from .util import atomic_write_json, hold, read_json

MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SAFE_FORMATS = ("qcow2", "raw")
HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class ImageFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Image:
    name: str
    os: str
    os_version: str
    arch: str
    disk: ImageFile
    disk_format: str
    virtual_size: int
    kernel: Optional[ImageFile]
    initrd: Optional[ImageFile]
    cmdline: str

    @property
    def digest(self) -> str:
        return "sha256:" + self.disk.sha256

    def files(self) -> list[ImageFile]:
        return [f for f in (self.disk, self.kernel, self.initrd) if f is not None]


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UnknownImage(f"invalid image name {name!r}: use letters, digits and . _ + - "
                           "(at most 64, starting with a letter or digit)")
    return name


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Library:
    def __init__(self, library_dir: str, state_dir: str, lock_timeout: float = 30.0):
        self.dir = library_dir
        self.cache_path = os.path.join(state_dir, "verified.json")
        self.lock = filelock.FileLock(os.path.join(state_dir, "verified.lock"), timeout=lock_timeout)

    # -- lookup ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        return [n for n in entries if _NAME.match(n) and
                os.path.isfile(os.path.join(self.dir, n, MANIFEST))]

    def get(self, name: str) -> Image:
        check_name(name)
        path = os.path.join(self.dir, name, MANIFEST)
        m = read_json(path)
        if m is None:
            have = ", ".join(self.names()) or "none installed"
            raise UnknownImage(f"unknown image {name!r} (available: {have})")
        return self._from_manifest(name, m)

    def _from_manifest(self, name: str, m: dict) -> Image:
        base = os.path.join(self.dir, name)

        def f(entry: Optional[dict]) -> Optional[ImageFile]:
            if not entry:
                return None
            return ImageFile(os.path.join(base, entry["file"]), entry["sha256"], entry["size"])

        return Image(name=name, os=m["os"], os_version=m["os_version"], arch=m["arch"],
                     disk=f(m["disk"]), disk_format=m["disk"]["format"],
                     virtual_size=m["disk"]["virtual_size"], kernel=f(m.get("kernel")),
                     initrd=f(m.get("initrd")), cmdline=m.get("cmdline", ""))

    # -- verification ------------------------------------------------------------------------
    def ensure_verified(self, image: Image) -> bool:
        """Raise ImageIntegrityError unless every file matches; return True if it hashed."""
        cache = read_json(self.cache_path, {})
        stale: list[tuple[ImageFile, list[int]]] = []
        for f in image.files():
            st = self._stat_trusted(image, f)
            entry = cache.get(f.path)
            if not (entry and entry["identity"] == _identity(st) and entry["sha256"] == f.sha256):
                stale.append((f, _identity(st)))
        if not stale:
            return False
        for f, ident in stale:
            digest = sha256_file(f.path)
            if digest != f.sha256:
                raise ImageIntegrityError(
                    f"image {image.name!r}: {os.path.basename(f.path)} does not match its recorded "
                    f"sha256 (expected {f.sha256[:16]}…, found {digest[:16]}…); refusing to use it")
            after = _identity(os.stat(f.path))
            if after != ident:
                raise ImageIntegrityError(f"image {image.name!r}: {f.path} changed while it was "
                                          "being verified")
        self._update_cache({f.path: {"identity": ident, "sha256": f.sha256, "verified_at": time.time()}
                            for f, ident in stale})
        return True

    def _stat_trusted(self, image: Image, f: ImageFile) -> os.stat_result:
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            raise ImageIntegrityError(f"image {image.name!r}: {f.path} is missing") from None
        if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ImageIntegrityError(f"image {image.name!r}: {f.path} is writable by group or "
                                      "others; the library must be root-owned and read-only")
        if st.st_size != f.size:
            raise ImageIntegrityError(f"image {image.name!r}: {f.path} is {st.st_size} bytes, "
                                      f"the manifest says {f.size}")
        return st

    def _update_cache(self, entries: dict) -> None:
        with hold(self.lock):
            cache = read_json(self.cache_path, {})
            cache.update(entries)
            atomic_write_json(self.cache_path, cache, mode=0o600)

    # -- adding ------------------------------------------------------------------------------
    def add(self, disk: str, *, name: str, os_name: str, os_version: str, arch: str = "x86_64",
            kernel: Optional[str] = None, initrd: Optional[str] = None, cmdline: str = "",
            max_virtual_size: int = 100 * 1024**3, replace: bool = False) -> Image:
        check_name(name)
        if initrd is not None and kernel is None:
            raise JobError("--initrd needs --kernel")
        info = inspect_disk(disk, max_virtual_size)
        final = os.path.join(self.dir, name)
        if os.path.exists(final) and not replace:
            raise JobError(f"image {name!r} already exists in {self.dir}")
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        tmp = os.path.join(self.dir, f".add-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o755)
        try:
            manifest = {"format_version": 1, "name": name, "os": os_name, "os_version": os_version,
                        "arch": arch, "cmdline": cmdline, "added_at": time.time(),
                        "disk": {**_install(disk, tmp, "disk." + info["format"]),
                                 "format": info["format"], "virtual_size": info["virtual-size"]},
                        "kernel": _install(kernel, tmp, "vmlinux") if kernel else None,
                        "initrd": _install(initrd, tmp, "initrd") if initrd else None}
            atomic_write_json(os.path.join(tmp, MANIFEST), manifest, mode=0o644)
            if os.path.exists(final):
                old = final + f".old-{os.getpid()}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
            else:
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.get(name)


def inspect_disk(path: str, max_virtual_size: int) -> dict:
    """qemu-img's view of a candidate image; reject what could reach outside the file."""
    if not os.path.isfile(path):
        raise JobError(f"{path}: no such image file")
    info = qemuimg.info(path)
    fmt = info.get("format")
    if fmt not in SAFE_FORMATS:
        raise JobError(f"{path}: format {fmt!r} is not accepted (only {', '.join(SAFE_FORMATS)})")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise JobError(f"{path}: has a backing file ({info.get('backing-filename')}); flatten it "
                       "with qemu-img convert first")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file") or info.get("data-file"):
        raise JobError(f"{path}: uses an external data file; flatten it first")
    if info.get("encrypted") or specific.get("encrypt"):
        raise JobError(f"{path}: is encrypted; vibatch cannot boot encrypted images")
    if info.get("virtual-size", 0) > max_virtual_size:
        raise JobError(f"{path}: virtual size {info['virtual-size']} exceeds the limit "
                       f"{max_virtual_size}")
    return info


def _install(src: str, directory: str, filename: str) -> dict:
    if not os.path.isfile(src):
        raise JobError(f"{src}: no such file")
    dst = os.path.join(directory, filename)
    shutil.copyfile(src, dst)
    os.chown(dst, 0, 0)
    os.chmod(dst, 0o444)
    return {"file": filename, "sha256": sha256_file(dst), "size": os.path.getsize(dst)}
