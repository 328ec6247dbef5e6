"""What this node can give jobs, from the config and the host itself."""
from __future__ import annotations

import os

import psutil

from ..config import Config
from .slots import Capacity


def online_cpus() -> tuple[int, ...]:
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return tuple(sorted(os.sched_getaffinity(0)))
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def capacity(cfg: Config) -> Capacity:
    cpus = cfg.host.cpus or online_cpus()
    usable = tuple(c for c in cpus if c not in set(cfg.host.reserved_cpus))
    memory = psutil.virtual_memory().total // (1024 * 1024) - cfg.host.reserved_memory_mb
    return Capacity(cpus=usable, memory_mb=max(0, memory))
