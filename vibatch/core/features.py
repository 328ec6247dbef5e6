"""HEPiX Machine/Job Features (HSF-TN-2016-02) for the job's guest, with the keys Vac and DIRAC
read: one file per key, its value on one line, in two directories the guest's root makes
(root-owned, 0755/0644: the job user reads them and cannot change them), named by
``$MACHINEFEATURES`` and ``$JOBFEATURES`` in every command ``vibatch exec`` runs.

Every value comes from the job's real allocation: the slot's cores and memory, the wall limit
the batch system gave, the node's CPUs; ``hs06`` only when the admin sets ``features.hs06``
(the node's total), ``shutdowntime`` only while the node is draining (``vibatch drain``).
Keys without a value are left out, as the note allows.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Optional

import psutil

from ..config import Config
from ..util import atomic_write_json

DRAIN_FILE = "drain.json"
_KEY = re.compile(r"^[A-Za-z0-9_]{1,32}$")
# every character a job id may hold (request.check_job_id): Torque's array tasks are 12[3].srv
_VALUE = re.compile(r"^[A-Za-z0-9_.@+:\[\]-]{1,128}$")


def drain_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, DRAIN_FILE)


def _drain(cfg: Config) -> dict:
    """``drain.json`` (root's, written by set_drain), or {} when the node is not draining."""
    try:
        with open(drain_path(cfg)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def shutdowntime(cfg: Config) -> Optional[int]:
    """The node's announced end (``vibatch drain --at``), if it is draining."""
    value = _drain(cfg).get("shutdowntime")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def drain_source(cfg: Config) -> tuple[Optional[str], dict]:
    """Who announced the drain: ("admin", {}) for ``vibatch drain --at``, or a batch system's
    name and the environment it was asked with (``vibatch drain --sync`` found its
    maintenance); (None, {}) if the node is not draining."""
    data = _drain(cfg)
    if not data:
        return None, {}
    env = data.get("env") if isinstance(data.get("env"), dict) else {}
    return str(data.get("source", "admin")), {str(k): str(v) for k, v in env.items()}


def set_drain(cfg: Config, at: Optional[int], source: str = "admin",
              env: Optional[dict] = None) -> None:
    """Announce the node's end at ``at`` (epoch seconds), or withdraw it (None); ``env`` is
    how to ask ``source`` (a batch system) again."""
    if at is None:
        try:
            os.unlink(drain_path(cfg))
        except FileNotFoundError:
            pass
        return
    atomic_write_json(drain_path(cfg), {"shutdowntime": int(at), "set_at": int(time.time()),
                                        "source": source, "env": dict(env or {})})


def machine(cfg: Config, jobslots: int) -> dict[str, str]:
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    out = {"total_cpu": logical, "log_cores": logical, "phys_cores": physical,
           "jobslots": jobslots}
    if cfg.features.hs06 > 0:
        out["hs06"] = _number(cfg.features.hs06)
    end = shutdowntime(cfg)
    if end is not None:
        out["shutdowntime"] = end
    return {k: str(v) for k, v in out.items()}


def job(cfg: Config, job_id: str, cores: int, memory_mb: int, walltime_s: Optional[int],
        started: int, machine_keys: dict[str, str], scratch_bytes: int = 0) -> dict[str, str]:
    """The job's features; the node's (``machine``'s answer) give its CPUs and shutdowntime."""
    out: dict[str, object] = {"job_id": job_id, "allocated_cpu": cores,
                              "mem_limit_MB": memory_mb, "max_rss_bytes": memory_mb << 20,
                              "jobstart_secs": started}
    if scratch_bytes:
        out["scratch_limit_bytes"] = scratch_bytes     # the job's scratch disk, its $TMPDIR
    ends = [int(machine_keys["shutdowntime"])] if "shutdowntime" in machine_keys else []
    if walltime_s:
        out["wall_limit_secs"] = walltime_s
        out["cpu_limit_secs"] = walltime_s * cores    # all its CPUs for its whole wall time
        ends.append(started + walltime_s)
    if ends:
        out["shutdowntime_job"] = min(ends)
    if cfg.features.hs06 > 0:
        out["hs06_job"] = _number(cfg.features.hs06 * cores
                                  / max(1, int(machine_keys["total_cpu"])))
    return {k: str(v) for k, v in out.items()}


def _number(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def as_args(machine_keys: dict[str, str], job_keys: dict[str, str]) -> list[str]:
    """``m:key=value`` / ``j:key=value`` arguments for the guest's setup script (checked: a key
    is a short identifier, a value one token of safe characters)."""
    args = []
    for prefix, keys in (("m", machine_keys), ("j", job_keys)):
        for k, v in keys.items():
            if not _KEY.match(k) or not _VALUE.match(v):
                raise ValueError(f"machine/job feature {k}={v!r} is not a key and a plain value")
            args.append(f"{prefix}:{k}={v}")
    return args
