"""What an adapter may use besides its own code: reading a job's request, running a job from its
starter, the prologue's refusal note, and small lookups. None of it imports libvirt, so every
adapter module can be imported before a root hook's hygiene (hygiene.enter_root_hook); the core
itself (core.py) reaches an adapter only as an argument, from base.main."""
from __future__ import annotations

import dataclasses
import os
import pwd
import sys
from typing import Any, Callable, Optional, Sequence

from ..config import Config
from ..errors import JobError, ResourceRequestError, UnknownUser, VibatchError
from ..core.execjob import Exec
from ..images.library import image_names
from ..core.request import JobRequest, check_job_id, resolve_user
from ..util import atomic_write

STARTER_FAILED = 125   # a starter that could not run the job (as podman and docker run do)
# Where a batch system holds all of a job's processes, QEMU among them, to a memory limit: room
# left beside the VM's hard cap for the job's host processes, virtiofsd and QEMU's shared
# libraries, which the cap does not hold (fit_vm)
HOST_RESERVE_MB = 128


class UnreadableRequest(JobError):
    """The job's request could not be read: until it has been, a failure is the job's."""


def read_request(parse: Callable[[], JobRequest]) -> JobRequest:
    """The request an adapter's parser builds (with request.make_request) from the job's values.
    Until the request is known valid, every value in it may be the user's: an unexpected
    exception while reading it is the job's fault, not the node's. The node's own failures (a
    NodeError from a parser: the batch system broke its contract) stay the node's."""
    try:
        return parse()
    except VibatchError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
            UnicodeError, RecursionError) as e:
        raise UnreadableRequest(f"cannot read this job's request: {type(e).__name__}: {e}") from e


def fit_vm(cfg: Config, req: JobRequest, limit_mb: int, what: str) -> JobRequest:
    """The request with its VM made to fit in ``limit_mb``, a limit the batch system holds the
    sum of the job's processes to once QEMU counts as one of them (Grid Engine's vmem, HTCondor's
    MemoryUsage against the slot's Memory): the VM's hard cap (the guest's memory plus QEMU's
    overhead) is the limit less HOST_RESERVE_MB. ResourceRequestError, naming the limit as
    ``what``, if it cannot hold a VM of ``jobs.min_memory_mb`` (the caller keeps QEMU out of
    the job's usage, and says so)."""
    fit = limit_mb - cfg.vm.memory_overhead_mb - HOST_RESERVE_MB
    if fit >= req.memory_mb:
        return req
    if fit < cfg.jobs.min_memory_mb:
        raise ResourceRequestError(f"{what} cannot hold a VM of {cfg.jobs.min_memory_mb} MiB "
                                   f"and {cfg.vm.memory_overhead_mb + HOST_RESERVE_MB} MiB "
                                   "besides")
    return dataclasses.replace(req, memory_mb=fit)


def exec_job(cfg: Config, job_id: str, argv: Sequence[str], script: Optional[str] = None,
             drop_first_line: bool = False, interpreter: Optional[str] = None,
             shell: Optional[str] = None, environ: Optional[dict] = None,
             relay: Optional[Callable[[Exec], Any]] = None, stdin: Optional[int] = None) -> int:
    """The job starter's part: run the job in its VM, as the job user. ``script`` is a host
    file the guest cannot see (the batch system's spool copy of the job script): its text is
    handed to the guest and run with ``argv`` as its arguments (by ``interpreter``, a path in
    the guest, if given; else by its own ``#!`` line, or by ``shell`` if it has none). If the
    prologue refused the job, say why, in the job's own error output, and fail it.
    ``environ``: the job's environment (default: ours); ``relay(exec)``: what serves the guest's
    requests while the job runs (see Exec.relay), closed after; ``stdin``: a descriptor whose
    input is streamed to the job (Exec.run)."""
    why = read_refusal(cfg, job_id)
    if why is not None:
        print(f"vibatch: this job cannot run: {why}", file=sys.stderr)
        return STARTER_FAILED
    ex = Exec(cfg, job_id)
    ex.relay = relay(ex) if relay is not None else None
    try:
        if script is None:
            return ex.run(list(argv), environ=environ, stdin=stdin)
        with open(script, "rb") as f:
            text = f.read()
        if drop_first_line:
            text = text.split(b"\n", 1)[1] if b"\n" in text else b""
        if interpreter is None and not text.startswith(b"#!"):
            interpreter = shell
        return ex.run_script(text, list(argv), interpreter=interpreter, environ=environ)
    finally:
        if ex.relay is not None:
            ex.relay.close()


def _refusal_path(cfg: Config, job_id: str) -> str:
    return os.path.join(cfg.run_dir, "refused", check_job_id(job_id))


def record_refusal(cfg: Config, job_id: str, user: str, message: str) -> None:
    """Leave the prologue's reason for refusing a job where the job's starter (running as the
    job user) finds it: for systems whose prologue cannot fail one job without taking the node
    out (Slurm drains a node whose Prolog fails). Root's, readable by the job's user only."""
    path = _refusal_path(cfg, job_id)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    atomic_write(path, (message.strip() + "\n").encode(), mode=0o400)
    try:
        ju = resolve_user(user)
        os.chown(path, ju.uid, ju.gid)
    except UnknownUser:
        os.chmod(path, 0o444)   # no such user (or root): no job of theirs runs anyway


def read_refusal(cfg: Config, job_id: str) -> Optional[str]:
    try:
        with open(_refusal_path(cfg, job_id), "rb") as f:
            return f.read(64 * 1024).decode(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return "the prologue refused it (its reason is not readable by this user)"


def clear_refusal(cfg: Config, job_id: str) -> None:
    try:
        os.unlink(_refusal_path(cfg, job_id))
    except FileNotFoundError:
        pass


def requestable_names(cfg: Config) -> set[str]:
    """Image names and aliases: what a node property or feature may name to pick an image."""
    return set(cfg.images.aliases) | set(image_names(cfg.library_dir))


def home_of(user: str) -> str:
    try:
        return pwd.getpwnam(user).pw_dir or "/"
    except KeyError:
        return "/"
