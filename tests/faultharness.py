"""vibatch's fault-injection harness: kill, stop and race the prologue, epilogue and reap on
real VMs, and after every trial check that nothing is left and no record is lost or doubled.

    # the long run (root, after etc/setup-node.sh; records its result for docs/testing.md)
    /opt/vibatch/venv/bin/python tests/faultharness.py --trials 1000 [--seed N]

tests/test_faults.py runs one trial of each kind in the suite. A trial runs the real CLI in
subprocesses; a fault point (vibatch/core/faultpoints.py) is armed only in the harness's own child
process, through ``python -c``, never through the environment. Waits poll an observable (the
job's record, libvirt, a process state) with a deadline; none sleeps to synchronise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import psutil

PROLOGUE_POINTS = ("reserved", "slot", "overlay", "domain", "booted", "set_up")
TEARDOWN_POINTS = ("ending", "vm_ended", "record_kept", "accounted", "removed")
NODE_FAULTS = set(range(20, 28))
ARMED_CLI = ("import signal, sys\n"
             "if sys.argv[1]:\n"
             "    import vibatch.core.faultpoints as f; f.ARMED = sys.argv[1]; "
             "f.ACTION = getattr(signal, sys.argv[2])\n"
             "from vibatch.commands.cli import main; sys.exit(main(sys.argv[3:]))")


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Harness:
    config_path: str
    user: str
    workdir: str
    prefix: str
    python: str = sys.executable
    pythonpath: str = ""      # another vibatch tree for the CLI (e.g. an older commit)
    started: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from vibatch import config
        self.cfg = config.load(self.config_path)
        self.n = 0

    # -- running the CLI ---------------------------------------------------------------------
    def job(self, kind: str) -> str:
        self.n += 1
        return f"{self.prefix}-{self.n}{kind[:3]}"

    def popen(self, *args: str, armed: Optional[str] = None, action: str = "SIGKILL",
              env: Optional[dict] = None) -> subprocess.Popen:
        argv = [self.python, "-c", ARMED_CLI, armed or "", action, "--config", self.config_path,
                *args]
        env = env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        if self.pythonpath:
            env = {**env, "PYTHONPATH": self.pythonpath}
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env,
                             cwd="/", start_new_session=True)
        self.started.append(p)
        return p

    def prologue(self, job: str, **kw) -> subprocess.Popen:
        return self.popen("prologue", "--job", job, "--user", self.user, "--cores", "1",
                          "--memory", "256M", "--workdir", self.workdir, **kw)

    def epilogue(self, job: str, **kw) -> subprocess.Popen:
        return self.popen("epilogue", "--job", job, **kw)

    def reap(self, **kw) -> subprocess.Popen:
        return self.popen("reap", **kw)

    @staticmethod
    def run(p: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
        """Wait for a started command (bounded); its exit code, stdout and stderr."""
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err

    # -- observables -------------------------------------------------------------------------
    def state(self, job: str) -> dict:
        try:
            with open(os.path.join(self.cfg.state_dir, "jobs", job, "state.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def phase_at_least(self, job: str, phase: str) -> bool:
        from vibatch.core import jobstore
        st = self.state(job)
        return bool(st) and not jobstore.before(st.get("phase"), phase)

    def domain_pid(self, job: str) -> Optional[int]:
        try:
            with open(f"/run/libvirt/qemu/vibatch-{job}.pid") as f:
                pid = int(f.read())
            return pid if psutil.pid_exists(pid) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def stopped(p: subprocess.Popen) -> bool:
        try:
            return psutil.Process(p.pid).status() == psutil.STATUS_STOPPED
        except psutil.Error:
            return False

    def records(self, job: str) -> list[dict]:
        try:
            with open(self.cfg.accounting_file) as f:
                return [r for r in map(json.loads, f) if r.get("job_id") == job]
        except FileNotFoundError:
            return []

    def leftovers(self, job: str) -> list[str]:
        """Everything of ``job`` that outlived it: empty means nothing."""
        from vmhelp import leftovers   # domain, job directories, refusal, slot, held locks
        cfg, found = self.cfg, leftovers(self, job)
        if os.path.lexists(os.path.join(cfg.state_dir, "orphans", job)):
            found.append("orphan mark")
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if f"guest=vibatch-{job}," in cmd:
                found.append(f"qemu pid {proc.pid}")
            elif ("virtiofsd" in cmd or "vibatch.vm.share" in cmd) and f"/jobs/{job}/" in cmd:
                found.append(f"share launcher pid {proc.pid}")   # before it exec'd virtiofsd
        return found

    def check(self, job: str, records: int | tuple[int, ...]) -> list[str]:
        """The leftover check every trial ends with: nothing left, exactly ``records`` lines."""
        problems = [f"{job}: left {x}" for x in self.leftovers(job)]
        n = len(self.records(job))
        if n not in ((records,) if isinstance(records, int) else records):
            problems.append(f"{job}: {n} accounting lines, expected {records}")
        return problems

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGCONT)
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        self.started.clear()


# ---------------------------------------------------------------------------------------------
# Trials. Each returns a list of problems (empty: the trial passed).
def expect_rc(what: str, got: tuple[int, str, str], allowed: set[int]) -> list[str]:
    rc, _out, err = got
    problems = [] if rc in allowed else [f"{what}: exit {rc}, expected {sorted(allowed)}: {err.strip()[-300:]}"]
    if "Traceback" in err:
        problems.append(f"{what}: printed a traceback")
    return problems


def trial_kill_prologue(h: Harness, point: str, then: str) -> list[str]:
    """SIGKILL the prologue at ``point``; then an epilogue, a reap, or the same job again."""
    job = h.job("kp")
    rc = h.run(h.prologue(job, armed=point))[0]
    problems = [] if rc == -signal.SIGKILL else [f"prologue armed at {point} exited {rc}"]
    got_slot = point != "reserved"
    if then == "reap":
        problems += expect_rc("reap", h.run(h.reap()), {0})
    elif then == "epilogue":
        problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
    else:   # the batch system runs the job again on this node: the leftovers are cleaned first
        problems += expect_rc("second prologue", h.run(h.prologue(job)), {0})
        problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
        return problems + h.check(job, 2 if got_slot else 1)
    return problems + h.check(job, 1 if got_slot else 0)


def trial_kill_undo(h: Harness, point: str) -> list[str]:
    """The prologue is stopped (SIGTERM) once its VM exists; its undo is killed at ``point``;
    a reap finishes the job, accounted once."""
    job = h.job("ku")
    p = h.prologue(job, armed=point)
    wait_for(lambda: h.phase_at_least(job, "domain") or p.poll() is not None, 60, "phase domain")
    p.send_signal(signal.SIGTERM)
    rc = h.run(p)[0]
    problems = [] if rc == -signal.SIGKILL else [f"undo armed at {point}: prologue exited {rc}"]
    problems += expect_rc("reap", h.run(h.reap()), {0})
    return problems + h.check(job, 1)


def trial_kill_epilogue(h: Harness, point: str, then: str) -> list[str]:
    """A ready job's epilogue is killed at ``point``; a rerun or a reap finishes it, once."""
    job = h.job("ke")
    problems = expect_rc("prologue", h.run(h.prologue(job)), {0})
    rc = h.run(h.epilogue(job, armed=point))[0]
    if rc != -signal.SIGKILL:
        problems.append(f"epilogue armed at {point} exited {rc}")
    problems += expect_rc(then, h.run(h.epilogue(job) if then == "epilogue" else h.reap()), {0})
    return problems + h.check(job, 1)


def trial_random_kill(h: Harness, rng: random.Random) -> list[str]:
    """SIGKILL the prologue at a random moment from outside; then a reap."""
    job = h.job("rk")
    p = h.prologue(job)
    delay = rng.uniform(0.0, 6.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=delay)
    slotted = h.phase_at_least(job, "overlay")
    if p.poll() is None:
        p.kill()
    rc = h.run(p)[0]
    problems = expect_rc("reap", h.run(h.reap()), {0})
    if rc == 0 or h.state(job).get("phase") == "ready":
        # it got to ready before the kill: its VM is the job's now, and reap leaves it alone;
        # the batch system's epilogue ends it
        problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
        return problems + h.check(job, 1)
    # a slot claimed between the look and the kill still counts: then its one line is due
    return problems + h.check(job, 1 if slotted else (0, 1))


def trial_qemu_dies_in_boot(h: Harness) -> list[str]:
    job = h.job("qd")
    p = h.prologue(job)
    # in the boot wait: libvirt has started the domain (its UUID is in the record)
    wait_for(lambda: h.state(job).get("uuid") or p.poll() is not None, 60, "the domain")
    pid = h.domain_pid(job)
    if pid is None:
        return [f"prologue ended before its VM existed: {h.run(p)}"]
    os.kill(pid, signal.SIGKILL)
    problems = expect_rc("prologue", h.run(p), {21})
    problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
    return problems + h.check(job, 1)


def _libvirtd_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "libvirtd"]


def start_libvirtd() -> None:
    if not _libvirtd_pids():
        # as etc/setup-node.sh starts it: under vibatch's subreaper
        os.makedirs("/var/log/vibatch", 0o755, exist_ok=True)
        subprocess.run([sys.executable, "-I", "-m", "vibatch.subreaper", "--detach", "--log",
                        "/var/log/vibatch/libvirtd.log", "libvirtd"], check=True,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    import libvirt

    def answers() -> bool:
        try:
            libvirt.open("qemu:///system").close()
            return True
        except libvirt.libvirtError:
            return False
    libvirt.registerErrorHandler(lambda *_a: None, None)
    wait_for(answers, 30, "libvirtd")


def stop_libvirtd() -> None:
    for pid in _libvirtd_pids():
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not _libvirtd_pids(), 30, "libvirtd to exit")


def trial_libvirtd_lost(h: Harness, phase: str) -> list[str]:
    """libvirtd stops while the prologue is at ``phase`` (or before it starts, "start"); the
    prologue fails as a node fault, releases its directories and slot; once libvirtd is back
    a reap destroys whatever VM is left. One accounting line if it got a slot."""
    job = h.job("lv")
    try:
        if phase == "start":
            stop_libvirtd()
            p = h.prologue(job)
        else:
            p = h.prologue(job, armed=phase, action="SIGSTOP")
            wait_for(lambda: h.stopped(p) or p.poll() is not None, 60, f"prologue at {phase}")
            stop_libvirtd()
            os.kill(p.pid, signal.SIGCONT)
        problems = expect_rc("prologue", h.run(p), NODE_FAULTS)
    finally:
        start_libvirtd()
    problems += [f"{job}: left {x}" for x in h.leftovers(job)
                 if x not in ("domain", "orphan mark")
                 and not x.startswith(("qemu", "virtiofsd", "share launcher"))]
    problems += expect_rc("reap", h.run(h.reap()), {0})
    return problems + h.check(job, 1)   # it claimed its slot before it needed libvirt


def trial_same_job_race(h: Harness) -> list[str]:
    """Two prologues for one job id at once: one wins, the other gets 16 and touches nothing;
    the winner's VM and slot are intact."""
    job = h.job("rc")
    a, b = h.prologue(job), h.prologue(job)
    results = sorted([h.run(a)[0], h.run(b)[0]])
    problems = [] if results == [0, 16] else [f"racing prologues exited {results}"]
    if 0 in results:
        problems += _works(h, job)
    problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
    return problems + h.check(job, 1)


def trial_stopped_prologue(h: Harness, point: str) -> list[str]:
    """A prologue is stopped at ``point`` while a reap and a second prologue for its job run:
    neither touches it; resumed, it finishes."""
    job = h.job("sp")
    p = h.prologue(job, armed=point, action="SIGSTOP")
    wait_for(lambda: h.stopped(p) or p.poll() is not None, 60, f"prologue at {point}")
    problems = expect_rc("reap", h.run(h.reap()), {0})
    problems += expect_rc("second prologue", h.run(h.prologue(job)), {16})
    os.kill(p.pid, signal.SIGCONT)
    problems += expect_rc("stopped prologue", h.run(p), {0})
    problems += _works(h, job)
    problems += expect_rc("epilogue", h.run(h.epilogue(job)), {0})
    return problems + h.check(job, 1)


def trial_teardown_race(h: Harness, other: str) -> list[str]:
    """An epilogue and (another epilogue | a reap) of one ready job at once: one record."""
    job = h.job("tr")
    problems = expect_rc("prologue", h.run(h.prologue(job)), {0})
    a = h.epilogue(job)
    b = h.epilogue(job) if other == "epilogue" else h.reap()
    problems += expect_rc("epilogue", h.run(a), {0}) + expect_rc(other, h.run(b), {0})
    return problems + h.check(job, 1)


def trial_epilogue_during_prologue(h: Harness) -> list[str]:
    """The batch system ends a job while its prologue boots: the epilogue stops the prologue
    (which undoes itself) and nothing is left; one record."""
    job = h.job("ep")
    p = h.prologue(job)
    wait_for(lambda: h.phase_at_least(job, "domain") or p.poll() is not None, 60, "phase domain")
    problems = expect_rc("epilogue", h.run(h.epilogue(job)), {0})
    rc, _, err = h.run(p)
    if rc == 0:
        problems.append("the prologue finished although its job was ended")
    problems += expect_rc("prologue", (rc, "", err), NODE_FAULTS | {-signal.SIGKILL})
    return problems + h.check(job, 1)


def trial_unwritable_dirs(h: Harness, where: str) -> list[str]:
    """The job directories cannot be made (``state`` or ``run`` made immutable): a one-line
    node fault, nothing left."""
    job = h.job("uw")
    parent = os.path.join(h.cfg.state_dir if where == "state" else h.cfg.run_dir, "jobs")
    os.makedirs(parent, exist_ok=True)
    subprocess.run(["chattr", "+i", parent], check=True, env={"PATH": "/usr/bin:/bin"})
    try:
        got = h.run(h.prologue(job))
    finally:
        subprocess.run(["chattr", "-i", parent], check=True, env={"PATH": "/usr/bin:/bin"})
    problems = expect_rc("prologue", got, {20})
    if len(got[2].strip().splitlines()) > 1:
        problems.append(f"more than one line: {got[2]!r}")
    return problems + h.check(job, 0)


def _works(h: Harness, job: str) -> list[str]:
    """The job's VM answers through its user agent (as root: a smoke check, not exec's rules)."""
    from vibatch.vm.agent import SocketAgent
    from vibatch.util import Deadline
    agent = SocketAgent(os.path.join(h.cfg.run_dir, "jobs", job, "agent.sock"))
    try:
        with agent.session(10):
            res = agent.run("/bin/sh", ["-c", "true"], Deadline(20), what="check")
        return [] if res.wait_status == 0 else [f"{job}: VM answered {res.wait_status}"]
    except Exception as e:  # noqa: BLE001 - reported as a problem of the trial
        return [f"{job}: its VM does not answer: {e}"]


def catalogue(rng: random.Random) -> list[tuple[str, Callable[[Harness], list[str]]]]:
    """Every kind of trial once (the suite's short run)."""
    out: list[tuple[str, Callable[[Harness], list[str]]]] = []
    for i, point in enumerate(PROLOGUE_POINTS):
        then = ("reap", "epilogue", "again")[i % 3]
        out.append((f"kill prologue at {point}, then {then}",
                    lambda h, p=point, t=then: trial_kill_prologue(h, p, t)))
    for point in TEARDOWN_POINTS:
        out.append((f"kill undo at {point}", lambda h, p=point: trial_kill_undo(h, p)))
    for i, point in enumerate(TEARDOWN_POINTS):
        then = ("epilogue", "reap")[i % 2]
        out.append((f"kill epilogue at {point}, then {then}",
                    lambda h, p=point, t=then: trial_kill_epilogue(h, p, t)))
    out += [
        ("random kill of the prologue", lambda h: trial_random_kill(h, rng)),
        ("QEMU dies while booting", trial_qemu_dies_in_boot),
        ("libvirtd down at start", lambda h: trial_libvirtd_lost(h, "start")),
        ("libvirtd lost at overlay", lambda h: trial_libvirtd_lost(h, "overlay")),
        ("libvirtd lost at domain", lambda h: trial_libvirtd_lost(h, "domain")),
        ("two prologues, one job", trial_same_job_race),
        ("reap and prologue beside a stopped prologue (reserved)",
         lambda h: trial_stopped_prologue(h, "reserved")),
        ("reap and prologue beside a stopped prologue (domain)",
         lambda h: trial_stopped_prologue(h, "domain")),
        ("epilogue races epilogue", lambda h: trial_teardown_race(h, "epilogue")),
        ("epilogue races reap", lambda h: trial_teardown_race(h, "reap")),
        ("epilogue while the prologue boots", trial_epilogue_during_prologue),
        ("state directory unwritable", lambda h: trial_unwritable_dirs(h, "state")),
        ("run directory unwritable", lambda h: trial_unwritable_dirs(h, "run")),
    ]
    return out


def run_trials(h: Harness, trials: int, seed: int, log=print, only: str = "") -> dict:
    rng = random.Random(seed)
    kinds = [k for k in catalogue(rng) if not only or any(w in k[0] for w in only.split(","))]
    counts: dict[str, list[int]] = {}
    failures: list[str] = []
    t0 = time.monotonic()
    for i in range(trials):
        name, trial = kinds[i] if i < len(kinds) else rng.choice(kinds)
        try:
            problems = trial(h)
        except Exception as e:  # noqa: BLE001 - a harness error is a failed trial
            problems = [f"harness: {type(e).__name__}: {e}"]
        finally:
            h.cleanup()
        c = counts.setdefault(name, [0, 0])
        c[0] += 1
        if problems:
            c[1] += 1
            failures.append(f"trial {i} ({name}): " + "; ".join(problems))
            log(failures[-1])
        elif (i + 1) % 25 == 0:
            log(f"{i + 1} trials, {len(failures)} failed, {time.monotonic() - t0:.0f} s")
    return {"trials": trials, "seed": seed, "failed": len(failures), "failures": failures,
            "by_kind": counts, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--base", default="/var/tmp/vibatch-faults")
    ap.add_argument("--image-build", default="/var/lib/vibatch/build/testguest")
    ap.add_argument("--out", help="write the JSON summary here")
    ap.add_argument("--only", default="", help="comma-separated words: only trials whose "
                    "name contains one (e.g. 'race,random')")
    ap.add_argument("--pythonpath", default="", help="run this vibatch tree's CLI instead "
                    "(to show a trial failing on an older commit); fault points need ours")
    args = ap.parse_args()
    h = make_harness(args.base, args.image_build, f"f{os.getpid()}")
    h.pythonpath = args.pythonpath
    try:
        summary = run_trials(h, args.trials, args.seed, only=args.only)
    finally:
        h.cleanup()
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if summary["failed"] else 0


def make_harness(base: str, image_build: str, prefix: str, user: str = "nobody") -> Harness:
    """A config of its own (state, run, library and accounting under ``base``) with the test
    image in its library, for the standalone run."""
    import yaml
    from vibatch.images.library import Library
    shutil.rmtree(base, ignore_errors=True)
    work = os.path.join(base, "work")
    os.makedirs(work)
    os.chmod(base, 0o755)
    os.chmod(work, 0o777)
    data = {"state_dir": f"{base}/state", "run_dir": f"/run/{os.path.basename(base)}",
            "library_dir": f"{base}/images", "accounting_file": f"{base}/accounting.jsonl",
            "images": {"default": "testguest"}, "lock_timeout_s": 20,
            "host": {"reserved_cpus": [], "reserved_memory_mb": 1024},
            "vm": {"boot_timeout_s": 60, "acceleration": "auto"}}
    config_path = os.path.join(base, "vibatch.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(data, f)
    from vibatch import config
    cfg = config.load(config_path)
    os.makedirs(cfg.state_dir, exist_ok=True)
    with open(os.path.join(image_build, "cmdline")) as f:
        cmdline = f.read().strip()
    Library(cfg.library_dir, cfg.state_dir).add(
        os.path.join(image_build, "disk.qcow2"), name="testguest", os_name="vbguest",
        os_version="test", kernel=os.path.join(image_build, "vmlinux"),
        initrd=os.path.join(image_build, "initrd.cpio"), cmdline=cmdline)
    return Harness(config_path, user, work, prefix)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
