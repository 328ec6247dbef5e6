#!/bin/bash
# Where systemd is PID 1: run libvirtd under vibatch's child subreaper through a drop-in for
# Debian's libvirtd.service (etc/systemd/libvirtd.service.d/vibatch-subreaper.conf, with
# /opt/vibatch/ replaced by PREFIX). Called by etc/setup-node.sh with ROOT=/; the tests give a
# scratch ROOT and a recording systemctl on PATH.
#   etc/install-systemd-dropin.sh ROOT PREFIX
# The drop-in is written only if its content changed; then, and only then, systemd reloads and
# libvirtd restarts if it runs (try-restart: a stopped libvirtd stays so; its sockets start it).
# A site that masks the drop-in (a symlink to /dev/null in its place) keeps it masked.
set -euo pipefail
[ $# = 2 ] || { echo "usage: $0 ROOT PREFIX" >&2; exit 2; }
ROOT=${1%/}
PREFIX=${2%/}
SRC="$(cd "$(dirname "$0")" && pwd)/systemd/libvirtd.service.d/vibatch-subreaper.conf"
log() { echo "setup-node: $*"; }
[ -d "$ROOT/run/systemd/system" ] || {
  echo "install-systemd-dropin: systemd is not the service manager ($ROOT/run/systemd/system is absent)" >&2
  exit 1; }
# the prefix goes into ExecStart as it is: no quoting, no specifier (%), no variable ($)
[[ "$PREFIX" =~ ^/[A-Za-z0-9/._-]+$ ]] || {
  echo "install-systemd-dropin: PREFIX $PREFIX: only an absolute path of A-Z a-z 0-9 / . _ -" >&2
  exit 2; }
text=$(<"$SRC")
text=${text//\/opt\/vibatch\//"$PREFIX/"}
DIR=$ROOT/etc/systemd/system/libvirtd.service.d
DST=$DIR/vibatch-subreaper.conf
if [ "$(readlink "$DST" 2>/dev/null)" = /dev/null ]; then   # masked by the site: left so
  log "$DST is masked (-> /dev/null): libvirtd is not run under vibatch's subreaper"
  exit 0
fi
install -d -m 0755 "$DIR"
NEW=$DIR/.vibatch-subreaper.conf.new   # not a *.conf: systemd never reads it
printf '%s\n' "$text" > "$NEW"
chmod 0644 "$NEW"
if [ -f "$DST" ] && [ ! -L "$DST" ] && cmp -s "$NEW" "$DST"; then
  rm -f "$NEW"
  exit 0
fi
mv -f "$NEW" "$DST"
log "installed $DST: libvirtd runs under vibatch's subreaper; reloading systemd"
systemctl daemon-reload
systemctl try-restart libvirtd.service
