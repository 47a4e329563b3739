#!/usr/bin/env bash
# Proof for tools/guest-image/build.sh: build a guest whose script checks its drivers, boot it
# under QEMU TCG with a virtio-blk disk and a virtio-net NIC, and check the serial log for
# "IOVIRT-GUEST-END status=0", the loaded modules, and a sector the guest wrote to the disk.
#
# Usage: tools/guest-image/test.sh [--kernel-package PKG] [--timeout SECS] [--keep]
# Env: IOVIRT_CACHE (default <repo>/.cache). Prints boot-to-marker wall time.
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SELF_DIR/../.." && pwd)
CACHE=${IOVIRT_CACHE:-$REPO_DIR/.cache}
KERNEL_PACKAGE=linux-image-cloud-amd64
TIMEOUT=120
KEEP=0
while (($#)); do
	case $1 in
	--kernel-package) KERNEL_PACKAGE=${2:?} && shift ;;
	--timeout) TIMEOUT=${2:?} && shift ;;
	--keep) KEEP=1 ;;
	-h | --help) sed -n '2,7p' "$0" && exit 0 ;;
	*) echo "unknown argument: $1" >&2 && exit 2 ;;
	esac
	shift
done

fail() {
	echo "guest-image test: FAIL: $*" >&2
	[[ -f ${LOG:-} ]] && sed 's/^/  | /' "$LOG" >&2
	exit 1
}

if ! command -v qemu-system-x86_64 >/dev/null; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2 ||
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2; }
fi

WORK=$(mktemp -d)
QEMU_PID=
cleanup() {
	[[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null
	if ((KEEP)); then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
LOG=$WORK/serial.log
DISK=$WORK/disk.img
MARK="iovirt-guest-image-test-sector"

cat >"$WORK/check.sh" <<EOF
#!/bin/sh
# Runs inside the guest as /test.sh; its exit status is the test's verdict.
set -e
echo "VERSION: \$(cat /proc/version)"
echo "MODULES:"
sed 's/^/  /' /proc/modules
# Each driver is either a loaded module or built in (6.12 builds virtio_pci in).
for m in virtio_pci virtio_blk virtio_net ata_piix sd_mod sr_mod isofs; do
	if grep -q "^\$m " /proc/modules; then
		echo "DRIVER-OK \$m module"
	elif grep -q "/\$m\.ko" "/lib/modules/\$(uname -r)/modules.builtin"; then
		echo "DRIVER-OK \$m builtin"
	else
		echo "missing driver \$m"; exit 10
	fi
done
# The virtio-blk disk (16 MiB = 32768 sectors) and the virtio-net NIC must have bound.
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 11; }
[ "\$(cat /sys/block/vda/size)" = 32768 ] || { echo "vda size \$(cat /sys/block/vda/size)"; exit 12; }
ls /sys/class/net | grep -q '^eth' || { echo "no virtio-net interface"; exit 13; }
echo "$MARK" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null
echo "GUEST-CHECKS-OK"
EOF

OUT="$CACHE/guest-image/test-out/$KERNEL_PACKAGE"
t0=$EPOCHREALTIME
INITRD=$("$SELF_DIR/build.sh" --cache "$CACHE" --out "$OUT" --kernel-package "$KERNEL_PACKAGE" \
	--script "$WORK/check.sh" --name guest-image-test -q)
t1=$EPOCHREALTIME
# shellcheck source=/dev/null
. "$OUT/manifest.txt"
echo "built $INITRD (kernel $KERNEL_RELEASE, $KERNEL_COMPRESSION) in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')s"

truncate -s 16M "$DISK"
start=$EPOCHREALTIME
timeout "$TIMEOUT" qemu-system-x86_64 -M q35 -accel tcg -cpu max -m 512 -smp 1 -nodefaults \
	-nographic -no-reboot -kernel "$OUT/vmlinux" -initrd "$INITRD" \
	-append "console=ttyS0 quiet panic=-1" -serial "file:$LOG" \
	-drive "file=$DISK,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0 \
	-netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,romfile= \
	</dev/null >"$WORK/qemu.out" 2>&1 &
QEMU_PID=$!
marker_at=
while kill -0 "$QEMU_PID" 2>/dev/null; do
	if [[ -z $marker_at ]] && grep -q 'IOVIRT-GUEST-END' "$LOG" 2>/dev/null; then
		marker_at=$EPOCHREALTIME
	fi
	sleep 0.02
done
rc=0
wait "$QEMU_PID" || rc=$?
QEMU_PID=
end=$EPOCHREALTIME
[[ -n $marker_at ]] || { grep -q 'IOVIRT-GUEST-END' "$LOG" 2>/dev/null && marker_at=$end; }
((rc != 124)) || fail "QEMU timed out after ${TIMEOUT}s"
((rc == 0)) || fail "QEMU exited with $rc: $(cat "$WORK/qemu.out")"

status=$(sed -n 's/.*IOVIRT-GUEST-END status=\([0-9]*\).*/\1/p' "$LOG" | tail -n1)
[[ -n $status ]] || fail "no IOVIRT-GUEST-END marker in the serial log"
[[ $status == 0 ]] || fail "guest script exited with status $status"
grep -q GUEST-CHECKS-OK "$LOG" || fail "guest checks did not report OK"
for m in virtio_pci virtio_blk virtio_net ata_piix sd_mod sr_mod isofs; do
	grep -q "^DRIVER-OK $m " "$LOG" || fail "driver $m neither loaded nor built in"
done
dd if="$DISK" bs=512 skip=1 count=1 2>/dev/null | grep -qa "$MARK" ||
	fail "the sector the guest wrote through virtio-blk is not in the disk image"

uptime=$(sed -n 's/.*IOVIRT-GUEST-UPTIME \([0-9.]*\).*/\1/p' "$LOG" | tail -n1)
to_marker=$(awk -v a="$start" -v b="$marker_at" 'BEGIN { printf "%.2f", b - a }')
total=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
grep -m1 '^VERSION:' "$LOG" | tr -d '\r'
echo "PASS: kernel $KERNEL_RELEASE; QEMU TCG launch-to-marker ${to_marker}s wall" \
	"(guest uptime at marker ${uptime}s), launch-to-exit ${total}s"
