#!/bin/sh
# Guest side of the live storage migration test (examples/vhost-user-blk/tests/linux_guest.rs,
# linux_live_migration_under_a_file_system_workload): a file-system workload on /dev/vda that
# goes on while the host migrates the disk, then checks its data.
#
# Protocol with the host: the guest prints "MIGRATE-READY" once its file system is made and the
# workload runs; the host starts the migration, and writes one line to the guest's second
# serial port (/dev/ttyS1) once the disk is switched. The guest writes 8 more files after that,
# verifies every file against its checksum after a remount, checks the kernel saw no I/O error,
# and prints "HOSTCHECK offset=0 len=BYTES md5=M" of the whole disk for the host to compare
# with the migration target.
set -e
dev=/dev/vda
disk=vda
[ -b "$dev" ] || { echo "CHECK-FAIL no block device $dev"; exit 1; }
bytes=$(($(cat /sys/block/$disk/size) * 512))

mke2fs -q "$dev" >/dev/null
mkdir -p /mnt
mount -t ext2 "$dev" /mnt
echo "CHECK-OK ext2 made and mounted"

# The host's "switched" line arrives on ttyS1; a background reader turns it into a file.
stty -F /dev/ttyS1 raw -echo 2>/dev/null || true
(read -r line </dev/ttyS1 && touch /tmp/switched) &
echo "MIGRATE-READY"

# Files f0..f63 of 64-256 KiB are rewritten in turn, each with its checksum in fN.md5.
i=0
after=0
cd /mnt
while :; do
	n=$((i % 64))
	dd if=/dev/urandom of=f$n bs=65536 count=$((1 + i % 4)) 2>/dev/null
	md5sum f$n >f$n.md5
	[ $((i % 4)) != 3 ] || sync
	i=$((i + 1))
	if [ -e /tmp/switched ]; then
		after=$((after + 1))
		[ "$after" -lt 8 ] || break
	fi
	[ "$i" -lt 20000 ] || { echo "CHECK-FAIL no switch signal after $i files"; exit 1; }
done
sync
echo "CHECK-OK wrote $i files, $after after the switch"

cd /
umount /mnt
echo 3 >/proc/sys/vm/drop_caches
mount -t ext2 -o ro "$dev" /mnt
cd /mnt
if ! cat ./*.md5 | md5sum -c -s; then
	echo "CHECK-FAIL file checksums differ after the migration"
	exit 1
fi
files=$(ls ./*.md5 | wc -l)
cd /
umount /mnt
echo "CHECK-OK $files files match their checksums"

if dmesg | grep -i -E "i/o error|blk_update_request|EXT[24]-fs error"; then
	echo "CHECK-FAIL the kernel logged I/O errors"
	exit 1
fi
echo "CHECK-OK kernel log clean"

sync
echo 3 >/proc/sys/vm/drop_caches
sum=$(dd if="$dev" bs=1048576 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "HOSTCHECK offset=0 len=$bytes md5=$sum"
