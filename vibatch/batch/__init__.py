"""Batch-system adapters: each turns its system's hook calls into the core's job request and maps
the core's faults onto that system's exit codes.

- base.py: the ``BatchSystem`` interface and ``main``, the one runner of every hook;
- kit.py: what adapters may use of vibatch (request reading, the starter, refusal notes);
- core.py: the job core as a root hook sees it, handed to adapters by ``main`` after the
  hook's hygiene (adapters never import it, nor lifecycle);
- one module per system (``SYSTEMS``), each with its ``SYSTEM`` and its one exit-code table
  ``EXIT``, documented in docs/batch/<system>.md; faults.py: Torque's node-fault record.

A job's or user's fault must fail that job only, with the message in the job's own output; a
node's fault asks the system to requeue (or offline the node, as that system intends); an
epilogue with nothing to clean succeeds.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Sequence

from .base import BatchSystem, main

SYSTEMS = ("slurm", "gridengine", "torque", "htcondor")


def system(name: str) -> BatchSystem:
    """The adapter named ``name`` (one of SYSTEMS)."""
    return importlib.import_module(f"{__name__}.{name}").SYSTEM


def job_gone(name: str, job_id: str, env: dict) -> Optional[bool]:
    """``vibatch reap``'s question to the job's batch system (None: unknown system)."""
    return system(name).job_gone(job_id, env) if name in SYSTEMS else None


def drain_time(name: str, env: dict) -> Optional[int]:
    """``vibatch drain --sync``'s question to a job's batch system (None: no drain known)."""
    return system(name).drain_time(env) if name in SYSTEMS else None


def offer_formats() -> dict[str, Callable[[Sequence[str]], str]]:
    """``vibatch image offer --format`` -> how to write the offered names, over every system."""
    return {fmt: write for name in SYSTEMS for fmt, write in system(name).offer_formats.items()}


__all__ = ["SYSTEMS", "BatchSystem", "drain_time", "job_gone", "main", "offer_formats",
           "system"]
