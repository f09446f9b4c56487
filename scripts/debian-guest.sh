#!/usr/bin/env bash
# Fetches Debian bookworm's i386 Linux kernel (linux-image-6.1.0-*-686) and
# busybox-static:i386 with apt-get download, and builds a busybox initramfs.
# Results are cached; nothing is committed.
#
#   scripts/debian-guest.sh [--init FILE] [--out DIR] [--lspci] [--pae] [--modules] [--rootfs]
#
# --pae prints the 686-pae kernel instead (linux-image-6.1.0-*-686-pae:
# PAE paging), fetched beside the 686 one.
#
# --lspci also puts Debian's pciutils:i386 lspci (busybox has none) in the
# initramfs, with the libraries it loads and the PCI ID list (needs
# readelf, from binutils).
#
# --modules puts the kernel modules for virtio and ext4 (Debian builds
# them as modules) in the initramfs, as /lib/modules/NAME.ko, with
# /lib/modules/load listing them in load order; popek's default /init
# loads them (a custom --init: `for m in $(cat /lib/modules/load); do
# insmod /lib/modules/$m.ko; done`).
#
# --rootfs (implies --modules) also builds a 64 MiB ext4 root file system
# image holding busybox-static and an /sbin/init that starts a shell
# (host mkfs.ext4 -d, from e2fsprogs), and prints its path as a third
# line; boot it with --disk path=IMAGE --cmdline "root=/dev/vda rw ...".
# Copy it first if the guest should not change the cached one.
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
lspci=""
pae=""
modules=""
rootfs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --init) init="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --lspci) lspci=1; shift ;;
    --pae) pae=1; shift ;;
    --modules) modules=1; shift ;;
    --rootfs) rootfs=1; modules=1; shift ;;
    *) echo "usage: $0 [--init FILE] [--out DIR] [--lspci] [--pae] [--modules] [--rootfs]" >&2; exit 2 ;;
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
# pciutils' lspci, the libraries it loads (found through each ELF's
# NEEDED entries) and the PCI ID list.
extra=()
if [ -n "$lspci" ]; then
  if [ ! -x tools/usr/bin/lspci ] || [ ! -f tools/usr/share/misc/pci.ids ]; then
    rm -rf tools tools.tmp && mkdir tools.tmp
    if ! (cd tools.tmp && apt-get download pciutils:i386 libpci3:i386 libkmod2:i386 libudev1:i386 \
          zlib1g:i386 liblzma5:i386 libssl3:i386 libzstd1:i386 libc6:i386 pci.ids >&2); then
      echo "debian-guest: apt-get download of pciutils failed: Debian's archive cannot be reached" >&2
      exit 1
    fi
    mkdir tools
    for d in tools.tmp/*.deb; do dpkg-deb -x "$d" tools; done
    rm -rf tools.tmp
  fi
  extra=(--add "tools/usr/bin/lspci=/usr/bin/lspci"
         --add "tools/usr/share/misc/pci.ids=/usr/share/misc/pci.ids"
         --add "tools/lib/i386-linux-gnu/ld-linux.so.2=/lib/ld-linux.so.2")
  queue=(tools/usr/bin/lspci)
  seen=" "
  while [ ${#queue[@]} -gt 0 ]; do
    elf=${queue[0]}; queue=("${queue[@]:1}")
    for lib in $(readelf -d "$elf" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
      case "$seen" in *" $lib "*) continue ;; esac
      seen="$seen$lib "
      path=""
      for dir in tools/lib/i386-linux-gnu tools/usr/lib/i386-linux-gnu; do
        if [ -z "$path" ] && [ -e "$dir/$lib" ]; then path="$dir/$lib"; fi
      done
      [ -n "$path" ] || { echo "debian-guest: lspci needs $lib, which no fetched package has" >&2; exit 1; }
      extra+=(--add "$path=/lib/i386-linux-gnu/$lib")
      queue+=("$path")
    done
  done
fi
kernel=$(ls root/boot/vmlinuz-*-686 | head -1)
if [ -n "$modules" ]; then
  # In dependency order (each module's .modinfo "depends=" comes first).
  order="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
         virtio-rng virtio_console failover net_failover virtio_net virtio_mmio
         crc16 mbcache jbd2 crc32c_generic ext4"
  kdir=$(ls -d root/lib/modules/*-686 | head -1)
  load=$(mktemp)
  for m in $order; do
    ko=$(find "$kdir/kernel" -name "$m.ko" | head -1)
    [ -n "$ko" ] || { echo "debian-guest: the kernel has no module $m" >&2; exit 1; }
    extra+=(--add "$ko=/lib/modules/$m.ko")
    echo "$m" >> "$load"
  done
  cp "$load" modules.load && rm -f "$load"
  extra+=(--add "$out/modules.load=/lib/modules/load")
fi
if [ -n "$pae" ]; then
  if ! ls root/boot/vmlinuz-*-686-pae >/dev/null 2>&1; then
    # The 686-pae flavour of the same kernel version.
    ppkg="$(cat package)-pae"
    rm -rf pae.tmp && mkdir pae.tmp
    if ! (cd pae.tmp && apt-get download "$ppkg:i386" >&2); then
      echo "debian-guest: apt-get download $ppkg failed: Debian's archive cannot be reached" >&2
      exit 1
    fi
    dpkg-deb -x pae.tmp/*.deb root
    rm -rf pae.tmp
  fi
  kernel=$(ls root/boot/vmlinuz-*-686-pae | head -1)
fi
# The name says what is inside: the /init's hash, and the extra files'.
tag=""
[ -n "$lspci" ] && tag="-lspci"
[ -n "$modules" ] && tag="$tag-modules"
[ -n "$tag" ] && tag="$tag-$(echo "${extra[*]}" | sha256sum | cut -c1-8)"
# Without --init the image holds popek's default /init: name its version.
initrd="$out/initrd$tag-$(sha256sum "$root_dir/crates/initramfs/src/lib.rs" | cut -c1-8).gz"
if [ -n "$init" ]; then
  initrd="$out/initrd-$(sha256sum "$init" | cut -c1-12)$tag.gz"
fi
if [ ! -f "$initrd" ]; then
  popek="${POPEK_BIN:-$root_dir/target/release/popek}"
  [ -x "$popek" ] || (cd "$root_dir" && cargo build --release -q >&2)
  "$popek" initramfs --busybox root/bin/busybox ${init:+--init "$init"} "${extra[@]}" -o "$initrd.tmp" >&2
  mv "$initrd.tmp" "$initrd"
fi
echo "$out/$kernel"
echo "$initrd"
if [ -n "$rootfs" ]; then
  image="$out/rootfs.img"
  if [ ! -f "$image" ]; then
    command -v mkfs.ext4 >/dev/null 2>&1 || PATH="$PATH:/sbin:/usr/sbin"
    rm -rf rootfs.tmp && mkdir -p rootfs.tmp/bin rootfs.tmp/sbin rootfs.tmp/usr/bin rootfs.tmp/usr/sbin \
      rootfs.tmp/proc rootfs.tmp/sys rootfs.tmp/dev rootfs.tmp/tmp rootfs.tmp/root rootfs.tmp/etc rootfs.tmp/mnt
    cp root/bin/busybox rootfs.tmp/bin/busybox
    for a in $(root/bin/busybox --list-full); do
      [ -e "rootfs.tmp/$a" ] || ln -s /bin/busybox "rootfs.tmp/$a"
    done
    rm -f rootfs.tmp/sbin/init
    cat > rootfs.tmp/sbin/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "popek: init on the disk reached ($(awk '$2 == "/" { print $1 }' /proc/mounts))"
echo 'Debian busybox shell on the disk; sync; poweroff -f to power off'
exec setsid cttyhack sh
INIT
    chmod 755 rootfs.tmp/sbin/init
    truncate -s 64M "$image.tmp"
    mkfs.ext4 -q -F -L popek-root -d rootfs.tmp "$image.tmp" >&2
    rm -rf rootfs.tmp
    mv "$image.tmp" "$image"
  fi
  echo "$image"
fi
