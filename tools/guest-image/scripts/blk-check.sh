#!/bin/sh
# Guest side of the block-device checks: Linux's own virtio-blk driver (or ata/sd) exercises the
# disk /dev/${IOVIRT_DISK:-vda}. Kernel command line options:
#   iovirt.disk=NAME   the disk to test (default vda)
#   iovirt.ro          the disk must be read-only: writes must fail, reads must work
# Prints "HOSTCHECK offset=O len=L md5=M" for the host to verify the image after power-off.
set -e
disk=vda
ro=0
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	iovirt.disk=*) disk=${arg#iovirt.disk=} ;;
	iovirt.ro) ro=1 ;;
	esac
done
dev=/dev/$disk
[ -b "$dev" ] || { echo "CHECK-FAIL no block device $dev"; ls /sys/block; exit 1; }
sectors=$(cat "/sys/block/$disk/size")
echo "CHECK disk=$disk sectors=$sectors ro=$(cat "/sys/block/$disk/ro")"
[ "$sectors" -ge 32768 ] || { echo "CHECK-FAIL disk smaller than 16 MiB"; exit 1; }

if [ "$ro" = 1 ]; then
	[ "$(cat "/sys/block/$disk/ro")" = 1 ] || { echo "CHECK-FAIL not read-only"; exit 1; }
	dd if="$dev" of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null
	if dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct 2>/dev/null; then
		echo "CHECK-FAIL write to read-only disk succeeded"
		exit 1
	fi
	echo "CHECK-OK read-only: reads work, writes refused"
	exit 0
fi

mib=1048576
dd if=/dev/urandom of=/tmp/pat bs=$mib count=4 2>/dev/null
want=$(md5sum </tmp/pat | cut -d' ' -f1)

# Buffered: write, fsync, drop the page cache, read back.
dd if=/tmp/pat of="$dev" bs=$mib seek=1 conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
got=$(dd if="$dev" bs=$mib skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "CHECK-FAIL buffered readback $got != $want"; exit 1; }
echo "CHECK-OK buffered write/fsync/read md5=$got"

# O_DIRECT, 64 KiB requests.
dd if=/tmp/pat of="$dev" bs=65536 seek=128 oflag=direct 2>/dev/null
got=$(dd if="$dev" bs=65536 skip=128 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "CHECK-FAIL direct readback $got != $want"; exit 1; }
echo "CHECK-OK O_DIRECT write/read md5=$got"

# A file system: make, mount, write, unmount, mount again, compare.
mke2fs -q "$dev" >/dev/null
mkdir -p /mnt
mount -t ext2 "$dev" /mnt
cp /tmp/pat /mnt/pat
sync
umount /mnt
echo 3 >/proc/sys/vm/drop_caches
mount -t ext2 "$dev" /mnt
got=$(md5sum </mnt/pat | cut -d' ' -f1)
umount /mnt
[ "$got" = "$want" ] || { echo "CHECK-FAIL file system readback $got != $want"; exit 1; }
echo "CHECK-OK ext2 make/mount/write/remount md5=$got"

# Discard the whole disk (the device must accept it when it offers discard).
if [ "$(cat "/sys/block/$disk/queue/discard_max_bytes")" -gt 0 ]; then
	blkdiscard "$dev"
	echo "CHECK-OK discard"
else
	echo "CHECK-SKIP discard not offered"
fi

# Last: a pattern the host verifies in the image after power-off.
dd if=/tmp/pat of="$dev" bs=$mib seek=8 oflag=direct conv=fsync 2>/dev/null
echo "HOSTCHECK offset=$((8 * mib)) len=$((4 * mib)) md5=$want"
