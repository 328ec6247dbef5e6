"""What an admin watches: a Prometheus textfile and one log line per hook phase.

- ``observed(hook)`` wraps ``lifecycle.prologue``/``epilogue``: after each run it logs one
  key=value line per phase (``logs.phases``), adds the durations and any failure to bounded
  counters in ``<state_dir>/metrics.json`` (under a root lock with a timeout) and rewrites the
  textfile (``metrics.textfile``). All of it is best effort: an error goes to the error log,
  never to the job.
- ``render(cfg)`` builds the textfile from the counters and the node's state (jobs, slots, the
  library, the catalogs); ``write(cfg)`` writes it atomically (``vibatch metrics``, for cron).

Every metric is listed in docs/operations.md.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import syslog
import time
from typing import Any, Callable, Optional

from ..config import Config
from ..errors import fault_of
from ..images.library import Library
from ..util import (append_log, atomic_write, atomic_write_json, hold, log_error, read_json,
                    root_lock)
from . import jobstore
from .node import capacity
from .slots import SlotAllocator

BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
MAX_SERIES = 200          # phase and failure series kept in the counters file, at most
COUNTERS_LOCK_S = 2.0     # a hook waits this long for the counters, then skips them
PHASE_LOG_MAX = 64 << 20
_ATTR = "vibatch_phases"  # set on a prologue's exception: the phases it went through


def start_kind(result: Any) -> str:
    """``warm`` (restored from a template) or ``cold`` (booted from its image): the prologue's
    JobState or the epilogue's record say which; a failed run counts as cold."""
    start = result.get("start") if isinstance(result, dict) else getattr(result, "start", None)
    return "warm" if start == "warm" else "cold"


# --- the hooks' side -----------------------------------------------------------------------
def observed(hook: str) -> Callable:
    """Decorate ``prologue(node, req, ...)`` or ``epilogue(node, job_id, ...)``."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(node: Any, job: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                result = fn(node, job, *args, **kwargs)
            except BaseException as exc:
                _observe(node.cfg, hook, getattr(job, "job_id", job), None, exc,
                         time.monotonic() - t0)
                raise
            _observe(node.cfg, hook, getattr(job, "job_id", job), result, None,
                     time.monotonic() - t0)
            return result
        return inner
    return wrap


def note_phases(exc: BaseException, phases: dict) -> None:
    """Keep the phases a failed prologue went through on its exception, for ``observed``."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _ATTR, dict(phases))


def _observe(cfg: Config, hook: str, job_id: str, result: Any, exc: Optional[BaseException],
             seconds: float) -> None:
    try:
        phases, failure = _outcome(hook, result, exc)
        start = start_kind(result)
    except Exception as e:  # noqa: BLE001 - metrics never fail a job
        log_error(f"metrics after the {hook} of job {job_id}", e)
        return
    for step in (lambda: log_phases(cfg, hook, str(job_id), phases, seconds, failure, result,
                                    start),
                 lambda: count(cfg, hook, phases, seconds, failure, start),
                 lambda: write(cfg)):
        try:   # each on its own: a log that cannot be written still leaves the counters
            step()
        except Exception as e:  # noqa: BLE001 - metrics never fail a job
            log_error(f"metrics after the {hook} of job {job_id}", e)


def _outcome(hook: str, result: Any, exc: Optional[BaseException]
             ) -> tuple[dict, Optional[tuple[str, str, str]]]:
    """(phase -> seconds, (fault, reason, message) or None)."""
    if exc is None:
        if hook == "prologue":
            return dict(result.phases), None
        return ({"teardown": result["phases"]["epilogue"]} if result else {}), None
    message = getattr(exc, "message", str(exc))   # not ours (a bug, a signal): the node's fault
    return dict(getattr(exc, _ATTR, {})), (str(fault_of(exc)), type(exc).__name__, message)


def log_phases(cfg: Config, hook: str, job_id: str, phases: dict, seconds: float,
               failure: Optional[tuple[str, str, str]], result: Any = None,
               start: str = "cold") -> None:
    """One line per phase and one for the outcome, each with ``job=`` and ``start=``."""
    where = cfg.logs.phases
    if not where:
        return
    lines = [kv(job=job_id, hook=hook, phase=name, seconds=f"{secs:.3f}", start=start)
             for name, secs in phases.items()]
    end: dict[str, Any] = {"job": job_id, "hook": hook, "result": "ok", "seconds": f"{seconds:.3f}"}
    if failure:
        end.update(result="failed", phase=list(phases)[-1] if phases else "claim",
                   fault=failure[0], reason=failure[1], message=failure[2])
    elif hook == "prologue":
        end.update(image=result.image, accel=result.accel, cpus=",".join(map(str, result.cpus)),
                   memory_mb=result.memory_mb, start=start)
    elif result is None:
        end["result"] = "nothing"     # nothing ran for this job here
    else:
        end.update(exit_code=result.get("exit_code"), vm_end=result.get("vm_end"))
    lines.append(kv(**end))
    if where == "syslog":
        syslog.openlog("vibatch", syslog.LOG_PID, syslog.LOG_DAEMON)
        for line in lines:
            syslog.syslog(syslog.LOG_ERR if failure and line is lines[-1] else syslog.LOG_INFO,
                          line)
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    append_log(where, "".join(f"ts={stamp} {line}\n" for line in lines), PHASE_LOG_MAX, 0o640)


def kv(**fields: Any) -> str:
    """key=value pairs; a value with a space, a quote or an = is double-quoted (logfmt)."""
    out = []
    for key, value in fields.items():
        text = "" if value is None else str(value)
        text = text.replace("\n", " ").replace("\r", " ")[:500]
        if not text or any(c in text for c in ' "=\\'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return " ".join(out)


# --- bounded counters -----------------------------------------------------------------------
def counters_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "metrics.json")


def _empty() -> dict:
    return {"version": 1, "histograms": {}, "failures": {}, "runs": {}}


def count(cfg: Config, hook: str, phases: dict, seconds: float,
          failure: Optional[tuple[str, str, str]], start: str = "cold") -> None:
    lock = root_lock(os.path.join(cfg.state_dir, "metrics.lock"), COUNTERS_LOCK_S)
    with hold(lock):
        c = read_counters(cfg)
        hists = c["histograms"]
        series = []   # durations of successful runs only: a timeout is not a slow boot
        if not failure:
            if hook == "prologue":
                series = [(f"prologue_phase|{name}|{start}", secs)
                          for name, secs in phases.items()]
            series.append((f"{hook}|total|{start}", seconds))
        for key, secs in series:
            if key not in hists and len(hists) >= MAX_SERIES:
                continue
            h = hists.setdefault(key, {"buckets": [0] * len(BUCKETS), "count": 0, "sum": 0.0})
            for i, bound in enumerate(BUCKETS):
                if secs <= bound:
                    h["buckets"][i] += 1
            h["count"] += 1
            h["sum"] = round(h["sum"] + secs, 4)
        result = "ok" if not failure else "failed"
        c["runs"][f"{hook}|{result}"] = c["runs"].get(f"{hook}|{result}", 0) + 1
        if failure:
            key = f"{hook}|{failure[0]}|{failure[1]}"
            if key not in c["failures"] and len(c["failures"]) >= MAX_SERIES:
                key = f"{hook}|{failure[0]}|other"
            c["failures"][key] = c["failures"].get(key, 0) + 1
        atomic_write_json(counters_path(cfg), c)


def read_counters(cfg: Config) -> dict:
    try:
        c = read_json(counters_path(cfg), None)
    except ValueError:
        c = None
    if not isinstance(c, dict) or c.get("version") != 1 or \
            not all(isinstance(c.get(k), dict) for k in ("histograms", "failures", "runs")):
        return _empty()   # absent or damaged: counting starts again (counters may reset)
    return c


# --- the textfile ---------------------------------------------------------------------------
def textfile_path(cfg: Config) -> str:
    """Where the textfile goes ("" for none)."""
    path = cfg.metrics.textfile
    return path if not path or os.path.isabs(path) else os.path.join(cfg.state_dir, path)


def write(cfg: Config) -> Optional[str]:
    """Rewrite the textfile atomically (world-readable: node_exporter is not root)."""
    path = textfile_path(cfg)
    if not path:
        return None
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    atomic_write(path, render(cfg).encode(), mode=0o644)
    return path


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: Any) -> None:
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def render(cfg: Config, now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    t = _Text()
    _jobs_and_slots(cfg, t)
    _histograms(cfg, t)
    _images(cfg, t, now)
    _catalogs(cfg, t)
    t.family("vibatch_metrics_written_timestamp_seconds", "gauge", "When this file was written.")
    t.sample("vibatch_metrics_written_timestamp_seconds", round(now, 3))
    return "\n".join(t.lines) + "\n"


def _jobs_and_slots(cfg: Config, t: _Text) -> None:
    by_phase: dict[str, int] = {p: 0 for p in jobstore.PHASES}
    for _paths, st in jobstore.records(cfg):
        phase = st.phase if st else "unknown"
        by_phase[phase] = by_phase.get(phase, 0) + 1
    t.family("vibatch_jobs_running", "gauge", "Jobs whose VM is ready (between prologue and "
             "epilogue).")
    t.sample("vibatch_jobs_running", by_phase[jobstore.READY])
    t.family("vibatch_jobs", "gauge", "Job records on this node by phase.")
    for phase, n in sorted(by_phase.items()):
        t.sample("vibatch_jobs", n, phase=phase)
    slots = SlotAllocator(cfg.state_dir, capacity(cfg), cfg.lock_timeout_s)
    held = slots.all().values()
    cap = slots.capacity
    used_cpus = {c for s in held for c in s.cpus}
    used_mem = sum(s.memory_mb for s in held)
    for name, help_, value in (
            ("vibatch_slot_cpus", "CPUs this node gives jobs.", len(cap.cpus)),
            ("vibatch_slot_cpus_free", "CPUs no job holds.",
             len([c for c in cap.cpus if c not in used_cpus])),
            ("vibatch_slot_memory_bytes", "Memory this node gives jobs.", cap.memory_mb << 20),
            ("vibatch_slot_memory_free_bytes", "Memory no job holds.",
             max(0, cap.memory_mb - used_mem) << 20)):
        t.family(name, "gauge", help_)
        t.sample(name, value)


def _histograms(cfg: Config, t: _Text) -> None:
    c = read_counters(cfg)
    families = {
        "prologue_phase": ("vibatch_prologue_phase_seconds", "Prologue phases' durations."),
        "prologue": ("vibatch_prologue_seconds", "Whole successful prologues' durations."),
        "epilogue": ("vibatch_epilogue_seconds", "Whole successful epilogues' durations."),
    }
    grouped: dict[str, list] = {}
    for key, h in sorted(c["histograms"].items()):
        parts = key.split("|")
        if len(parts) == 3 and parts[0] in families:
            grouped.setdefault(parts[0], []).append((parts[1], parts[2], h))
    for fam, (name, help_) in families.items():
        t.family(name, "histogram", help_ + " start: cold (booted from the image) or warm.")
        for phase, start, h in grouped.get(fam, []):
            labels = {"phase": phase, "start": start} if fam == "prologue_phase" else \
                {"start": start}
            for bound, n in zip(BUCKETS, h["buckets"]):
                t.sample(name + "_bucket", n, **labels, le=_num(float(bound)))
            t.sample(name + "_bucket", h["count"], **labels, le="+Inf")
            t.sample(name + "_sum", float(h["sum"]), **labels)
            t.sample(name + "_count", h["count"], **labels)
    t.family("vibatch_hook_runs_total", "counter", "Prologues and epilogues run, by result.")
    for key, n in sorted(c["runs"].items()):
        hook, result = key.split("|")
        t.sample("vibatch_hook_runs_total", n, hook=hook, result=result)
    t.family("vibatch_failures_total", "counter", "Failed prologues and epilogues, by fault class "
             "(job or node) and reason (the error's class, docs/exit-codes.md).")
    for key, n in sorted(c["failures"].items()):
        hook, fault, reason = key.split("|")
        t.sample("vibatch_failures_total", n, hook=hook, fault=fault, reason=reason)


def _images(cfg: Config, t: _Text, now: float) -> None:
    lib = Library(cfg.library_dir, cfg.state_dir, cfg.lock_timeout_s)
    images = lib.images()
    t.family("vibatch_image_info", "gauge", "The library's images (1 each).")
    for img in images:
        t.sample("vibatch_image_info", 1, image=img.name, version=img.version, os=img.os,
                 os_version=img.os_version, boot=img.boot)
    t.family("vibatch_image_verify_age_seconds", "gauge", "Seconds since the image's files were "
             "last hashed in full (absent: never with their present identity).")
    for img in images:
        when = lib.last_verified(img)
        if when is not None:
            t.sample("vibatch_image_verify_age_seconds", round(max(0.0, now - when), 3),
                     image=img.name)
    quarantine = read_json(lib.quarantine_path, {}) or {}
    t.family("vibatch_image_quarantined", "gauge", "Library versions quarantined (1 each): no job "
             "uses them.")
    for version, q in sorted(quarantine.items()):
        t.sample("vibatch_image_quarantined", 1, image=(q or {}).get("name", "?"), version=version)
    t.family("vibatch_images_quarantined", "gauge", "How many library versions are quarantined.")
    t.sample("vibatch_images_quarantined", len(quarantine))


def _catalogs(cfg: Config, t: _Text) -> None:
    from ..images.sync import state_path  # noqa: PLC0415 - sync loads the catalog's crypto
    try:
        known = read_json(state_path(cfg), {}) or {}
    except ValueError:
        known = {}
    for name, key, help_ in (
            ("vibatch_catalog_serial", "serial", "The last catalog serial accepted from a URL."),
            ("vibatch_catalog_expiry_timestamp_seconds", "expires_at",
             "When that catalog expires."),
            ("vibatch_catalog_accepted_timestamp_seconds", "accepted_at",
             "When that serial was first accepted."),
            ("vibatch_catalog_sync_timestamp_seconds", "synced_at",
             "When `vibatch image sync` last accepted a catalog from the URL.")):
        t.family(name, "gauge", help_)
        for url, entry in sorted(known.items()):
            if isinstance(entry, dict) and isinstance(entry.get(key), (int, float)):
                t.sample(name, entry[key], url=url)
