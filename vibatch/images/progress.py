"""Progress of long operations (hashing, downloads), shown only on a terminal.

``Progress.on(stream)`` draws one self-overwriting line on ``stream`` when it is a terminal and
does nothing otherwise (a pipe, a file, cron), so scripts and logs stay quiet.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

REDRAW_S = 0.2


class Progress:
    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream
        self.label, self.total, self.shown = "", 0, 0.0

    @classmethod
    def on(cls, stream: Optional[TextIO] = None) -> "Progress":
        stream = sys.stderr if stream is None else stream
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(stream if tty else None)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.shown = label, total, 0.0
        self.update(0, force=True)

    def update(self, done: int, force: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.shown < REDRAW_S:
            return
        self.shown = now
        pct = f"{100 * done / self.total:5.1f}%" if self.total else "     "
        self.stream.write(f"\r{self.label}: {pct} {_mib(done)} of {_mib(self.total)}\x1b[K")
        self.stream.flush()

    def end(self, done: Optional[int] = None) -> None:
        if self.stream is None:
            return
        self.update(self.total if done is None else done, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


QUIET = Progress(None)
