"""qemu-img, run with argument lists through the one subprocess runner."""
from __future__ import annotations

import json

from .. import proc
from ..errors import CommandFailed

QEMU_IMG = "qemu-img"


def info(path: str, *, timeout: float = 30.0) -> dict:
    # -U: do not take the image lock, so inspecting an image in use by a VM works
    res = proc.run([QEMU_IMG, "info", "-U", "--output=json", path], timeout=timeout)
    try:
        return json.loads(res.stdout)
    except ValueError:
        raise CommandFailed(f"qemu-img info {path}: output is not JSON") from None


def create_overlay(base: str, base_format: str, overlay: str, *, timeout: float = 30.0) -> None:
    """A qcow2 overlay whose backing file is ``base``; the base is opened read-only."""
    proc.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", base, overlay],
             timeout=timeout)
