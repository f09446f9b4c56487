#!/bin/sh
# /init for scripts/bench-debian.py --disk: loads the virtio modules, then
# reads 256 MiB from /dev/vda and writes 256 MiB to /dev/vdb (flushed),
# between markers the host timestamps.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load); do insmod /lib/modules/$m.ko; done
echo "BENCH-INIT"
echo "BENCH-START read"
dd if=/dev/vda of=/dev/null bs=1M count=256 2>/dev/null
echo "BENCH-END read"
echo "BENCH-START write"
dd if=/dev/zero of=/dev/vdb bs=1M count=256 conv=fsync 2>/dev/null
echo "BENCH-END write"
poweroff -f
