#!/usr/bin/env python3
"""Benchmark of a job's path, vibatch vs the bare libvirt path, and clone vs full copy.

    /opt/vibatch/venv/bin/python bench/lifecycle.py [--runs 10] [--user nobody] [--skip-copy]

Runs as root on a node set up by etc/setup-node.sh, with its own state/run directories (the
node's own jobs and slots are not touched). Prints markdown tables (medians over --runs).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

from vibatch.vm import accel, hypervisor
from vibatch import config
from vibatch.images import qemuimg
from vibatch.vm.agent import LibvirtAgent
from vibatch.vm.domain import render
from vibatch.core.jobdir import JobPaths
from vibatch.core.lifecycle import Node, domain_spec, epilogue, prologue, qemu_ids
from vibatch.core.request import make_request
from vibatch.core.slots import Slot
from vibatch.util import Deadline

ROOT = f"/var/tmp/vibatch-bench-{os.getpid()}"


def bench_config() -> config.Config:
    node_cfg = config.load()
    data = {"state_dir": f"{ROOT}/state", "run_dir": f"/run/vb-bench-{os.getpid()}",
            "library_dir": node_cfg.library_dir, "accounting_file": f"{ROOT}/acct.jsonl",
            "images": {"default": node_cfg.images.default or "testguest"},
            "host": {"reserved_memory_mb": 1024}}
    return config.parse(data, "bench")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def vibatch_runs(cfg, runs: int, user: str, workdir: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    node = Node(cfg)
    env = {**os.environ, "VIBATCH_CONFIG": cfg_path(cfg)}
    for i in range(runs):
        job = f"bench-{os.getpid()}-{i}"
        t0 = time.perf_counter()
        state = prologue(node, make_request(job, user, 1, 512, cfg.images.default, workdir))
        total = time.perf_counter() - t0
        for k, v in state.phases.items():
            out.setdefault(k, []).append(v)
        out.setdefault("prologue_total", []).append(total)
        # vibatch exec true, a fresh process as the job user (what a job starter does)
        pw = pwd.getpwnam(user)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vibatch", "exec", "--job", job, "--", "true"],
                       env=env, cwd=workdir, check=True, user=pw.pw_uid, group=pw.pw_gid,
                       extra_groups=[])
        out.setdefault("exec_true", []).append(time.perf_counter() - t1)
        # bare guest-exec true through the root agent, same VM
        dom = node.conn.lookupByName("vibatch-" + job)
        t2 = time.perf_counter()
        LibvirtAgent(dom).run("/bin/true", [], Deadline(30))
        out.setdefault("bare_guest_exec_true", []).append(time.perf_counter() - t2)
        t3 = time.perf_counter()
        epilogue(node, job, 0)
        out.setdefault("epilogue", []).append(time.perf_counter() - t3)
    node.close()
    return out


def cfg_path(cfg) -> str:
    path = os.path.join(ROOT, "bench.yaml")
    if not os.path.exists(path):
        with open(path, "w") as f:
            yaml.safe_dump({"state_dir": cfg.state_dir, "run_dir": cfg.run_dir,
                            "library_dir": cfg.library_dir, "accounting_file": cfg.accounting_file,
                            "images": {"default": cfg.images.default}}, f)
        os.chmod(path, 0o644)
    return path


def bare_runs(cfg, runs: int, workdir: str) -> dict[str, list[float]]:
    """The same overlay + createXML + agent ping, directly with libvirt-python."""
    node = Node(cfg)
    image = node.library.get(cfg.images.default)
    conn = hypervisor.connect(cfg.libvirt_uri)
    out: dict[str, list[float]] = {}
    req = make_request("bare", "nobody", 1, 512, image.name, workdir)
    owner = qemu_ids(cfg)
    kind = accel.choose(cfg.vm.acceleration, cfg.state_dir, cfg.vm.emulator,
                        lambda: (image.kernel.path if image.kernel else None,
                                 image.initrd.path if image.initrd else None))
    for i in range(runs):
        d = tempfile.mkdtemp(prefix="bare-", dir=ROOT)
        os.chmod(d, 0o711)
        os.mkdir(os.path.join(d, "io"))
        paths = JobPaths(f"bare{i}", d, d)
        # no shares: the bare path is QEMU and the guest alone (no share specs, no virtiofsd)
        xml = render(dataclasses.replace(
            domain_spec(cfg, req, paths, image, Slot("bare", (0,), 512), kind), shares=()))
        xml = xml.replace(f"<name>vibatch-bare{i}</name>", f"<name>vbbare-{os.getpid()}-{i}</name>")
        t0 = time.perf_counter()
        qemuimg.create_overlay(image.disk.path, image.disk_format, paths.overlay)
        os.chown(paths.overlay, *owner)
        t1 = time.perf_counter()
        dom = conn.createXML(xml, 0)
        t2 = time.perf_counter()
        agent = LibvirtAgent(dom)
        while True:
            try:
                agent.ping(1.0)
                break
            except Exception:  # noqa: BLE001 - not up yet, whatever the reason
                time.sleep(0.1)
        t3 = time.perf_counter()
        out.setdefault("clone", []).append(t1 - t0)
        out.setdefault("domain_start", []).append(t2 - t1)
        out.setdefault("boot", []).append(t3 - t2)
        out.setdefault("total", []).append(t3 - t0)
        dom.destroy()
        shutil.rmtree(d)
    conn.close()
    node.close()
    return out


def clone_vs_copy(skip_copy: bool) -> list[tuple]:
    rows = []
    for gib in (2, 20):
        d = tempfile.mkdtemp(prefix=f"copy{gib}-", dir=ROOT)
        base = os.path.join(d, "base.raw")
        # a base whose every block is allocated (fallocate), so a full copy really copies gib GiB
        subprocess.run(["fallocate", "-l", f"{gib}G", base], check=True)
        clones = []
        for i in range(10):
            t = time.perf_counter()
            qemuimg.create_overlay(base, "raw", os.path.join(d, f"ov{i}.qcow2"))
            clones.append(time.perf_counter() - t)
        copy_s = None
        if not skip_copy:
            t = time.perf_counter()
            subprocess.run(["cp", "--sparse=never", base, os.path.join(d, "copy.raw")], check=True)
            subprocess.run(["sync", os.path.join(d, "copy.raw")], check=True)
            copy_s = time.perf_counter() - t
        rows.append((gib, median(clones), max(clones), copy_s))
        shutil.rmtree(d)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--user", default="nobody")
    ap.add_argument("--skip-copy", action="store_true", help="skip the full copies (slow)")
    args = ap.parse_args()
    os.makedirs(ROOT, mode=0o755)
    workdir = os.path.join(ROOT, "work")
    os.mkdir(workdir)
    shutil.chown(workdir, args.user)
    cfg = bench_config()
    try:
        vb = vibatch_runs(cfg, args.runs, args.user, workdir)
        bare = bare_runs(cfg, args.runs, workdir)
        copies = clone_vs_copy(args.skip_copy)
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    print(f"## vibatch prologue/exec/epilogue, median of {args.runs} runs (seconds)\n")
    print("| phase | median | min | max |\n|---|---|---|---|")
    for k in ("claim", "image_check", "clone", "shares", "domain_start", "boot", "guest_setup",
              "prologue_total", "exec_true", "bare_guest_exec_true", "epilogue"):
        if k not in vb:
            continue
        print(f"| {k} | {median(vb[k]):.3f} | {min(vb[k]):.3f} | {max(vb[k]):.3f} |")
    print(f"\n## bare path (overlay + createXML + agent ping, no shares), median of {args.runs} "
          "runs\n")
    print("| step | median |\n|---|---|")
    for k in ("clone", "domain_start", "boot", "total"):
        print(f"| {k} | {median(bare[k]):.3f} |")
    own = median(vb["prologue_total"]) - median(bare["total"])
    own_wo_setup = own - median(vb["guest_setup"])
    print(f"\nvibatch prologue beyond the bare path: {own * 1000:.0f} ms "
          f"({own_wo_setup * 1000:.0f} ms without the guest setup)")
    print(f"vibatch exec true over a bare guest-exec: "
          f"{(median(vb['exec_true']) - median(vb['bare_guest_exec_true'])) * 1000:.0f} ms\n")
    print("## clone vs full copy\n\n| base | overlay median | overlay max | full copy (cp + sync) | ratio |")
    print("|---|---|---|---|---|")
    for gib, med, mx, copy_s in copies:
        ratio = f"{copy_s / med:.0f}x" if copy_s else "-"
        cp = f"{copy_s:.2f} s" if copy_s else "skipped"
        print(f"| {gib} GiB | {med * 1000:.1f} ms | {mx * 1000:.1f} ms | {cp} | {ratio} |")


if __name__ == "__main__":
    main()
