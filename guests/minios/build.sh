#!/bin/sh
# Build minios from source with the host toolchain only (gcc, ld).
#   ./build.sh OUTDIR [FLAVOUR...]
# Flavours: minios (i386 native), minios-pv (i386 paravirtual, -DPARAVIRT),
# minios64 and minios64-pv (x86-64: linked as ELF64, shipped as ELF32 so any
# Multiboot v1 loader takes it); for testing also minios-fail / minios64-fail
# (a deliberately failing check) and minios-pvshim / minios64-pvshim (the PV
# kernel with an in-guest stand-in for the VMM, runnable on QEMU).
# Default: minios minios-pv minios64 minios64-pv.
set -eu
SRC=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUTDIR [FLAVOUR...]}
shift
[ $# -gt 0 ] || set -- minios minios-pv minios64 minios64-pv
CC=${CC:-gcc}
LD=${LD:-ld}
OBJCOPY=${OBJCOPY:-objcopy}
for tool in "$CC" "$LD" "$OBJCOPY"; do
	command -v "$tool" >/dev/null 2>&1 || {
		echo "minios: '$tool' not found: install the Debian packages gcc and binutils" >&2
		exit 1
	}
done
COMMON_CFLAGS="-ffreestanding -fno-pic -fno-pie -fno-stack-protector -nostdlib
 -fno-builtin -fno-tree-loop-distribute-patterns -fno-asynchronous-unwind-tables
 -fno-omit-frame-pointer -O2 -Wall -Wextra -Werror -Wno-array-bounds -std=gnu11
 -I$SRC/include"
CFLAGS_i386="-m32 -march=i686 -mno-sse -mno-mmx -mno-80387"
CFLAGS_x86_64="-m64 -mno-red-zone -mgeneral-regs-only -mcmodel=small"
COMMON_SOURCES="kernel/main.c kernel/console.c kernel/acpi.c kernel/pic_pit.c kernel/mm.c
 kernel/trap.c kernel/proc.c kernel/checks.c kernel/pv_shim.c kernel/irqbench.c
 lib/lib.c lib/sha256.c user/ulib.c user/programs.c user/bench.c"

for flavour in "$@"; do
	case $flavour in
	minios64*) ARCH=x86_64 ;;
	*) ARCH=i386 ;;
	esac
	case $flavour in
	minios | minios64) DEFS= ;;
	minios-pv | minios64-pv) DEFS=-DPARAVIRT ;;
	minios-fail | minios64-fail) DEFS=-DFAIL_CHECK ;;
	minios-pvshim | minios64-pvshim) DEFS="-DPARAVIRT -DPV_SHIM" ;;
	*) echo "minios: unknown flavour $flavour" >&2; exit 1 ;;
	esac
	eval "ARCH_CFLAGS=\$CFLAGS_$ARCH"
	CFLAGS="$COMMON_CFLAGS $ARCH_CFLAGS -I$SRC/arch/$ARCH"
	SOURCES="arch/$ARCH/entry.S arch/$ARCH/trap.S arch/$ARCH/desc.c arch/$ARCH/mmu.c
 arch/$ARCH/user/uasm.S $COMMON_SOURCES"
	OBJ=$OUT/obj/$flavour
	objs=
	for s in $SOURCES; do
		o=$OBJ/${s%.*}.o
		mkdir -p "$(dirname "$o")"
		$CC $CFLAGS $DEFS -c "$SRC/$s" -o "$o"
		objs="$objs $o"
	done
	# link.ld places */user/*.o and */lib/*.o in the ring-3 region.
	if [ $ARCH = i386 ]; then
		$LD -m elf_i386 -nostdlib -z noexecstack --no-warn-rwx-segments \
			-T "$SRC/link.ld" -o "$OUT/$flavour" $objs
	else
		$LD -m elf_x86_64 -nostdlib -z noexecstack --no-warn-rwx-segments \
			-z max-page-size=0x1000 -T "$SRC/link64.ld" -o "$OBJ/$flavour.elf64" $objs
		$OBJCOPY -O elf32-i386 "$OBJ/$flavour.elf64" "$OUT/$flavour"
	fi
done
