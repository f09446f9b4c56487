#!/bin/sh
# /init of the virtio tests: loads the virtio and ext4 modules, prints
# what the kernel found, then does what popek.mode= on the command line
# says with the ext4 file system on /dev/vda (or with hvc0), and powers
# off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/load); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
mode=$(sed -n 's/.*popek\.mode=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "POPEK-DISK mode=$mode"
echo "vda sectors: $(cat /sys/block/vda/size)"
echo "vda serial: $(cat /sys/block/vda/serial)"
echo "hwrng: $(cat /sys/class/misc/hw_random/rng_current)"
echo "hwrng bytes: $(head -c 4096 /dev/hwrng | wc -c)"
lspci -vv -d 1af4: | grep -E '^[0-9a-f]|MSI-X:|Region 0' | sed 's/^/lspci: /'
dmesg | grep -E 'BAR 0 .*assigned' | sed 's/^.*pci /dmesg: /'
grep -E 'virtio[0-9]-' /proc/interrupts | awk '{print "irq:", $NF, $2}'
mkdir -p /mnt
case $mode in
write)
  mount -t ext4 /dev/vda /mnt && echo "mounted"
  head -c 1048576 /dev/hwrng > /mnt/data
  echo "data sha: $(sha256sum /mnt/data | cut -c1-64)"
  umount /mnt && echo "unmounted"
  ;;
check)
  mount -t ext4 -o ro /dev/vda /mnt && echo "mounted"
  echo "data sha: $(sha256sum /mnt/data | cut -c1-64)"
  umount /mnt
  ;;
fsync)
  mount -t ext4 /dev/vda /mnt && echo "mounted"
  head -c 65536 /dev/hwrng > /mnt/synced
  echo "synced sha: $(sha256sum /mnt/synced | cut -c1-64)"
  # busybox sync FILE is fsync(2) of that file.
  sync /mnt/synced && echo "POPEK-FSYNCED"
  sleep 600
  ;;
shell)
  mount -t ext4 /dev/vda /mnt && echo "mounted"
  echo before > /mnt/before
  echo "POPEK-SNAP-READY"
  exec sh
  ;;
hvc)
  # The terminal is hvc0 (popek --serial off --console tty).
  echo "POPEK-HVC hello from hvc0" > /dev/hvc0
  read -r line < /dev/hvc0
  echo "POPEK-HVC got: $line" > /dev/hvc0
  ;;
net)
  # eth0 at the address popek.ip= gives; a file served over HTTP.
  ip=$(sed -n 's/.*popek\.ip=\([0-9./]*\).*/\1/p' /proc/cmdline)
  ip link set eth0 up
  ip addr add "$ip" dev eth0
  echo "eth0 mac: $(cat /sys/class/net/eth0/address)"
  mkdir -p /www
  head -c 1048576 /dev/hwrng > /www/data
  echo "net sha: $(sha256sum /www/data | cut -c1-64)"
  httpd -p 80 -h /www
  echo "POPEK-NET-READY"
  sleep 600
  ;;
ro)
  if echo x | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "ro write: accepted"
  else
    echo "ro write: refused"
  fi
  ;;
esac
echo "POPEK-DONE"
poweroff -f
