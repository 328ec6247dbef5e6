#!/usr/bin/env python3
"""What a scratch disk and a user/nat network add to a job's prologue, measured without a VM:
``disk.create_scratch`` (sparse file + mkfs.ext4) and ``network.ensure`` (the bridge and the
policy reloaded whole). Root; leaves nothing (its own bridge and chains are removed).

    /opt/vibatch/venv/bin/python bench/startcosts.py [--runs 10] [--scratch-gb 10]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vibatch import config  # noqa: E402
from vibatch.core import disk  # noqa: E402
from vibatch.vm import network  # noqa: E402


def timed(fn, runs):
    out = []
    for _ in range(runs):
        t0 = time.monotonic()
        fn()
        out.append(time.monotonic() - t0)
    return out


def show(name, ts):
    print(f"{name:32} median {statistics.median(ts) * 1e3:7.1f} ms   "
          f"min {min(ts) * 1e3:6.1f}   max {max(ts) * 1e3:6.1f}   ({len(ts)} runs)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--scratch-gb", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        path = os.path.join(d, "scratch.img")

        def scratch():
            if os.path.exists(path):
                os.unlink(path)
            disk.create_scratch(path, args.scratch_gb << 30, 1000, 1000, (0, 0))
        show(f"scratch {args.scratch_gb} GiB (mkfs.ext4)", timed(scratch, args.runs))
        cfg = config.parse({"run_dir": d, "vm": {"network": "nat"},
                            "network": {"allow": ["192.0.2.0/24:443"], "nat_bridge": "vbbench0",
                                        "nat_subnet": "10.215.0.0/24"}}, "bench")
        try:
            for mode in ("nat", "user"):
                show(f"network.ensure {mode}", timed(lambda m=mode: network.ensure(cfg, m, 64055),
                                                     args.runs))
        finally:
            network.remove(cfg, 64055)


if __name__ == "__main__":
    main()
