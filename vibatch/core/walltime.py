"""A job's time limit, enforced by vibatch as a backstop to the batch system's.

The batch system ends a job at its limit; if it cannot (its daemon died, the epilogue was
lost), the job's VM must still end. Two ends do it, ``batch.walltime_grace_s`` after the
limit: the guest's own root timer, started by the guest setup (``t:SECONDS``), and ``vibatch
reap``, which ends a ready job past its limit plus grace. Guest root can stop the timer, so
reap (cron, every minute) is the enforcement; the timer also covers a node where reap does not
run. Both count from the prologue's start, which is after the batch system's own start of the
job's clock: neither ever ends a job before the batch system would.
"""
from __future__ import annotations

import time
from typing import Optional

from ..config import Config


def guest_deadline_s(cfg: Config, walltime_s: Optional[int]) -> Optional[int]:
    """Seconds from guest setup until the guest powers itself off (None: no limit)."""
    return walltime_s + cfg.batch.walltime_grace_s if walltime_s else None


def overdue(cfg: Config, started_at: Optional[float], walltime_s: Optional[int],
            now: Optional[float] = None) -> bool:
    """Is a job that started at ``started_at`` past its limit plus grace?"""
    if not walltime_s or not started_at:
        return False
    return (time.time() if now is None else now) > started_at + walltime_s + \
        cfg.batch.walltime_grace_s


def reason(cfg: Config, walltime_s: Optional[int]) -> str:
    return f"past its walltime ({walltime_s} s) + grace ({cfg.batch.walltime_grace_s} s)"
