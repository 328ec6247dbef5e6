#!/bin/bash
# Build a stock Debian image from Debian's archive, of the kind a site would run jobs in:
#   images/debian/build.sh --release bookworm|trixie --layout kernel|disk OUTDIR
# Options: --kernel-package PKG  (default linux-image-cloud-amd64, Debian's kernel for VMs: it has
#                                 virtio and virtiofs, is 300 MB smaller than linux-image-amd64
#                                 and reached the agent 3.6 s sooner here under TCG; both work)
#          --mirror URL          (default http://deb.debian.org/debian; RELEASE and RELEASE-updates)
#          --security-mirror URL (default http://deb.debian.org/debian-security; RELEASE-security)
#          --size SIZE           (the root file system, default 2G; the qcow2 holds only what is used)
#          --include PKG,PKG     (more Debian packages, e.g. a site's own tools)
# OUTDIR receives, for --layout kernel (add with `vibatch image add --kernel --initrd --cmdline`):
#   disk.qcow2   ext4 root file system, no partition table (root=/dev/vda)
#   vmlinux      the Debian kernel as an uncompressed ELF: boots by PVH, no decompression in the guest
#   initrd.img   Debian's own initramfs (initramfs-tools), as it made it
#   cmdline      the kernel command line to boot it with
# and for --layout disk (add with `vibatch image add --disk-boot`):
#   disk.qcow2   an MBR disk: GRUB (i386-pc) in the MBR and the gap after it, one ext4 partition
#                with /boot/grub/grub.cfg, Debian's compressed kernel and initramfs
# and for both: KVER (the kernel release), os-release (the image's /etc/os-release), and
#   packages (every installed package and version, for the record).
#
# What is in the image: Debian's Priority:required packages, systemd as init, udev, dbus, the
# kernel, and qemu-guest-agent exactly as Debian ships it (its udev rule starts its unit when the
# virtio port org.qemu.guest_agent.0 appears). Nothing of vibatch's, no credentials, no SSH
# server or keys, no sudo; root is locked. /etc/machine-id is empty, so systemd makes a new one
# at every boot (every job's VM starts from a fresh overlay of this disk); there is no
# /etc/hostname, so systemd uses its fallback name unless a kernel argument systemd.hostname=
# gives one. systemd-networkd brings up any en* interface with DHCP.
#
# Needs root, mmdebstrap, mke2fs (e2fsprogs >= 1.43 for -d), qemu-img, zstd/xz/lz4/gzip, and for
# --layout disk sfdisk. No loop device and no mount on the host: mmdebstrap runs in a private
# mount namespace (its /proc, /sys, /dev bind mounts vanish with it), the file system is made
# from the directory with mke2fs -d, and the disk is assembled with dd.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
usage() { echo "usage: build.sh --release bookworm|trixie --layout kernel|disk [--kernel-package PKG] [--mirror URL] [--security-mirror URL] [--size SIZE] [--include PKGS] OUTDIR" >&2; exit 2; }
RELEASE= LAYOUT= KPKG=linux-image-cloud-amd64 SIZE=2G EXTRA= OUT=
MIRROR=http://deb.debian.org/debian SECURITY=http://deb.debian.org/debian-security
while [ $# -gt 0 ]; do
  case "$1" in
    --release) RELEASE=${2:?}; shift 2 ;;
    --layout) LAYOUT=${2:?}; shift 2 ;;
    --kernel-package) KPKG=${2:?}; shift 2 ;;
    --mirror) MIRROR=${2:?}; shift 2 ;;
    --security-mirror) SECURITY=${2:?}; shift 2 ;;
    --size) SIZE=${2:?}; shift 2 ;;
    --include) EXTRA=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "build.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] && [ -n "$RELEASE" ] || usage
case "$LAYOUT" in kernel|disk) ;; *) echo "build.sh: --layout must be kernel or disk" >&2; exit 2 ;; esac
case "$RELEASE" in bookworm|trixie) ;; *) echo "build.sh: release $RELEASE is not one this recipe was tested with (bookworm, trixie)" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "build.sh: needs root (the image's files are owned by root and system users)" >&2; exit 1; }
command -v mmdebstrap >/dev/null || { echo "build.sh: needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R="$WORK/root"
PKGS="systemd-sysv,udev,dbus,qemu-guest-agent,$KPKG"
[ "$LAYOUT" = disk ] && PKGS="$PKGS,grub-pc-bin"          # the binaries only: no postinst install
[ -z "$EXTRA" ] || PKGS="$PKGS,$EXTRA"

# 1. the tree, from Debian's archive with the release's updates and security updates (these
# three lines are also the image's sources.list). minbase = Essential + Priority:required (passwd, login,
# util-linux...); --include adds the rest with their dependencies (no Recommends).
# The initramfs holds only what finds and mounts a virtio disk (initramfs-tools' MODULES=list
# and its modules file, the admin's way to choose): with Debian's default MODULES=most it is
# 130 MB uncompressed, which costs 10 s to load and seconds to boot under TCG. MODULES=list is
# set before the kernel is installed (so its postinst does not first build the big one); the
# modules file is initramfs-tools' conffile, so it is edited once the package is in. The hooks
# run in order, in the chroot, while mmdebstrap's mounts are up. systemd-networkd is enabled for
# the DHCP configuration below. e2scrub_reap (bookworm's e2fsprogs; trixie has none) looks for
# stale LVM snapshots at every boot: there is no LVM, and under TCG it kept the vCPU busy 11 s.
unshare --mount --propagation private -- \
  mmdebstrap --mode=root --variant=minbase --include="$PKGS" \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"' \
    --essential-hook='echo MODULES=list > "$1/etc/initramfs-tools/conf.d/modules-list.conf"' \
    --customize-hook='printf "%s\n" virtio_pci virtio_blk crc32c_generic ext4 >> "$1/etc/initramfs-tools/modules"' \
    --customize-hook='chroot "$1" update-initramfs -u -k all' \
    --customize-hook='chroot "$1" systemctl enable --quiet systemd-networkd.service' \
    --customize-hook='[ ! -e "$1/lib/systemd/system/e2scrub_reap.service" ] || chroot "$1" systemctl disable --quiet e2scrub_reap.service e2scrub_all.timer' \
    "$RELEASE" "$R" "deb $MIRROR $RELEASE main" "deb $MIRROR $RELEASE-updates main" \
    "deb $SECURITY $RELEASE-security main"

# 2. what a per-job VM needs, written as plain files (no vibatch inside)
: > "$R/etc/machine-id"                          # empty: systemd makes one per boot
[ ! -f "$R/var/lib/dbus/machine-id" ] || ln -sf /etc/machine-id "$R/var/lib/dbus/machine-id"
rm -f "$R/etc/hostname"                           # systemd's fallback, or systemd.hostname=
: > "$R/etc/resolv.conf"                          # mmdebstrap leaves the build host's here
if [ "$LAYOUT" = kernel ]; then ROOTDEV=/dev/vda; else ROOTDEV=/dev/vda1; fi
# mounted rw by the kernel (cmdline "rw"), so no fsck of root at boot: each job's disk is new
printf '# <file system> <mount point> <type> <options> <dump> <pass>\n%s / ext4 errors=remount-ro 0 0\n' \
  "$ROOTDEV" > "$R/etc/fstab"
mkdir -p "$R/etc/systemd/network"
printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' > "$R/etc/systemd/network/80-dhcp.network"
# an empty /root/.ssh appears during the bootstrap on this machine (no package lists it):
# rmdir removes it only while empty, so a key in it would fail the build here
[ ! -d "$R/root/.ssh" ] || rmdir "$R/root/.ssh"
rm -rf "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"*_Packages "$R/tmp/"*

# 3. checks: the image's promises, failing the build if one is broken
root_pw=$(awk -F: '$1 == "root" { print $2 }' "$R/etc/shadow")
case "$root_pw" in '*'|'!'*) ;; *) echo "build.sh: root is not locked in /etc/shadow ($root_pw)" >&2; exit 1 ;; esac
# (trixie's systemd ships an ssh client snippet in /etc/ssh/ssh_config.d: no server, no key)
for bad in "$R/usr/bin/sudo" "$R/etc/sudoers.d" "$R/usr/sbin/sshd" "$R/etc/ssh/sshd_config" "$R/root/.ssh"; do
  [ ! -e "$bad" ] || { echo "build.sh: the image must not have $bad" >&2; exit 1; }
done
keys=$(find "$R" -xdev \( -name 'authorized_keys*' -o -name 'ssh_host_*key*' -o -name 'id_rsa*' -o -name 'id_ed25519*' -o -name 'id_ecdsa*' \) -print)
[ -z "$keys" ] || { echo "build.sh: the image must hold no SSH keys: $keys" >&2; exit 1; }
[ -e "$R/lib/udev/rules.d/60-qemu-guest-agent.rules" ] || [ -e "$R/usr/lib/udev/rules.d/60-qemu-guest-agent.rules" ] \
  || { echo "build.sh: qemu-guest-agent's udev rule is missing" >&2; exit 1; }
KVER=$(ls "$R/lib/modules")
[ "$(echo "$KVER" | wc -w)" = 1 ] || { echo "build.sh: expected one kernel, found: $KVER" >&2; exit 1; }
chroot "$R" dpkg-query -W -f '${Package} ${Version}\n' > "$WORK/packages"
cp "$R/etc/os-release" "$WORK/os-release" 2>/dev/null || cp "$R/usr/lib/os-release" "$WORK/os-release"
echo "$KVER" > "$WORK/KVER"
CMDLINE="console=ttyS0 quiet rw root=$ROOTDEV"

# 4. the disk. GRUB 2.06 reads no ext4 with metadata_csum_seed or orphan_file: leave them out.
MKE2FS="mke2fs -q -t ext4 -L debroot -O ^metadata_csum_seed,^orphan_file"
if [ "$LAYOUT" = kernel ]; then
  python3 "$HERE/../testguest/extract-vmlinux.py" "$R/boot/vmlinuz-$KVER" "$WORK/vmlinux"
  # Debian's initramfs as it is (gzip, as zstd is not in the image; trixie's has an
  # uncompressed early part before it)
  cp "$R/boot/initrd.img-$KVER" "$WORK/initrd.img"
  echo "$CMDLINE" > "$WORK/cmdline"
  $MKE2FS -d "$R" "$WORK/root.img" "$SIZE"
  qemu-img convert -q -f raw -O qcow2 "$WORK/root.img" "$WORK/disk.qcow2"
  OUTPUTS="disk.qcow2 vmlinux initrd.img cmdline KVER os-release packages"
else
  # GRUB as grub-install would lay it out: its modules in /boot/grub/i386-pc, core.img (with
  # the modules to find and read /boot/grub) in the 1 MiB gap before partition 1, boot.img's
  # code in the MBR. grub.cfg is written here, as grub-mkconfig cannot probe a directory.
  mkdir -p "$R/boot/grub/i386-pc"
  cp "$R/usr/lib/grub/i386-pc/"*.mod "$R/usr/lib/grub/i386-pc/"*.lst "$R/boot/grub/i386-pc/"
  cat > "$R/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set default=0
set timeout=0
menuentry "Debian GNU/Linux ($RELEASE, $KVER)" {
  linux /boot/vmlinuz-$KVER $CMDLINE
  initrd /boot/initrd.img-$KVER
}
EOF
  chroot "$R" grub-mkimage -O i386-pc -o /tmp/core.img -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal
  mv "$R/tmp/core.img" "$WORK/core.img"
  $MKE2FS -d "$R" "$WORK/root.img" "$SIZE"
  root_bytes=$(stat -c %s "$WORK/root.img")
  truncate -s $((root_bytes + 2 * 1048576)) "$WORK/disk.raw"
  printf 'label: dos\nstart=2048, size=%d, type=83, bootable\n' $((root_bytes / 512)) \
    | sfdisk --quiet "$WORK/disk.raw"
  # boot.img's code into the MBR (its partition table stays), with the two-byte patch
  # grub-bios-setup makes for a hard disk (nop the floppy drive check at 0x66); core.img from
  # sector 1, where boot.img looks for it (grub-mkimage wrote core.img's own sector count)
  [ "$(stat -c %s "$WORK/core.img")" -le $((2047 * 512)) ] || { echo "build.sh: core.img does not fit in the MBR gap" >&2; exit 1; }
  BOOTIMG="$R/usr/lib/grub/i386-pc/boot.img"
  [ "$(od -An -tx1 -j102 -N1 "$BOOTIMG" | tr -d ' ')" = eb ] || { echo "build.sh: unexpected boot.img (no jmp at 0x66)" >&2; exit 1; }
  dd if="$BOOTIMG" of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
  printf '\x90\x90' | dd of="$WORK/disk.raw" bs=1 seek=102 conv=notrunc status=none
  dd if="$WORK/core.img" of="$WORK/disk.raw" bs=512 seek=1 conv=notrunc status=none
  dd if="$WORK/root.img" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc status=none
  qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
  OUTPUTS="disk.qcow2 KVER os-release packages"
fi
# each output written under a temporary name and renamed, so a failed build leaves no half file
for f in $OUTPUTS; do mv -f "$WORK/$f" "$OUT/$f"; done
VERSION_ID=$(sed -n 's/^VERSION_ID="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$OUT/os-release")
echo "build.sh: built $OUT: Debian $VERSION_ID ($RELEASE), $LAYOUT boot, kernel $KVER"
if [ "$LAYOUT" = kernel ]; then
  echo "add it: vibatch image add $OUT/disk.qcow2 --name debian$VERSION_ID --os debian --os-version $VERSION_ID --kernel $OUT/vmlinux --initrd $OUT/initrd.img --cmdline \"$CMDLINE\""
else
  echo "add it: vibatch image add $OUT/disk.qcow2 --name debian$VERSION_ID --os debian --os-version $VERSION_ID --disk-boot"
fi
