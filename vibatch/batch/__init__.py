"""Batch-system adapters: each turns its system's hook call into the core's job request and maps
the core's outcome onto that system's exit codes.

Every adapter has the same shape:
- ``job_from_*``: the system's argv/environment/job files -> ``BatchJob``;
- ``EXIT``: a table {Outcome: code} per hook, documented in docs/batch/<system>.md;
- hook entry points (``python -I -m vibatch.batch.<system> <hook> ...``) that the shims in
  ``hooks/<system>/`` exec.

A job's or user's fault must fail that job only, with the message in the job's own output; a
node's fault asks the system to requeue (or offline the node, as that system intends); an
epilogue with nothing to clean succeeds.
"""
from __future__ import annotations

import enum
import os
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..errors import JobError, NodeError, VibatchError
from ..util import log_error


class Outcome(enum.Enum):
    OK = "ok"
    JOB_FAULT = "job"      # the request is wrong: fail this job only
    NODE_FAULT = "node"    # this node is wrong: requeue / take the node out, per system


def classify(exc: Optional[BaseException]) -> Outcome:
    if exc is None:
        return Outcome.OK
    if isinstance(exc, VibatchError) and exc.fault == "job":
        return Outcome.JOB_FAULT
    return Outcome.NODE_FAULT


@dataclass(frozen=True)
class BatchJob:
    job_id: str
    user: str
    cores: int
    memory_mb: int
    workdir: str
    image: Optional[str] = None
    walltime_s: Optional[int] = None
    queue: Optional[str] = None
    account: Optional[str] = None
    cpus: Optional[tuple[int, ...]] = None


class HookTimeout(NodeError):
    """The hook's own deadline, set below the batch system's so we clean up before it kills us."""


def run_hook(system: str, hook: str, body: Callable[[], None], table: dict[Outcome, int],
             alarm_s: Optional[int] = None, out=None,
             on_fault: Optional[Callable[[Outcome, str], None]] = None) -> int:
    """Run ``body``; report any failure in one line (plus detail) and return ``table``'s code.
    ``on_fault(outcome, message)`` runs after a failure, e.g. to leave the message for the job."""
    out = out or sys.stderr
    message = ""
    if alarm_s:
        def on_alarm(_signum, _frame):
            raise HookTimeout(f"vibatch {system} {hook}: did not finish within {alarm_s} s")
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(alarm_s)
    exc: Optional[BaseException] = None
    try:
        body()
    except VibatchError as e:
        exc, message = e, e.message
        print(f"vibatch: {system} {hook} failed ({'job' if e.fault == 'job' else 'node'} "
              f"fault): {e.message}", file=out)
        if e.detail:
            print(e.detail.rstrip("\n"), file=out)
    except Exception as e:  # an unexpected bug is the node's problem, never the user's
        exc, message = e, f"unexpected {type(e).__name__}: {e}"
        log_error(f"vibatch {system} {hook}", e)
        print(f"vibatch: {system} {hook} failed (node fault): {message} (the traceback is in "
              "the error log)", file=out)
    finally:
        if alarm_s:
            signal.alarm(0)
    outcome = classify(exc)
    if on_fault is not None and outcome is not Outcome.OK:
        try:
            on_fault(outcome, message)
        except Exception as e:  # noqa: BLE001 - the hook's exit code matters more
            print(f"vibatch: {system} {hook}: could not record the failure: {e}", file=out)
    out.flush()
    return table[outcome]


class UnreadableRequest(JobError):
    """The job's request could not be read: until it has been, a failure is the job's."""


def read_request(job: "BatchJob | Callable[[], BatchJob]"):
    """The core's request from an adapter's ``BatchJob`` (or from a parser of the job's values,
    called here). Until the request is known valid, every value in it may be the user's: an
    unexpected exception while reading it is the job's fault, not the node's. The node's own
    failures (a NodeError from a parser: the batch system broke its contract) stay the node's."""
    from ..request import make_request  # noqa: PLC0415
    try:
        if callable(job):
            job = job()
        return make_request(job_id=job.job_id, user=job.user, cores=job.cores,
                            memory_mb=job.memory_mb, image=job.image, workdir=job.workdir,
                            walltime_s=job.walltime_s, cpus=job.cpus, queue=job.queue,
                            account=job.account)
    except VibatchError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
            UnicodeError, RecursionError) as e:
        raise UnreadableRequest(f"cannot read this job's request: {type(e).__name__}: {e}") from e


def prologue(cfg, job: "BatchJob | Callable[[], BatchJob]", holder: Optional[int] = None) -> dict:
    from .. import lifecycle  # noqa: PLC0415
    req = read_request(job)
    node = lifecycle.Node(cfg)
    try:
        return lifecycle.prologue(node, req, holder=holder)
    finally:
        node.close()


def epilogue(cfg, job_id: str, exit_code: Optional[int]) -> None:
    from .. import lifecycle  # noqa: PLC0415
    node = lifecycle.Node(cfg)
    try:
        lifecycle.epilogue(node, job_id, exit_code)
    finally:
        node.close()


def exec_job(cfg, job_id: str, argv: Sequence[str], script: Optional[str] = None,
             drop_first_line: bool = False, interpreter: Optional[str] = None,
             shell: Optional[str] = None) -> int:
    """The job starter's part: run the job in its VM, as the job user. ``script`` is a host
    file the guest cannot see (the batch system's spool copy of the job script): its text is
    handed to the guest and run with ``argv`` as its arguments (by ``interpreter``, a path in
    the guest, if given; else by its own ``#!`` line, or by ``shell`` if it has none). If the
    prologue refused the job, say why, in the job's own error output, and fail it."""
    from ..execjob import Exec  # noqa: PLC0415
    why = read_refusal(cfg, job_id)
    if why is not None:
        print(f"vibatch: this job cannot run: {why}", file=sys.stderr)
        return REFUSED_EXIT
    ex = Exec(cfg, job_id)
    if script is None:
        return ex.run(list(argv))
    with open(script, "rb") as f:
        text = f.read()
    if drop_first_line:
        text = text.split(b"\n", 1)[1] if b"\n" in text else b""
    if interpreter is None and not text.startswith(b"#!"):
        interpreter = shell
    return ex.run_script(text, list(argv), interpreter=interpreter)


REFUSED_EXIT = 125


def _refusal_path(cfg, job_id: str) -> str:
    from ..request import check_job_id  # noqa: PLC0415
    return os.path.join(cfg.run_dir, "refused", check_job_id(job_id))


def record_refusal(cfg, job_id: str, user: str, message: str) -> None:
    """Leave the prologue's reason for refusing a job where the job's starter (running as the
    job user) finds it: for systems whose prologue cannot fail one job without taking the node
    out (Slurm drains a node whose Prolog fails). Root's, readable by the job's user only."""
    from ..errors import UnknownUser  # noqa: PLC0415
    from ..request import resolve_user  # noqa: PLC0415
    from ..util import atomic_write  # noqa: PLC0415
    path = _refusal_path(cfg, job_id)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    atomic_write(path, (message.strip() + "\n").encode(), mode=0o400)
    try:
        ju = resolve_user(user)
        os.chown(path, ju.uid, ju.gid)
    except UnknownUser:
        os.chmod(path, 0o444)   # no such user (or root): no job of theirs runs anyway


def read_refusal(cfg, job_id: str) -> Optional[str]:
    try:
        with open(_refusal_path(cfg, job_id), "rb") as f:
            return f.read(64 * 1024).decode(errors="replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return "the prologue refused it (its reason is not readable by this user)"


def clear_refusal(cfg, job_id: str) -> None:
    try:
        os.unlink(_refusal_path(cfg, job_id))
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ShimCall:
    hook: str
    args: list
    alarm_s: int
    config_path: str
    helper: str = ""


def parse_shim_args(argv: Sequence[str], default_alarm_s: int) -> ShimCall:
    """``[--alarm S] [--config PATH] [--helper PATH] HOOK ARGS...``, as the shims in
    hooks/<system>/ call us. Paths are written into the shim, never taken from the environment:
    root's hooks run with environments that batch systems partly hand over to the job's user."""
    from .. import config as config_mod  # noqa: PLC0415
    argv = list(argv)
    opts = {"--alarm": str(default_alarm_s), "--config": config_mod.DEFAULT_PATH, "--helper": ""}
    while len(argv) >= 2 and argv[0] in opts:
        opts[argv[0]] = argv[1]   # --alarm: the batch system's own hook timeout, if set
        argv = argv[2:]
    return ShimCall(argv[0] if argv else "", argv[1:], int(opts["--alarm"]), opts["--config"],
                    opts["--helper"])


def requestable_names(cfg) -> set[str]:
    """Image names and aliases: what a node property or feature may name to pick an image."""
    from ..library import Library  # noqa: PLC0415
    return set(cfg.images.aliases) | set(Library(cfg.library_dir, cfg.state_dir).names())


def home_of(user: str) -> str:
    import pwd  # noqa: PLC0415
    try:
        return pwd.getpwnam(user).pw_dir or "/"
    except KeyError:
        return "/"


def clean_env_path() -> None:
    """A root hook's first act: the environment it was given (partly the job user's) is
    emptied and its limits lifted (hygiene.enter_root_hook). Callers copy what they read first."""
    from ..hygiene import enter_root_hook  # noqa: PLC0415
    enter_root_hook()
