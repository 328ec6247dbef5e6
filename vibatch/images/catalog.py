"""Endorsed image catalogs: a signed list of images, in the spirit of HEPiX image endorsement.

A catalog is one JSON document::

    {"signed": {"format_version": 1, "serial": 42,
                "issued_at": "2026-11-21T10:00:00Z", "expires_at": "2026-12-21T10:00:00Z",
                "endorser": "Example site endorsers <images@example.org>",
                "images": [{"name": "alma9-2026.11", "os": "alma", "os_version": "9.5",
                            "arch": "x86_64", "format": "qcow2",
                            "url": "alma9-2026.11/disk.qcow2", "size": 123, "sha512": "…",
                            "boot": "kernel", "cmdline": "console=ttyS0 root=/dev/vda",
                            "kernel": {"url": "…", "size": 1, "sha512": "…"},
                            "initrd": {"url": "…", "size": 1, "sha512": "…"}}]},
     "signatures": [{"key_id": "…", "signature": "<base64 Ed25519 signature>"}]}

The signature covers the canonical bytes of ``signed`` (JSON, sorted keys, no spaces, ASCII; the
format has no floating-point numbers, so the bytes are unambiguous). URLs may be relative to the
catalog's own URL, so a catalog and its images can be mirrored together. Ed25519 comes from
``cryptography``; nothing cryptographic is written here.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import CatalogRejected
from .library import check_name
from ..names import valid_sha512

FORMAT_VERSION = 1
MAX_BYTES = 16 * 1024 * 1024
CLOCK_SKEW_S = 300
_ENTRY_KEYS = {"name", "os", "os_version", "arch", "format", "url", "size", "sha512", "boot",
               "cmdline", "kernel", "initrd"}
_FILE_KEYS = {"url", "size", "sha512"}


@dataclass(frozen=True)
class FileRef:
    url: str
    size: int
    sha512: str


@dataclass(frozen=True)
class Entry:
    name: str
    os: str
    os_version: str
    arch: str
    format: str
    disk: FileRef
    boot: str
    cmdline: str
    kernel: Optional[FileRef]
    initrd: Optional[FileRef]

    def files(self) -> dict[str, FileRef]:
        return {k: v for k, v in (("disk", self.disk), ("kernel", self.kernel),
                                  ("initrd", self.initrd)) if v is not None}


@dataclass(frozen=True)
class Catalog:
    serial: int
    issued_at: float
    expires_at: float
    endorser: str
    key_id: str
    entries: tuple[Entry, ...]
    digest: str        # sha256 of the canonical signed bytes: same serial must mean same content


# -- keys ------------------------------------------------------------------------------------
def public_key_string(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + base64.b64encode(raw).decode()


def key_id(public: str) -> str:
    """A short fingerprint of a public key string: the first 16 hex digits of its sha256."""
    return hashlib.sha256(base64.b64decode(public[len("ed25519:"):])).hexdigest()[:16]


def generate_key() -> tuple[bytes, str]:
    """A new private key (PKCS#8 PEM) and its public key string for the nodes' config."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public_key_string(key.public_key())


def load_private_key(path: str) -> Ed25519PrivateKey:
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CatalogRejected(f"{path}: cannot read the signing key: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise CatalogRejected(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CatalogRejected(f"{path}: not an Ed25519 key")
    return key


def _public(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len("ed25519:"):]))


# -- canonical form and signing ----------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign(signed: dict, key: Ed25519PrivateKey) -> dict:
    validate(signed, "the catalog being signed")
    public = public_key_string(key.public_key())
    sig = key.sign(canonical(signed))
    return {"signed": signed,
            "signatures": [{"key_id": key_id(public), "signature": base64.b64encode(sig).decode()}]}


def dumps(document: dict) -> bytes:
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


# -- reading -----------------------------------------------------------------------------------
def parse(data: bytes, trusted_keys: Sequence[str], source: str,
          now: Optional[float] = None) -> Catalog:
    """Verify a catalog's signature with a trusted key, then its format and validity period."""
    if not trusted_keys:
        raise CatalogRejected(f"{source}: no trusted keys configured (images.trusted_keys); "
                              "refusing to trust any catalog")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CatalogRejected(f"{source}: not a catalog (not valid JSON: {e})") from None
    if not isinstance(doc, dict) or set(doc) != {"signed", "signatures"} or \
            not isinstance(doc["signed"], dict) or not isinstance(doc["signatures"], list):
        raise CatalogRejected(f"{source}: not a catalog (expected the keys 'signed' and "
                              "'signatures')")
    trusted = {key_id(k): k for k in trusted_keys}
    body = canonical(doc["signed"])
    seen = []
    kid = None
    for s in doc["signatures"]:
        if not isinstance(s, dict) or not isinstance(s.get("key_id"), str) or \
                not isinstance(s.get("signature"), str):
            raise CatalogRejected(f"{source}: malformed signature entry")
        seen.append(s["key_id"])
        if s["key_id"] not in trusted:
            continue
        try:
            _public(trusted[s["key_id"]]).verify(base64.b64decode(s["signature"], validate=True), body)
        except (InvalidSignature, binascii.Error, ValueError):
            raise CatalogRejected(f"{source}: the signature by key {s['key_id']} does not match "
                                  "the catalog's content: it was modified after signing, or is "
                                  "corrupt") from None
        kid = s["key_id"]
        break
    if kid is None:
        raise CatalogRejected(f"{source}: signed by unknown key(s) {', '.join(seen) or '(none)'}; "
                              f"this node trusts {', '.join(sorted(trusted))} "
                              "(images.trusted_keys)")
    signed = doc["signed"]
    validate(signed, source)
    now = time.time() if now is None else now
    issued, expires = _time(signed["issued_at"], source, "issued_at"), \
        _time(signed["expires_at"], source, "expires_at")
    if expires <= now:
        raise CatalogRejected(f"{source}: the catalog expired at {signed['expires_at']} "
                              f"(serial {signed['serial']}); the endorser must sign a new one")
    if issued > now + CLOCK_SKEW_S:
        raise CatalogRejected(f"{source}: the catalog is issued in the future "
                              f"({signed['issued_at']}); check this node's clock")
    entries = tuple(_entry(e) for e in signed["images"])
    return Catalog(serial=signed["serial"], issued_at=issued, expires_at=expires,
                   endorser=signed["endorser"], key_id=kid, entries=entries,
                   digest=hashlib.sha256(body).hexdigest())


def _time(text: Any, source: str, key: str) -> float:
    try:
        if not isinstance(text, str) or not text.endswith("Z"):
            raise ValueError
        return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()
    except ValueError:
        raise CatalogRejected(f"{source}: {key}: {text!r} is not a UTC time like "
                              "2026-11-21T10:00:00Z") from None


def _line(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and not any(ord(c) < 32 for c in v)


def _file_ref(v: Any, where: str, source: str) -> None:
    if not isinstance(v, dict) or set(v) != _FILE_KEYS:
        raise CatalogRejected(f"{source}: {where}: needs exactly url, size and sha512")
    if not _line(v["url"]):
        raise CatalogRejected(f"{source}: {where}.url: must be a URL")
    if not isinstance(v["size"], int) or isinstance(v["size"], bool) or v["size"] < 0:
        raise CatalogRejected(f"{source}: {where}.size: must be a whole number of bytes")
    if not valid_sha512(v["sha512"]):
        raise CatalogRejected(f"{source}: {where}.sha512: must be 128 lowercase hex digits")


def validate(signed: Any, source: str) -> None:
    """Strict structural checks; every problem names the field at fault."""
    if not isinstance(signed, dict):
        raise CatalogRejected(f"{source}: 'signed' must be a mapping")
    need = {"format_version", "serial", "issued_at", "expires_at", "endorser", "images"}
    if set(signed) != need:
        extra, missing = set(signed) - need, need - set(signed)
        raise CatalogRejected(f"{source}: catalog keys: unknown {sorted(extra)}, missing "
                              f"{sorted(missing)}")
    if signed["format_version"] != FORMAT_VERSION:
        raise CatalogRejected(f"{source}: format_version {signed['format_version']!r}: this "
                              f"vibatch reads format {FORMAT_VERSION}")
    if not isinstance(signed["serial"], int) or isinstance(signed["serial"], bool) or \
            signed["serial"] < 1:
        raise CatalogRejected(f"{source}: serial: must be a whole number >= 1")
    for key in ("issued_at", "expires_at"):
        _time(signed[key], source, key)
    if not _line(signed["endorser"]):
        raise CatalogRejected(f"{source}: endorser: must name who endorses these images")
    if not isinstance(signed["images"], list):
        raise CatalogRejected(f"{source}: images: must be a list")
    names = set()
    for i, e in enumerate(signed["images"]):
        where = f"images[{i}]"
        if not isinstance(e, dict):
            raise CatalogRejected(f"{source}: {where}: must be a mapping")
        if not set(e) <= _ENTRY_KEYS or not {"name", "os", "os_version", "arch", "format", "url",
                                               "size", "sha512", "boot"} <= set(e):
            raise CatalogRejected(f"{source}: {where}: keys must be {sorted(_ENTRY_KEYS)} "
                                  f"(got {sorted(e)})")
        try:
            check_name(e["name"])
        except Exception:  # noqa: BLE001 - any value the catalog's JSON holds (not even a str)
            raise CatalogRejected(f"{source}: {where}.name: {e['name']!r} is not a valid image "
                                  "name") from None
        if e["name"] in names:
            raise CatalogRejected(f"{source}: {where}.name: {e['name']!r} is listed twice")
        names.add(e["name"])
        for key in ("os", "os_version", "arch"):
            if not _line(e[key]):
                raise CatalogRejected(f"{source}: {where}.{key}: must be a non-empty line of text")
        if e["format"] not in ("qcow2", "raw"):
            raise CatalogRejected(f"{source}: {where}.format: must be qcow2 or raw")
        _file_ref({k: e[k] for k in _FILE_KEYS}, where, source)
        if e["boot"] == "kernel":
            _file_ref(e.get("kernel"), f"{where}.kernel", source)
            if e.get("initrd") is not None:
                _file_ref(e["initrd"], f"{where}.initrd", source)
        elif e["boot"] == "disk":
            if e.get("kernel") or e.get("initrd"):
                raise CatalogRejected(f"{source}: {where}: a disk-boot image has no kernel/initrd")
        else:
            raise CatalogRejected(f"{source}: {where}.boot: must be kernel or disk")
        if not isinstance(e.get("cmdline", ""), str):
            raise CatalogRejected(f"{source}: {where}.cmdline: must be text")


def _entry(e: dict) -> Entry:
    def ref(v: Optional[dict]) -> Optional[FileRef]:
        return FileRef(v["url"], v["size"], v["sha512"]) if v else None

    return Entry(name=e["name"], os=e["os"], os_version=e["os_version"], arch=e["arch"],
                 format=e["format"], disk=FileRef(e["url"], e["size"], e["sha512"]),
                 boot=e["boot"], cmdline=e.get("cmdline", ""), kernel=ref(e.get("kernel")),
                 initrd=ref(e.get("initrd")))


# -- drafting (the endorser's side) ------------------------------------------------------------
def _draft_ref(v: Any, where: str, draft_dir: str, hash_file) -> dict:
    if not isinstance(v, dict) or set(v) != {"file", "url"}:
        raise CatalogRejected(f"{where}: needs file (local path) and url (where nodes fetch it, "
                              "may be relative to the catalog)")
    path = v["file"] if os.path.isabs(v["file"]) else os.path.join(draft_dir, v["file"])
    if not os.path.isfile(path):
        raise CatalogRejected(f"{where}.file: {path}: no such file")
    return {"url": v["url"], "size": os.path.getsize(path), "sha512": hash_file(path),
            "_path": path}


def build_signed(draft: dict, draft_dir: str, *, serial: int, valid_days: float, now: float,
                 hash_file, inspect) -> dict:
    """Turn an endorser's draft (local files + the URLs nodes fetch them from) into ``signed``."""
    if not isinstance(draft, dict) or set(draft) - {"endorser", "images"}:
        raise CatalogRejected("draft: top-level keys are endorser and images")
    images = []
    for i, d in enumerate(draft.get("images") or []):
        where = f"draft images[{i}]"
        if not isinstance(d, dict):
            raise CatalogRejected(f"{where}: must be a mapping")
        allowed = {"name", "os", "os_version", "arch", "disk", "kernel", "initrd", "cmdline", "boot"}
        if set(d) - allowed:
            raise CatalogRejected(f"{where}: unknown keys {sorted(set(d) - allowed)}")

        disk = _draft_ref(d.get("disk"), f"{where}.disk", draft_dir, hash_file)
        fmt = inspect(disk.pop("_path"), d.get("name", where))["format"]
        boot = d.get("boot", "kernel" if d.get("kernel") else "disk")
        entry = {"name": d.get("name"), "os": d.get("os"), "os_version": str(d.get("os_version", "")),
                 "arch": d.get("arch", "x86_64"), "format": fmt, **disk, "boot": boot,
                 "cmdline": d.get("cmdline", "")}
        for what in ("kernel", "initrd"):
            if d.get(what):
                r = _draft_ref(d[what], f"{where}.{what}", draft_dir, hash_file)
                r.pop("_path")
                entry[what] = r
        images.append(entry)
    signed = {"format_version": FORMAT_VERSION, "serial": serial, "issued_at": iso(now),
              "expires_at": iso(now + valid_days * 86400), "endorser": draft.get("endorser"),
              "images": images}
    validate(signed, "draft")
    return signed
