"""Fakes for the lifecycle's ports (vibatch.core.lifecycle.Node): a hypervisor and the two guest
agents, so the core's prologue, epilogue and reap run in milliseconds, without root's libvirtd
or a guest, and can be killed at any fault point in a forked child. And a batch system
(``FakeBatchSystem``) with a recording core (``FakeCore``) for vibatch.batch.main.

The fake hypervisor keeps its domains in a JSON file (under a flock), so a child process that
dies leaves its "VM" behind exactly as QEMU would outlive a killed prologue. Its errors are
real ``libvirt.libvirtError`` objects carrying libvirt's error codes, so vibatch's own error
matching (hypervisor.py) is what is tested.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import libvirt

from vibatch.vm.agent import AgentError, ExecStatus
from vibatch.batch.base import AS_IS, BatchSystem, exits
from vibatch.batch.kit import STARTER_FAILED, read_request
from vibatch.vm.domain import read_metadata
from vibatch.errors import HypervisorError
from vibatch.core.request import make_request


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, 0, message, 0, None, None, None, 0, 0)
    return e


class FakeHypervisor:
    """The node's VMs, in ``path`` (JSON). ``down`` makes every call fail as a lost libvirtd;
    ``on_create`` can make createXML fail."""

    def __init__(self, path: str):
        self.path = path
        self.fail_create: Optional[str] = None
        self.template_builds: list = []

    @property
    def down(self) -> bool:
        """libvirtd is gone (a file, so that forked children see it change too)."""
        return os.path.exists(self.path + ".down")

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            open(self.path + ".down", "w").close()
        elif self.down:
            os.unlink(self.path + ".down")

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict]:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(self.path) as f:
                    doms = json.load(f)
            except FileNotFoundError:
                doms = {}
            yield doms
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doms, f)
            os.replace(tmp, self.path)

    def domains(self) -> dict:
        with self._state() as doms:
            return dict(doms)

    def kill(self, name: str) -> None:
        """QEMU died: the transient domain is gone."""
        with self._state() as doms:
            doms.pop(name, None)

    def connect(self, uri: str) -> "FakeConn":
        """The port's contract is hypervisor.connect's: a connection, or HypervisorError."""
        if self.down:
            raise HypervisorError(f"cannot connect to libvirt at {uri}: Failed to connect socket")
        return FakeConn(self)


@dataclass
class FakeConn:
    hv: FakeHypervisor

    def _up(self) -> None:
        if self.hv.down:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed")

    def lookupByName(self, name: str) -> "FakeDomain":
        self._up()
        if name not in self.hv.domains():
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: {name}")
        return FakeDomain(self, name)

    def createXML(self, xml: str, _flags: int) -> "FakeDomain":
        self._up()
        if self.hv.fail_create:
            raise libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, self.hv.fail_create)
        root = ET.fromstring(xml)
        name = root.findtext("name")
        with self.hv._state() as doms:
            if name in doms:
                raise libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED,
                                    f"domain '{name}' already exists")
            doms[name] = {"uuid": str(uuid.uuid4()), "xml": xml, "running": False}
        for src in root.iter("source"):    # QEMU binds the user agent's socket
            if src.get("mode") == "bind" and src.get("path"):
                open(src.get("path"), "w").close()
        return FakeDomain(self, name)

    def getLibVersion(self) -> int:
        return 9000000

    def getVersion(self) -> int:
        return 7002000

    def listAllDomains(self) -> list:
        self._up()
        return [FakeDomain(self, n) for n in self.hv.domains()]

    def close(self) -> None:
        pass


@dataclass
class FakeDomain:
    conn: FakeConn
    _name: str

    def _get(self) -> dict:
        self.conn._up()
        dom = self.conn.hv.domains().get(self._name)
        if dom is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, f"Domain not found: {self._name}")
        return dom

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._get()["uuid"]

    def XMLDesc(self, _flags: int = 0) -> str:
        return self._get()["xml"]

    def isActive(self) -> int:
        return 1 if self._get() else 0

    def setMemoryParameters(self, _params: dict, _flags: int) -> None:
        self._get()

    def resume(self) -> None:
        self._get()
        with self.conn.hv._state() as doms:
            doms[self._name]["running"] = True

    def getCPUStats(self, _total: bool) -> list:
        self._get()
        return [{"cpu_time": 1_500_000_000}]

    def destroy(self) -> None:
        self._get()
        self.conn.hv.kill(self._name)


class FakeRootAgent:
    """The guest's root agent: answers once the domain runs; guest setup succeeds unless the
    test says otherwise (``setup_status``)."""

    setup_status = 0

    def __init__(self, domain: FakeDomain):
        self.domain = domain

    def ping(self, timeout: float = 1.0) -> None:
        try:
            if not self.domain.conn.hv.domains().get(self.domain.name(), {}).get("running"):
                raise AgentError("guest agent: not up")
        except libvirt.libvirtError as e:
            raise AgentError(f"guest agent: {e.get_error_message()}") from None

    def run(self, path: str, args, deadline, env=None, what: str = "command") -> ExecStatus:
        self.ping()
        err = b"" if self.setup_status == 0 else b"guest setup: no such user tool\n"
        return ExecStatus(exited=True, exitcode=self.setup_status, err=err)


class FakeUserAgent:
    """The job user's agent behind the job's socket: runs as the uid/gid the domain's
    metadata names (as the real guest setup makes it)."""

    def __init__(self, hv: FakeHypervisor, socket_path: str):
        self.hv, self.path = hv, socket_path

    @contextlib.contextmanager
    def session(self, _timeout: float) -> Iterator[None]:
        yield

    setuid = None    # a test's broken image: the agent runs as this uid instead

    def read_file(self, path: str, max_bytes: int, timeout: float = 10.0) -> bytes:
        assert path == "/proc/self/status"
        job = os.path.basename(os.path.dirname(self.path))
        dom = FakeDomain(FakeConn(self.hv), "vibatch-" + job)
        try:
            meta = read_metadata(dom.XMLDesc())
        except libvirt.libvirtError:
            raise AgentError("lost the job's VM") from None
        uid = meta["uid"] if self.setuid is None else self.setuid
        return (f"Name:\tqemu-ga\nUid:\t{meta['uid']}\t{uid}\t{meta['uid']}\t{meta['uid']}\n"
                f"Gid:\t{meta['gid']}\t{meta['gid']}\t{meta['gid']}\t{meta['gid']}\n").encode()


def fake_check_workdir(path, uid, gid, groups, label="working directory") -> None:
    """share.check_as_user without dropping to the user: the fake tests run as any user."""
    from vibatch.errors import MissingWorkdir, NodeError
    if not os.path.isdir(path):
        error = MissingWorkdir if label == "working directory" else NodeError
        raise error(f"{label} {path} does not exist")


def fake_node(cfg: Any, hv: FakeHypervisor):
    """A Node of ``cfg`` whose ports are the fakes."""
    from vibatch.core.lifecycle import Node
    return Node(cfg, connect=hv.connect, root_agent=FakeRootAgent,
                user_agent=lambda path: FakeUserAgent(hv, path), check_workdir=fake_check_workdir,
                build_template=lambda *args: hv.template_builds.append(args))


# --- a batch system and a core for vibatch.batch.main ----------------------------------------
class FakeBatchSystem(BatchSystem):
    """A batch system that tests (and demos) drive through vibatch.batch.main:
    ``prologue JOB USER WORKDIR [IMAGE]``, ``epilogue JOB [EXIT CODE]`` (root hooks) and
    ``starter ARGS...`` (the job user's; the job id in ``$FAKE_JOB_ID``). ``keeps_refusals``:
    like Slurm and Torque, a job's fault exits 0 and the starter fails the job."""

    name = "fake"
    prologue_hook, epilogue_hook, starter_hook = "prologue", "epilogue", "starter"
    usage = "prologue JOB USER WORKDIR [IMAGE] | epilogue JOB [CODE] | starter ARGS"

    def __init__(self, keeps_refusals: bool = False, deadline_s: int = 30):
        self.keeps_refusals = keeps_refusals
        self.deadline = deadline_s
        self.EXIT = {"prologue": exits(ok=0, job=0 if keeps_refusals else 10, node=20),
                     "epilogue": exits(ok=0, job=0, node=21),
                     "starter": exits(ok=AS_IS, job=STARTER_FAILED, node=STARTER_FAILED)}

    def asking_env(self, env, argv=()) -> dict:
        return {"FAKE_CONF": env["FAKE_CONF"]} if "FAKE_CONF" in env else {}

    def check_args(self, hook: str, argv) -> Optional[str]:
        return None if argv else "no job id"

    def job_of(self, argv, env) -> tuple[str, str]:
        return argv[0], argv[1] if len(argv) > 1 else ""

    def job_from_hook(self, cfg, argv, env):
        return read_request(lambda: make_request(
            job_id=argv[0], user=argv[1], cores=1, memory_mb=256,
            image=argv[3] if len(argv) > 3 else None, workdir=argv[2]))

    def epilogue_exit_code(self, argv, env) -> Optional[int]:
        return int(argv[1]) if len(argv) > 1 else None

    def starter_job_id(self, env) -> str:
        return env.get("FAKE_JOB_ID", "")

    def deadline_s(self, call) -> int:
        return self.deadline


class FakeCore:
    """The core as a root hook sees it (vibatch.batch.core.Core), recording what it is asked;
    ``fail`` (an exception, or a callable run instead) makes the prologue fail."""

    def __init__(self, cfg: Any, log: list, fail: Any = None):
        self.cfg, self.log, self.fail = cfg, log, fail
        log.append(("core",))

    def prologue(self, req, holder: Optional[int] = None, batch: Optional[str] = None,
                 batch_env: Optional[dict] = None) -> dict:
        self.log.append(("prologue", req.job_id, req.workdir))
        self.log.append(("reap asks", batch, batch_env))   # whom vibatch reap asks, and how
        if isinstance(self.fail, BaseException):
            raise self.fail
        if self.fail is not None:
            self.fail()
        return {}

    def epilogue(self, job_id: str, exit_code: Optional[int] = None,
                 signum: Optional[int] = None) -> None:
        self.log.append(("epilogue", job_id, exit_code) + ((signum,) if signum else ()))

    def jobs_held_by(self, pid: int) -> list:
        return []

    def holder_ended(self, job_id: str) -> bool:
        return False

    def close(self) -> None:
        self.log.append(("closed",))
