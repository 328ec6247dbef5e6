"""Named points in the prologue and epilogue where the fault-injection harness (tests/faults/)
stops or kills the process, to prove that every phase can be interrupted without leaving
anything behind or losing a record.

Production never arms one: ``point`` is a single comparison with ``None``. The harness arms it
in its own process (``python -c`` that sets ``ARMED`` and then calls the CLI), never through
the environment or a file, so nothing a user controls can reach it.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

ARMED: Optional[str] = None     # the point's name
ACTION = signal.SIGKILL         # or SIGSTOP: the harness resumes the process later


def point(name: str) -> None:
    if ARMED == name:
        os.kill(os.getpid(), ACTION)
