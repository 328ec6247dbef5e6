"""Talking to a qemu-guest-agent.

Two transports share one set of helpers:
- ``LibvirtAgent``: the guest's root agent, through libvirt (root on the host, prologue only);
- ``SocketAgent``: the per-job user agent, straight over the unix socket QEMU exposes for its
  virtio-serial port (``vibatch exec``, as the job's user: no libvirt, no root).

This module must not import libvirt at load time: ``vibatch exec`` imports it and starts fast.
"""
from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import VibatchError
from ..util import Deadline


class AgentError(VibatchError):
    """The agent did not answer, or answered with an error."""


@dataclass
class ExecStatus:
    exited: bool
    exitcode: Optional[int] = None
    signal: Optional[int] = None
    out: bytes = b""
    err: bytes = b""

    @property
    def wait_status(self) -> int:
        """The shell's convention: the exit code, or 128+N after death by signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exitcode if self.exitcode is not None else 255


class Agent:
    """Common helpers over ``command(name, arguments, timeout)``."""

    def command(self, name: str, arguments: Optional[dict] = None, timeout: float = 10.0) -> Any:
        raise NotImplementedError

    def ping(self, timeout: float = 1.0) -> None:
        self.command("guest-ping", None, timeout)

    def exec_start(self, path: str, args: Sequence[str], env: Optional[Sequence[str]] = None,
                   capture: bool = False, timeout: float = 10.0) -> int:
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture}
        if env is not None:
            arguments["env"] = list(env)
        return int(self.command("guest-exec", arguments, timeout)["pid"])

    def exec_status(self, pid: int, timeout: float = 10.0) -> ExecStatus:
        r = self.command("guest-exec-status", {"pid": pid}, timeout)
        return ExecStatus(exited=bool(r.get("exited")), exitcode=r.get("exitcode"),
                          signal=r.get("signal"),
                          out=base64.b64decode(r.get("out-data", "")),
                          err=base64.b64decode(r.get("err-data", "")))

    def read_file(self, path: str, max_bytes: int, timeout: float = 10.0) -> bytes:
        """At most ``max_bytes`` of the guest file ``path``, read by the agent itself (no
        process started in the guest: ``/proc/self`` is the agent's own)."""
        handle = self.command("guest-file-open", {"path": path, "mode": "r"}, timeout)
        try:
            r = self.command("guest-file-read", {"handle": handle, "count": max_bytes}, timeout)
        finally:
            self.command("guest-file-close", {"handle": handle}, timeout)
        return base64.b64decode(r.get("buf-b64", ""))[:max_bytes]

    def run(self, path: str, args: Sequence[str], deadline: Deadline,
            env: Optional[Sequence[str]] = None, what: str = "command") -> ExecStatus:
        """Run to completion with captured output, polling until ``deadline``."""
        pid = self.exec_start(path, args, env=env, capture=True,
                              timeout=max(1.0, deadline.remaining()))
        interval = 0.005
        while True:
            status = self.exec_status(pid, timeout=max(1.0, deadline.remaining()))
            if status.exited:
                return status
            if deadline.expired():
                raise AgentError(f"{what} in the guest did not finish within {deadline.seconds:g} s")
            time.sleep(min(interval, deadline.remaining()))
            interval = min(interval * 2, 0.02)


class LibvirtAgent(Agent):
    """The guest's own (root) agent, reached through libvirt."""

    def __init__(self, domain: Any):
        import libvirt_qemu  # noqa: PLC0415 - root-only path, keeps ``vibatch exec`` light
        self._qemu = libvirt_qemu
        self.domain = domain

    def command(self, name: str, arguments: Optional[dict] = None, timeout: float = 10.0) -> Any:
        import libvirt  # noqa: PLC0415
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        try:
            raw = self._qemu.qemuAgentCommand(self.domain, json.dumps(msg), max(1, int(timeout)), 0)
        except libvirt.libvirtError as e:
            raise AgentError(f"guest agent: {name}: {e.get_error_message()}") from None
        reply = json.loads(raw)
        if "error" in reply:
            raise AgentError(f"guest agent: {name}: {reply['error'].get('desc')}")
        return reply.get("return")


class SocketAgent(Agent):
    """A qemu-guest-agent behind a unix socket (the per-job user agent).

    Outside a ``session()``, each ``command`` is one short transaction: connect, resynchronise
    with guest-sync-delimited, send, read the answer, disconnect. ``lock`` (a context manager)
    serialises transactions when several ``vibatch exec`` of one job share the endpoint.
    qemu-ga sleeps 100 ms after the host side of a virtio-serial port disconnects, so a burst
    of commands (starting a short command and polling it) goes through one ``session()``,
    which holds the connection and the lock until it ends.
    """

    def __init__(self, path: str, lock: Optional[Callable[[], Any]] = None):
        self.path = path
        self.lock = lock or contextlib.nullcontext
        self._session: Optional[tuple[socket.socket, "_LineReader"]] = None

    @contextlib.contextmanager
    def session(self, timeout: float) -> Iterator[None]:
        with self.lock():
            sock, reader = self._guarded("connect", lambda: self._connect(Deadline(timeout)))
            self._session = (sock, reader)
            try:
                yield
            finally:
                self._session = None
                sock.close()

    def command(self, name: str, arguments: Optional[dict] = None, timeout: float = 10.0) -> Any:
        deadline = Deadline(timeout)
        if self._session is not None:
            sock, reader = self._session
            reader.deadline = deadline
            return self._guarded(name, lambda: self._request(sock, reader, name, arguments))
        with self.lock():
            sock, reader = self._guarded(name, lambda: self._connect(deadline))
            try:
                return self._guarded(name, lambda: self._request(sock, reader, name, arguments))
            finally:
                sock.close()

    def _guarded(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except socket.timeout:
            raise AgentError(f"the job's VM did not answer {name} in time") from None
        except (OSError, ValueError) as e:
            raise AgentError(f"lost the job's VM during {name}: {e}") from None

    def _connect(self, deadline: Deadline) -> tuple[socket.socket, "_LineReader"]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, deadline.remaining()))
            try:
                sock.connect(self.path)
            except OSError as e:
                raise AgentError(f"cannot reach the job's VM at {self.path}: {e.strerror}") from None
            reader = _LineReader(sock, deadline)
            sync_id = random.randrange(1, 2**31)
            # 0xFF resets the agent's JSON parser after any half-sent request of an earlier
            # client; the delimited reply starts with 0xFF, so stale output before it is skipped.
            sock.sendall(b"\xff" + _encode("guest-sync-delimited", {"id": sync_id}))
            while True:
                line = reader.readline()
                if b"\xff" in line:
                    reply = json.loads(line.rsplit(b"\xff", 1)[1])
                    if reply.get("return") == sync_id:
                        return sock, reader
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _request(sock: socket.socket, reader: "_LineReader", name: str,
                 arguments: Optional[dict]) -> Any:
        sock.sendall(_encode(name, arguments))
        reply = json.loads(reader.readline())
        if "error" in reply:
            raise AgentError(f"guest agent: {name}: {reply['error'].get('desc')}")
        return reply.get("return")


def _encode(name: str, arguments: Optional[dict]) -> bytes:
    msg: dict[str, Any] = {"execute": name}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"


MAX_LINE = 32 << 20   # one reply: qemu-ga caps a command's captured output at 16 MiB (base64)


class _LineReader:
    def __init__(self, sock: socket.socket, deadline: Deadline):
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            if self.deadline.expired():
                raise socket.timeout()
            if len(self.buf) > MAX_LINE:
                raise OSError(0, f"the agent sent a line of more than {MAX_LINE} bytes")
            self.sock.settimeout(max(0.01, self.deadline.remaining()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError(0, "the agent closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

