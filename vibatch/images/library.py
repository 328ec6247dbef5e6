"""The image library: versioned, root-owned, read-only image files behind atomic names.

    <library_dir>/<name>              symlink -> .store/<name>@<sha512 prefix>.<token>
    <library_dir>/.store/<version>/   one installed version of an image:
        manifest.json                 what it is, each file's sha512 and size, where it came from
        disk.qcow2 | disk.raw         root-owned, 0444
        vmlinux, initrd               for kernel-boot images
    <library_dir>/.staging/           half-made versions and partial downloads (never used by jobs)

A job's overlay points at the real path of the version it started on. Adding or syncing a new
version swaps the name's symlink atomically; removing an image removes the name. Either way the old
version stays on disk, unchanged, until no running job uses it (``gc``), so no running VM breaks.

Before a job uses an image, ``ensure_verified`` checks each file against its recorded sha512. A
full hash of a multi-GB image is too slow for every job, so the result is cached per file, keyed by
the file's identity (device, inode, size, mtime and ctime) and accepted only while the file is
root-owned and not writable: while the identity is unchanged, the cached result stands. Any write,
chmod, chown, rename or replacement changes it. Full rehashes run on ``verify`` (by hand or on a
schedule); a mismatch quarantines that version so no job uses it.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional


from . import qemuimg
from ..errors import (ImageInUse, ImageIntegrityError, ImageRejected, LibraryError, LockTimeout,
                      UnknownImage)
from ..names import valid_name
from ..util import atomic_write_json, hold, read_json, root_lock
from .progress import QUIET, Progress

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2
STORE = ".store"
STAGING = ".staging"
DOWNLOADS = "downloads"   # under STAGING: partial downloads, kept for resuming
SAFE_FORMATS = ("qcow2", "raw")
HASH_BUFFER = 1 << 20
FILE_NAMES = {"disk": "disk", "kernel": "vmlinux", "initrd": "initrd"}   # in a version dir
IN_USE_UNKNOWN = "*"   # in a jobs-to-versions map: some job's version is not known yet


@dataclass(frozen=True)
class ImageFile:
    path: str
    sha512: str
    size: int


@dataclass(frozen=True)
class Image:
    name: str
    dir: str                      # the real path of this version (what a job's overlay uses)
    os: str
    os_version: str
    arch: str
    disk: ImageFile
    disk_format: str
    virtual_size: int
    boot: str                     # "kernel" (kernel + initrd from the library) | "disk"
    kernel: Optional[ImageFile]
    initrd: Optional[ImageFile]
    cmdline: str
    added_at: float
    provenance: Optional[dict]    # catalog url, serial, endorser, key id, expires_at; None if added

    @property
    def digest(self) -> str:
        return "sha512:" + self.disk.sha512

    @property
    def version(self) -> str:
        return os.path.basename(self.dir)

    def files(self) -> list[ImageFile]:
        return [f for f in (self.disk, self.kernel, self.initrd) if f is not None]


def check_name(name: str) -> str:
    if not valid_name(name):
        raise UnknownImage(f"invalid image name {name!r}: use letters, digits and . _ + - "
                           "(at most 64, starting with a letter or digit)")
    return name


def sha512_file(path: str, progress: Progress = QUIET) -> str:
    h = hashlib.sha512()
    buf = bytearray(HASH_BUFFER)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        progress.start(f"hashing {os.path.basename(path)}", os.fstat(f.fileno()).st_size)
        while n := f.readinto(buf):
            h.update(view[:n])
            done += n
            progress.update(done)
    progress.end(done)
    return h.hexdigest()


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def image_names(library_dir: str) -> list[str]:
    """The names the library at ``library_dir`` holds (a listing: no lock, no state)."""
    try:
        entries = sorted(os.listdir(library_dir))
    except FileNotFoundError:
        return []
    return [n for n in entries if valid_name(n) and os.path.islink(os.path.join(library_dir, n))
            and os.path.isfile(os.path.join(library_dir, n, MANIFEST))]


class Library:
    def __init__(self, library_dir: str, state_dir: str, lock_timeout: float = 30.0):
        self.dir = library_dir
        self.store = os.path.join(library_dir, STORE)
        self.staging = os.path.join(library_dir, STAGING)
        self.cache_path = os.path.join(state_dir, "verified.json")
        self.quarantine_path = os.path.join(state_dir, "quarantine.json")
        self.cache_lock = root_lock(os.path.join(state_dir, "verified.lock"), lock_timeout)
        # changes to names and versions (add, sync, remove, gc) take this one
        self.lock = root_lock(os.path.join(state_dir, "library.lock"), lock_timeout)

    # -- lookup ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return image_names(self.dir)

    def images(self) -> list[Image]:
        out = []
        for n in self.names():
            try:
                out.append(self.get(n))
            except UnknownImage:
                continue   # removed meanwhile
        return out

    def get(self, name: str) -> Image:
        check_name(name)
        link = os.path.join(self.dir, name)
        if not os.path.islink(link):
            if os.path.isdir(link):
                raise LibraryError(f"{link} is a plain directory, not a library entry; remove it "
                                   "and add the image again with `vibatch image add`")
            have = ", ".join(self.names()) or "none installed"
            raise UnknownImage(f"unknown image {name!r} (available: {have})")
        real = os.path.realpath(link)
        if os.path.dirname(real) != os.path.realpath(self.store):
            raise LibraryError(f"{link} points outside the library's store ({real})")
        return load_version(real, name)

    # -- verification ------------------------------------------------------------------------
    def ensure_verified(self, image: Image) -> bool:
        """The prologue's check: raise unless every file matches; return True if it hashed.

        The fast path is one stat per file and one small JSON read. A file whose identity is not
        the one last verified is rehashed in full; a mismatch quarantines this version.
        """
        q = self.quarantined(image)
        if q:
            raise ImageIntegrityError(f"image {image.name!r} is quarantined: {q['reason']}")
        cache = read_json(self.cache_path, {})
        stale = []
        for f in image.files():
            st = self._stat_trusted(image, f)
            entry = cache.get(f.path)
            if not (entry and entry["identity"] == _identity(st) and entry["sha512"] == f.sha512):
                stale.append(f)
        if not stale:
            return False
        self._rehash(image, stale)
        return True

    def verify(self, image: Image, progress: Progress = QUIET) -> None:
        """A full rehash of every file; quarantines on mismatch, lifts a quarantine on success."""
        self._rehash(image, image.files(), progress)
        if self.quarantined(image):
            self._set_quarantine(image.version, None)

    def _rehash(self, image: Image, files: Iterable[ImageFile], progress: Progress = QUIET) -> None:
        done = {}
        for f in files:
            try:
                before = _identity(self._stat_trusted(image, f))
                digest = sha512_file(f.path, progress)
            except ImageIntegrityError as e:
                self.quarantine(image, e.message)
                raise
            if digest != f.sha512:
                msg = (f"image {image.name!r}: {os.path.basename(f.path)} does not match its "
                       f"recorded sha512 (expected {f.sha512[:16]}…, found {digest[:16]}…)")
                self.quarantine(image, msg)
                raise ImageIntegrityError(msg + "; quarantined, no job will use it")
            if _identity(os.stat(f.path)) != before:
                raise ImageIntegrityError(f"image {image.name!r}: {f.path} changed while it "
                                          "was being verified")
            done[f.path] = {"identity": before, "sha512": f.sha512, "verified_at": time.time()}
        self._edit(self.cache_path, 0o600, lambda cache: cache.update(done))

    def last_verified(self, image: Image) -> Optional[float]:
        """When every file of this version was last fully hashed with its present identity."""
        cache = read_json(self.cache_path, {})
        times = []
        for f in image.files():
            entry = cache.get(f.path)
            try:
                ident = _identity(os.stat(f.path))
            except OSError:
                return None
            if not entry or entry["identity"] != ident or entry["sha512"] != f.sha512:
                return None
            times.append(entry["verified_at"])
        return min(times) if times else None

    def _stat_trusted(self, image: Image, f: ImageFile) -> os.stat_result:
        try:
            st = os.lstat(f.path)
        except FileNotFoundError:
            raise ImageIntegrityError(f"image {image.name!r}: {f.path} is missing") from None
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o222:
            raise ImageIntegrityError(
                f"image {image.name!r}: {f.path} is not a root-owned read-only file (owner "
                f"{st.st_uid}, mode {stat.filemode(st.st_mode)}); the library must not be writable")
        if st.st_size != f.size:
            raise ImageIntegrityError(f"image {image.name!r}: {f.path} is {st.st_size} bytes, "
                                      f"the manifest says {f.size}")
        return st

    # -- quarantine --------------------------------------------------------------------------
    def quarantined(self, image: Image) -> Optional[dict]:
        return read_json(self.quarantine_path, {}).get(image.version)

    def quarantine(self, image: Image, reason: str) -> None:
        self._set_quarantine(image.version, {"name": image.name, "reason": reason, "at": time.time()})

    def _set_quarantine(self, version: str, entry: Optional[dict]) -> None:
        if entry is None:
            self._edit(self.quarantine_path, 0o644, lambda q: q.pop(version, None))
        else:
            self._edit(self.quarantine_path, 0o644, lambda q: q.update({version: entry}))

    # -- adding, replacing, removing ---------------------------------------------------------
    def add(self, disk: str, *, name: str, os_name: str, os_version: str, arch: str = "x86_64",
            kernel: Optional[str] = None, initrd: Optional[str] = None, cmdline: str = "",
            disk_boot: bool = False, max_virtual_size: int = 100 * 1024**3,
            replace: bool = False, progress: Progress = QUIET) -> Image:
        """Copy local files into a new version and give it the name ``name``."""
        check_name(name)
        if disk_boot and (kernel or initrd):
            raise ImageRejected("--disk-boot and --kernel/--initrd exclude each other")
        if not disk_boot and not kernel:
            raise ImageRejected("an image needs --kernel (with --initrd, --cmdline) or --disk-boot")
        if initrd and not kernel:
            raise ImageRejected("--initrd needs --kernel")
        for path in (disk, kernel, initrd):
            if path is not None and not os.path.isfile(path):
                raise ImageRejected(f"{path}: no such file")
        with hold(self.lock):
            if not replace and os.path.lexists(os.path.join(self.dir, name)):
                raise ImageRejected(f"image {name!r} already exists (use --replace for a new "
                                    "version)")
            stage = self.new_stage(name)
            try:
                sources = {"disk": disk, "kernel": kernel, "initrd": initrd}
                files = {what: _copy_in(src, stage, FILE_NAMES[what], progress)
                         for what, src in sources.items() if src}
                manifest = make_manifest(stage, files, name=name, os_name=os_name,
                                         os_version=os_version, arch=arch, cmdline=cmdline,
                                         boot="disk" if disk_boot else "kernel",
                                         max_virtual_size=max_virtual_size)
                return self.install(stage, manifest)
            finally:
                shutil.rmtree(stage, ignore_errors=True)

    def new_stage(self, name: str) -> str:
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        stage = os.path.join(self.staging, f"{name}.{secrets.token_hex(4)}")
        os.mkdir(stage, 0o755)
        return stage

    def install(self, stage: str, manifest: dict) -> Image:
        """Move a staged, checked version into the store and point its name at it (atomic).

        The caller holds ``self.lock``; every file in ``stage`` is already root-owned 0444 and
        matches ``manifest``.
        """
        name = manifest["name"]
        atomic_write_json(os.path.join(stage, MANIFEST), manifest, mode=0o644)
        os.makedirs(self.store, mode=0o755, exist_ok=True)
        version = f"{name}@{manifest['disk']['sha512'][:12]}.{secrets.token_hex(3)}"
        final = os.path.join(self.store, version)
        os.rename(stage, final)
        link = os.path.join(self.dir, name)
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(final)
            raise LibraryError(f"{link} is a plain directory, not a library entry; remove it first")
        tmp_link = os.path.join(self.dir, f".{name}.{secrets.token_hex(3)}")
        os.symlink(os.path.join(STORE, version), tmp_link)
        os.replace(tmp_link, link)
        image = self.get(name)
        self._record_verified(image)
        return image

    def _record_verified(self, image: Image) -> None:
        """Cache the identity of files this process just hashed in its root-only staging area."""
        now = time.time()
        entries = {f.path: {"identity": _identity(os.stat(f.path)), "sha512": f.sha512,
                            "verified_at": now} for f in image.files()}
        self._edit(self.cache_path, 0o600, lambda cache: cache.update(entries))

    def _edit(self, path: str, mode: int, change: Callable[[dict], Any]) -> None:
        """Read-modify-write one of the small JSON state files, under the lock."""
        with hold(self.cache_lock):
            data = read_json(path, {})
            change(data)
            atomic_write_json(path, data, mode=mode)

    def update_manifest(self, image: Image, **changes: Any) -> Image:
        """Rewrite fields of an installed version's manifest (provenance); files are unchanged."""
        path = os.path.join(image.dir, MANIFEST)
        m = read_json(path)
        m.update(changes)
        atomic_write_json(path, m, mode=0o644)
        return load_version(image.dir, image.name)

    def unname(self, name: str, in_use: dict[str, list[str]], force: bool) -> Image:
        """Remove a name. Its version's files go only once no running job uses them (``gc``)."""
        with hold(self.lock):
            image = self.get(name)
            users = in_use_by(image, in_use)
            if users and not force:
                raise ImageInUse(f"image {name!r} is used by running job(s) {', '.join(users)}; "
                                 "use --force to remove the name now (their VMs keep running "
                                 "and the files go when they end)")
            os.unlink(os.path.join(self.dir, name))
            return image

    def gc(self, in_use: dict[str, list[str]], wait: bool = True) -> list[str]:
        """Delete versions no name points to and no running job uses; and stale staging.

        With ``wait=False`` (an epilogue) it does nothing while another command holds the
        library: that command, or the next epilogue, collects instead.
        """
        if IN_USE_UNKNOWN in in_use:
            return []
        try:
            with hold(self.lock, timeout=None if wait else 0):
                return self._collect(in_use)
        except LockTimeout:
            if wait:
                raise
            return []

    def _collect(self, in_use: dict[str, list[str]]) -> list[str]:
        removed: list[str] = []
        named = {os.path.realpath(os.path.join(self.dir, n)) for n in self.names()}
        try:
            versions = os.listdir(self.store)
        except FileNotFoundError:
            versions = []
        for v in versions:
            path = os.path.realpath(os.path.join(self.store, v))
            if path in named or path in in_use:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(v)
        # stages of adds and syncs that crashed (a live one holds self.lock, as we do)
        for stage in os.listdir(self.staging) if os.path.isdir(self.staging) else ():
            if stage != DOWNLOADS:
                shutil.rmtree(os.path.join(self.staging, stage), ignore_errors=True)
        if any(v in read_json(self.quarantine_path, {}) for v in removed):
            def forget(q: dict) -> None:
                for v in removed:
                    q.pop(v, None)
            self._edit(self.quarantine_path, 0o644, forget)
        return removed


def in_use_by(image: Image, in_use: dict[str, list[str]]) -> list[str]:
    """Job ids (from ``in_use``: real version dir -> job ids) that run on this version."""
    return sorted(in_use.get(image.dir, ()))


def load_version(path: str, name: str) -> Image:
    m = read_json(os.path.join(path, MANIFEST))
    if m is None:
        raise UnknownImage(f"image {name!r}: no manifest in {path}")
    if m.get("format_version") != MANIFEST_FORMAT:
        raise LibraryError(f"image {name!r}: {path}/{MANIFEST} has format "
                           f"{m.get('format_version')!r}, this vibatch reads {MANIFEST_FORMAT}; "
                           "add the image again")

    def f(entry: Optional[dict]) -> Optional[ImageFile]:
        if not entry:
            return None
        return ImageFile(os.path.join(path, entry["file"]), entry["sha512"], entry["size"])

    return Image(name=m["name"], dir=path, os=m["os"], os_version=m["os_version"], arch=m["arch"],
                 disk=f(m["disk"]), disk_format=m["disk"]["format"],
                 virtual_size=m["disk"]["virtual_size"], boot=m["boot"], kernel=f(m.get("kernel")),
                 initrd=f(m.get("initrd")), cmdline=m.get("cmdline", ""),
                 added_at=m.get("added_at", 0.0), provenance=m.get("provenance"))


def make_manifest(stage: str, files: dict[str, dict], *, name: str, os_name: str, os_version: str,
                  arch: str, cmdline: str, boot: str, max_virtual_size: int,
                  provenance: Optional[dict] = None) -> dict:
    """The manifest of a staged version, after qemu-img's safety checks on its disk."""
    for key, value in (("--os", os_name), ("--os-version", os_version), ("--arch", arch)):
        if not isinstance(value, str) or not value or any(ord(c) < 32 for c in value):
            raise ImageRejected(f"image {name!r}: {key} must be a non-empty line of text")
    disk = files["disk"]
    info = inspect_disk(os.path.join(stage, disk["file"]), max_virtual_size, label=f"image {name!r}")
    fmt = info["format"]
    final_disk = f"disk.{fmt}"
    if disk["file"] != final_disk:
        os.rename(os.path.join(stage, disk["file"]), os.path.join(stage, final_disk))
    return {"format_version": MANIFEST_FORMAT, "name": name, "os": os_name,
            "os_version": os_version, "arch": arch, "boot": boot, "cmdline": cmdline,
            "added_at": time.time(), "provenance": provenance,
            "disk": {**disk, "file": final_disk, "format": fmt,
                     "virtual_size": info["virtual-size"]},
            "kernel": files.get("kernel"), "initrd": files.get("initrd")}


def inspect_disk(path: str, max_virtual_size: int, label: str = "") -> dict:
    """qemu-img's view of a candidate image; reject what could reach outside the file."""
    what = label or path
    info = qemuimg.info(path)
    fmt = info.get("format")
    if fmt not in SAFE_FORMATS:
        raise ImageRejected(f"{what}: format {fmt!r} is not accepted (only "
                            f"{', '.join(SAFE_FORMATS)})")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRejected(f"{what}: has a backing file ({info.get('backing-filename')}), which "
                            "could point at any host file; flatten it with qemu-img convert")
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file") or info.get("data-file"):
        raise ImageRejected(f"{what}: uses an external data file; flatten it with qemu-img convert")
    if info.get("encrypted") or specific.get("encrypt"):
        raise ImageRejected(f"{what}: is encrypted; vibatch cannot boot encrypted images")
    if info.get("virtual-size", 0) > max_virtual_size:
        raise ImageRejected(f"{what}: virtual size {info['virtual-size']} bytes exceeds the "
                            f"limit of {max_virtual_size} bytes (images.max_virtual_size_gb)")
    return info


def seal(path: str) -> None:
    """Make a staged file what the library trusts: root-owned and read-only."""
    os.chown(path, 0, 0)
    os.chmod(path, 0o444)


def _copy_in(src: str, stage: str, filename: str, progress: Progress = QUIET) -> dict:
    dst = os.path.join(stage, filename)
    shutil.copyfile(src, dst)
    seal(dst)
    return {"file": filename, "sha512": sha512_file(dst, progress), "size": os.path.getsize(dst)}


