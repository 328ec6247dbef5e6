"""The admin and endorser commands: ``vibatch image …`` and ``vibatch catalog …``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import yaml

from .. import batch
from ..images import catalog as catalog_mod, offerfile
from ..config import Config
from ..errors import (CatalogRejected, ImageIntegrityError, ImageRejected, ImageTestFailed,
                      LibraryError, UsageError, VibatchError)
from ..images.library import Image, Library, in_use_by, inspect_disk, sha512_file
from ..util import atomic_write, read_json, require_root
from ..images.progress import Progress


def _ago(ts: Optional[float], now: float) -> str:
    if ts is None:
        return "never"
    s = max(0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _human(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _endorsement(p: Optional[dict], now: float) -> str:
    if not p:
        return "local"
    state = "EXPIRED" if p["expires_at"] < now else f"to {time.strftime('%Y-%m-%d', time.gmtime(p['expires_at']))}"
    return f"#{p['serial']} {state}"


def describe(cfg: Config, lib: Library, img: Image, in_use: dict, now: float) -> dict:
    from ..images.policy import refusal  # noqa: PLC0415
    why = refusal(cfg, lib, img, now)
    return {
        "name": img.name, "version": img.version, "dir": img.dir, "os": img.os,
        "os_version": img.os_version, "arch": img.arch, "boot": img.boot,
        "format": img.disk_format, "virtual_size": img.virtual_size,
        "size": sum(f.size for f in img.files()), "digest": img.digest,
        "files": {k: {"path": f.path, "size": f.size, "sha512": f.sha512}
                  for k, f in (("disk", img.disk), ("kernel", img.kernel), ("initrd", img.initrd))
                  if f is not None},
        "cmdline": img.cmdline, "added_at": img.added_at, "provenance": img.provenance,
        "aliases": sorted(a for a, t in cfg.images.aliases.items() if t == img.name),
        "in_use_by": in_use_by(img, in_use), "last_verified": lib.last_verified(img),
        "quarantine": lib.quarantined(img), "usable": not why, "refusal": why,
    }


def image_command(args: argparse.Namespace, cfg: Config) -> int:
    from ..core import lifecycle  # noqa: PLC0415
    os.makedirs(cfg.state_dir, mode=0o755, exist_ok=True)
    lib = Library(cfg.library_dir, cfg.state_dir, cfg.lock_timeout_s)
    act = args.image_command
    now = time.time()
    if act == "add":
        require_root("image add")
        img = lib.add(args.file, name=args.name, os_name=args.os_name, os_version=args.os_version,
                      arch=args.arch, kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                      disk_boot=args.disk_boot, replace=args.replace,
                      max_virtual_size=cfg.images.max_virtual_size_gb * 1024**3,
                      progress=Progress.on(sys.stderr))
        print(f"added {img.name}: {img.os} {img.os_version} ({img.boot} boot, {img.disk_format}), "
              f"{img.digest[:23]}…")
        _refresh_offer(cfg, lib)
        _refresh_templates(cfg)
        return 0
    if act in ("list", "show"):
        in_use = lifecycle.images_in_use(cfg)
        if act == "show":
            d = describe(cfg, lib, lib.get(args.name), in_use, now)
            if args.json:
                print(json.dumps(d, indent=1))
            else:
                _print_show(d, now)
            return 0
        rows = [describe(cfg, lib, img, in_use, now) for img in lib.images()]
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'NAME':24} {'OS':10} {'VERSION':16} {'SIZE':>7} {'DIGEST':14} {'ENDORSED':18} "
              f"{'IN USE':6} VERIFIED")
        for d in rows:
            verified = "QUARANTINED" if d["quarantine"] else _ago(d["last_verified"], now)
            print(f"{d['name']:24} {d['os']:10} {d['os_version'][:16]:16} {_human(d['size']):>7} "
                  f"{d['digest'][7:19]:14} {_endorsement(d['provenance'], now):18} "
                  f"{len(d['in_use_by']):<6} {verified}")
        return 0
    if act == "verify":
        require_root("image verify")
        return _verify(cfg, lib, args, now)
    if act == "remove":
        require_root("image remove")
        in_use = lifecycle.images_in_use(cfg)
        img = lib.unname(args.name, in_use, args.force)
        users = in_use_by(img, in_use)
        gone = lib.gc(in_use)
        print(f"removed {img.name}" + (f"; its files stay until job(s) {', '.join(users)} end"
                                       if users else f" ({len(gone)} version(s) deleted)"))
        _refresh_offer(cfg, lib)
        _refresh_templates(cfg)
        return 0
    if act == "sync":
        require_root("image sync")
        try:
            return _sync(cfg, lib, args.url or list(cfg.images.catalogs))
        finally:     # also after a partial sync: what was installed is offered
            _refresh_offer(cfg, lib)
            _refresh_templates(cfg)
    if act == "test":
        require_root("image test")
        return _test(cfg, lib, args)
    if act == "resolve":
        return _resolve(cfg, lib, args)
    if act == "offer":
        from ..images.policy import offer  # noqa: PLC0415
        formats = batch.offer_formats()   # the batch systems' own
        if args.format != "lines" and args.format not in formats:
            raise UsageError(f"argument --format: invalid choice {args.format!r} (choose from "
                             f"lines, {', '.join(formats)})")
        if args.format == "lines":
            text = offerfile.text(cfg, lib)
        else:
            text = formats[args.format](offer(cfg, lib))
        if args.output:
            atomic_write(args.output, text.encode(), mode=0o644)
        else:
            sys.stdout.write(text)
        return 0
    raise LibraryError(f"unknown image action {act}")


def _refresh_offer(cfg: Config, lib: Library) -> None:
    """Keep ``batch.offer_file`` in step with the library just changed."""
    try:
        if offerfile.refresh(cfg, lib):
            print(f"rewrote the offer file {cfg.batch.offer_file}")
    except OSError as e:
        print(f"vibatch: could not rewrite the offer file {cfg.batch.offer_file}: {e}",
              file=sys.stderr)


def _refresh_templates(cfg: Config) -> None:
    """Bring the warm-start templates (templates.shapes) in step with the library just changed,
    in the background: ``vibatch template sync`` builds what is missing, removes what is stale."""
    if not (cfg.templates.enabled and cfg.templates.shapes):
        return
    from ..vm import template  # noqa: PLC0415
    try:
        template.spawn(cfg, "sync")
        print("templates: `vibatch template sync` runs in the background (see `vibatch template "
              "list`)")
    except VibatchError as e:
        print(f"vibatch: {e.message}", file=sys.stderr)


def _print_show(d: dict, now: float) -> None:
    print(f"name:          {d['name']}   (version {d['version']})")
    print(f"os:            {d['os']} {d['os_version']} {d['arch']}")
    if d["aliases"]:
        print(f"aliases:       {', '.join(d['aliases'])}")
    print(f"boot:          {d['boot']}" + (f", cmdline {d['cmdline']!r}" if d["boot"] == "kernel" else ""))
    print(f"disk:          {d['format']}, virtual size {_human(d['virtual_size'])}")
    for k, f in d["files"].items():
        print(f"  {k:7} {_human(f['size']):>8}  sha512 {f['sha512'][:32]}…  {f['path']}")
    p = d["provenance"]
    if p:
        print(f"endorsed by:   {p['endorser']} (key {p['key_id']}), catalog serial {p['serial']}")
        print(f"catalog:       {p['catalog_url']}")
        print(f"expires:       {catalog_mod.iso(p['expires_at'])}"
              + ("  EXPIRED" if p["expires_at"] < now else ""))
    else:
        print("endorsed by:   nobody (added locally with `vibatch image add`)")
    print(f"added:         {catalog_mod.iso(d['added_at'])}")
    print(f"last verified: {_ago(d['last_verified'], now)}")
    if d["quarantine"]:
        print(f"QUARANTINED:   {d['quarantine']['reason']}")
    print(f"in use by:     {', '.join(d['in_use_by']) or 'no job'}")
    print(f"usable:        {'yes' if d['usable'] else 'no: ' + d['refusal']}")


def _verify(cfg: Config, lib: Library, args: argparse.Namespace, now: float) -> int:
    if bool(args.name) == bool(args.all or args.due):
        raise ImageRejected("name one image, or use --all or --due")
    images = [lib.get(args.name)] if args.name else lib.images()
    if args.due:
        limit = cfg.images.verify_interval_h * 3600
        images = [i for i in images if (lib.last_verified(i) or 0) <= now - limit]
    bad = 0
    for img in images:
        t0 = time.monotonic()
        try:
            lib.verify(img, Progress.on(sys.stderr))
        except ImageIntegrityError as e:
            bad += 1
            print(f"FAIL {img.name}: {e.message}")
            continue
        secs = time.monotonic() - t0
        size = sum(f.size for f in img.files())
        print(f"ok   {img.name}: {_human(size)} in {secs:.2f} s "
              f"({size / max(secs, 1e-9) / 2**20:.0f} MiB/s)")
    if bad:
        raise ImageIntegrityError(f"{bad} image(s) failed verification and are quarantined")
    return 0


def _sync(cfg: Config, lib: Library, urls: list[str]) -> int:
    from ..core import lifecycle  # noqa: PLC0415
    from ..images import sync  # noqa: PLC0415
    if not urls:
        raise CatalogRejected("no catalog URL given and images.catalogs is empty")
    worst: Optional[VibatchError] = None
    for url in urls:
        try:
            r = sync.sync(cfg, lib, url, lambda: lifecycle.images_in_use(cfg),
                          progress=Progress.on(sys.stderr))
        except VibatchError as e:
            print(f"{url}: REJECTED: {e.message}", file=sys.stderr)
            worst = worst or e
            continue
        print(f"{url}: serial {r.serial} by {r.endorser}: {len(r.installed)} installed, "
              f"{len(r.refreshed)} unchanged, {len(r.expired)} expired, {len(r.failed)} failed "
              f"({_human(r.bytes_downloaded)} in {r.seconds:.1f} s)")
        for name in r.installed:
            print(f"  installed {name}")
        for name in r.expired:
            print(f"  expired   {name} (no longer listed; files go when no job uses them)")
        for what in r.skipped:
            print(f"  skipped   {what}")
        for name, e in r.failed:
            print(f"  FAILED    {name}: {e.message}", file=sys.stderr)
            worst = worst or e
    if worst:
        raise type(worst)(f"sync incomplete: {worst.message}")
    return 0


def _test(cfg: Config, lib: Library, args: argparse.Namespace) -> int:
    from . import imagetest  # noqa: PLC0415
    from ..core import lifecycle  # noqa: PLC0415
    img = lib.get(args.name)
    node = lifecycle.Node(cfg)
    print(f"testing {img.name} ({img.os} {img.os_version}, {img.boot} boot) as user {args.user}")

    def report(c) -> None:
        word = "WARN" if c.warning else "PASS" if c.ok else "FAIL"
        print(f"{word}  {c.name}: {c.detail}", flush=True)

    try:
        result = imagetest.run(node, img, user=args.user, cores=args.cores,
                               memory_mb=args.memory, report=report)
    finally:
        node.close()
    failed = [c.name for c in result.checks if not c.ok]
    if failed:
        raise ImageTestFailed(f"image {img.name!r} failed {len(failed)} of "
                              f"{len(result.checks)} checks: {'; '.join(failed)}")
    print(f"image {img.name}: all {len(result.checks)} checks passed")
    return 0


def _resolve(cfg: Config, lib: Library, args: argparse.Namespace) -> int:
    import pwd  # noqa: PLC0415
    from ..images.policy import resolve, user_groups  # noqa: PLC0415
    pw = pwd.getpwnam(args.user) if args.user else pwd.getpwuid(os.getuid())
    res = resolve(cfg, lib, args.requested, queue=args.queue,
                  groups=user_groups(pw.pw_name, pw.pw_gid), account=args.account)
    print(f"{res.image.name} ({res.how}; {res.image.os} {res.image.os_version}, "
          f"{res.image.digest[:23]}…)")
    return 0


def catalog_command(args: argparse.Namespace, cfg: Optional[Config]) -> int:
    act = args.catalog_command
    if act == "keygen":
        pem, public = catalog_mod.generate_key()
        try:
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CatalogRejected(f"{args.out} exists; not overwriting a key") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        print(f"private key: {args.out} (keep it off the worker nodes)")
        print(f"public key (key id {catalog_mod.key_id(public)}), for images.trusted_keys:")
        print(f"  - {public}")
        return 0
    if act == "sign":
        return _sign(args)
    if act == "show":
        from ..images import fetch  # noqa: PLC0415
        assert cfg is not None
        url = fetch.normalize(args.url)
        data = fetch.fetch_bytes(url, catalog_mod.MAX_BYTES, cfg.images.connect_timeout_s)
        cat = catalog_mod.parse(data, cfg.images.trusted_keys, url)
        print(f"catalog {url}: serial {cat.serial}, by {cat.endorser} (key {cat.key_id}), "
              f"issued {catalog_mod.iso(cat.issued_at)}, expires {catalog_mod.iso(cat.expires_at)}")
        for e in cat.entries:
            print(f"  {e.name:24} {e.os} {e.os_version} {e.arch} {e.boot} boot, "
                  f"{_human(sum(f.size for f in e.files().values()))}, sha512 {e.disk.sha512[:16]}…")
        return 0
    raise CatalogRejected(f"unknown catalog action {act}")


def _sign(args: argparse.Namespace) -> int:
    key = catalog_mod.load_private_key(args.key)
    try:
        with open(args.draft, "rb") as f:
            draft = yaml.safe_load(f)
    except OSError as e:
        raise CatalogRejected(f"{args.draft}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CatalogRejected(f"{args.draft}: not valid YAML: {e}") from None
    previous = read_json(args.out)
    prev_serial = (previous or {}).get("signed", {}).get("serial", 0) if isinstance(previous, dict) else 0
    serial = args.serial or prev_serial + 1
    if serial <= prev_serial:
        raise CatalogRejected(f"--serial {serial} is not above the serial {prev_serial} of "
                              f"{args.out}; nodes would refuse it as a rollback")
    signed = catalog_mod.build_signed(
        draft, os.path.dirname(os.path.abspath(args.draft)), serial=serial,
        valid_days=args.valid_days, now=time.time(), hash_file=sha512_file,
        inspect=lambda path, name: inspect_disk(path, 2**63, label=f"image {name!r}"))
    doc = catalog_mod.sign(signed, key)
    from ..util import atomic_write  # noqa: PLC0415
    atomic_write(args.out, catalog_mod.dumps(doc), mode=0o644)
    print(f"signed {args.out}: serial {serial}, {len(signed['images'])} image(s), expires "
          f"{signed['expires_at']}, key {doc['signatures'][0]['key_id']}")
    return 0
