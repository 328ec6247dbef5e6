"""The shape of a batch-system adapter (``BatchSystem``) and the one runner of every hook
(``main``).

A system's hooks are called by shims in ``hooks/<system>/`` as
``python -I -m vibatch.batch.<system> [--alarm S] [--config PATH] [--helper PATH] HOOK ARGS...``.
``main`` does for every system what every hook needs:

- reads the shim's arguments (paths are written into the shim, never taken from the
  environment) and copies the environment it was given, to be read as data;
- a **root hook** (the prologue and epilogue): checks its command line, empties its environment
  and lifts its limits (hygiene.enter_root_hook) before the core, and so libvirt, is imported;
  loads the config once; runs the hook under its deadline, below the batch system's own; maps
  the fault (errors.Fault) to the system's exit code in its one table ``EXIT``;
- the **starter** (as the job user): runs the job in its VM; if it could not, prints why in the
  job's own error output and exits with the table's code for that.

An adapter says only what is its own: where the job's request comes from (``job_from_hook``),
the epilogue's job id and exit code, the starter's job id and how it starts the job, its exit
codes, and the ``vibatch image offer`` formats it reads.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .. import config as config_mod
from ..config import Config
from ..errors import Fault, NodeError, VibatchError, fault_of
from ..hygiene import enter_root_hook
from ..core.request import JobRequest
from ..util import log_error
from .kit import STARTER_FAILED, clear_refusal, exec_job, record_refusal

AS_IS = None     # in an exit table: the job's own exit status (a starter that ran the job)
Exits = dict     # {None: on success, Fault.JOB: ..., Fault.NODE: ...}


def exits(ok: Optional[int], job: int, node: int) -> Exits:
    """One hook's row of a system's exit-code table."""
    return {None: ok, Fault.JOB: job, Fault.NODE: node}


class HookTimeout(NodeError):
    """The hook's own deadline, set below the batch system's so we clean up before it kills us."""


def _enter_root() -> None:
    enter_root_hook()
    os.chdir("/")   # batch systems start hooks in a directory the job's user may own


def _real_core(cfg: Config) -> Any:
    from .core import Core  # noqa: PLC0415 - only after the hook's hygiene: it imports libvirt
    return Core(cfg)


@dataclass
class Call:
    """One call of a hook, as the shim made it."""

    hook: str
    args: list[str]
    alarm_s: int           # the shim's --alarm; 0: not given (see ``alarm``)
    config_path: str
    helper: str = ""
    env: dict[str, str] = field(default_factory=dict)   # as the hook got it, before hygiene
    cwd: str = ""
    started: float = field(default_factory=time.monotonic)
    # the ports: tests run main() without emptying their own environment, on a fake core
    enter_root: Callable[[], None] = _enter_root
    make_core: Callable[[Config], Any] = _real_core
    _cfg: Optional[Config] = None

    def alarm(self, default_s: int) -> int:
        """The hook's alarm: the shim's ``--alarm``, else the config's ``batch.hook_alarm_s``,
        else ``default_s`` (also when the config cannot be read: the hook reports that)."""
        if self.alarm_s:
            return self.alarm_s
        try:
            return self.cfg().batch.hook_alarm_s or default_s
        except VibatchError:
            return default_s

    def cfg(self) -> Config:
        """The config, loaded once per call."""
        if self._cfg is None:
            self._cfg = config_mod.load(self.config_path)
        return self._cfg


def parse_call(argv: Sequence[str], **ports: Any) -> Call:
    """``[--alarm S] [--config PATH] [--helper PATH] HOOK ARGS...``, as the shims call us. Paths
    are written into the shim, never taken from the environment: root's hooks run with
    environments that batch systems partly hand over to the job's user."""
    argv = list(argv)
    opts = {"--alarm": "0", "--config": config_mod.DEFAULT_PATH, "--helper": ""}
    while len(argv) >= 2 and argv[0] in opts:
        opts[argv[0]] = argv[1]   # --alarm: the batch system's own hook timeout, if set
        argv = argv[2:]
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = ""
    return Call(argv[0] if argv else "", argv[1:], int(opts["--alarm"]), opts["--config"],
                opts["--helper"], dict(os.environ), cwd, **ports)


class BatchSystem:
    """One batch system. Subclasses set the attributes and implement what their system has."""

    name = ""
    EXIT: dict[str, Exits] = {}          # the system's one exit-code table: hook -> row
    prologue_hook = "prolog"
    epilogue_hook = "epilog"
    starter_hook: Optional[str] = "starter"
    other_starters: tuple[str, ...] = ()  # more hooks that run a job's part as its user
    starter_label = "starter"            # how the starter's failures are introduced
    default_alarm_s = 600                # without --alarm or batch.hook_alarm_s
    margin_s = 0                         # finish (and clean up) this long before that alarm
    keeps_refusals = False               # a job's fault exits 0 and the starter fails the job
    offer_formats: dict[str, Callable[[Sequence[str]], str]] = {}
    usage = ""

    # -- what every system says --------------------------------------------------------------
    def job_from_hook(self, cfg: Config, argv: Sequence[str], env: dict) -> JobRequest:
        """The prologue's job request (through kit.read_request and request.make_request)."""
        raise NotImplementedError

    def job_of(self, argv: Sequence[str], env: dict) -> tuple[str, str]:
        """(job id, user) of a prologue or epilogue call, for its records."""
        raise NotImplementedError

    def epilogue_exit_code(self, argv: Sequence[str], env: dict) -> Optional[int]:
        """The job's exit code as the epilogue is told it (None: unknown)."""
        return None

    def epilogue_status(self, argv: Sequence[str], env: dict) -> tuple[Optional[int],
                                                                       Optional[int]]:
        """(exit code, signal): the signal that ended the job where the system says so
        separately (Slurm's ``rc:signal``), else None."""
        return self.epilogue_exit_code(argv, env), None

    def starter_job_id(self, env: dict) -> str:
        raise NotImplementedError

    # -- what some systems add ---------------------------------------------------------------
    def start(self, call: Call) -> int:
        """The starter: run the job in its VM, as the job user."""
        return exec_job(call.cfg(), self.starter_job_id(call.env), call.args)

    def check_args(self, hook: str, argv: Sequence[str]) -> Optional[str]:
        """What is wrong with a root hook's command line (a node fault), if anything."""
        return None

    def enter_root_hook(self, hook: str) -> None:
        """After hygiene: undo whatever else this system hands its root hooks."""

    def after_prologue(self, cfg: Config, req: JobRequest) -> None:
        pass

    # -- reap's question: does the job still exist? ------------------------------------------
    def asking_env(self, env: dict, argv: Sequence[str] = ()) -> dict:
        """What of the prologue's environment (and argv) ``job_gone`` and ``adopter`` will
        need (kept in the record)."""
        return {}

    def job_gone(self, job_id: str, env: dict) -> Optional[bool]:
        """True if the system says the job no longer exists (its epilogue was lost), False if
        it still does, None if it cannot be asked or cannot tell (then reap leaves it)."""
        return None

    def drain_time(self, env: dict) -> Optional[int]:
        """When the system will take this node away (epoch seconds), if it says so; None if it
        does not, or cannot be asked (``vibatch drain --sync``)."""
        return None

    def before_epilogue(self, cfg: Config, job_id: str, exit_code: Optional[int]) -> None:
        pass

    # -- the batch system's view of the VM (core/adopt.py) ----------------------------------
    def adopter(self, cfg: Config, job_id: str, env: dict
                ) -> Optional[Callable[[Sequence[int]], None]]:
        """How to hand the job's VM processes (QEMU and its helpers, by pid) to this system
        so that it accounts and suspends them as the job's; None if it needs nothing more.
        Called in the prologue's own process (``cfg``: its configuration).
        The callable runs in a detached root child, after the prologue has returned, and
        raises on failure (logged)."""
        return None

    def after_node_fault(self, call: Call, exc: BaseException, message: str) -> Optional[int]:
        """A node fault in the prologue; returns the exit code if not the table's."""
        return None

    def other_hook(self, call: Call) -> Optional[int]:
        """A hook of this system's own shape (None: there is no such hook)."""
        return None

    def deadline_s(self, call: Call) -> int:
        return max(5, call.alarm(self.default_alarm_s) - self.margin_s)


def run_hook(system: str, hook: str, body: Callable[[], None], table: Exits,
             alarm_s: Optional[int] = None, out=None,
             on_fault: Optional[Callable[[Fault, str, BaseException], None]] = None) -> int:
    """Run ``body``; report any failure in one line (plus detail) and return ``table``'s code.
    ``on_fault(fault, message, exc)`` runs after a failure, e.g. to leave the message for the
    job."""
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
        print(f"vibatch: {system} {hook} failed ({e.fault} fault): {e.message}", file=out)
        if e.detail:
            print(e.detail.rstrip("\n"), file=out)
    except Exception as e:  # noqa: BLE001 - an unexpected bug is the node's, never the user's
        exc, message = e, f"unexpected {type(e).__name__}: {e}"
        log_error(f"vibatch {system} {hook}", e)
        print(f"vibatch: {system} {hook} failed (node fault): {message} (the traceback is in "
              "the error log)", file=out)
    finally:
        if alarm_s:
            signal.alarm(0)
    fault = None if exc is None else fault_of(exc)
    if on_fault is not None and exc is not None:
        try:
            on_fault(fault, message, exc)
        except Exception as e:  # noqa: BLE001 - the hook's exit code matters more
            print(f"vibatch: {system} {hook}: could not record the failure: {e}", file=out)
    out.flush()
    return table[fault]


def run_root(system: BatchSystem, call: Call, body: Callable[[Any], None], alarm_s: int,
             on_fault: Optional[Callable[[Fault, str, BaseException], None]] = None,
             what: Optional[str] = None) -> int:
    """A root hook: hygiene first, then the core (one per call), then ``body(core)`` under the
    deadline, its fault mapped by the system's table."""
    call.enter_root()
    system.enter_root_hook(call.hook)

    def run() -> None:
        core = call.make_core(call.cfg())
        try:
            body(core)
        finally:
            core.close()

    return run_hook(system.name, what or call.hook, run, system.EXIT[call.hook],
                    alarm_s=alarm_s, on_fault=on_fault)


def _prologue(system: BatchSystem, call: Call, core: Any) -> None:
    cfg = call.cfg()
    req = system.job_from_hook(cfg, call.args, call.env)
    if system.keeps_refusals:
        clear_refusal(cfg, req.job_id)
    core.prologue(req, batch=system.name, batch_env=system.asking_env(call.env, call.args))
    system.after_prologue(cfg, req)


def _epilogue(system: BatchSystem, call: Call, core: Any) -> None:
    cfg = call.cfg()
    job_id, _ = system.job_of(call.args, call.env)
    if not job_id:
        return
    code, signum = system.epilogue_status(call.args, call.env)
    if system.keeps_refusals:
        clear_refusal(cfg, job_id)
    system.before_epilogue(cfg, job_id, code)
    core.epilogue(job_id, code, signum)


def _root_hook(system: BatchSystem, call: Call) -> int:
    problem = system.check_args(call.hook, call.args)
    if problem:
        print(f"vibatch: {system.name} {call.hook}: {problem}", file=sys.stderr)
        return system.EXIT[call.hook][Fault.NODE]
    if call.hook == system.epilogue_hook:
        return run_root(system, call, lambda core: _epilogue(system, call, core),
                        system.deadline_s(call))
    codes: dict[str, int] = {}

    def on_fault(fault: Fault, message: str, exc: BaseException) -> None:
        if fault is Fault.JOB and system.keeps_refusals:
            job_id, user = system.job_of(call.args, call.env)
            record_refusal(call.cfg(), job_id, user, message)
        elif fault is Fault.NODE:
            code = system.after_node_fault(call, exc, message)
            if code is not None:
                codes["code"] = code

    code = run_root(system, call, lambda core: _prologue(system, call, core),
                    system.deadline_s(call), on_fault=on_fault)
    return codes.get("code", code)


def _starter(system: BatchSystem, call: Call) -> int:
    """As the job user, with the job's environment: the job's own status, or the table's code
    (and why, in the job's error output) if it could not be run."""
    try:
        return system.start(call)
    except Exception as e:  # noqa: BLE001 - report in the job's output, fail the job
        print(f"vibatch: {system.name} {system.starter_label}: {e}", file=sys.stderr)
        return system.EXIT[call.hook][fault_of(e)]


def main(system: BatchSystem, argv: Optional[Sequence[str]] = None, **ports: Any) -> int:
    """Every hook of every system (``ports``: tests' stand-ins for Call.enter_root and
    Call.make_core)."""
    call = parse_call(sys.argv[1:] if argv is None else argv, **ports)
    if call.hook == system.starter_hook or call.hook in system.other_starters:
        return _starter(system, call)
    if call.hook in (system.prologue_hook, system.epilogue_hook):
        return _root_hook(system, call)
    code = system.other_hook(call)
    if code is not None:
        return code
    print(f"usage: python -I -m vibatch.batch.{system.name} {system.usage}", file=sys.stderr)
    return 2


def exit_table_markdown(system: BatchSystem) -> str:
    """The system's exit-code table as docs/batch/<system>.md prints it."""
    def show(code: Optional[int]) -> str:
        return "the job's own" if code is AS_IS else str(code)
    lines = ["| hook | success | job's fault | node's fault |", "|---|---|---|---|"]
    for hook, row in system.EXIT.items():
        lines.append(f"| {hook} | {show(row[None])} | {show(row[Fault.JOB])} | "
                     f"{show(row[Fault.NODE])} |")
    return "\n".join(lines) + "\n"


__all__ = ["AS_IS", "STARTER_FAILED", "BatchSystem", "Call", "Exits", "HookTimeout", "exits",
           "exit_table_markdown", "main", "parse_call", "run_hook", "run_root"]
