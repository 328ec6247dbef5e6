#!/usr/bin/env python3
"""Benchmark of the image library: what the prologue pays, full-hash speed, sync throughput.

    /opt/vibatch/venv/bin/python bench/library.py [--size-mb 1024] [--runs 5] [--checks 2000]

Runs as root on a node set up by etc/setup-node.sh. Uses a scratch library under /var/tmp
(the node's library is only read). Prints markdown tables:

1. the prologue's image work on the node's default image: policy resolution and the cached
   identity check (``ensure_verified`` when nothing changed), median and 99th percentile;
2. full sha512 throughput of vibatch's hasher vs ``sha512sum`` on the same file (page cache warm,
   so both measure the CPU's hashing, not the disk);
3. ``vibatch image sync`` of one image of --size-mb: over http:// from a local HTTP server
   (Python's http.server in a thread of this process) and over file://, download + sha512 +
   qemu-img checks + atomic install, median of --runs.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import statistics
import subprocess
import threading
import time

from vibatch.images import catalog, sync
from vibatch import config
from vibatch.images.library import Library, sha512_file
from vibatch.images.policy import resolve

ROOT = f"/var/tmp/vibatch-bench-lib-{os.getpid()}"


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def prologue_path(checks: int) -> None:
    cfg = config.load()
    lib = Library(cfg.library_dir, cfg.state_dir)
    name = cfg.images.default or lib.names()[0]
    image = resolve(cfg, lib, None).image if cfg.images.default else lib.get(name)
    lib.ensure_verified(image)                     # make sure the cache is warm
    res, chk = [], []
    for _ in range(checks):
        t0 = time.perf_counter()
        resolve(cfg, lib, name)
        t1 = time.perf_counter()
        hashed = lib.ensure_verified(image)
        t2 = time.perf_counter()
        assert not hashed
        res.append(t1 - t0)
        chk.append(t2 - t1)
    size = sum(f.size for f in image.files())
    print(f"\n### The prologue's image work ({image.name}, {len(image.files())} files, "
          f"{size / 2**20:.0f} MiB; {checks} runs)\n")
    print("| step | median | p99 |\n|---|---|---|")
    for label, xs in (("policy resolution", res), ("cached identity check", chk)):
        print(f"| {label} | {statistics.median(xs) * 1e6:.0f} µs | {pct(xs, 99) * 1e6:.0f} µs |")


def hashing(path: str, runs: int) -> None:
    size = os.path.getsize(path)
    ours, theirs = [], []
    sha512_file(path)                               # warm the page cache
    for _ in range(runs):
        t0 = time.perf_counter()
        a = sha512_file(path)
        t1 = time.perf_counter()
        b = subprocess.run(["sha512sum", path], capture_output=True, text=True,
                           check=True).stdout.split()[0]
        t2 = time.perf_counter()
        assert a == b
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    mib = size / 2**20
    print(f"\n### Full sha512 of a {mib:.0f} MiB file (page cache warm, median of {runs})\n")
    print("| hasher | seconds | MiB/s |\n|---|---|---|")
    for label, xs in (("vibatch (hashlib, 1 MiB reads)", ours), ("sha512sum (coreutils)", theirs)):
        m = statistics.median(xs)
        print(f"| {label} | {m:.2f} | {mib / m:.0f} |")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def sync_runs(path: str, runs: int) -> None:
    pub = os.path.join(ROOT, "pub")
    os.makedirs(pub, exist_ok=True)
    os.link(path, os.path.join(pub, "disk.raw"))
    keyfile = os.path.join(ROOT, "k.pem")
    pem, public = catalog.generate_key()
    with open(keyfile, "wb") as f:
        f.write(pem)
    entry = {"name": "big", "os": "bench", "os_version": "1", "arch": os.uname().machine,
             "format": "raw", "url": "disk.raw", "size": os.path.getsize(path),
             "sha512": sha512_file(path), "boot": "disk", "cmdline": ""}
    now = time.time()
    signed = {"format_version": 1, "serial": 1, "issued_at": catalog.iso(now),
              "expires_at": catalog.iso(now + 3600), "endorser": "bench", "images": [entry]}
    with open(os.path.join(pub, "catalog.json"), "wb") as f:
        f.write(catalog.dumps(catalog.sign(signed, catalog.load_private_key(keyfile))))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_Quiet, directory=pub))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    urls = {"http://": f"http://127.0.0.1:{httpd.server_address[1]}/catalog.json",
            "file://": f"file://{pub}/catalog.json"}
    mib = entry["size"] / 2**20
    print(f"\n### `vibatch image sync` of one {mib:.0f} MiB image (download, sha512, qemu-img "
          f"checks, install; median of {runs})\n")
    print("| source | seconds | MiB/s |\n|---|---|---|")
    try:
        for label, url in urls.items():
            times = []
            for i in range(runs):
                base = os.path.join(ROOT, f"node-{label[:-3]}-{i}")
                os.makedirs(f"{base}/state")
                cfg = config.parse({"state_dir": f"{base}/state", "library_dir": f"{base}/lib",
                                    "run_dir": f"{base}/run",
                                    "images": {"trusted_keys": [public]}}, "bench")
                lib = Library(cfg.library_dir, cfg.state_dir)
                subprocess.run(["sync"], check=True)
                t0 = time.perf_counter()
                report = sync.sync(cfg, lib, url, lambda: {})
                times.append(time.perf_counter() - t0)
                assert report.installed == ["big"], report
                shutil.rmtree(base)
            m = statistics.median(times)
            print(f"| {label} (127.0.0.1) | {m:.2f} | {mib / m:.0f} |" if label == "http://"
                  else f"| {label} (same disk) | {m:.2f} | {mib / m:.0f} |")
    finally:
        httpd.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--checks", type=int, default=2000)
    args = ap.parse_args()
    os.makedirs(ROOT)
    try:
        prologue_path(args.checks)
        path = os.path.join(ROOT, "data.raw")
        with open(path, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        hashing(path, args.runs)
        sync_runs(path, args.runs)
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
