"""Torque's task manager (TM) protocol, the one request vibatch sends: ``TM_ADOPT_JOBID``, which
makes a session an adopted task of a job on the local pbs_mom, so that pbs_mom counts its
processes in the job's ``resources_used`` (docs/batch/torque.md, "Accounting and suspend").

Why not ``pbs_track -j JOB -a PID``, the command that sends it: its client refuses (TM_EPERM,
17008) unless ``/proc/<the pid's session id>`` exists and is the caller's (``tm_adopt`` and
``ispidowner`` in ``src/lib/Libifl/tm.c``). libvirt starts QEMU and the share launchers through
a double fork, so their session leader is gone: pbs_track refuses them for every uid, root's
too (seen on 6.1.3.h5). pbs_mom itself (``adoptSession`` in ``src/resmom/mom_comm.c``) checks no
uid: a local connection, the job id and the cookie ``ADOPT COOKIE``.

The wire format is Torque's DIS ("data is strings"): an integer is its sign and decimal digits,
preceded by the count of those digits written the same way (recursively) while it has more
than one digit (``+5``, ``2+42``, ``210+1234567890``); a string is its length so written, then
its bytes (``src/lib/Libdis``). The request (``startcom`` then ``tm_adopt``):
``TM_PROTOCOL TM_PROTOCOL_VER jobid cookie TM_ADOPT_JOBID event=0 task=0 sid pid jobid``; the
reply is one integer, ``TM_OKAY`` (0) or ``TM_ERROR`` (999, no such job).
"""
from __future__ import annotations

import socket
from typing import BinaryIO

TM_PROTOCOL = 5
TM_PROTOCOL_VER = 2
TM_ADOPT_JOBID = 114
TM_OKAY = 0
TM_ERROR = 999
ADOPT_COOKIE = b"ADOPT COOKIE"   # pbs_mom skips the cookie check for this one
MOM_HOST = "127.0.0.1"           # pbs_mom takes TM requests from a local address only
DIS_MAX_DIGITS = 32
DIS_MAX_LEVELS = 8          # Torque's own decoder stops at 30 (DIS_RECURSIVE_LIMIT)


class TmError(Exception):
    pass


def dis_int(value: int) -> bytes:
    digits = str(abs(int(value)))
    out = ("-" if value < 0 else "+") + digits
    n = len(digits)
    while n > 1:
        prefix = str(n)
        out, n = prefix + out, len(prefix)
    return out.encode()


def dis_str(data: bytes) -> bytes:
    return dis_int(len(data)) + data


def read_dis_int(f: BinaryIO) -> int:
    """One DIS integer from ``f`` (bounded: at most DIS_MAX_DIGITS digits at any level)."""
    count = 1
    for _level in range(DIS_MAX_LEVELS):
        c = f.read(1)
        if c in (b"+", b"-"):
            digits = f.read(count)
            if len(digits) != count or not digits.isdigit():
                raise TmError(f"pbs_mom sent a malformed integer ({c + digits!r})")
            return -int(digits) if c == b"-" else int(digits)
        if not c.isdigit() or c == b"0":
            raise TmError(f"pbs_mom sent a malformed integer (prefix {c!r})")
        rest = f.read(count - 1)
        if len(rest) != count - 1 or not (c + rest).isdigit() or int(c + rest) > DIS_MAX_DIGITS:
            raise TmError(f"pbs_mom sent a malformed integer (prefix {c + rest!r})")
        count = int(c + rest)
        if count < 2:     # a count of one digit is never prefixed: not DIS
            raise TmError(f"pbs_mom sent a malformed integer (prefix {c + rest!r})")
    raise TmError(f"pbs_mom sent an integer nested more than {DIS_MAX_LEVELS} levels deep")


def adopt_request(job_id: str, sid: int, pid: int) -> bytes:
    job = job_id.encode()
    return b"".join([dis_int(TM_PROTOCOL), dis_int(TM_PROTOCOL_VER), dis_str(job),
                     dis_str(ADOPT_COOKIE), dis_int(TM_ADOPT_JOBID), dis_int(0), dis_int(0),
                     dis_int(sid), dis_int(pid), dis_str(job)])


def adopt(port: int, job_id: str, sid: int, pid: int, timeout_s: float = 10) -> None:
    """Ask the local pbs_mom (its manager port, ``mom_manager_port``) to adopt session ``sid``
    (``pid`` one of its processes) into job ``job_id``. Raises TmError or OSError."""
    with socket.create_connection((MOM_HOST, port), timeout=timeout_s) as s:
        s.sendall(adopt_request(job_id, sid, pid))
        with s.makefile("rb") as f:
            status = read_dis_int(f)
    if status != TM_OKAY:
        raise TmError(f"pbs_mom refused to adopt session {sid} into job {job_id} "
                      f"(status {status}{': no such job' if status == TM_ERROR else ''})")


__all__ = ["TmError", "adopt", "adopt_request", "dis_int", "dis_str", "read_dis_int"]
