#!/bin/sh
# Developer check (not CI): build every flavour and boot it on QEMU's PC,
# which has the same devices as popek's machine. Needs qemu-system-x86.
#   ./test-qemu.sh [OUTDIR]
# Expected: minios*, minios*-pvshim exit 0 (all checks, scheduler demo,
# benchmarks, ACPI power-off); *-fail exit 3; the PV builds without popek
# exit 5 ("no popek hypervisor").
set -u
SRC=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$(mktemp -d)}
"$SRC/build.sh" "$OUT" minios minios-pv minios-fail minios-pvshim \
	minios64 minios64-pv minios64-fail minios64-pvshim || exit 1
fail=0
for spec in minios:0 minios-pvshim:0 minios-fail:3 minios-pv:5 \
	minios64:0 minios64-pvshim:0 minios64-fail:3 minios64-pv:5; do
	name=${spec%:*}
	want=${spec#*:}
	case $name in minios64*) qemu=qemu-system-x86_64 ;; *) qemu=qemu-system-i386 ;; esac
	timeout 300 $qemu -kernel "$OUT/$name" -nographic -no-reboot -m 64 \
		-device isa-debug-exit,iobase=0xf4,iosize=4 -accel tcg \
		</dev/null >"$OUT/$name.log" 2>&1
	got=$?
	if [ "$got" = "$want" ]; then
		echo "ok   $name (exit $got)"
	else
		echo "FAIL $name: exit $got, want $want (log: $OUT/$name.log)"
		fail=1
	fi
done
exit $fail
