#!/usr/bin/env python3
"""Warm start against cold boot, side by side in one run (issue 10).

    /opt/vibatch/venv/bin/python bench/warmstart.py [--image testguest] [--runs 10] [--jobs 20]
        [--memory 512] [--user nobody] [--half cold|warm|both] [--results FILE] [--add BUILD]

Root, on a node set up by etc/setup-node.sh, with its own state and run directories (the
node's jobs, slots and templates are not touched; the node's image library is used, or with
``--add BUILD`` a library of its own holding the image images/debian/build.sh made in BUILD). For each
start (cold: `--cold`, no template; warm: a template of the image built first, its build time
and size measured):

- one job not counted (a warm-up), then ``--runs`` jobs, each: the prologue in this process (its phases; claim to ready), then
  `vibatch exec --job J -- true` as the job user (a new process, as a job starter runs it), then
  the epilogue in this process;
- ``--runs`` whole `vibatch run --user U -- true` (a new process: interpreter, prologue, exec,
  epilogue);
- throughput: ``--jobs`` `vibatch run -- true` of one core each, as many at once as the node
  has CPUs, wall time from the first start to the last end.

``--half`` runs one start only and merges its figures into ``--results`` (JSON), so a long run
can release a shared lock between the halves; the tables are printed from whatever the file
holds. It also records who reaps libvirtd's orphans (QEMU): its parent process.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import pwd
import shutil
import statistics
import subprocess
import sys
import time

import yaml

from vibatch import config
from vibatch.core import lifecycle
from vibatch.core.request import make_request
from vibatch.vm import accel

ROOT = f"/var/tmp/vibatch-bench-warm-{os.getpid()}"
PHASES = ("claim", "shares", "image_check", "clone", "domain_start", "boot", "restore", "agent",
          "hotplug", "guest_setup")


def bench_config(image: str, library_dir: str, acceleration: str) -> str:
    data = {"state_dir": f"{ROOT}/state", "run_dir": f"/run/vb-bench-warm-{os.getpid()}",
            "library_dir": library_dir, "accounting_file": f"{ROOT}/acct.jsonl",
            "images": {"default": image}, "host": {"reserved_memory_mb": 1024},
            "templates": {"enabled": True, "on_first_use": False},
            "vm": {"acceleration": acceleration, "boot_timeout_s": 240}}
    path = os.path.join(ROOT, "bench.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    os.chmod(path, 0o644)
    return path


def vibatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "vibatch", *args]


def jobs(cfg_path: str, start: str, runs: int, user: str, memory: int, workdir: str) -> dict:
    """Prologue (phases), `vibatch exec true` as the user, epilogue: ``runs`` times."""
    cfg = config.load(cfg_path)
    node = lifecycle.Node(cfg)
    pw = pwd.getpwnam(user)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "VIBATCH_CONFIG": cfg_path}
    out: dict[str, list[float]] = {}
    try:
        for i in range(runs):
            job = f"bw-{os.getpid()}-{start}-{i}"
            t0 = time.perf_counter()
            state = lifecycle.prologue(node, make_request(job, user, 1, memory, cfg.images.default,
                                                          workdir), cold=start == "cold")
            out.setdefault("claim_to_ready", []).append(time.perf_counter() - t0)
            if state.start != start:
                raise SystemExit(f"job {job} started {state.start}, not {start}")
            for k, v in state.phases.items():
                out.setdefault(k, []).append(v)
            t1 = time.perf_counter()
            subprocess.run(vibatch("exec", "--job", job, "--", "true"), env=env, cwd=workdir,
                           check=True, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                           timeout=60)
            out.setdefault("exec_true", []).append(time.perf_counter() - t1)
            t2 = time.perf_counter()
            lifecycle.epilogue(node, job, 0)
            out.setdefault("epilogue", []).append(time.perf_counter() - t2)
    finally:
        node.close()
    return out


def run_true(cfg_path: str, start: str, user: str, memory: int, workdir: str) -> float:
    argv = vibatch("--config", cfg_path, "run", "--user", user, "--memory", f"{memory}M",
                   "--workdir", workdir, *(["--cold"] if start == "cold" else []), "--", "true")
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=workdir, timeout=300, stdout=subprocess.DEVNULL,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return time.perf_counter() - t0


def throughput(cfg_path: str, start: str, n: int, user: str, memory: int, workdir: str) -> float:
    width = len(lifecycle.Node(config.load(cfg_path)).slots.capacity.cpus)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(width) as pool:
        for f in [pool.submit(run_true, cfg_path, start, user, memory, workdir)
                  for _ in range(n)]:
            f.result()
    return time.perf_counter() - t0


def build_template(cfg_path: str, image: str, memory: int) -> dict:
    cfg = config.load(cfg_path)
    node = lifecycle.Node(cfg)
    try:
        img = lifecycle.resolve_image_name(node, image)
        t0 = time.perf_counter()
        t = lifecycle.build_template(node, img, 1, memory)
        wall = time.perf_counter() - t0
    finally:
        node.close()
    on_disk = sum(os.lstat(os.path.join(t.dir, n)).st_blocks * 512 for n in os.listdir(t.dir))
    return {"id": t.id, "build_s": wall, "boot_s": t.meta["boot_s"],
            "save_bytes": t.meta["save_bytes"], "overlay_bytes": t.meta["overlay_bytes"],
            "on_disk_bytes": on_disk}


def add_image(build: str, name: str, library_dir: str, state_dir: str) -> None:
    """An image built by images/debian/build.sh --layout kernel (OUT: disk.qcow2, vmlinux,
    initrd.img, cmdline, os-release) into the benchmark's own library."""
    from vibatch.images.library import Library  # noqa: PLC0415 - only a Debian run needs it
    with open(os.path.join(build, "os-release")) as f:
        rel = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    with open(os.path.join(build, "cmdline")) as f:
        cmdline = f.read().strip()
    os.makedirs(state_dir, exist_ok=True)
    Library(library_dir, state_dir).add(
        os.path.join(build, "disk.qcow2"), name=name, os_name=rel["ID"].strip('"'),
        os_version=rel.get("VERSION_ID", "").strip('"'), kernel=os.path.join(build, "vmlinux"),
        initrd=os.path.join(build, "initrd.img"), cmdline=cmdline)


def prime(cfg: config.Config, image: str) -> None:
    """The KVM probe a new state directory makes once (10 s under TCG here), before any timing."""
    node = lifecycle.Node(cfg)
    try:
        img = lifecycle.resolve_image_name(node, image)
        accel.choose(cfg.vm.acceleration, cfg.state_dir, cfg.vm.emulator,
                     lambda: lifecycle._probe_files(node, img))
    finally:
        node.close()


def reaper() -> str:
    """libvirtd's parent: who reaps what it daemonizes (QEMU) unless a subreaper is between."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "libvirtd":
                    continue
            with open(f"/proc/{pid}/status") as f:
                ppid = next(line.split()[1] for line in f if line.startswith("PPid:"))
            with open(f"/proc/{ppid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode().strip()
            return f"libvirtd {pid}, parent {ppid} ({cmd[:80]})"
        except (OSError, StopIteration):
            continue
    return "no libvirtd found"


def half(args, start: str) -> dict:
    os.makedirs(ROOT, mode=0o755)
    workdir = os.path.join(ROOT, "work")
    os.mkdir(workdir)
    shutil.chown(workdir, args.user)
    library_dir = config.load().library_dir
    if args.add:
        library_dir = os.path.join(ROOT, "images")
        add_image(args.add, args.image, library_dir, os.path.join(ROOT, "state"))
    cfg_path = bench_config(args.image, library_dir, args.accel)
    cfg = config.load(cfg_path)
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reaper": reaper()}
    try:
        prime(cfg, args.image)
        if start == "warm":
            res["template"] = build_template(cfg_path, args.image, args.memory)
        jobs(cfg_path, start, 1, args.user, args.memory, workdir)     # a warm-up, not counted
        res["jobs"] = jobs(cfg_path, start, args.runs, args.user, args.memory, workdir)
        res["run_true"] = [run_true(cfg_path, start, args.user, args.memory, workdir)
                           for _ in range(args.runs)]
        if args.jobs:
            res["throughput"] = {"jobs": args.jobs, "seconds": throughput(
                cfg_path, start, args.jobs, args.user, args.memory, workdir)}
        with open(cfg.accounting_file) as f:
            got = {json.loads(line)["start"] for line in f}
        if got != {start}:
            raise SystemExit(f"the {start} half's jobs started {sorted(got)}")
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return res


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def cell(xs) -> str:
    return f"{med(xs):.3f} ({min(xs):.2f}–{max(xs):.2f})" if xs else "-"


def report(results: dict) -> None:
    cold, warm = results.get("cold", {}), results.get("warm", {})
    cj, wj = cold.get("jobs", {}), warm.get("jobs", {})
    meta = results["meta"]
    print(f"image {meta['image']}, 1 core, {meta['memory']} MiB, median of {meta['runs']} "
          f"(min–max), seconds; {meta['machine']}")
    for s, r in (("cold", cold), ("warm", warm)):
        if r:
            print(f"{s}: {r['when']}; {r['reaper']}")
    print("\n| phase | cold | warm |\n|---|---|---|")
    for k in PHASES:
        if k in cj or k in wj:
            print(f"| {k} | {cell(cj.get(k, []))} | {cell(wj.get(k, []))} |")
    rows = (("**claim to ready**", "claim_to_ready"), ("`vibatch exec true`", "exec_true"),
            ("epilogue", "epilogue"))
    for label, k in rows:
        print(f"| {label} | {cell(cj.get(k, []))} | {cell(wj.get(k, []))} |")
    print(f"| whole `vibatch run -- true` | {cell(cold.get('run_true', []))} | "
          f"{cell(warm.get('run_true', []))} |")
    if cj and wj:
        print()
        for label, c, w in (("claim to ready", cj["claim_to_ready"], wj["claim_to_ready"]),
                            ("whole vibatch run -- true", cold["run_true"], warm["run_true"])):
            print(f"cold/warm, {label}: {med(c) / med(w):.1f}x")
    if "throughput" in cold and "throughput" in warm:
        c, w = cold["throughput"], warm["throughput"]
        print(f"throughput, {c['jobs']} jobs of true, one core each: cold {c['seconds']:.1f} s, "
              f"warm {w['seconds']:.1f} s: {c['seconds'] / w['seconds']:.1f}x")
    if "template" in warm:
        t = warm["template"]
        print(f"template: built in {t['build_s']:.1f} s (boot {t['boot_s']:.1f} s), state "
              f"{t['save_bytes'] / 2**20:.0f} MiB, overlay {t['overlay_bytes'] / 2**20:.1f} MiB, "
              f"{t['on_disk_bytes'] / 2**20:.0f} MiB on disk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="testguest")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=20, help="throughput jobs (0: skip)")
    ap.add_argument("--memory", type=int, default=512, help="MiB")
    ap.add_argument("--user", default="nobody")
    ap.add_argument("--half", choices=("cold", "warm", "both"), default="both")
    ap.add_argument("--results", help="JSON file the figures are merged into")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="vm.acceleration (the Debian tests use tcg: docs/testing.md)")
    ap.add_argument("--add", metavar="BUILD", help="add the image --image from this output "
                    "directory of images/debian/build.sh (kernel layout) into the benchmark's "
                    "own library, instead of using the node's")
    args = ap.parse_args()
    results: dict = {}
    if args.results and os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    results["meta"] = {"image": args.image, "memory": args.memory, "runs": args.runs,
                       "accel": args.accel,
                       "machine": f"{platform.node()}, {os.cpu_count()} CPUs, "
                                  f"{platform.release()}"}
    for start in (("cold", "warm") if args.half == "both" else (args.half,)):
        results[start] = half(args, start)
        if args.results:
            with open(args.results, "w") as f:
                json.dump(results, f, indent=1)
    report(results)


if __name__ == "__main__":
    main()
