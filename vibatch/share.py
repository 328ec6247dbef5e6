"""The job's shared folders: one virtiofsd per share, run as the job's user, never as root.

libvirt would start QEMU's virtiofsd as host root, which makes whatever guest root creates land
on the host as root (setuid-root files, device nodes, chown to root). Instead the prologue starts
each virtiofsd itself and hands libvirt only its socket (``<source socket=...>``):

- a launcher (a fresh interpreter running ``_child``) drops to the job user's uid, gid and
  groups, and with those credentials alone opens the working directory one component at a time
  (``O_PATH|O_NOFOLLOW|O_DIRECTORY``: no symbolic link is followed, and every parent must be
  searchable by the user), then ``fchdir``s into exactly that directory. The I/O folder, which
  vibatch created below root-owned directories, is opened by root and passed as a descriptor;
- it enters a new user namespace that maps only the job's own uid and gid (what an unprivileged
  user may do for itself), plus new network, IPC and UTS namespaces;
- it installs a seccomp filter that refuses setuid/setgid mode bits (chmod, create, mkdir,
  mknod), device nodes, xattr writes, openat2 and io_uring, and any non-x86-64 system call;
- it execs virtiofsd with ``sandbox=chroot`` and ``source=/proc/self/fd/N/.``, N being the
  descriptor of the directory that was checked: virtiofsd chroots into exactly that directory,
  whatever happens to its path later.

So a file the guest creates, as any guest uid, is created by a process that is the job's user
and cannot become anyone else: guest uids other than the job's are refused (EINVAL, since
virtiofsd cannot switch to an unmapped id), chown to another id is refused, a device node needs
CAP_MKNOD in the initial namespace, and the filter keeps setuid/setgid bits off.

The prologue records each virtiofsd (pid and start time) in the job's state before the launcher
may go on, so undo, epilogue and reap can always find and kill it. See docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from .errors import MissingWorkdir, NodeError

LAUNCH_TIMEOUT_S = 10.0
SOCKET_PATH_MAX = 107
STOP_TIMEOUT_S = 5.0
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class ShareSource:
    """One folder to share: ``path`` is walked as the job user, ``fd`` is opened already."""

    tag: str
    socket: str            # the vhost-user socket QEMU connects to
    log: str               # virtiofsd's stderr
    path: Optional[str] = None
    fd: Optional[int] = None


# --- the parent (root, in the prologue) --------------------------------------------------------
def job_shares(workdir: str, io_dir: str, state_dir: str,
               tags: tuple[str, str]) -> list[ShareSource]:
    """The job's two shares: its working directory (checked as the user) and its I/O folder
    (made by vibatch below root-owned directories, so opened by root). The sockets live in the
    job's state directory (root, 0711): QEMU reaches them by path, nobody can list it."""
    def source(tag: str, **kw) -> ShareSource:
        return ShareSource(tag, socket_path(state_dir, tag),
                           os.path.join(state_dir, f"virtiofsd-{tag}.log"), **kw)
    wd_tag, io_tag = tags
    return [source(wd_tag, path=workdir), source(io_tag, fd=open_own_dir(io_dir))]


def socket_path(state_dir: str, tag: str) -> str:
    return os.path.join(state_dir, tag + ".sock")


def open_own_dir(path: str) -> int:
    """An O_PATH descriptor of a directory vibatch made below root-owned parents."""
    return os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)


def _listen(path: str, owner: tuple[int, int]) -> socket.socket:
    """A listening socket only ``owner`` (QEMU's user) can connect to, from its first instant."""
    if len(path.encode()) > SOCKET_PATH_MAX:
        raise NodeError(f"the virtiofsd socket path {path} is longer than {SOCKET_PATH_MAX} "
                        "bytes: shorten state_dir or the job id")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)    # the bound file gets this mode (before any umask)
        sock.bind(path)
        os.chown(path, *owner, follow_symlinks=False)
        sock.listen(1)
        return sock
    except BaseException:
        sock.close()
        raise


def process_name(job_id: str, tag: str) -> str:
    """virtiofsd's argv[0], so ``ps`` tells whose it is."""
    return f"virtiofsd-{job_id}-{tag}"


def start(job_id: str, shares: Sequence[ShareSource], uid: int, gid: int,
          groups: Sequence[int], cpus: Sequence[int], virtiofsd: str, qemu: tuple[int, int],
          record: Callable[[list[dict]], None], timeout: float = LAUNCH_TIMEOUT_S) -> list[dict]:
    """Start one virtiofsd per share; ``record`` persists their ids before any may run.

    Returns the records ({tag, pid, start}). A working directory the job user cannot reach
    raises MissingWorkdir (the job's fault), naming the path; anything else is a NodeError.
    The caller stops what was recorded (``stop``) if this raises."""
    import psutil  # noqa: PLC0415
    procs: list[tuple[ShareSource, subprocess.Popen, int]] = []
    records: list[dict] = []
    opened: list[object] = []
    try:
        for share in shares:
            sock = _listen(share.socket, qemu)
            opened.append(sock)
            r_fd, w_fd = os.pipe()
            opened.append(r_fd)
            log = os.open(share.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_APPEND | os.O_CLOEXEC, 0o600)
            spec = {"uid": uid, "gid": gid, "groups": list(groups), "cpus": list(cpus),
                    "tag": share.tag, "path": share.path, "fd": share.fd,
                    "listen": sock.fileno(), "status": w_fd, "virtiofsd": virtiofsd,
                    "name": process_name(job_id, share.tag)}
            keep = [sock.fileno(), w_fd] + ([share.fd] if share.fd is not None else [])
            try:
                p = subprocess.Popen(_child_argv(spec), stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=log, pass_fds=keep,
                                     env=ENV, cwd="/", start_new_session=True)
            finally:
                os.close(w_fd)
                os.close(log)
            procs.append((share, p, r_fd))
            records.append({"tag": share.tag, "pid": p.pid,
                            "start": psutil.Process(p.pid).create_time()})
        record(records)
        for share, p, _ in procs:      # recorded: now they may go on
            try:
                p.stdin.write(b"go\n")
                p.stdin.close()
            except OSError as e:
                raise NodeError(f"the virtiofsd launcher for {share.tag} died: {e}") from None
        end = time.monotonic() + timeout
        for share, p, r_fd in procs:
            _await(share, p, r_fd, end)
        return records
    finally:
        for item in opened:
            if isinstance(item, int):
                os.close(item)
            else:
                item.close()


def _child_argv(spec: dict) -> list[str]:
    """The launcher: this very module, in a fresh interpreter that ignores the environment."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.insert(0, {pkg_parent!r}); "
            "from vibatch.share import _child; _child(sys.argv[1])")
    return [sys.executable, "-I", "-c", code, json.dumps(spec)]


def _await(share: ShareSource, p: subprocess.Popen, r_fd: int, end: float) -> None:
    """Read the launcher's verdict; EOF after "ok" means it exec'd virtiofsd."""
    buf = b""
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise NodeError(f"virtiofsd for {share.tag} did not start within "
                            f"{LAUNCH_TIMEOUT_S:g} s")
        ready, _, _ = select.select([r_fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(r_fd, 4096)
        if not chunk:
            break
        buf += chunk
    verdict = buf.decode(errors="replace").strip()
    if verdict == "ok":
        return
    if verdict.startswith("refused "):
        raise MissingWorkdir(verdict[len("refused "):])
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=max(0.1, end - time.monotonic()))
    raise NodeError(f"could not start virtiofsd for {share.tag}: "
                    f"{verdict or f'launcher exit status {p.returncode}'}")


def stop(records: Sequence[dict], timeout: float = STOP_TIMEOUT_S) -> None:
    """Kill the recorded virtiofsd processes that still run (same pid, same start time) and
    wait for them to end. Safe to repeat; a process already gone is not an error."""
    import psutil  # noqa: PLC0415
    live = []
    for rec in records:
        try:
            proc = psutil.Process(int(rec["pid"]))
            if abs(proc.create_time() - float(rec["start"])) >= 1:
                continue       # the pid was reused
            proc.send_signal(signal.SIGKILL)
            live.append(proc)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    end = time.monotonic() + timeout
    while live:
        for proc in list(live):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)     # ours (undo in the prologue): reap it
            try:
                gone = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
            if gone:
                live.remove(proc)
        if live and time.monotonic() >= end:
            raise NodeError("virtiofsd process(es) " + ", ".join(str(p.pid) for p in live)
                            + f" did not end within {timeout:g} s of SIGKILL")
        if live:
            time.sleep(0.005)


# --- the launcher (child) ---------------------------------------------------------------------
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2


class _Refused(Exception):
    pass


def walk_as_user(path: str) -> int:
    """Open ``path`` (absolute, normalised) component by component with this process's
    credentials, following no symbolic link. Returns an O_PATH descriptor; raises _Refused."""
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise _Refused(f"working directory {path!r} is not a normalised absolute path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    done = ""
    try:
        for comp in [c for c in path.split("/") if c]:
            here = done + "/" + comp
            try:
                nfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError as e:
                raise _Refused(_why(e, fd, comp, here, done or "/", path)) from None
            os.close(fd)
            fd, done = nfd, here
        return fd
    except BaseException:
        os.close(fd)
        raise


def _why(e: OSError, parent_fd: int, comp: str, here: str, parent: str, path: str) -> str:
    if e.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            st = os.stat(comp, dir_fd=parent_fd, follow_symlinks=False)
            if (st.st_mode & 0o170000) == 0o120000:
                return (f"working directory {path}: {here} is a symbolic link; give the real "
                        "path (as `pwd -P` prints it)")
        except OSError:
            pass
        return f"working directory {path}: {here} is not a directory"
    if e.errno == errno.EACCES:
        return (f"working directory {path}: the job's user may not enter {parent} "
                "(permission denied)")
    if e.errno == errno.ENOENT:
        return f"working directory {path} does not exist ({here} is missing)"
    return f"working directory {path}: cannot open {here}: {e.strerror}"


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _child(arg: str) -> None:
    spec = json.loads(arg)
    status = spec["status"]
    os.set_inheritable(status, False)          # closes (EOF for the parent) at exec
    try:
        if sys.stdin.buffer.read(8) != b"go\n":
            os._exit(3)                         # the parent died before recording us
        uid, gid = spec["uid"], spec["gid"]
        if spec["cpus"]:
            os.sched_setaffinity(0, spec["cpus"])
        # 1. the check, with the job user's uid, gid and groups (a root euid only in the saved
        #    set, so no capability applies): enter the directory, which stays our cwd
        os.setgroups(spec["groups"])
        os.setegid(gid)
        os.seteuid(uid)
        if spec["path"] is not None:
            fd = walk_as_user(spec["path"])
            try:
                os.fchdir(fd)
            except OSError as e:
                raise _Refused(f"working directory {spec['path']}: the job's user may not "
                               f"enter it ({e.strerror})") from None
        else:
            fd = spec["fd"]
            os.fchdir(fd)
        os.set_inheritable(fd, True)            # virtiofsd serves the share through it
        # 2. become the job user for good, without supplementary groups (virtiofsd drops them
        #    itself, and could not in a namespace where setgroups is denied)
        os.seteuid(0)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        libc = _libc()
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # the uid change made us undumpable, so /proc/self/*_map would be root's: we are
        # the job user's process now, and it may own them (exec would reset this anyway)
        _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # virtiofsd: one fd per inode
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
        _keep_chroot_capability(libc)
        install_filter(libc)
        argv = [spec["name"], f"--fd={spec['listen']}",
                # virtiofsd changes directory to / before its chroot, so it gets the share by
                # path: the descriptor of the checked directory, which it holds (no swap window)
                "-o", f"source=/proc/self/fd/{fd}/.", "-o", "sandbox=chroot", "-o", "cache=none",
                "-o", "no_xattr", "-o", "no_posix_acl", "-o", "log_level=err",
                "-o", "modcaps=" + ":".join("-" + c for c in VIRTIOFSD_CAPS), "--rlimit-nofile=0"]
        os.write(status, b"ok\n")
        os.execve(spec["virtiofsd"], argv, dict(ENV))
    except _Refused as e:
        os.write(status, b"refused " + str(e).encode(errors="replace") + b"\n")
        os._exit(2)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        os.write(status, f"error {type(e).__name__}: {e}\n".encode(errors="replace"))
        os._exit(1)


CAP_SETPCAP, CAP_SYS_CHROOT = 8, 18
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
# virtiofsd keeps these (to act as root on a host file system) unless told otherwise: none is
# needed, as it never acts as anyone but the job user, and it holds none of them anyway
VIRTIOFSD_CAPS = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod",
                  "setfcap")


def _keep_chroot_capability(libc: ctypes.CDLL) -> None:
    """Keep CAP_SYS_CHROOT and CAP_SETPCAP (in our own user namespace only) across exec:
    virtiofsd chroots into the share, then empties its bounding set (libcap-ng refuses that
    without CAP_SETPCAP) and drops every capability."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()                      # {effective, permitted, inheritable} x2
    _check(libc.syscall(125, header, data), "capget")  # x86-64 capget
    data[2] |= (1 << CAP_SYS_CHROOT) | (1 << CAP_SETPCAP)
    _check(libc.syscall(126, header, data), "capset")
    for cap in (CAP_SYS_CHROOT, CAP_SETPCAP):
        _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0), "ambient")


# --- the seccomp filter -----------------------------------------------------------------------
AUDIT_ARCH_X86_64 = 0xC000003E
X32_BIT = 0x40000000
RET_ALLOW, RET_KILL = 0x7FFF0000, 0x80000000
RET_EPERM = 0x00050000 | errno.EPERM
SUID_BITS = 0o6000
CREATE_FLAGS = os.O_CREAT | 0o20000000          # O_CREAT | __O_TMPFILE
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000
# x86-64 syscall -> (kind, argument index of flags/mode)
SYSCALLS = {
    2: ("create", 1, 2),       # open(path, flags, mode)
    257: ("create", 2, 3),     # openat(dfd, path, flags, mode)
    85: ("mode", 1),           # creat(path, mode)
    90: ("mode", 1),           # chmod(path, mode)
    91: ("mode", 1),           # fchmod(fd, mode)
    268: ("mode", 2),          # fchmodat(dfd, path, mode)
    452: ("mode", 2),          # fchmodat2(dfd, path, mode, flags)
    83: ("mode", 1),           # mkdir(path, mode)
    258: ("mode", 2),          # mkdirat(dfd, path, mode)
    133: ("node", 1),          # mknod(path, mode, dev)
    259: ("node", 2),          # mknodat(dfd, path, mode, dev)
    437: ("deny",),            # openat2: its mode is in memory the filter cannot read
    425: ("deny",),            # io_uring_setup: io_uring requests bypass seccomp
    188: ("deny",), 189: ("deny",), 190: ("deny",),   # setxattr, lsetxattr, fsetxattr
}


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


LD_ABS, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06


def _arg(i: int) -> bytes:           # low 32 bits of argument i (little-endian)
    return _ins(LD_ABS, 16 + 8 * i)


def _block(spec: tuple) -> list[bytes]:
    kind = spec[0]
    if kind == "deny":
        return [_ins(RET, RET_EPERM)]
    if kind == "mode":
        return [_arg(spec[1]), _ins(JSET, SUID_BITS, 0, 1), _ins(RET, RET_EPERM),
                _ins(RET, RET_ALLOW)]
    if kind == "create":
        return [_arg(spec[1]), _ins(JSET, CREATE_FLAGS, 0, 3), _arg(spec[2]),
                _ins(JSET, SUID_BITS, 0, 1), _ins(RET, RET_EPERM), _ins(RET, RET_ALLOW)]
    # node: no setuid/setgid bits, no character or block device
    return [_arg(spec[1]), _ins(JSET, SUID_BITS, 4, 0), _ins(AND, S_IFMT),
            _ins(JEQ, S_IFCHR, 2, 0), _ins(JEQ, S_IFBLK, 1, 0), _ins(RET, RET_ALLOW),
            _ins(RET, RET_EPERM)]


def filter_program() -> bytes:
    prog = [_ins(LD_ABS, 4), _ins(JEQ, AUDIT_ARCH_X86_64, 1, 0), _ins(RET, RET_KILL),
            _ins(LD_ABS, 0), _ins(JGE, X32_BIT, 0, 1), _ins(RET, RET_KILL)]
    for nr, spec in SYSCALLS.items():
        block = _block(spec)
        prog += [_ins(LD_ABS, 0), _ins(JEQ, nr, 0, len(block))] + block
    prog.append(_ins(RET, RET_ALLOW))
    return b"".join(prog)


def install_filter(libc: Optional[ctypes.CDLL] = None) -> None:
    """Install the filter in this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    libc = libc or _libc()
    prog = filter_program()
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")
