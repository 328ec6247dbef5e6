#!/bin/bash
# Build vibatch's test image from Debian packages only:
#   images/testguest/build.sh OUTDIR
# OUTDIR receives:
#   vmlinux      the Debian kernel, uncompressed ELF (boots by PVH, ~2.7 s faster under TCG)
#   initrd.cpio  uncompressed initramfs: busybox-static, qemu-guest-agent + its libraries, modules, /init
#   disk.qcow2   ext4 root disk with the same tree (boot with root=/dev/vda)
#   cmdline      the kernel command line to boot it with
#   KVER         the kernel version
# Environment: KMETA (default linux-image-amd64; linux-image-cloud-amd64 gives another kernel),
#              DISK_MB (default 256), HOSTNAME_TAG (default vbguest),
#              LAYOUT=kernel (default: the outputs above) or LAYOUT=disk: a different, self-booting
#                image. OUTDIR then receives only disk.qcow2 (an MBR disk: SYSLINUX on a FAT boot
#                partition with the compressed kernel and a gzip initramfs, root on /dev/vda2)
#                and KVER; boot it with `vibatch image add --disk-boot`.
#              NO_SHADOW=1: leave shadow's useradd/groupadd out (vibatch then adds the job user
#                the way a minimal image needs: straight into /etc/passwd).
# Needs root (files in the image are owned by 0:0), apt-get with fresh lists, dpkg, cpio,
# mke2fs, qemu-img, ldd and xz/lz4/zstd/gzip. Nothing is installed on the host.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUTDIR}
KMETA=${KMETA:-linux-image-amd64}
DISK_MB=${DISK_MB:-256}
HOSTNAME_TAG=${HOSTNAME_TAG:-vbguest}
LAYOUT=${LAYOUT:-kernel}
NO_SHADOW=${NO_SHADOW:-0}
BOOT_MB=48
case "$LAYOUT" in kernel|disk) ;; *) echo "build.sh: LAYOUT must be kernel or disk" >&2; exit 1 ;; esac
MODULES="virtio_pci virtio_console virtio_blk virtio_net virtio_rng crc32c_generic ext4 virtiofs"

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"
mkdir -p "$WORK/debs" "$WORK/x" "$WORK/root"
KPKG=$(apt-cache depends "$KMETA" | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$KPKG" ] || { echo "build.sh: cannot resolve $KMETA (run apt-get update first)" >&2; exit 1; }
echo "build.sh: kernel package $KPKG"
chmod 777 "$WORK/debs"   # apt's _apt user downloads into it
(cd "$WORK/debs" && apt-get download -q "$KPKG" busybox-static qemu-guest-agent passwd)
for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/x"; done
KVER=$(ls "$WORK/x/lib/modules")
BB="$WORK/x/bin/busybox"
R="$WORK/root"

# skeleton and busybox applets
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,tmp,var,home,root,opt,lib/x86_64-linux-gnu,lib64}
chmod 1777 "$R/tmp"; chmod 700 "$R/root"
cp "$BB" "$R/bin/busybox"
for applet in $("$BB" --list-full); do
  [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done

# the real qemu-guest-agent, and shadow's useradd/groupadd (the usual tools to add a user), each
# with the shared libraries it links, taken from the host (the same Debian release)
install_bin() {  # SRC DST: copy a binary and its ldd closure into the image
  cp "$1" "$R$2"
  ldd "$1" | awk '/=>/{print $3} $1 ~ /^\/lib64\//{print $1}' | while read -r lib; do
    [ -n "$lib" ] || continue
    case "$lib" in /lib64/*) dst="$R/lib64" ;; *) dst="$R/lib/x86_64-linux-gnu" ;; esac
    [ -e "$dst/$(basename "$lib")" ] || cp -L "$lib" "$dst/"
  done
}
install_bin "$WORK/x/usr/sbin/qemu-ga" /usr/sbin/qemu-ga
chroot "$R" /usr/sbin/qemu-ga --version >/dev/null   # fails on a missing library
if [ "$NO_SHADOW" != 1 ]; then
  install_bin "$WORK/x/usr/sbin/useradd" /usr/sbin/useradd
  install_bin "$WORK/x/usr/sbin/groupadd" /usr/sbin/groupadd
  [ ! -e /etc/login.defs ] || cp /etc/login.defs "$R/etc/login.defs"
  chroot "$R" /usr/sbin/useradd --help >/dev/null
fi

# kernel modules: the closure of the wanted ones over modules.dep
"$BB" depmod -b "$WORK/x" "$KVER"
MD="$WORK/x/lib/modules/$KVER"
needed=""
: > "$R/etc/modules-load"
for m in $MODULES; do
  pat=$(echo "$m" | sed 's/[-_]/[-_]/g')
  if line=$(grep -E "(^|/)${pat}\.ko(\.[a-z]+)?:" "$MD/modules.dep"); then
    echo "$m" >> "$R/etc/modules-load"
    needed="$needed ${line%%:*} ${line#*:}"
  elif grep -qE "/${pat}\.ko$" "$MD/modules.builtin"; then
    echo "build.sh: $m is built in"
  else
    echo "build.sh: kernel has no module $m" >&2; exit 1
  fi
done
for f in $(echo $needed | tr ' ' '\n' | sort -u); do
  mkdir -p "$R/lib/modules/$KVER/$(dirname "$f")"
  cp "$MD/$f" "$R/lib/modules/$KVER/$f"
done
cp "$MD/modules.builtin" "$MD/modules.order" "$R/lib/modules/$KVER/"
"$BB" depmod -b "$R" "$KVER"

# /etc: root is locked (no password login, so a job user cannot su to root)
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
printf 'root:!:1::::::\nnobody:!:1::::::\n' > "$R/etc/shadow"; chmod 600 "$R/etc/shadow"
echo "$HOSTNAME_TAG" > "$R/etc/hostname"
printf 'NAME="vibatch test image"\nID=vbguest\nVERSION_ID=%s\nPRETTY_NAME="vibatch test image (Debian kernel %s)"\n' \
  "$KVER" "$KVER" > "$R/etc/os-release"
rm -f "$R/sbin/shutdown"
printf '#!/bin/sh\n# qemu-ga guest-shutdown runs /sbin/shutdown -P|-h|-r +0\ncase "$*" in *-r*) exec reboot -f ;; *) exec poweroff -f ;; esac\n' > "$R/sbin/shutdown"
chmod 755 "$R/sbin/shutdown"
install -m 755 "$HERE/init" "$R/init"

# outputs, each written to a temporary name and renamed, so a failed build leaves no half file
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$WORK/initrd.cpio"
mke2fs -q -t ext4 -L vbroot -d "$R" "$WORK/root.img" "${DISK_MB}M"
echo "$KVER" > "$WORK/KVER"
if [ "$LAYOUT" = kernel ]; then
  python3 "$HERE/extract-vmlinux.py" "$WORK/x/boot/vmlinuz-$KVER" "$WORK/vmlinux"
  qemu-img convert -q -f raw -O qcow2 "$WORK/root.img" "$WORK/disk.qcow2"
  echo "console=ttyS0 quiet root=/dev/vda" > "$WORK/cmdline"
  OUTPUTS="vmlinux initrd.cpio disk.qcow2 cmdline KVER"
else
  # a BIOS-bootable disk, made without loop devices or mounts: FAT and ext4 built as files,
  # placed into an MBR partition table; SYSLINUX (mtools installer) on the FAT partition
  gzip -1n < "$WORK/initrd.cpio" > "$WORK/initrd.gz"
  cp "$WORK/x/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
  printf 'DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  APPEND initrd=/initrd.gz console=ttyS0 quiet root=/dev/vda2\n' \
    > "$WORK/syslinux.cfg"
  mkfs.fat -C -h 2048 -n VBBOOT "$WORK/boot.img" $((BOOT_MB * 1024)) >/dev/null
  MTOOLS_SKIP_CHECK=1 mcopy -i "$WORK/boot.img" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg" ::/
  syslinux --install "$WORK/boot.img"
  truncate -s $((1 + BOOT_MB + DISK_MB + 1))M "$WORK/disk.raw"
  printf 'label: dos\nstart=2048, size=%d, type=c, bootable\nstart=%d, size=%d, type=83\n' \
    $((BOOT_MB * 2048)) $((2048 + BOOT_MB * 2048)) $((DISK_MB * 2048)) | sfdisk --quiet "$WORK/disk.raw"
  dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
  dd if="$WORK/boot.img" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc status=none
  dd if="$WORK/root.img" of="$WORK/disk.raw" bs=1M seek=$((1 + BOOT_MB)) conv=notrunc status=none
  qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
  OUTPUTS="disk.qcow2 KVER"
fi
for f in $OUTPUTS; do mv -f "$WORK/$f" "$OUT/$f"; done
echo "build.sh: built $OUT ($LAYOUT boot, kernel $KVER)"
