"""Slot allocator: which host CPUs and how much memory each job on this node holds.

State is one JSON file, changed only under a lock with a timeout and written atomically, so
concurrent claims never overlap and a crash never leaves half-written state. Claiming twice for
the same job returns the slot it already holds.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import NoFreeSlot, ResourceRequestError
from ..util import atomic_write_json, hold, read_json, root_lock


@dataclass(frozen=True)
class Slot:
    job_id: str
    cpus: tuple[int, ...]
    memory_mb: int

    def to_json(self) -> dict:
        return {"cpus": list(self.cpus), "memory_mb": self.memory_mb}


@dataclass(frozen=True)
class Capacity:
    cpus: tuple[int, ...]   # CPU ids jobs may use
    memory_mb: int          # memory jobs may use, in total


class SlotAllocator:
    def __init__(self, state_dir: str, capacity: Capacity, lock_timeout: float):
        self.path = os.path.join(state_dir, "slots.json")
        self.capacity = capacity
        self.lock = root_lock(os.path.join(state_dir, "slots.lock"), lock_timeout)

    # -- locked state access ----------------------------------------------------------------
    def _load(self) -> dict:
        return read_json(self.path, {"version": 1, "slots": {}})

    def _save(self, state: dict) -> None:
        atomic_write_json(self.path, state)   # root only: 0600

    # -- API ---------------------------------------------------------------------------------
    def claim(self, job_id: str, cores: int, memory_mb: int,
              cpus: Optional[Sequence[int]] = None) -> tuple[Slot, bool]:
        """Return (slot, created). ``created`` is False when the job already held one."""
        self._check_request(cores, memory_mb, cpus)
        with hold(self.lock):
            state = self._load()
            held = state["slots"].get(job_id)
            if held is not None:
                slot = Slot(job_id, tuple(held["cpus"]), held["memory_mb"])
                if len(slot.cpus) != cores or slot.memory_mb != memory_mb or (
                        cpus is not None and tuple(sorted(cpus)) != slot.cpus):
                    raise ResourceRequestError(
                        f"job {job_id} already holds CPUs {_fmt(slot.cpus)} and "
                        f"{slot.memory_mb} MiB; a different request for it is refused")
                return slot, False
            used_cpus = {c for s in state["slots"].values() for c in s["cpus"]}
            used_mem = sum(s["memory_mb"] for s in state["slots"].values())
            if used_mem + memory_mb > self.capacity.memory_mb:
                raise NoFreeSlot(f"not enough free memory for job {job_id}: asks {memory_mb} MiB, "
                                 f"{self.capacity.memory_mb - used_mem} MiB of "
                                 f"{self.capacity.memory_mb} MiB free")
            if cpus is not None:
                busy = sorted(set(cpus) & used_cpus)
                if busy:
                    raise NoFreeSlot(f"CPUs {_fmt(busy)} given to job {job_id} are held by "
                                     "another job on this node")
                chosen = tuple(sorted(cpus))
            else:
                free = [c for c in self.capacity.cpus if c not in used_cpus]
                if len(free) < cores:
                    raise NoFreeSlot(f"not enough free CPUs for job {job_id}: asks {cores}, "
                                     f"{len(free)} of {len(self.capacity.cpus)} free")
                chosen = tuple(free[:cores])
            slot = Slot(job_id, chosen, memory_mb)
            state["slots"][job_id] = {**slot.to_json(), "claimed_at": time.time()}
            self._save(state)
            return slot, True

    def release(self, job_id: str) -> Optional[Slot]:
        """Free the job's slot; return it, or None when it held none (safe to repeat)."""
        with hold(self.lock):
            state = self._load()
            held = state["slots"].pop(job_id, None)
            if held is None:
                return None
            self._save(state)
            return Slot(job_id, tuple(held["cpus"]), held["memory_mb"])

    def get(self, job_id: str) -> Optional[Slot]:
        held = self._load()["slots"].get(job_id)
        return Slot(job_id, tuple(held["cpus"]), held["memory_mb"]) if held else None

    def all(self) -> dict[str, Slot]:
        return {j: Slot(j, tuple(s["cpus"]), s["memory_mb"]) for j, s in self._load()["slots"].items()}

    def _check_request(self, cores: int, memory_mb: int, cpus: Optional[Sequence[int]]) -> None:
        cap = self.capacity
        if cores > len(cap.cpus):
            raise ResourceRequestError(f"{cores} cores requested; this node gives jobs at most "
                                       f"{len(cap.cpus)} (CPUs {_fmt(cap.cpus)})")
        if memory_mb > cap.memory_mb:
            raise ResourceRequestError(f"{memory_mb} MiB requested; this node gives jobs at most "
                                       f"{cap.memory_mb} MiB")
        if cpus is not None:
            outside = sorted(set(cpus) - set(cap.cpus))
            if outside:
                raise NoFreeSlot(f"the batch system gave CPUs {_fmt(outside)}, which this node "
                                 f"keeps from jobs (usable: {_fmt(cap.cpus)}): check "
                                 "host.reserved_cpus against the batch system's configuration")


def _fmt(cpus: Sequence[int]) -> str:
    return ",".join(str(c) for c in cpus) or "none"
