#!/bin/sh
# /init for scripts/bench-debian.py --smp: two sha256 jobs at once (one
# per vCPU when there are two), timed by the host between the markers.
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo "BENCH-INIT cpus=$(nproc)"
echo "BENCH-START par"
(dd if=/dev/zero bs=1M count=96 2>/dev/null | sha256sum) &
(dd if=/dev/zero bs=1M count=96 2>/dev/null | sha256sum) &
wait
echo "BENCH-END par"
grep -E "LOC|CAL" /proc/interrupts
poweroff -f
