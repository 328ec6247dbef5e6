"""``vibatch template build|list|remove|sync``: the node's warm-start templates (vm/template.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from ..config import Config
from ..core import lifecycle
from ..core.request import parse_memory_mb
from ..errors import UsageError
from ..images.library import Image
from ..util import require_root
from ..vm import template


def add_parsers(sub) -> None:
    p = sub.add_parser("template", help="warm-start templates: saved boots of an image (root)")
    tsub = p.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    b = tsub.add_parser("build", help="boot an image once and save it as a template")
    b.add_argument("image", help="image name or alias")
    b.add_argument("--cores", type=int, required=True, help="vCPUs of the jobs it serves")
    b.add_argument("--memory", required=True, help="guest memory of the jobs it serves "
                   "(e.g. 2048, 2G)")
    b.add_argument("--if-missing", action="store_true",
                   help="do nothing (exit 0) if it exists or is being built (for background use)")
    lp = tsub.add_parser("list", help="the node's templates, and whether each can be used")
    lp.add_argument("--json", action="store_true")
    r = tsub.add_parser("remove", help="delete templates")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("id", nargs="?", help="a template id (from template list)")
    g.add_argument("--unusable", action="store_true", help="every template that can no longer "
                   "be used (image, QEMU, libvirt or config changed)")
    g.add_argument("--all", action="store_true")
    tsub.add_parser("sync", help="build the shapes templates.shapes lists for every image, and "
                    "remove unusable templates (for cron and after image changes)")


def command(args: argparse.Namespace, cfg: Config) -> int:
    act = args.template_command
    require_root(f"template {act}")
    node = lifecycle.Node(cfg)
    try:
        if act == "build":
            memory = parse_memory_mb(args.memory, "--memory")
            image = lifecycle.resolve_image_name(node, args.image)
            return _build(node, image, args.cores, memory, args.if_missing)
        if act == "list":
            rows = _rows(node)
            if args.json:
                print(json.dumps(rows, indent=1))
                return 0
            print(f"{'ID':16} {'IMAGE':24} {'CORES':>5} {'MEMORY':>7} {'ACCEL':5} {'SIZE':>7} "
                  f"{'BUILT':>7} STATE")
            for r in rows:
                print(f"{r['id']:16} {r['image'] or '?':24} {r['cores'] or '?':>5} "
                      f"{r['memory_mb'] or '?':>7} {r['accel'] or '?':5} "
                      f"{(r['save_bytes'] or 0) / 1e6:>6.0f}M {r['build_s'] or 0:>6.1f}s "
                      f"{r['state']}")
            return 0
        if act == "remove":
            if args.id:
                if not template.remove(cfg, args.id):
                    raise UsageError(f"no template {args.id!r} (see vibatch template list)")
                print(f"removed template {args.id}")
                return 0
            for r in _rows(node):
                if args.all or r["state"] != "ready":
                    template.remove(cfg, r["id"])
                    print(f"removed template {r['id']} ({r['state']})")
            return 0
        if act == "sync":
            return _sync(node)
    finally:
        node.close()
    raise UsageError(f"unknown template action {act}")


def _build(node: lifecycle.Node, image: Image, cores: int, memory_mb: int,
           if_missing: bool) -> int:
    t0 = time.monotonic()
    try:
        t = lifecycle.build_template(node, image, cores, memory_mb,
                                     log=lambda m: print(f"template: {m}", file=sys.stderr))
    except template.TemplateError as e:
        if if_missing and "being built" in e.message:
            return 0
        raise
    print(f"template {t.id}: {image.name}, {cores} cores, {memory_mb} MiB, "
          f"{t.meta['save_bytes'] / 1e6:.0f} MB saved state, ready "
          f"({time.monotonic() - t0:.1f} s)")
    return 0


def _rows(node: lifecycle.Node) -> list[dict]:
    images = {i.digest: i for i in node.library.images()}
    return [_row(node, t, images) for t in template.all_templates(node.cfg)]


def _row(node: lifecycle.Node, t: template.Template, images: dict[str, Image]) -> dict:
    key = t.meta.get("key") or {}
    current = None
    image = images.get(key.get("image_digest"))
    if image is not None and key.get("cores") and key.get("memory_mb"):
        try:
            current = template.key_for(node.cfg, node.conn, lifecycle.template_spec(
                node, image, key["cores"], key["memory_mb"], key.get("accel", "")), image.digest)
        except Exception:  # noqa: BLE001 - list what is there even without libvirt
            pass
    why = why_not(node, t, current, images)
    return {"id": t.id, "image": t.meta.get("image"), "cores": key.get("cores"),
            "memory_mb": key.get("memory_mb"), "accel": key.get("accel"),
            "save_bytes": t.meta.get("save_bytes"), "build_s": t.meta.get("build_s"),
            "built_at": t.meta.get("built_at"), "state": why or "ready",
            "key": key, "current_key": asdict(current) if current else None}


def why_not(node: lifecycle.Node, t: template.Template, current,
            images: dict[str, Image]) -> str | None:
    if not t.meta:
        return "being built" if template.building(node.cfg, t.id) else "unreadable"
    if (t.meta.get("key") or {}).get("image_digest") not in images:
        return "outdated: its image is no longer in the library"
    return template.why_unusable(t, current)


def _sync(node: lifecycle.Node) -> int:
    cfg = node.cfg
    failed = 0
    for row in _rows(node):
        if row["state"] not in ("ready", "being built"):
            template.remove(cfg, row["id"])
            print(f"removed template {row['id']} ({row['state']})")
    names = {}
    for img in node.library.images():
        names.setdefault(img.name, img)
    for shape in cfg.templates.shapes:
        wanted = {cfg.images.aliases.get(n, n) for n in shape.images} if shape.images else set(names)
        for name in sorted(wanted):
            image = names.get(name)
            if image is None:
                print(f"template: no image {name} in the library (templates.shapes)",
                      file=sys.stderr)
                failed += 1
                continue
            try:
                _build(node, image, shape.cores, shape.memory_mb, if_missing=True)
            except template.TemplateError as e:
                print(f"template: {name} {shape.cores}c/{shape.memory_mb}M: {e.message}",
                      file=sys.stderr)
                failed += 1
    return template.TemplateError.exit_code if failed else 0
