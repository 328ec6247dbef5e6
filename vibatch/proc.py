"""The one way vibatch runs host tools: argument lists, a timeout, the project's error."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Optional

from .errors import CommandFailed
from .hygiene import minimal_env


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(argv: list[str], *, timeout: float, check: bool = True,
        env: Optional[dict] = None, cwd: Optional[str] = None,
        input_text: Optional[str] = None) -> Result:
    """``env`` is the child's whole environment: by default ``hygiene.minimal_env()``, never ours.
    ``input_text`` is the child's stdin (else /dev/null)."""
    if env is None:
        env = minimal_env()
    stdin = {"input": input_text} if input_text is not None else {"stdin": subprocess.DEVNULL}
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                            env=env, cwd=cwd, **stdin)
    except subprocess.TimeoutExpired as e:
        raise CommandFailed(f"{argv[0]} did not finish within {timeout:g} s") from e
    except OSError as e:
        raise CommandFailed(f"cannot run {argv[0]}: {e.strerror}") from e
    res = Result(list(argv), cp.returncode, cp.stdout, cp.stderr)
    if check and cp.returncode != 0:
        last = (cp.stderr.strip().splitlines() or ["no error output"])[-1]
        raise CommandFailed(f"{argv[0]} failed (exit {cp.returncode}): {last}")
    return res
