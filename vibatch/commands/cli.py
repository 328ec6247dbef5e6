"""The ``vibatch`` command: argument parsing and the one place errors become exit codes."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from typing import Optional, Sequence

from .. import config as config_mod
from ..errors import EXIT_CODES, JobError, NodeError, VibatchError
from ..core.request import parse_cpu_list, parse_memory_mb
from ..util import require_root

PROG = "vibatch"


def _memory(text: str) -> int:
    return parse_memory_mb(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _add_job_resources(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cores", type=_positive_int, help="vCPUs (default: jobs.default_cores)")
    p.add_argument("--memory", type=str, help="guest memory, e.g. 512M or 2G "
                   "(default: jobs.default_memory_mb)")
    p.add_argument("--image", help="image name or OS alias (default: the queue's or site's)")
    p.add_argument("--queue", help="the job's queue/partition (for its default image)")
    p.add_argument("--account", help="the job's account (for its allow-list)")
    p.add_argument("--workdir", help="working directory, shared into the VM at the same path")
    p.add_argument("--walltime", type=_positive_int, help="walltime in seconds, if known")
    p.add_argument("--cpus", help="exact host CPU ids the batch system gave the job, e.g. 2-3")
    p.add_argument("--network", choices=config_mod.NETWORK_MODES,
                   help="network mode (default: vm.network; others as network.groups allow)")
    p.add_argument("--scratch", help="scratch disk the batch system granted, e.g. 10G "
                   "(default: scratch.default_gb; mounted at scratch.mount, the job's $TMPDIR)")


def _when(text: str) -> int:
    """--at: epoch seconds or an ISO 8601 local time, in the future."""
    import datetime  # noqa: PLC0415
    try:
        at = int(text) if text.isdigit() else int(datetime.datetime.fromisoformat(text).timestamp())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither epoch seconds nor "
                                         "YYYY-MM-DDTHH:MM[:SS]") from None
    if at <= time.time():
        raise argparse.ArgumentTypeError(f"{text!r} is not in the future")
    return at


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the argument at fault, exit 2 (not the usage text)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Per-job virtual machines for batch systems.",
                                 epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    ap.add_argument("--config", help=f"config file (default: ${config_mod.ENV_VAR} or "
                    f"{config_mod.DEFAULT_PATH})")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prologue", help="claim a slot and boot the job's VM (root)")
    p.add_argument("--job", required=True, help="job id")
    p.add_argument("--user", required=True, help="job user (name or uid)")
    _add_job_resources(p)

    p = sub.add_parser("exec", help="run a command in the job's VM (the job's user)")
    p.add_argument("--job", help="job id (default: $VIBATCH_JOB_ID, $SLURM_JOB_ID, $JOB_ID, ...)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    p = sub.add_parser("epilogue", help="destroy the job's VM, release its slot, account (root)")
    p.add_argument("--job", required=True, help="job id")
    p.add_argument("--exit-code", type=int, help="the job's exit code, if the batch system knows it")

    p = sub.add_parser("run", help="prologue + exec + epilogue for one command (root)")
    p.add_argument("--job", help="job id (default: a fresh run-… id)")
    p.add_argument("--user", help="job user (default: $SUDO_USER, or you if not root)")
    p.add_argument("--timings", action="store_true", help="print a phase-by-phase timing table")
    p.add_argument("--cold", action="store_true", help="boot the VM even if a template of its "
                   "image and shape is ready (no warm start)")
    _add_job_resources(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")

    sub.add_parser("reap", help="clean up after crashes, reboots, libvirtd restarts (root)")

    p = sub.add_parser("drain", help="announce the node's end to its jobs' Machine Features "
                       "(shutdowntime), or withdraw it (root)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--at", type=_when, help="when: epoch seconds, or local time as "
                   "YYYY-MM-DDTHH:MM[:SS]")
    g.add_argument("--cancel", action="store_true", help="the node is not draining after all")
    g.add_argument("--sync", action="store_true", help="take the drain time from the batch "
                   "system (a Slurm maintenance reservation of this node), for cron")

    p = sub.add_parser("network", help="the node's network policy for user/nat guests (root)")
    p.add_argument("action", choices=("apply", "show", "remove"),
                   help="apply: put the config's policy (and the NAT bridge) in force now; "
                   "show: print the rules it would load; remove: take them away")

    p = sub.add_parser("status", help="jobs, slots and VMs on this node")
    p.add_argument("--json", action="store_true")

    _image_parsers(sub)
    _catalog_parsers(sub)
    from . import templates  # noqa: PLC0415 - its own module, like admin's
    templates.add_parsers(sub)

    sub.add_parser("check-config", help="validate the config file and print it")
    p = sub.add_parser("doctor", help="check this node: KVM, libvirt, hooks, images, ... (root)")
    p.add_argument("--boot", action="store_true", help="also boot a test job (vibatch image "
                   "test of the image a job would get)")
    p = sub.add_parser("metrics", help="rewrite the Prometheus textfile (root, for cron)")
    p.add_argument("--stdout", action="store_true", help="print it instead of writing it")
    return ap


def _image_parsers(sub) -> None:
    p = sub.add_parser("image", help="the image library (admin)")
    isub = p.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    a = isub.add_parser("add", help="add an image file to the library (root)")
    a.add_argument("file", help="the disk image (qcow2 or raw)")
    a.add_argument("--name", required=True)
    a.add_argument("--os", required=True, dest="os_name")
    a.add_argument("--os-version", required=True)
    a.add_argument("--arch", default=os.uname().machine)
    a.add_argument("--kernel", help="kernel to boot the disk with (kernel boot)")
    a.add_argument("--initrd")
    a.add_argument("--cmdline", default="")
    a.add_argument("--disk-boot", action="store_true", help="boot the disk's own bootloader")
    a.add_argument("--replace", action="store_true", help="install as a new version of NAME")
    lp = isub.add_parser("list", help="the library's images")
    lp.add_argument("--json", action="store_true")
    sp = isub.add_parser("show", help="everything about one image")
    sp.add_argument("name")
    sp.add_argument("--json", action="store_true")
    v = isub.add_parser("verify", help="rehash images in full; quarantine mismatches (root)")
    v.add_argument("name", nargs="?")
    v.add_argument("--all", action="store_true", help="every image")
    v.add_argument("--due", action="store_true", help="only those last verified more than "
                   "images.verify_interval_h ago (for cron)")
    r = isub.add_parser("remove", help="remove an image's name; files go when unused (root)")
    r.add_argument("name")
    r.add_argument("--force", action="store_true", help="even while jobs use it (their VMs keep "
                   "running; the files go when they end)")
    y = isub.add_parser("sync", help="install what endorsed catalogs list (root, for cron)")
    y.add_argument("url", nargs="*", help="catalog URL(s) (default: images.catalogs)")
    t = isub.add_parser("test", help="boot an image as a job would and check it (root)")
    t.add_argument("name")
    t.add_argument("--user", default="nobody", help="job user for the test (default: nobody)")
    t.add_argument("--cores", type=_positive_int, default=1)
    t.add_argument("--memory", type=_memory, help="guest memory (default: jobs.default_memory_mb)")
    rp = isub.add_parser("resolve", help="which image a job would get (policy check)")
    rp.add_argument("requested", nargs="?", help="image or OS the job names (none: the defaults)")
    rp.add_argument("--user", help="job user (for group allow-lists; default: you)")
    rp.add_argument("--queue")
    rp.add_argument("--account")
    op = isub.add_parser("offer", help="the names a job may ask for (for submit-time checks, "
                         "e.g. Slurm's job_submit.lua)")
    op.add_argument("--output", help="write them here, atomically (default: print)")
    op.add_argument("--format", default="lines", help="lines: one name per line (default); "
                    "or a batch system's own: htcondor-startd, htcondor-schedd (HTCondor config "
                    "fragments for execute points: advertise the names, match only jobs asking "
                    "for one of them; for access points: refuse others at condor_submit)")


def _catalog_parsers(sub) -> None:
    p = sub.add_parser("catalog", help="endorsed image catalogs (endorsers)")
    csub = p.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    k = csub.add_parser("keygen", help="make an Ed25519 signing key; prints the public key")
    k.add_argument("--out", required=True, help="private key file to create (mode 0600)")
    s = csub.add_parser("sign", help="sign a catalog from a draft (YAML) listing local files")
    s.add_argument("draft")
    s.add_argument("--key", required=True, help="private key (from catalog keygen)")
    s.add_argument("--out", required=True, help="catalog file to write")
    s.add_argument("--serial", type=_positive_int, help="default: the previous --out's + 1, else 1")
    s.add_argument("--valid-days", type=float, default=30.0)
    v = csub.add_parser("show", help="verify a catalog with this node's trusted keys and list it")
    v.add_argument("url")


def _argv_after_dashes(argv: Sequence[str], ap: argparse.ArgumentParser) -> list[str]:
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        ap.error("a command to run is required after --")
    return argv


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.command == "catalog" and args.catalog_command in ("keygen", "sign"):
            from .admin import catalog_command  # noqa: PLC0415 - an endorser needs no node config
            return catalog_command(args, None)
        if args.command == "doctor":   # reports a bad config as one of its checks
            from . import doctor  # noqa: PLC0415
            require_root("doctor")
            return doctor.main(args.config, args.boot)
        cfg = config_mod.load(args.config)
        return _dispatch(ap, args, cfg)
    except VibatchError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        if e.detail:
            print(e.detail.rstrip("\n"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug is the node's fault, in one line
        from ..util import log_error  # noqa: PLC0415
        log_error(f"vibatch {args.command}", e)
        print(f"{PROG}: error: unexpected {type(e).__name__}: {e} (node fault; the traceback "
              "is in the error log)", file=sys.stderr)
        return NodeError.exit_code


def _dispatch(ap: argparse.ArgumentParser, args: argparse.Namespace, cfg) -> int:
    cmd = args.command
    if cmd == "exec":
        from ..core.execjob import Exec, find_job_id  # noqa: PLC0415 - keeps exec free of libvirt
        command = _argv_after_dashes(args.argv, ap)
        return Exec(cfg, find_job_id(args.job)).run(command)
    if cmd == "check-config":
        print(json.dumps(_asdict(cfg), indent=2, sort_keys=True))
        return 0
    if cmd == "metrics":
        from ..core import metrics  # noqa: PLC0415
        require_root("metrics")
        if args.stdout:
            sys.stdout.write(metrics.render(cfg))
        elif not metrics.write(cfg):
            print(f"{PROG}: metrics.textfile is empty in {cfg.source}: no textfile",
                  file=sys.stderr)
        return 0
    if cmd == "network":
        return _network(args, cfg)
    from ..core import lifecycle  # noqa: PLC0415
    if cmd == "template":
        from . import templates  # noqa: PLC0415
        return templates.command(args, cfg)
    if cmd in ("image", "catalog"):
        from . import admin  # noqa: PLC0415
        return admin.image_command(args, cfg) if cmd == "image" else admin.catalog_command(args, cfg)
    node = lifecycle.Node(cfg)
    try:
        if cmd == "prologue":
            require_root("prologue")
            state = lifecycle.prologue(node, _request(args, cfg, args.job, args.user))
            print(f"{PROG}: job {args.job}: VM {state.domain} ready on CPUs "
                  f"{','.join(map(str, state.cpus))} ({sum(state.phases.values()):.2f} s)",
                  file=sys.stderr)
            return 0
        if cmd == "epilogue":
            require_root("epilogue")
            lifecycle.epilogue(node, args.job, args.exit_code)
            return 0
        if cmd == "run":
            return _run(ap, args, cfg, node)
        if cmd == "status":
            return _status(args, cfg, node)
        if cmd == "drain":
            require_root("drain")
            if args.sync:
                from .. import batch  # noqa: PLC0415 - asked only here and by reap
                at, answers = lifecycle.sync_drain(node, batch.drain_time)
                print(f"node drains at {at}" if at else "node is not draining")
            else:
                answers = lifecycle.announce_shutdown(node, None if args.cancel else args.at)
            problems = 0
            for job, err in answers:
                print(f"job {job}: {'updated' if err is None else 'not updated: ' + err}")
                problems += err is not None
            return NodeError.exit_code if problems else 0   # the node could not tell them all
        if cmd == "reap":
            require_root("reap")
            from .. import batch  # noqa: PLC0415 - asked only by reap
            for line in lifecycle.reap(node, batch.job_gone):
                print(f"reaped {line}")
            return 0
    finally:
        node.close()
    ap.error(f"unknown command {cmd}")
    return 2


def _request(args: argparse.Namespace, cfg, job_id: str, user: str):
    from ..core.request import make_request  # noqa: PLC0415
    memory = parse_memory_mb(args.memory) if args.memory else cfg.jobs.default_memory_mb
    cpus = parse_cpu_list(args.cpus) if args.cpus else None
    cores = args.cores or (len(cpus) if cpus else cfg.jobs.default_cores)
    return make_request(job_id=job_id, user=user, cores=cores, memory_mb=memory, image=args.image,
                        workdir=args.workdir or os.getcwd(), walltime_s=args.walltime, cpus=cpus,
                        queue=args.queue, account=args.account,
                        scratch_mb=parse_memory_mb(args.scratch, "scratch size") if args.scratch else None,
                        network=args.network)


def _network(args: argparse.Namespace, cfg) -> int:
    from ..core.lifecycle import qemu_ids  # noqa: PLC0415
    from ..vm import network  # noqa: PLC0415
    uid = qemu_ids(cfg)[0]
    if args.action == "show":
        sys.stdout.write(network.ruleset(cfg, uid))
        return 0
    require_root(f"network {args.action}")
    if args.action == "remove":
        network.remove(cfg, uid)
        return 0
    modes = {cfg.vm.network, *cfg.network.groups}
    for mode in sorted(modes & {"user", "nat", "bridge"}):
        network.ensure(cfg, mode, uid)
        print(f"{PROG}: network {mode}: policy in force")
    return 0


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace, cfg, node) -> int:
    from ..core import lifecycle  # noqa: PLC0415
    from ..core.execjob import Exec  # noqa: PLC0415
    require_root("run")
    command = _argv_after_dashes(args.argv, ap)
    user = args.user or os.environ.get("SUDO_USER")
    if not user:
        raise JobError("vibatch run as root needs --user NAME (the job never runs as root)")
    job_id = args.job or f"run-{os.getpid()}-{secrets.token_hex(3)}"
    req = _request(args, cfg, job_id, user)
    state = lifecycle.prologue(node, req, cold=args.cold)
    status = 255
    t0 = time.perf_counter()
    try:
        status = Exec(cfg, job_id).run(command)
    finally:
        exec_s = time.perf_counter() - t0
        record = lifecycle.epilogue(node, job_id, status)
    if args.timings and record:
        phases = {**state.phases, "exec": round(exec_s, 4), "epilogue": record["phases"]["epilogue"]}
        width = max(len(k) for k in phases)
        print(f"\n{'phase'.ljust(width)}  seconds", file=sys.stderr)
        for name, secs in phases.items():
            print(f"{name.ljust(width)}  {secs:7.3f}", file=sys.stderr)
        print(f"{'total'.ljust(width)}  {sum(phases.values()):7.3f}   "
              f"({state.start} start, accel {state.accel}, CPUs {','.join(map(str, state.cpus))}, "
              f"image {state.image})", file=sys.stderr)
    return status


def _status(args: argparse.Namespace, cfg, node) -> int:
    from ..core import lifecycle  # noqa: PLC0415
    from ..batch import faults  # noqa: PLC0415
    jobs = lifecycle.running_jobs(node)
    slots = {j: s.to_json() for j, s in node.slots.all().items()}
    if args.json:
        print(json.dumps({"jobs": jobs, "slots": slots, "node_faults": faults.read(cfg),
                          "capacity": {"cpus": list(node.slots.capacity.cpus),
                                       "memory_mb": node.slots.capacity.memory_mb}}, indent=1))
        return 0
    cap = node.slots.capacity
    print(f"node: CPUs {','.join(map(str, cap.cpus))} and {cap.memory_mb} MiB for jobs")
    print(f"{'JOB':24} {'PHASE':10} {'VM':6} {'USER':12} {'IMAGE':16} {'CPUS':8} MEM")
    for j in jobs:
        print(f"{j['job_id']:24} {j.get('phase', '?'):10} {'up' if j['domain_active'] else 'down':6} "
              f"{j.get('user', '?'):12} {j.get('image', '?'):16} "
              f"{','.join(map(str, j.get('cpus', []))):8} {j.get('memory_mb', '?')}")
    for line in faults.describe(cfg):
        print(line)
    return 0


def _asdict(cfg) -> dict:
    import dataclasses  # noqa: PLC0415
    return dataclasses.asdict(cfg)


if __name__ == "__main__":
    sys.exit(main())
