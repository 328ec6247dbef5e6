"""Torque/PBS: prologue/epilogue run by pbs_mom as root, forwarding through ``$job_starter``.

The contract (Torque 6/7 docs and pbs_mom's source; see docs/batch/torque.md):

- ``prologue`` argv: 1 job id, 2 user, 3 group, 4 job name, 5 resource limits, 6 queue,
  7 account, [8 script path, 9 host list]. Empty environment, stdin /dev/null, stdout/stderr go
  to the job's output and error files. Killed after ``$prologalarm`` (default 300 s).
- ``epilogue`` argv: 1-4 as above, 5 session id, 6 resource limits, 7 resources used, 8 queue,
  9 account, 10 the job's exit code, [11 script path].
- exit codes: 0 ok; **1 = the job fails, no retry**; any other non-zero = **requeue**.
- ``$job_starter``: exec'd as the job user with the job's environment as
  ``job_starter <shell> <args>``.

The OS is chosen with a node property in the job's node spec (``qsub -l nodes=1:ppn=2:el9``):
a property that names an image or alias selects it. The scheduler only places such a job on
nodes that carry that property, so a typo never reaches a node. Otherwise the queue's default
(``images.queue_defaults``) or the site default applies.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional, Sequence

from .. import config as config_mod
from ..errors import ResourceRequestError
from . import (BatchJob, Outcome, clean_env_path, epilogue, exec_job, home_of, parse_shim_args,
               prologue, requestable_names, run_hook)

SYSTEM = "torque"
PROLOGUE_ALARM_S = 300
MARGIN_S = 20            # finish (and clean up) this long before pbs_mom's alarm
EXIT = {
    "prologue": {Outcome.OK: 0, Outcome.JOB_FAULT: 1, Outcome.NODE_FAULT: 2},
    "epilogue": {Outcome.OK: 0, Outcome.JOB_FAULT: 0, Outcome.NODE_FAULT: 2},
}
_UNITS = {"b": 1 / 2**20, "kb": 1 / 1024, "mb": 1, "gb": 1024, "tb": 1024**2}


def parse_limits(text: str) -> dict[str, str]:
    """'nodes=1:ppn=2:el9,mem=1gb,walltime=01:00:00' -> {'nodes': '1:ppn=2:el9', ...}."""
    out = {}
    for part in (text or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def parse_size_mb(text: str) -> int:
    m = re.match(r"^(\d+)([kmgt]?b)?$", text.strip().lower())
    if not m:
        raise ResourceRequestError(f"invalid Torque memory size {text!r} (e.g. 512mb, 2gb)")
    return max(1, int(int(m.group(1)) * _UNITS[m.group(2) or "b"]))


def parse_walltime(text: str) -> int:
    parts = text.strip().split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ResourceRequestError(f"invalid Torque walltime {text!r}") from None
    secs = 0
    for n in nums:
        secs = secs * 60 + n
    return secs


def node_spec(limits: dict[str, str]) -> tuple[Optional[int], list[str]]:
    """(ppn, properties) of the first node chunk of ``neednodes``/``nodes``."""
    spec = limits.get("neednodes") or limits.get("nodes") or ""
    chunk = spec.split("+")[0]
    ppn, props = None, []
    for i, tok in enumerate(t for t in chunk.split(":") if t):
        if tok.startswith("ppn="):
            ppn = int(tok[4:]) if tok[4:].isdigit() else None
        elif "=" in tok or (i == 0 and tok.isdigit()):
            continue
        else:
            props.append(tok)
    return ppn, props


def job_from_prologue(cfg, argv: Sequence[str]) -> BatchJob:
    if len(argv) < 7:
        raise ResourceRequestError(f"Torque prologue called with {len(argv)} arguments; expected "
                                   "at least 7 (job id, user, group, name, limits, queue, account)")
    job_id, user, _group, _name, limits_text, queue, account = argv[:7]
    limits = parse_limits(limits_text)
    ppn, props = node_spec(limits)
    cores = ppn or int(limits.get("ncpus") or limits.get("procs") or 0) or cfg.jobs.default_cores
    mem = limits.get("mem")
    memory_mb = parse_size_mb(mem) if mem else cfg.jobs.default_memory_mb
    walltime = parse_walltime(limits["walltime"]) if limits.get("walltime") else None
    known = requestable_names(cfg)
    image = next((p for p in props if p in known), None)
    return BatchJob(job_id=job_id, user=user, cores=cores, memory_mb=memory_mb,
                    workdir=home_of(user), image=image, walltime_s=walltime,
                    queue=queue or None, account=account or None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    call = parse_shim_args(sys.argv[1:] if argv is None else argv, PROLOGUE_ALARM_S)
    hook, args, alarm, config_path = call.hook, call.args, call.alarm_s, call.config_path

    def cfg():
        return config_mod.load(config_path)

    if hook == "job_starter":   # as the job user, with the job's environment
        job_id = os.environ.get("PBS_JOBID", "")
        try:
            return exec_job(cfg(), job_id, args)
        except Exception as e:  # noqa: BLE001 - report in the job's output, fail the job
            print(f"vibatch: torque job starter: {e}", file=sys.stderr)
            return 125
    clean_env_path()
    def run_prologue() -> None:
        c = cfg()
        prologue(c, lambda: job_from_prologue(c, args))

    def run_epilogue() -> None:
        code = int(args[9]) if len(args) > 9 and args[9].lstrip("-").isdigit() else None
        epilogue(cfg(), args[0], code)

    if hook == "epilogue" and not args:
        print("vibatch: torque epilogue: no job id", file=sys.stderr)
        return 0
    if hook in ("prologue", "epilogue"):
        body = run_prologue if hook == "prologue" else run_epilogue
        return run_hook(SYSTEM, hook, body, EXIT[hook], alarm_s=max(5, alarm - MARGIN_S))
    print("usage: python -I -m vibatch.batch.torque [--alarm S] prologue|epilogue|job_starter ...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
