#!/bin/sh
# /init for scripts/bench-debian.py: markers on the console around each
# workload; the host timestamps them.
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo "BENCH-INIT"
echo "BENCH-START sha"
dd if=/dev/zero bs=1M count=160 2>/dev/null | sha256sum
echo "BENCH-END sha"
echo "BENCH-START loop"
i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done
echo "BENCH-END loop $i"
poweroff -f
