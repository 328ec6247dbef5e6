"""The job's shared folders: each served by a virtiofsd that runs as the job's user, never as root.

libvirt starts one virtiofsd per ``<filesystem>``, as host root, so whatever guest root creates
would land on the host as root (setuid-root files, device nodes, chown to root). The domain
therefore names vibatch's launcher as the virtiofsd ``<binary>`` (``vm.share_launcher``, the
``hooks/libvirt/virtiofsd`` shim). libvirtd starts it, so it runs outside the batch system's
hook: none of the limits a batch system puts on the prologue (Grid Engine gives root's prolog
the job's ``h_vmem`` as RLIMIT_AS, which root here cannot lift) reaches virtiofsd, and libvirt
keeps owning its life: it is in the domain's cgroup and ends with the domain.

The ``<source dir>`` libvirt passes is the share's spec, a root-owned file in the job's state
directory (``shares/<tag>.json``) that the prologue wrote: the job user's ids, the directory
and the real virtiofsd. The launcher then, in place of libvirt's virtiofsd:

- with the job user's uid, gid and groups (root's uid kept only in the saved set, so no
  capability applies) opens the working directory one component at a time
  (``O_PATH|O_NOFOLLOW|O_DIRECTORY``: no symbolic link is followed, and every parent must be
  searchable by the user) and ``fchdir``s into exactly that directory. The I/O folder, which
  vibatch made below root-owned directories, is opened by root;
- becomes the job user for good, and enters a new user namespace that maps only the job's own
  uid and gid (what an unprivileged user may do for itself), plus new network, IPC and UTS
  namespaces;
- installs a seccomp filter that refuses setuid/setgid mode bits (chmod, create, mkdir,
  mknod), device nodes, xattr writes, openat2 and io_uring, and any non-x86-64 system call;
  where the batch system counts a job's processes by a group (Grid Engine's ``add_grp_id``),
  the launcher keeps that one group and the filter turns ``setgroups`` into a no-op, so
  virtiofsd's own drop of its groups (which the namespace would refuse) neither fails nor
  drops it;
- execs virtiofsd (same pid, so libvirt's pid file stays right) on libvirt's socket with
  ``sandbox=chroot`` and ``source=/proc/self/fd/N/.``, N being the descriptor of the directory
  that was checked: virtiofsd chroots into exactly that directory, whatever happens to its
  path later.

So a file the guest creates, as any guest uid, is created by a process that is the job's user
and cannot become anyone else: guest uids other than the job's are refused (EINVAL, since
virtiofsd cannot switch to an unmapped id), chown to another id is refused, a device node needs
CAP_MKNOD in the initial namespace, and the filter keeps setuid/setgid bits off.

The prologue checks the working directory as the job user first (``check_as_user``), so that a
refusal is the job's fault with a message naming the path, before any VM exists. Should the
directory change between that check and the launcher's own walk, the launcher writes its
refusal next to the spec (``<tag>.verdict``), and the prologue reports that instead of the
failed start. See docs/architecture.md and docs/security.md.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from ..errors import MissingWorkdir, NodeError

CHECK_TIMEOUT_S = 10.0
SPEC_MAX = 65536
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class ShareSpec:
    """What the launcher needs for one share; written by the prologue, root-only."""

    job_id: str
    tag: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    cpus: tuple[int, ...]
    virtiofsd: str                 # the real virtiofsd the launcher execs
    path: Optional[str] = None     # walked as the job user (the working directory, site shares)
    own: Optional[str] = None      # opened by root (the I/O folder vibatch made)
    readonly: bool = False         # refuse every change to the tree (site shares)
    label: str = "working directory"   # what the path is, in messages
    process_gid: Optional[int] = None  # the batch system's job group (Grid Engine's add_grp_id)


def shares_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "shares")


def spec_path(state_dir: str, tag: str) -> str:
    return os.path.join(shares_dir(state_dir), tag + ".json")


def verdict_path(spec_file: str) -> str:
    return spec_file[:-len(".json")] + ".verdict"


def process_name(job_id: str, tag: str) -> str:
    """virtiofsd's argv[0], so ``ps`` tells whose it is."""
    return f"virtiofsd-{job_id}-{tag}"


# --- the prologue's side (root) ----------------------------------------------------------------
def write_specs(state_dir: str, specs: Sequence[ShareSpec]) -> None:
    """Write each share's spec below the job's state directory, at ``spec_path`` (what the
    domain names as each share's source)."""
    d = shares_dir(state_dir)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise NodeError(f"{d} exists and is not root's directory") from None
    for spec in specs:
        path = spec_path(state_dir, spec.tag)
        for stale in (path, verdict_path(path)):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(spec), f)


def refusal(spec_files: Sequence[str]) -> Optional[str]:
    """The reason a launcher refused its share (written by it, root-only), if one did."""
    from ..safeio import read_bounded  # noqa: PLC0415
    for path in spec_files:
        data = read_bounded(verdict_path(path), 4096)
        if data:
            return data.decode(errors="replace").strip()
    return None


def check_as_user(path: str, uid: int, gid: int, groups: Sequence[int],
                  timeout: float = CHECK_TIMEOUT_S, label: str = "working directory") -> None:
    """Raise MissingWorkdir (the job's fault, naming the path) unless the job's user can open
    ``path`` through every parent without following a symbolic link. Checked in a child that
    takes the user's credentials: root's own answer would tell the user what lies below a
    directory they may not enter. A site share (``label``) that is missing or reached through
    a link is the node's fault (NodeError): the site configured it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from vibatch.vm.share import _check_child; _check_child(sys.argv[2:])")
    argv = [sys.executable, "-I", "-B", "-c", code, _pkg_parent(), path, str(uid), str(gid),
            ",".join(map(str, groups)), label]
    try:
        r = subprocess.run(argv, env=ENV, cwd="/", capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NodeError(f"checking the working directory {path} as the job's user took more "
                        f"than {timeout:g} s") from None
    out = r.stdout.decode(errors="replace").strip()
    if r.returncode == 0 and out == "ok":
        return
    if r.returncode == 2 and out.startswith("refused "):
        kind, _, why = out[len("refused "):].partition(" ")
        if label != "working directory" and kind in ("missing", "link"):
            raise NodeError(f"{why} on this node (fix the site's shares: in the config)")
        raise MissingWorkdir(why)
    raise NodeError(f"could not check the {label} {path} as the job's user: "
                    + (r.stderr.decode(errors="replace").strip().splitlines() or
                       [f"exit status {r.returncode}"])[-1])


def _pkg_parent() -> str:
    """The directory holding the vibatch package this process runs (the child runs the same)."""
    import vibatch  # noqa: PLC0415 - the top package, for its location only
    return os.path.dirname(os.path.dirname(os.path.abspath(vibatch.__file__)))


def _become_checker(uid: int, gid: int, groups: Sequence[int]) -> None:
    """The job user's uid, gid and groups as the effective ids; root stays in the saved set."""
    os.setgroups(list(groups))
    os.setegid(gid)
    os.seteuid(uid)


def _check_child(args: list[str]) -> None:
    path, uid, gid, groups, label = args[0], int(args[1]), int(args[2]), args[3], args[4]
    try:
        _become_checker(uid, gid, [int(g) for g in groups.split(",") if g])
        _enter(walk_as_user(path, label), path, label)
    except _Refused as e:
        print("refused", e.kind, e, flush=True)
        os._exit(2)
    print("ok", flush=True)
    os._exit(0)


# --- the launcher (libvirtd runs it as root, in place of virtiofsd) -----------------------------
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 4, 38, 22, 2


class _Refused(Exception):
    def __init__(self, message: str, kind: str = "denied") -> None:
        super().__init__(message)
        self.kind = kind      # missing | link | denied


def _enter(fd: int, path: str, label: str) -> None:
    """fchdir into the walked directory: that needs search permission on it."""
    try:
        os.fchdir(fd)
    except OSError as e:
        raise _Refused(f"{label} {path}: the job's user may not enter it ({e.strerror})") from None


def walk_as_user(path: str, label: str = "working directory") -> int:
    """Open ``path`` (absolute, normalised) component by component with this process's
    credentials, following no symbolic link. Returns an O_PATH descriptor; raises _Refused."""
    if not os.path.isabs(path) or os.path.normpath(path) != path or path.startswith("//"):
        raise _Refused(f"{label} {path!r} is not a normalised absolute path")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    done = ""
    try:
        for comp in [c for c in path.split("/") if c]:
            here = done + "/" + comp
            try:
                nfd = os.open(comp, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                              dir_fd=fd)
            except OSError as e:
                raise _why(e, fd, comp, here, done or "/", path, label) from None
            os.close(fd)
            fd, done = nfd, here
        return fd
    except BaseException:
        os.close(fd)
        raise


def _why(e: OSError, parent_fd: int, comp: str, here: str, parent: str, path: str,
         label: str) -> _Refused:
    if e.errno in (errno.ENOTDIR, errno.ELOOP):
        try:
            st = os.stat(comp, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return _Refused(f"{label} {path}: {here} is a symbolic link; give the real "
                                "path (as `pwd -P` prints it)", "link")
        except OSError:
            pass
        return _Refused(f"{label} {path}: {here} is not a directory", "missing")
    if e.errno == errno.EACCES:
        return _Refused(f"{label} {path}: the job's user may not enter {parent} "
                        "(permission denied)")
    if e.errno == errno.ENOENT:
        return _Refused(f"{label} {path} does not exist ({here} is missing)", "missing")
    return _Refused(f"{label} {path}: cannot open {here}: {e.strerror}")


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


class _Usage(Exception):
    pass


def parse_libvirt_argv(argv: Sequence[str]) -> tuple[int, str]:
    """(socket fd, source) from the command line libvirt gives virtiofsd:
    ``--fd=N -o source=PATH[,cache=...,...] [--thread-pool-size=N] [-d]``."""
    fd, source, it = None, None, iter(argv)
    for arg in it:
        if arg.startswith("--fd="):
            fd = int(arg[len("--fd="):])
        elif arg == "-o":
            opts = next(it, "")
            if opts.startswith("source="):
                source = _first_option(opts[len("source="):])
        elif arg.startswith("--thread-pool-size=") or arg == "-d":
            continue
        else:
            raise _Usage(f"unexpected argument {arg!r}")
    if fd is None or source is None:
        raise _Usage("expected --fd=N and -o source=PATH (as libvirt starts virtiofsd)")
    return fd, source


def _first_option(text: str) -> str:
    """The value up to the first lone comma; libvirt doubles a comma inside a path."""
    out, i = [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] != ",":
                break
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def read_spec(path: str) -> ShareSpec:
    """The spec at ``path``, trusted only if it and every directory above it are root's and
    writable by root alone, or sticky (so only root, that is vibatch, can have put it there)."""
    if not os.path.isabs(path) or os.path.normpath(path) != path or not path.endswith(".json"):
        raise _Usage(f"{path!r} is not a share spec")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        comps = [c for c in path.split("/") if c]
        for i, comp in enumerate(comps):
            last = i == len(comps) - 1
            flags = (os.O_RDONLY | os.O_NONBLOCK) if last else (os.O_PATH | os.O_DIRECTORY)
            nfd = os.open(comp, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            # root's, and writable by root alone; a sticky directory (/var/tmp) lets nobody
            # else replace root's entries, and any entry they add there is not root's
            shared = st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and not last)
            if st.st_uid != 0 or shared or (last and not stat.S_ISREG(st.st_mode)):
                raise _Usage(f"{path}: {'/' + '/'.join(comps[:i + 1])} is not root's alone")
        data = os.read(fd, SPEC_MAX + 1)
    finally:
        os.close(fd)
    if len(data) > SPEC_MAX:
        raise _Usage(f"{path} is larger than {SPEC_MAX} bytes")
    raw = json.loads(data)
    if (raw.get("path") is None) == (raw.get("own") is None):
        raise _Usage(f"{path}: a share spec names exactly one of path and own")
    return ShareSpec(**{**raw, "groups": tuple(raw["groups"]), "cpus": tuple(raw["cpus"])})


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The launcher's entry point: libvirt's virtiofsd command line in, virtiofsd exec'd."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        listen, source = parse_libvirt_argv(argv)
        spec = read_spec(source)
    except (_Usage, OSError, ValueError, KeyError, TypeError) as e:
        print(f"vibatch virtiofsd launcher: {e}", file=sys.stderr, flush=True)
        os._exit(64)
    try:
        _serve(spec, listen)
    except _Refused as e:
        _record_refusal(source, str(e))
        print(f"vibatch virtiofsd launcher: refused: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except BaseException as e:  # noqa: BLE001 - libvirt logs stderr, then reports the start
        print(f"vibatch virtiofsd launcher: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)


def _record_refusal(source: str, why: str) -> None:
    os.seteuid(0)
    fd = os.open(verdict_path(source), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, why.encode(errors="replace")[:4096])
    finally:
        os.close(fd)


def _serve(spec: ShareSpec, listen: int) -> None:
    uid, gid = spec.uid, spec.gid
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    if spec.own is not None:     # made by vibatch below root's directories: opened as root
        fd = os.open(spec.own, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    # 1. the check, with the job user's uid, gid and groups: enter the directory, which stays
    #    our cwd
    _become_checker(uid, gid, spec.groups)
    if spec.path is not None:
        fd = walk_as_user(spec.path, spec.label)
        _enter(fd, spec.path, spec.label)
    else:
        os.fchdir(fd)
    os.set_inheritable(fd, True)            # virtiofsd serves the share through it
    libc = _libc()
    become_job_user(libc, uid, gid, spec.process_gid)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)   # virtiofsd: one fd per inode
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _keep_chroot_capability(libc)
    install_filter(libc, readonly=spec.readonly, keep_groups=bool(spec.process_gid))
    # a process with the job group gets every signal Grid Engine sends the job
    # (ENABLE_ADDGRP_KILL): SIGUSR1 for s_rt or -notify, SIGUSR2 for -notify, which would end
    # virtiofsd (it handles neither) and take the job's shares away while its VM runs on.
    # Ignored, they stay ignored across exec; libvirt's SIGTERM and a SIGKILL still end it
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    argv = [process_name(spec.job_id, spec.tag), f"--fd={listen}",
            # virtiofsd changes directory to / before its chroot, so it gets the share by path:
            # the descriptor of the checked directory, which it holds (no swap window)
            "-o", f"source=/proc/self/fd/{fd}/.", "-o", "sandbox=chroot", "-o", "cache=none",
            "-o", "no_xattr", "-o", "no_posix_acl", "-o", "log_level=err",
            "-o", "modcaps=" + ":".join("-" + c for c in VIRTIOFSD_CAPS), "--rlimit-nofile=0"]
    os.execve(spec.virtiofsd, argv, dict(ENV))


def become_job_user(libc: ctypes.CDLL, uid: int, gid: int, process_gid: Optional[int]) -> None:
    """Step 2 of the launcher: become the job user for good, in user, network, IPC and UTS
    namespaces of its own that map only its uid and gid. No supplementary group of the user's:
    only the batch system's job group, by which its collector counts the process (Grid Engine's
    PDC reads /proc/PID/status Groups:). virtiofsd drops every group at start, and in a
    namespace where setgroups is denied that fails and it exits; the filter makes its setgroups
    a no-op instead (it can then neither drop nor add a group)."""
    os.seteuid(0)
    os.setgroups([process_gid] if process_gid else [])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # the uid change made us undumpable, so /proc/self/*_map would be root's: we are the job
    # user's process now, and it may own them (exec would reset this anyway)
    _check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


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
RET_ERRNO = 0x00050000             # SECCOMP_RET_ERRNO: the call fails with the errno in the low bits
RET_EPERM = RET_ERRNO | errno.EPERM
RET_NOOP = RET_ERRNO                # errno 0: the call returns 0, doing nothing
SETGROUPS = 116
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


# a read-only share: every call that could change the tree fails with EROFS, whatever guest root
# asks (the C virtiofsd of QEMU 7.2 has no read-only mode of its own)
RET_EROFS = RET_ERRNO | errno.EROFS
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | 0o20000000   # | __O_TMPFILE
READONLY_SYSCALLS = {
    2: ("rdonly", 1), 257: ("rdonly", 2),                  # open, openat: no write/create flag
    **{nr: ("erofs",) for nr in (
        85, 90, 91, 268, 452,           # creat, chmod, fchmod, fchmodat, fchmodat2
        92, 93, 94, 260,                # chown, fchown, lchown, fchownat
        83, 258, 133, 259, 84,          # mkdir, mkdirat, mknod, mknodat, rmdir
        87, 263, 82, 264, 316,          # unlink, unlinkat, rename, renameat, renameat2
        86, 265, 88, 266,               # link, linkat, symlink, symlinkat
        76, 77, 285,                    # truncate, ftruncate, fallocate
        188, 189, 190, 197, 198, 199,   # set/remove xattr
        132, 235, 261, 280)},           # utime, utimes, futimesat, utimensat
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
    if kind == "erofs":
        return [_ins(RET, RET_EROFS)]
    if kind == "noop":
        return [_ins(RET, RET_NOOP)]
    if kind == "rdonly":
        return [_arg(spec[1]), _ins(JSET, WRITE_FLAGS, 0, 1), _ins(RET, RET_EROFS),
                _ins(RET, RET_ALLOW)]
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


def filter_program(readonly: bool = False, keep_groups: bool = False) -> bytes:
    """The launcher's filter; ``keep_groups``: setgroups does nothing and succeeds, so the
    process keeps the groups it has (the batch system's job group, _serve)."""
    prog = [_ins(LD_ABS, 4), _ins(JEQ, AUDIT_ARCH_X86_64, 1, 0), _ins(RET, RET_KILL),
            _ins(LD_ABS, 0), _ins(JGE, X32_BIT, 0, 1), _ins(RET, RET_KILL)]
    rules = {**SYSCALLS, **READONLY_SYSCALLS} if readonly else dict(SYSCALLS)
    if keep_groups:
        rules[SETGROUPS] = ("noop",)
    for nr, spec in rules.items():
        block = _block(spec)
        prog += [_ins(LD_ABS, 0), _ins(JEQ, nr, 0, len(block))] + block
    prog.append(_ins(RET, RET_ALLOW))
    return b"".join(prog)


def install_filter(libc: Optional[ctypes.CDLL] = None, readonly: bool = False,
                   keep_groups: bool = False) -> None:
    """Install the filter in this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    libc = libc or _libc()
    prog = filter_program(readonly, keep_groups)
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


if __name__ == "__main__":
    main()
