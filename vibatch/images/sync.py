"""``vibatch image sync CATALOG_URL``: make this node's library what an endorsed catalog lists.

1. Fetch the catalog; check its signature against ``images.trusted_keys``, its format and expiry.
2. Refuse a serial lower than the last one accepted from this URL (rollback), or the same serial
   with different content; record the accepted serial before anything else.
3. For each entry for this node's architecture that the site does not block: if the library has
   the same files under that name, refresh its provenance (endorsement, expiry); otherwise download
   (resuming), check size and sha512, run the library's qemu-img safety checks, and install the new
   version atomically. A failure leaves nothing installed for that entry.
4. Entries from this catalog that are no longer listed lose their name; their files go once no
   running job uses them.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional


from . import catalog as catalog_mod
from . import fetch
from ..config import Config
from ..errors import CatalogRejected, VibatchError
from .library import DOWNLOADS, FILE_NAMES, Image, Library, make_manifest, seal
from ..util import Deadline, atomic_write_json, hold, read_json, root_lock
from .progress import QUIET, Progress


@dataclass
class Report:
    url: str
    serial: int = 0
    endorser: str = ""
    installed: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, VibatchError]] = field(default_factory=list)
    bytes_downloaded: int = 0
    seconds: float = 0.0


def state_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "catalogs.json")


def sync(cfg: Config, library: Library, url: str, in_use: Callable[[], dict],
         now: Optional[float] = None, progress: Progress = QUIET) -> Report:
    t0 = time.monotonic()
    url = fetch.normalize(url)
    fetch.scheme(url)
    report = Report(url)
    lock = root_lock(os.path.join(cfg.state_dir, "sync.lock"), cfg.lock_timeout_s)
    with hold(lock):
        data = fetch.fetch_bytes(url, catalog_mod.MAX_BYTES, cfg.images.connect_timeout_s)
        cat = catalog_mod.parse(data, cfg.images.trusted_keys, url, now)
        _check_rollback(cfg, url, cat)
        report.serial, report.endorser = cat.serial, cat.endorser
        listed = set()
        arch = os.uname().machine
        blocked = set(cfg.images.blocked)
        for entry in cat.entries:
            if entry.arch != arch:
                report.skipped.append(f"{entry.name} (arch {entry.arch}, this node is {arch})")
                continue
            if entry.name in blocked or "sha512:" + entry.disk.sha512 in blocked:
                report.skipped.append(f"{entry.name} (blocked by images.blocked)")
                continue
            listed.add(entry.name)
            try:
                _sync_entry(cfg, library, url, cat, entry, report, progress)
            except VibatchError as e:
                report.failed.append((entry.name, e))
        used = in_use()
        for image in library.images():
            prov = image.provenance or {}
            if prov.get("catalog_url") == url and image.name not in listed:
                library.unname(image.name, used, force=True)
                report.expired.append(image.name)
        library.gc(used)
    report.seconds = time.monotonic() - t0
    return report


def _check_rollback(cfg: Config, url: str, cat: catalog_mod.Catalog) -> None:
    path = state_path(cfg)
    known = read_json(path, {})
    prev = known.get(url)
    if prev:
        if cat.serial < prev["serial"]:
            raise CatalogRejected(f"{url}: serial {cat.serial} is older than serial "
                                  f"{prev['serial']} accepted on {catalog_mod.iso(prev['accepted_at'])}: "
                                  "a rollback (a replayed old catalog); refusing it")
        if cat.serial == prev["serial"] and cat.digest != prev["digest"]:
            raise CatalogRejected(f"{url}: serial {cat.serial} was accepted before with different "
                                  "content; an endorser must raise the serial for every change")
    known[url] = {"serial": cat.serial, "digest": cat.digest, "endorser": cat.endorser,
                  "key_id": cat.key_id, "expires_at": cat.expires_at,
                  "accepted_at": prev["accepted_at"] if prev and prev["serial"] == cat.serial
                  else time.time(), "synced_at": time.time()}
    atomic_write_json(path, known, mode=0o644)


def _provenance(url: str, cat: catalog_mod.Catalog) -> dict:
    return {"catalog_url": url, "serial": cat.serial, "endorser": cat.endorser,
            "key_id": cat.key_id, "issued_at": cat.issued_at, "expires_at": cat.expires_at,
            "synced_at": time.time()}


def _same_files(image: Image, entry: catalog_mod.Entry) -> bool:
    mine = {"disk": image.disk, "kernel": image.kernel, "initrd": image.initrd}
    theirs = entry.files()
    return (image.boot == entry.boot and image.cmdline == entry.cmdline and
            image.disk_format == entry.format and
            all((mine[k] is None) == (theirs.get(k) is None) for k in mine) and
            all(mine[k].sha512 == ref.sha512 and mine[k].size == ref.size
                for k, ref in theirs.items()))


def _sync_entry(cfg: Config, library: Library, url: str, cat: catalog_mod.Catalog,
                entry: catalog_mod.Entry, report: Report, progress: Progress = QUIET) -> None:
    if entry.name in library.names():
        current = library.get(entry.name)
        prov = current.provenance or {}
        if prov.get("catalog_url") != url:
            raise CatalogRejected(
                f"image {entry.name!r} exists on this node but did not come from {url} "
                f"({'added by hand' if not prov else 'from ' + prov['catalog_url']}); "
                "remove it first to let this catalog manage it")
        if _same_files(current, entry):
            with hold(library.lock):
                library.update_manifest(current, provenance=_provenance(url, cat),
                                        os=entry.os, os_version=entry.os_version)
            report.refreshed.append(entry.name)
            return
    downloads = os.path.join(library.staging, DOWNLOADS)
    os.makedirs(downloads, mode=0o700, exist_ok=True)
    fetched: dict[str, str] = {}
    for what, ref in entry.files().items():
        part = os.path.join(downloads, ref.sha512 + ".part")
        before = os.path.getsize(part) if os.path.exists(part) else 0
        fetch.download(fetch.resolve(url, ref.url), part, ref.size, ref.sha512,
                       Deadline(cfg.images.download_timeout_s), cfg.images.connect_timeout_s,
                       f"image {entry.name!r} {what}", progress)
        report.bytes_downloaded += ref.size - before
        fetched[what] = part
    with hold(library.lock):
        stage = library.new_stage(entry.name)
        try:
            files = {}
            for what, part in fetched.items():
                dst = os.path.join(stage, FILE_NAMES[what])
                os.rename(part, dst)   # the very bytes that were hashed
                seal(dst)
                ref = entry.files()[what]
                files[what] = {"file": FILE_NAMES[what], "sha512": ref.sha512, "size": ref.size}
            manifest = make_manifest(stage, files, name=entry.name, os_name=entry.os,
                                     os_version=entry.os_version, arch=entry.arch,
                                     cmdline=entry.cmdline, boot=entry.boot,
                                     max_virtual_size=cfg.images.max_virtual_size_gb * 1024**3,
                                     provenance=_provenance(url, cat))
            if manifest["disk"]["format"] != entry.format:
                raise CatalogRejected(f"image {entry.name!r}: the catalog says format "
                                      f"{entry.format}, the file is {manifest['disk']['format']}")
            library.install(stage, manifest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    report.installed.append(entry.name)
