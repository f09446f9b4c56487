#!/usr/bin/env bash
# Fetches Debian bookworm's i386 Linux kernel (linux-image-6.1.0-*-686) and
# busybox-static:i386 with apt-get download, and builds a busybox initramfs.
# Results are cached; nothing is committed.
#
#   scripts/debian-guest.sh [--init FILE] [--out DIR]
#
# Prints two lines: the kernel path and the initrd path. Then:
#   popek run --kernel "$KERNEL" --initrd "$INITRD" --cmdline "console=ttyS0"
#
# Needs root the first time (dpkg --add-architecture i386; apt-get update).
# POPEK_BIN names the popek binary that builds the initramfs (default:
# target/release/popek, built if missing); POPEK_CACHE the cache directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$(pwd)
out="${POPEK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/popek}/debian-i386"
init=""
while [ $# -gt 0 ]; do
  case "$1" in
    --init) init="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "usage: $0 [--init FILE] [--out DIR]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
cd "$out"
# One fetch at a time: test binaries and users may run this concurrently,
# and concurrent dpkg/apt-get runs collide on their locks.
exec 9>"$out/.lock"
flock 9

fetch() {
  if ! dpkg --print-foreign-architectures | grep -qx i386; then
    [ "$(id -u)" = 0 ] || { echo "debian-guest: run as root once (dpkg --add-architecture i386)" >&2; exit 1; }
    dpkg --add-architecture i386
  fi
  if [ "$(id -u)" = 0 ]; then apt-get update -qq || true; fi
  local kpkg
  kpkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-686$' | awk '{print $1}' | sort -V | tail -1)
  if [ -z "$kpkg" ]; then
    echo "debian-guest: no linux-image-6.1.0-*-686 package found: is Debian's archive reachable?" >&2
    exit 1
  fi
  rm -f ./*.deb
  if ! apt-get download "$kpkg:i386" "busybox-static:i386" >&2; then
    echo "debian-guest: apt-get download failed: Debian's archive cannot be reached" >&2
    exit 1
  fi
  rm -rf root && mkdir root
  for d in ./*.deb; do dpkg-deb -x "$d" root; done
  echo "$kpkg" > package
}

if [ ! -f package ] || [ ! -x root/bin/busybox ] || ! ls root/boot/vmlinuz-* >/dev/null 2>&1; then
  fetch
fi
kernel=$(ls root/boot/vmlinuz-* | head -1)
initrd="$out/initrd.gz"
if [ -n "$init" ]; then
  initrd="$out/initrd-$(sha256sum "$init" | cut -c1-12).gz"
fi
if [ ! -f "$initrd" ]; then
  popek="${POPEK_BIN:-$root_dir/target/release/popek}"
  [ -x "$popek" ] || (cd "$root_dir" && cargo build --release -q >&2)
  "$popek" initramfs --busybox root/bin/busybox ${init:+--init "$init"} -o "$initrd.tmp" >&2
  mv "$initrd.tmp" "$initrd"
fi
echo "$out/$kernel"
echo "$initrd"
