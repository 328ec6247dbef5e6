"""Helpers for library, catalog and sync tests: small real images, keys, catalogs, and an HTTP
server (Range requests, proxy requests, and the misbehaviour the tamper tests need)."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

import yaml

from vibatch.images import catalog
from vibatch import config
from vibatch.images.library import sha512_file

VIBATCH = [sys.executable, "-m", "vibatch"]


def make_disk(path: str, seed: str, size: str = "4M") -> str:
    """A small qcow2 whose content (and so digest) depends on ``seed``."""
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.write((seed.encode() * 4096)[: 256 * 1024])
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path],
                   check=True)
    subprocess.run(["qemu-img", "resize", "-q", "-f", "qcow2", path, size], check=True)
    os.unlink(raw)
    return path


@dataclass
class Site:
    """A node config in a temporary directory, with an endorser's key it trusts."""

    base: str
    key_path: str
    public: str
    config_path: str = ""
    extra: dict = field(default_factory=dict)

    def write_config(self, **images) -> config.Config:
        data = {"state_dir": f"{self.base}/state", "run_dir": f"{self.base}/run",
                "library_dir": f"{self.base}/lib", "accounting_file": f"{self.base}/acct.jsonl",
                "lock_timeout_s": 5,
                "images": {"trusted_keys": [self.public], "connect_timeout_s": 5,
                           "download_timeout_s": 60, **images}}
        self.config_path = os.path.join(self.base, "vibatch.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(data, f)
        return config.load(self.config_path)

    def cli(self, *args, env: Optional[dict] = None, timeout: float = 120):
        e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        e.update(env or {})
        return subprocess.run(VIBATCH + ["--config", self.config_path, *args], env=e,
                              capture_output=True, text=True, timeout=timeout)


def new_key(directory: str, name: str = "endorser.key") -> tuple[str, str]:
    pem, public = catalog.generate_key()
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)
    return path, public


def entry_for(name: str, disk: str, url: str, **kw) -> dict:
    e = {"name": name, "os": kw.get("os", "vbtest"), "os_version": kw.get("os_version", "1"),
         "arch": kw.get("arch", os.uname().machine), "format": "qcow2", "url": url,
         "size": os.path.getsize(disk), "sha512": sha512_file(disk), "boot": "disk",
         "cmdline": ""}
    return e


def signed_doc(key_path: str, images: list[dict], serial: int = 1, now: float = None,
               valid_s: float = 86400, issued_offset: float = 0) -> dict:
    import time
    now = time.time() if now is None else now
    signed = {"format_version": 1, "serial": serial, "issued_at": catalog.iso(now + issued_offset),
              "expires_at": catalog.iso(now + valid_s), "endorser": "Test endorsers <t@example.org>",
              "images": images}
    return catalog.sign(signed, catalog.load_private_key(key_path))


def write_doc(path: str, doc: dict) -> str:
    with open(path, "wb") as f:
        f.write(catalog.dumps(doc))
    return path


class Served:
    """What the server does for one path."""

    def __init__(self, data: bytes):
        self.data = data
        self.cut_after: Optional[int] = None      # close the connection after this many bytes
        self.then: Optional[bytes] = None         # content served after the first GET
        self.gets = 0


class Server:
    """A threaded HTTP/1.1 server on 127.0.0.1 with Range support; also acts as a forward proxy
    (absolute-URI requests are answered from the same table and recorded in ``proxied``)."""

    def __init__(self):
        self.files: dict[str, Served] = {}
        self.log: list[tuple[str, Optional[str]]] = []
        self.proxied: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path
                if path.startswith("http://"):
                    outer.proxied.append(path)
                    path = "/" + path.split("/", 3)[3]
                rng = self.headers.get("Range")
                outer.log.append((path, rng))
                s = outer.files.get(path)
                if s is None:
                    self.send_error(404)
                    return
                s.gets += 1
                data = s.data if (s.gets == 1 or s.then is None) else s.then
                start = 0
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if s.cut_after is not None and s.gets == 1:
                    self.wfile.write(body[: s.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def put(self, path: str, data: bytes) -> Served:
        self.files[path] = Served(data)
        return self.files[path]

    def put_file(self, path: str, local: str) -> Served:
        with open(local, "rb") as f:
            return self.put(path, f.read())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
