"""Per-job setup of a stock guest, done through its root agent at prologue time.

The image needs nothing of ours: a POSIX shell, the usual tools to add a user (useradd,
busybox adduser, or plain /etc/passwd), mount with virtiofs, and qemu-guest-agent. The script
gets every job value as a positional argument; nothing is pasted into shell text.
"""
from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .domain import IO_TAG, USER_AGENT_PORT, WORKDIR_TAG

GUEST_IO_DIR = "/run/vibatch/io"
MACHINE_FEATURES = "/run/vibatch/features/machine"    # $MACHINEFEATURES in the guest
JOB_FEATURES = "/run/vibatch/features/job"            # $JOBFEATURES
GUEST_AGENT_STATE = "/run/vibatch/agent"
WALLTIME_PID = "/run/vibatch/walltime.pid"           # the guest's walltime timer (t:SECONDS)

# $1 name  $2 uid  $3 gid  $4 home  $5 workdir  $6 io dir  $7 agent state dir
# $8 machine features dir  $9 job features dir  then c:CENTISECONDS (a restored guest's clock:
# the host's time when the guest's uptime was 0), r:SEED i:MACHINE-ID h:HOSTNAME (a fresh
# machine), m:KEY=VALUE / j:KEY=VALUE, one per feature, s:TAG=PATH per site share,
# x:SERIAL=PATH for the scratch disk, n:MAC=ADDR,GW,DNS for the NIC,
# t:SECONDS (last): power the guest off that long from now (the job's walltime plus grace)
SETUP_SCRIPT = r"""
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
name=$1 uid=$2 gid=$3 home=$4 wd=$5 io=$6 st=$7 mf=$8 jf=$9
shift 9
fail() { echo "vibatch guest setup: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# a device plugged in after a restore (warm start) may take a moment to appear: retry 10 s
settle() { n=0; until "$@" 2>/dev/null; do n=$((n+1)); [ $n -lt 100 ] || { "$@"; return; }; sleep 0.1; done; }
# builtins only (every fork is slow under emulation): is PATH mounted (with type TYPE)?
mounted() { while read -r _ m t _; do [ "$m" = "$1" ] && [ -z "${2:-}" -o "$t" = "${2:-}" ] && return 0; done < /proc/mounts; return 1; }
# the first line of FILE into VAR, also without a newline (a virtio disk's serial has none)
line() { eval "$1="; [ -r "$2" ] || return 1; IFS= read -r "$1" < "$2" || eval "[ -n \"\$$1\" ]"; }
vfs() { mounted "$2" virtiofs || mount -t virtiofs ${3:+-o "$3"} "$1" "$2"; }
disk_by_serial() { for b in /sys/block/vd*; do line s "$b/serial" && [ "$s" = "$1" ] && { dev=/dev/${b##*/}; return 0; }; done; return 1; }
nic_by_mac() { for i in /sys/class/net/*; do line a "$i/address" && [ "$a" = "$1" ] && { dev=${i##*/}; return 0; }; done; return 1; }

# a fresh machine first (r: RNG seed, i: machine id, h: host name): a restored template's
# guest would otherwise share them with every other job restored from it. The host name is the
# kernel's (and resolves, through /etc/hosts); /etc/hostname stays the image's own. Before them,
# a restored guest's clock (c:): the host's time at the guest's uptime 0, plus the uptime now.
# By date, not by the agent's guest-set-time, whose hwclock -w busy-waits up to a second for the
# RTC's next half second (busybox's date sets whole seconds only: then rounded)
while [ $# -gt 0 ]; do
  case $1 in
    c:*) read -r u _ < /proc/uptime
         case $u in *[0-9].[0-9][0-9]) ;; *) fail "cannot set the clock: /proc/uptime says '$u'" ;; esac
         f=${u#*.}
         t=$(( ${1#c:} + ${u%.*} * 100 + ${f#0} )); f=$((t % 100)); [ $f -gt 9 ] || f=0$f
         date -u -s "@$((t / 100)).$f" >/dev/null 2>&1 || date -u -s "@$(((t + 50) / 100))" >/dev/null ||
           fail "cannot set the clock" ;;
    r:*) printf '%s' "${1#r:}" > /dev/urandom || fail "cannot seed the RNG" ;;
    i:*) [ ! -f /etc/machine-id ] || printf '%s\n' "${1#i:}" > /etc/machine-id || fail "cannot write /etc/machine-id" ;;
    h:*) printf '%s' "${1#h:}" > /proc/sys/kernel/hostname || fail "cannot set the host name"
         [ ! -f /etc/hosts ] || printf '127.0.1.1\t%s\n' "${1#h:}" >> /etc/hosts || fail "cannot write /etc/hosts" ;;
    *) break ;;
  esac
  shift
done

# the job's group and user, with the host's ids
group= taken=
while IFS=: read -r g _ i _; do
  [ "$i" = "$gid" ] && [ -z "$group" ] && group=$g
  [ "$g" = "$name" ] && taken=1
done < /etc/group
if [ -z "$group" ]; then
  group=$name
  [ -z "$taken" ] || group=vbjob$gid
  if have groupadd; then groupadd -o -g "$gid" "$group" || fail "groupadd $group failed"
  elif have addgroup; then addgroup -g "$gid" "$group" || fail "addgroup $group failed"
  else echo "$group:x:$gid:" >> /etc/group || fail "cannot write /etc/group"; fi
fi
known=
while IFS=: read -r n _ i _; do
  [ "$n" = "$name" ] || continue
  [ "$i" = "$uid" ] || fail "the image already has a user $name with another uid"
  known=1
done < /etc/passwd
if [ -z "$known" ]; then
  if have useradd; then useradd -o -M -N -u "$uid" -g "$gid" -d "$home" -s /bin/sh "$name" || fail "useradd $name failed"
  elif have adduser; then adduser -D -H -u "$uid" -G "$group" -h "$home" -s /bin/sh "$name" || fail "adduser $name failed"
  else echo "$name:x:$uid:$gid:vibatch job user:$home:/bin/sh" >> /etc/passwd || fail "cannot write /etc/passwd"; fi
fi

# One process per kind of work (each exec costs 50-70 ms on a stock image under emulation):
# every directory in one mkdir (0755 by the umask: the HEPiX Machine/Job Features directories
# and their files are root's, 0644 in 0755), the job user's home (if new), agent state and
# virtio-serial port in one chown and one chmod, before any share hides a path. Then the job's
# working directory at the same path and the per-job I/O folder.
umask 022
newhome=
[ -d "$home" ] || newhome=$home
# (a home the guest cannot make is not fatal: the job runs without one, as before)
mkdir -p ${newhome:+"$home"} "$wd" "$io" "$mf" "$jf" "$st" 2>/dev/null || {
  [ -z "$newhome" ] || [ -d "$home" ] || { echo "vibatch guest setup: cannot create the home $home" >&2; newhome=; }
  mkdir -p "$wd" "$io" "$mf" "$jf" "$st" || fail "cannot create $wd, $io, $mf, $jf or $st"; }
port=
for p in /sys/class/virtio-ports/*; do
  line n "$p/name" && [ "$n" = "$PORT" ] && port=/dev/${p##*/}
done
[ -n "$port" ] || fail "no virtio-serial port named $PORT"
chown "$uid:$gid" "$port" "$st" ${newhome:+"$home"} && chmod u=rwX,go= "$port" "$st" ${newhome:+"$home"} ||
  fail "cannot hand $port and $st to the job user"
[ -d /sys/module/virtiofs ] || { have modprobe && modprobe virtiofs 2>/dev/null; }
settle vfs "$TAG_WD" "$wd" || fail "cannot mount the working directory on $wd"
settle vfs "$TAG_IO" "$io" || fail "cannot mount the I/O folder on $io"
# site shares (s:TAG=PATH), read-only at their host path, and the scratch disk (x:SERIAL=PATH),
# the job user's
for kv in "$@"; do
  case $kv in
    m:*) d=$mf ;;
    j:*) d=$jf ;;
    s:*) kv=${kv#s:}; p=${kv#*=}
         mkdir -p "$p" || fail "cannot create $p for a site share"
         settle vfs "${kv%%=*}" "$p" ro,nosuid,nodev || fail "cannot mount the site share on $p"
         continue ;;
    x:*) kv=${kv#x:}; p=${kv#*=} dev=
         settle disk_by_serial "${kv%%=*}" || fail "no scratch disk (serial ${kv%%=*}) in the guest"
         mkdir -p "$p" || fail "cannot create $p for the scratch disk"
         mounted "$p" || mount -t ext4 -o nosuid,nodev "$dev" "$p" || fail "cannot mount the scratch disk on $p"
         chown "$uid:$gid" "$p" && chmod 700 "$p" || fail "cannot hand $p to the job user"
         continue ;;
    n:*) kv=${kv#n:}; mac=${kv%%=*} v=${kv#*=}; addr=${v%%,*} v=${v#*,}; gw=${v%%,*} dns=${v#*,} dev=
         settle nic_by_mac "$mac" || fail "no network interface with MAC $mac in the guest"
         ! have udevadm || udevadm settle -t 5 2>/dev/null   # a new NIC may still be renamed
         nic_by_mac "$mac" || fail "the network interface with MAC $mac went away"
         ip link set "$dev" up || fail "cannot bring $dev up"
         ip -4 addr show dev "$dev" | grep -q " $addr " || ip addr add "$addr" dev "$dev" || fail "cannot give $dev the address $addr"
         ip route replace default via "$gw" dev "$dev" || fail "cannot route through $gw"
         [ -z "$dns" ] || printf 'nameserver %s\n' "$dns" > /etc/resolv.conf || fail "cannot write /etc/resolv.conf"
         continue ;;
    t:*) s=${kv#t:}
         case $s in ''|*[!0-9]*) fail "bad walltime deadline $s" ;; esac
         # root's timer: the VM ends itself at the job's limit plus grace even if nothing on
         # the host does (a batch daemon that died without its epilogue). Guest root can stop
         # it: vibatch reap is the enforcement (docs/operations.md). Its pid: $WALLTIME_PID.
         if [ ! -s "$WALLTIME_PID" ]; then
           (trap - TERM; sleep "$s"; echo "vibatch: walltime + grace ($s s) passed: powering off" >/dev/console 2>/dev/null
            sync; poweroff -f 2>/dev/null; echo o > /proc/sysrq-trigger) </dev/null >/dev/null 2>&1 &
           echo $! > "$WALLTIME_PID" || fail "cannot write $WALLTIME_PID"
         fi
         continue ;;
    *) fail "bad setup argument $kv" ;;
  esac
  kv=${kv#?:}
  printf '%s\n' "${kv#*=}" > "$d/${kv%%=*}" || fail "cannot write $d/${kv%%=*}"
done

# a second qemu-guest-agent, as the job user, on the job's own virtio-serial port. util-linux's
# setpriv first (no PAM session to open: a third of a second less than runuser on Debian under
# emulation); busybox's setpriv has no --reuid and refuses at once, so then runuser, or su
ga=
for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin /usr/libexec; do [ -x "$d/qemu-ga" ] && ga=$d/qemu-ga && break; done
[ -n "$ga" ] || fail "qemu-ga not found"
set -- "$ga" -d -m virtio-serial -p "$port" -t "$st" -f "$st/qemu-ga.pid"
if have setpriv && setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@" 2>/dev/null; then :
elif have runuser; then runuser -u "$name" -- "$@" || fail "cannot start the user agent"
else  # POSIXLY_CORRECT: stop option parsing at the user name, so qemu-ga's options pass through
  POSIXLY_CORRECT=1 su -s /bin/sh -c 'exec "$0" "$@"' "$name" "$@" || fail "cannot start the user agent"
fi
echo ok
"""


@dataclass(frozen=True)
class SetupArgs:
    name: str
    uid: int
    gid: int
    home: str
    workdir: str
    features: tuple[str, ...] = ()     # m:KEY=VALUE / j:KEY=VALUE (features.as_args)
    shares: tuple[tuple[str, str], ...] = ()   # (tag, guest path) of each site share
    scratch: Optional[tuple[str, str]] = None  # (disk serial, guest path)
    net: Optional[str] = None          # n:MAC=ADDRESS/PREFIX,GATEWAY,DNS (network.GuestNet.arg)
    fresh: tuple[str, ...] = ()        # r:SEED i:MACHINE-ID h:HOSTNAME (fresh_machine)
    clock_cs: Optional[int] = None     # c:CENTISECONDS, a restored guest's clock (clock_base)
    deadline_s: Optional[int] = None   # t:SECONDS, the guest powers off then (walltime + grace)

    def argv(self) -> list[str]:
        script = (f"TAG_WD={WORKDIR_TAG} TAG_IO={IO_TAG} PORT={USER_AGENT_PORT} "
                  f"WALLTIME_PID={WALLTIME_PID}\n" + SETUP_SCRIPT)
        return ["-c", script, "vibatch-setup", self.name, str(self.uid), str(self.gid), self.home,
                self.workdir, GUEST_IO_DIR, GUEST_AGENT_STATE, MACHINE_FEATURES, JOB_FEATURES,
                *([f"c:{self.clock_cs}"] if self.clock_cs is not None else []),
                *self.fresh, *self.features, *(f"s:{tag}={path}" for tag, path in self.shares),
                *([f"x:{self.scratch[0]}={self.scratch[1]}"] if self.scratch else []),
                *([self.net] if self.net else []),
                *([f"t:{self.deadline_s}"] if self.deadline_s else [])]   # last (issue 11)


def clock_base(agent: Any) -> int:
    """The host's time, in centiseconds since the epoch, at which the guest's uptime was 0:
    the guest's ``/proc/uptime``, read by its root agent (no process), against the host's
    clock at the middle of the read. The setup adds the uptime then current (c:)."""
    t0 = time.time()
    uptime = float(agent.read_file("/proc/uptime", 64).split()[0])
    return round(((t0 + time.time()) / 2 - uptime) * 100)


def fresh_machine(node: str, job_id: str) -> tuple[str, ...]:
    """What makes each job's guest a machine of its own, also when restored from a template:
    256 bits for its RNG (on top of the reseed its VM generation id causes), a new machine id
    and a host name of its own, ``<node>-<job>`` (which node ran which job, in a job's log)."""
    return (f"r:{secrets.token_hex(32)}", f"i:{uuid.uuid4().hex}", f"h:{host_name(node, job_id)}")


def host_name(node: str, job_id: str) -> str:
    """``<node>-<job>`` as one DNS label: lower case letters, digits and '-', at most 63."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"{node.split('.')[0]}-{job_id}".lower())
    return label[:63].strip("-") or "vibatch"
