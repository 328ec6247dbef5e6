"""Node faults that a batch system would retry at once, and without limit, on this same node.

Torque's pbs_mom reruns a job whose prologue exits with anything but 0 or 1 (or times out)
straight away, on the same node, for ever (seen on a real 6.1 pbs_mom: 233 reruns in 2 minutes).
So the adapter counts node faults per job on this node, waits longer after each one before it
asks for the requeue, and after ``limit`` of them takes the node out. The record lives in
``<state_dir>/node-faults.json`` (root's, 0600), and ``vibatch status`` shows it.
"""
from __future__ import annotations

import os
import time

import filelock

from ..util import atomic_write_json, hold, read_json, root_lock

FILE = "node-faults.json"


def _path(cfg) -> str:
    return os.path.join(cfg.state_dir, FILE)


def _lock(cfg) -> filelock.FileLock:
    # root's alone, like every vibatch lock: a user who could flock it would stall the hooks
    return root_lock(_path(cfg) + ".lock", cfg.lock_timeout_s)


def read(cfg) -> dict:
    """{"jobs": {job_id: {"count", "first", "last", "message"}}, "offline": {...} or absent}."""
    data = read_json(_path(cfg), default={})
    return data if isinstance(data, dict) else {}


def _update(cfg, change) -> dict:
    os.makedirs(cfg.state_dir, mode=0o755, exist_ok=True)
    with hold(_lock(cfg)):
        data = read(cfg)
        data.setdefault("jobs", {})
        change(data)
        atomic_write_json(_path(cfg), data, mode=0o600)   # job ids and messages: root's
        return data


def record(cfg, job_id: str, message: str) -> int:
    """One more node fault of ``job_id`` here; returns how many there have been."""
    now = time.time()

    def change(data: dict) -> None:
        entry = data["jobs"].setdefault(job_id, {"count": 0, "first": now})
        entry.update(count=entry["count"] + 1, last=now, message=message[:500])
    return _update(cfg, change)["jobs"][job_id]["count"]


def offlined(cfg, job_id: str, note: str) -> None:
    def change(data: dict) -> None:
        data["offline"] = {"since": time.time(), "job_id": job_id, "note": note}
    _update(cfg, change)


def clear(cfg, job_id: str, back_in_service: bool = False) -> None:
    """The job got past the prologue here, or ended: forget its faults. A prologue that
    succeeds also shows the node is back in service (``back_in_service``): the offline record
    goes too."""
    if not os.path.exists(_path(cfg)):
        return

    def change(data: dict) -> None:
        data["jobs"].pop(job_id, None)
        if back_in_service:
            data.pop("offline", None)
    _update(cfg, change)


def backoff_s(count: int, base_s: float, budget_s: float) -> float:
    """How long to wait before asking for requeue number ``count``: ``base_s`` doubling, never
    beyond ``budget_s`` (what is left before the batch system's own alarm)."""
    return max(0.0, min(base_s * 2 ** (count - 1), budget_s))


def describe(cfg) -> list[str]:
    """Lines for ``vibatch status``."""
    data = read(cfg)
    lines = []
    off = data.get("offline")
    if off:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(off.get("since", 0)))
        lines.append(f"node taken out of service by vibatch at {when}: {off.get('note', '')}")
    for job_id, e in sorted(data.get("jobs", {}).items()):
        lines.append(f"job {job_id}: {e.get('count')} node fault(s) here, the last: "
                     f"{e.get('message', '')}")
    return lines
