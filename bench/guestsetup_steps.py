#!/usr/bin/env python3
"""Where the prologue's guest setup spends its time, step by step, on a real image.

    /opt/vibatch/venv/bin/python bench/guestsetup_steps.py --image debian-bookworm-kernel \
        [--runs 3] [--user nobody] [--workdir DIR]

Runs real prologues and epilogues (as root, under the node's config or $VIBATCH_CONFIG) with
the setup script of vibatch/vm/guestsetup.py unchanged except for one added line before each of
its top-level commands, which appends the guest's /proc/uptime (a shell builtin read, no fork;
0.01 s resolution) and the command to /run/vb-setup-times. After the prologue, the root agent
reads that file. Prints the median time of each step, the script's whole run, the rest of the
root agent's guest-exec round trip, and the wait for the job user's agent to answer.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from vibatch import config
from vibatch.core import lifecycle
from vibatch.core.request import make_request
from vibatch.util import Deadline
from vibatch.vm import guestsetup, hypervisor
from vibatch.vm.agent import LibvirtAgent

TIMES = "/run/vb-setup-times"
MARK = 't() { read -r up _ < /proc/uptime; echo "$up $1" >> ' + TIMES + '; }'
NOT_A_STEP = ("else", "elif", "fi", "done", "esac", "then", "#")


def instrumented(script: str) -> str:
    """SETUP_SCRIPT with a time mark before every top-level command."""
    out = [MARK]
    for line in script.splitlines():
        if line and not line[0].isspace() and not line.startswith(NOT_A_STEP):
            out.append(f"t {_quote(line[:60])}")
        out.append(line)
    out.append("t end")
    return "\n".join(out) + "\n"


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


class TimedSetup(guestsetup.SetupArgs):
    def argv(self) -> list[str]:
        argv = super().argv()
        argv[1] = argv[1].replace(guestsetup.SETUP_SCRIPT, instrumented(guestsetup.SETUP_SCRIPT))
        return argv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--user", default="nobody")
    ap.add_argument("--workdir", default="/var/tmp")
    a = ap.parse_args()
    cfg = config.load()
    waits: list[float] = []
    real_wait = lifecycle._wait_for_user_agent

    def timed_wait(agent, deadline):
        t0 = time.perf_counter()
        try:
            return real_wait(agent, deadline)
        finally:
            waits.append(time.perf_counter() - t0)

    lifecycle.SetupArgs = TimedSetup
    lifecycle._wait_for_user_agent = timed_wait
    steps: dict[str, list[float]] = {}
    totals, scripts = [], []
    node = lifecycle.Node(cfg)
    try:
        for i in range(a.runs):
            job = f"setupbench-{os.getpid()}-{i}"
            state = lifecycle.prologue(node, make_request(job, a.user, 1, 512, a.image, a.workdir))
            try:
                conn = hypervisor.connect(cfg.libvirt_uri)
                try:
                    agent = LibvirtAgent(hypervisor.lookup(conn, "vibatch-" + job))
                    res = agent.run("/bin/cat", [TIMES], Deadline(30), what="cat")
                finally:
                    conn.close()
            finally:
                lifecycle.epilogue(node, job)
            marks = [line.split(" ", 1) for line in res.out.decode().splitlines()]
            for (t, label), (t_next, _) in zip(marks, marks[1:]):
                steps.setdefault(label, []).append(float(t_next) - float(t))
            scripts.append(float(marks[-1][0]) - float(marks[0][0]))
            totals.append(state.phases["guest_setup"])
    finally:
        node.close()
    med = statistics.median
    print(f"| step of the setup script ({a.image}, median of {a.runs}) | seconds |")
    print("|---|---|")
    for label, xs in steps.items():
        print(f"| `{label}` | {med(xs):.2f} |")
    print(f"| **the script, first mark to last** | **{med(scripts):.2f}** |")
    print(f"| wait for the job user's agent (id -u; id -g through it) | {med(waits):.2f} |")
    rest = [t - s - w for t, s, w in zip(totals, scripts, waits)]
    print(f"| the rest: root agent guest-exec and its status polls | {med(rest):.2f} |")
    print(f"| **guest_setup phase** | **{med(totals):.2f}** |")


if __name__ == "__main__":
    main()
