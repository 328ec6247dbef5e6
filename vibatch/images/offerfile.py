"""The offer file: the names jobs may ask for, one per line, where a submit-time check reads them
(Slurm's job_submit.lua reads ``batch.offer_file``). It follows the library by itself: ``vibatch
image add/remove/sync`` and every Slurm Prolog rewrite it when it differs (atomically, 0644),
and ``vibatch doctor`` reports one that does not say what this node offers."""
from __future__ import annotations

import os
from typing import Optional

from .. import safeio
from ..config import Config
from ..util import atomic_write
from .library import Library
from .policy import offer

MAX_BYTES = 1 << 20


def text(cfg: Config, library: Optional[Library] = None) -> str:
    """What the offer file should hold now (``vibatch image offer``'s lines)."""
    library = library or Library(cfg.library_dir, cfg.state_dir, cfg.lock_timeout_s)
    return "".join(f"{name}\n" for name in offer(cfg, library))


def stale(cfg: Config, path: str, library: Optional[Library] = None) -> Optional[str]:
    """How the file at ``path`` differs from what this node offers, or None if it does not."""
    have = safeio.read_bounded(path, MAX_BYTES)
    if have is None:
        return f"{path} is missing (or not a regular file)"
    want = text(cfg, library)
    if have.decode(errors="replace") == want:
        return None
    old, new = set(have.decode(errors="replace").split()), set(want.split())
    parts = [f"lacks {', '.join(sorted(new - old))}" if new - old else "",
             f"still offers {', '.join(sorted(old - new))}" if old - new else ""]
    return f"{path} " + ("; ".join(p for p in parts if p) or "is ordered differently")


def refresh(cfg: Config, library: Optional[Library] = None) -> bool:
    """Rewrite ``batch.offer_file`` if it differs from the offer; True if it was rewritten."""
    path = cfg.batch.offer_file
    if not path:
        return False
    want = text(cfg, library)
    if safeio.read_bounded(path, MAX_BYTES) == want.encode():
        return False
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomic_write(path, want.encode(), mode=0o644)
    return True
