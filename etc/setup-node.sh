#!/bin/bash
# Set a Debian 12 node up for vibatch, then run a demo job in a fresh VM. Safe to run again.
#   sudo etc/setup-node.sh [--no-demo]
# 1. Debian packages: QEMU, qemu-utils, libvirt daemon + dev headers, image build tools.
# 2. A virtualenv with vibatch in /opt/vibatch/venv (outside any home, so job users can run
#    `vibatch exec`) and /usr/local/bin/vibatch.
#    Slurm's SPANK plugin (spank/vibatch_spank.c) built against libslurm-dev into
#    /opt/vibatch/lib/vibatch_spank.so (plugstack.conf: docs/batch/slurm.md), and vibatch's
#    QEMU (qemu/vibatch_qemu.c, vm.emulator) into /opt/vibatch/lib/vibatch-qemu.
# 3. /etc/vibatch/vibatch.yaml from etc/vibatch.yaml, unless one exists.
# 4. /dev/kvm as root:kvm 0660 (else libvirt re-probes QEMU for ~60 s at every start), and
#    libvirtd under vibatch's child subreaper: where systemd is PID 1, through a drop-in for
#    libvirtd.service (etc/install-systemd-dropin.sh); elsewhere virtlogd + libvirtd started here.
# 5. The test image built from Debian packages and added to the library as "testguest".
# 6. The demo: `vibatch run` prints, from inside the VM, the kernel, id, CPUs and memory.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${VIBATCH_PREFIX:-/opt/vibatch}
VENV=$PREFIX/venv
CONF=/etc/vibatch/vibatch.yaml
DEMO=1
[ "${1:-}" = "--no-demo" ] && DEMO=0
log() { echo "setup-node: $*"; }
[ "$(id -u)" = 0 ] || { echo "setup-node: run as root" >&2; exit 1; }

PKGS=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
      gcc python3-dev python3-venv cpio e2fsprogs xz-utils lz4 zstd passwd
      syslinux syslinux-common mtools dosfstools fdisk iptables iproute2
      mmdebstrap debian-archive-keyring   # images/debian (the tests build it; this does not)
      systemd                             # systemd-socket-activate, systemd-analyze (tests)
      libslurm-dev)                       # spank.h, for the Slurm plugin
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}"
fi

# Debian's python3, not a per-user interpreter: the job users must be able to run it
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  mkdir -p "$PREFIX"
  /usr/bin/python3 -m venv "$VENV"
fi
log "installing vibatch into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "$REPO[test]"
ln -sf "$VENV/bin/vibatch" /usr/local/bin/vibatch
chmod -R a+rX "$PREFIX"   # before the hooks: they keep their own modes
# the batch systems' hook shims, root-owned, each with its mode from hooks/modes (0500 for
# root's hooks, 0555 for the job user's): point slurm.conf, the SGE queue or pbs_mom here
install -d -o root -g root -m 0755 "$PREFIX" "$PREFIX/hooks"
for f in "$REPO"/hooks/*/*; do
  rel=${f#"$REPO"/hooks/}
  mode=$(awk -v f="$rel" '$1 == f { print $2 }' "$REPO/hooks/modes")
  [ -n "$mode" ] || { echo "setup-node: hooks/$rel has no mode in hooks/modes" >&2; exit 1; }
  install -d -o root -g root -m 0755 "$PREFIX/hooks/$(dirname "$rel")"
  install -o root -g root -m "$mode" "$f" "$PREFIX/hooks/$rel"
done
# Slurm's SPANK plugin: built from our source here, never shipped as a binary
install -d -o root -g root -m 0755 "$PREFIX/lib"
gcc -shared -fPIC -O2 -Wall -Wextra -Werror -o "$PREFIX/lib/vibatch_spank.so.new" \
  "$REPO/spank/vibatch_spank.c"
chown root:root "$PREFIX/lib/vibatch_spank.so.new"
chmod 0755 "$PREFIX/lib/vibatch_spank.so.new"
mv -f "$PREFIX/lib/vibatch_spank.so.new" "$PREFIX/lib/vibatch_spank.so"
# vibatch's QEMU (vm.emulator): ignores SIGUSR2, then execs Debian's QEMU (qemu/vibatch_qemu.c)
gcc -O2 -Wall -Wextra -Werror -DVIBATCH_QEMU='"/usr/bin/qemu-system-x86_64"' \
  -o "$PREFIX/lib/vibatch-qemu.new" "$REPO/qemu/vibatch_qemu.c"
chown root:root "$PREFIX/lib/vibatch-qemu.new"
chmod 0755 "$PREFIX/lib/vibatch-qemu.new"
mv -f "$PREFIX/lib/vibatch-qemu.new" "$PREFIX/lib/vibatch-qemu"

mkdir -p /etc/vibatch
[ -e "$CONF" ] || install -m 644 "$REPO/etc/vibatch.yaml" "$CONF"

if [ -e /dev/kvm ]; then chown root:kvm /dev/kvm; chmod 0660 /dev/kvm; fi
# A daemon started here must not keep the caller's descriptors open: an inherited pipe would keep
# a CI runner waiting for EOF, an inherited flock(1) lock would be held for the daemon's life.
# Python's subprocess closes every descriptor above 2 (close_fds).
daemon() { /usr/bin/python3 -I -c 'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))' "$@"; }
if [ -d /run/systemd/system ]; then
  # systemd runs virtlogd and libvirtd (socket-activated); a drop-in puts libvirtd under the
  # subreaper, so that QEMU's parent is not PID 1 (etc/install-systemd-dropin.sh)
  "$REPO/etc/install-systemd-dropin.sh" / "$PREFIX"
else
  pgrep -x virtlogd >/dev/null || { log "starting virtlogd"; daemon virtlogd -d; }
  # under a child subreaper that reaps QEMU at once, as systemd would (vibatch/subreaper.py)
  pgrep -x libvirtd >/dev/null || { log "starting libvirtd under a subreaper"
    install -d -m 0755 /var/log/vibatch
    L=/var/log/vibatch/libvirtd.log   # kept below 10 MiB, one old copy
    [ ! -f "$L" ] || [ "$(stat -c %s "$L")" -lt 10485760 ] || mv -f "$L" "$L.1"
    "$VENV/bin/python" -I -m vibatch.subreaper --detach --log /var/log/vibatch/libvirtd.log libvirtd; }
fi
for _ in $(seq 1 100); do   # bounded: up to 10 s for libvirtd to accept connections
  "$VENV/bin/python" -c 'import libvirt, sys; libvirt.registerErrorHandler(lambda *a: None, None); libvirt.open("qemu:///system").close()' 2>/dev/null && break
  sleep 0.1
done
"$VENV/bin/python" -c 'import libvirt; libvirt.open("qemu:///system").close()'

LIB=$("$VENV/bin/python" -c 'from vibatch import config; print(config.load().library_dir)')
BUILD=${VIBATCH_IMAGE_BUILD:-/var/lib/vibatch/build/testguest}
if [ ! -s "$BUILD/disk.qcow2" ]; then
  log "building the test image into $BUILD"
  apt-cache depends linux-image-amd64 2>/dev/null | grep -q 'Depends: linux-image-' || apt-get update -q
  "$REPO/images/testguest/build.sh" "$BUILD"
fi
if ! vibatch image show testguest >/dev/null 2>&1; then
  # absent, or left by an older vibatch (a plain directory): (re)install it
  [ -L "$LIB/testguest" ] || rm -rf "${LIB:?}/testguest"
  vibatch image add "$BUILD/disk.qcow2" --name testguest --os vbguest --replace \
    --os-version "$(cat "$BUILD/KVER")" --kernel "$BUILD/vmlinux" --initrd "$BUILD/initrd.cpio" \
    --cmdline "$(cat "$BUILD/cmdline")"
fi
vibatch image list

if [ "$DEMO" = 1 ]; then
  log "demo: one job in a fresh VM (as user nobody)"
  vibatch run --user nobody --workdir /var/tmp --timings -- sh -c \
    'echo "guest kernel: $(uname -r)"; echo "id:           $(id)"; echo "CPUs:         $(nproc)"; echo "memory:       $(free -m | awk "/^Mem:/ {print \$2}") MiB"'
fi
