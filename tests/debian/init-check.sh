#!/bin/sh
# /init of the Debian boot test: prints a marker, runs a few commands whose
# output the test checks, then powers off through ACPI.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "POPEK-INIT-MARKER"
echo "uname: $(uname -s -m)"
grep -m1 'model name' /proc/cpuinfo
grep -m1 'vendor_id' /proc/cpuinfo
echo "proc entries: $(ls /proc | wc -l)"
echo "dmesg lines: $(dmesg | wc -l)"
echo "arith: $((6*7))"
echo "sha: $(echo popek | sha256sum | cut -c1-16)"
echo "awk: $(awk 'BEGIN { printf "%.3f", 1/3 }')"
echo "pci: $(ls /sys/bus/pci/devices | tr '\n' ' ')$(cat /sys/bus/pci/devices/0000:00:00.0/vendor /sys/bus/pci/devices/0000:00:00.0/device 2>/dev/null | tr '\n' ' ')"
echo "pci fatal: $(dmesg | grep -c 'No config space access')"
# pciutils' lspci (busybox has none) lists the host bridge.
echo "lspci: $(lspci | grep '^00:00.0')"
# ECAM: extended configuration space through the MCFG table.
echo "mmconfig: $(dmesg | grep -c 'Using MMCONFIG for extended config space')"
echo "pci config bytes: $(wc -c < /sys/bus/pci/devices/0000:00:00.0/config)"
echo "nproc: $(nproc)"
echo "apic: $(dmesg | grep -c 'Enabling APIC mode')"
echo "acpi tables: $(dmesg | grep -c 'ACPI: APIC .*POPEK')"
# CPUs whose local APIC timer ticked.
echo "loc cpus: $(grep LOC: /proc/interrupts | tr -s ' ' '\n' | grep -c '^[1-9][0-9]*$')"
# A job pinned to each CPU: field 39 of /proc/self/stat is the CPU it last ran on.
for c in $(seq 0 $(($(nproc) - 1))); do
  taskset -c $c sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo "job on cpu $(cut -d" " -f39 /proc/self/stat)"' &
done
wait
echo "POPEK-DONE"
poweroff -f
