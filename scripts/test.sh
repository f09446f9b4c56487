#!/usr/bin/env bash
# The test command of the README: installs what the tests need (Debian
# packages, when run as root) and runs the whole test suite, optimized.
#
#   scripts/test.sh [cargo test arguments, e.g. -p popek-cpu]
#
# Environment: POPEK_DIFF_CASES (differential test size, default 20000),
# POPEK_FUZZ_CASES (fuzz smoke size), POPEK_SNAPSHOT_FUZZ_CASES (snapshot
# loader fuzz size, default 300).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v ld >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1 || need+=(binutils)
command -v make >/dev/null 2>&1 || need+=(make)
# The API tests speak HTTP on a Unix socket with a real client.
command -v curl >/dev/null 2>&1 || need+=(curl)
# The firmware test boots Debian's SeaBIOS from the reset vector.
[ -f /usr/share/seabios/bios.bin ] || need+=(seabios)
# ...and hands it a Linux kernel through QEMU's option ROM.
[ -f /usr/share/qemu/linuxboot_dma.bin ] || need+=(qemu-system-data)
# The network test makes a TAP device.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The disk tests make and check ext4 images.
command -v mkfs.ext4 >/dev/null 2>&1 && command -v e2fsck >/dev/null 2>&1 || need+=(e2fsprogs)
if command -v gcc >/dev/null 2>&1; then
  # Guests and the native differential runner are 32-bit freestanding code.
  if ! echo 'int x;' | gcc -m32 -ffreestanding -x c -c -o /dev/null - >/dev/null 2>&1; then
    need+=(gcc-multilib)
  fi
fi
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing ${need[*]}" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
  else
    echo "scripts/test.sh: missing packages; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found: install Rust (rustup.rs) first" >&2
  exit 1
fi

# The test profile is optimized (Cargo.toml [profile.test]), so guest-booting
# tests run at speed. By default: every test, showing what passing tests
# print (the differential and fuzz counts, the Debian boot times).
# Every test binary runs even after one fails (--no-fail-fast), so that
# one run reports every failure.
if [ $# -eq 0 ]; then
  set -- --workspace --no-fail-fast -- --show-output
fi
exec cargo test "$@"
