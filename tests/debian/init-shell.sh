#!/bin/sh
# /init of the Debian snapshot test: fills 16 MiB of tmpfs with a pattern
# and records its checksum, then gives the console to a shell. The test
# snapshots the VM at that shell, restores it on another engine and checks
# the pattern and the shell there.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=32m tmpfs /mnt
yes popek-pattern | head -c 16777216 > /mnt/pattern
sha256sum /mnt/pattern > /mnt/sum
echo "POPEK-SNAP-READY $(cut -c1-16 /mnt/sum)"
exec sh
