#!/usr/bin/env bash
# Time from launch to SeaBIOS's "No bootable device." under iovirt-vmm and under QEMU (-M pc,
# KVM), N runs each (default 5), and print every run and the medians.
# Usage: examples/vmm/scripts/boot-time.sh [RUNS]   (env: VMM=path/to/iovirt-vmm, BIOS=...)
set -euo pipefail

RUNS=${1:-5}
BIOS=${BIOS:-/usr/share/seabios/bios-256k.bin}
VMM=${VMM:-${CARGO_TARGET_DIR:-target}/debug/iovirt-vmm}
MARKER="No bootable device."
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

[ -x "$VMM" ] || { echo "no iovirt-vmm at $VMM: build it (cargo build -p iovirt-vmm) or set VMM" >&2; exit 1; }
[ -r "$BIOS" ] || { echo "no SeaBIOS at $BIOS: apt-get install seabios" >&2; exit 1; }

# time_one LOG CMD...: run CMD in the background, wait for MARKER in LOG, kill it, print seconds.
time_one() {
	local log=$1; shift
	rm -f "$log"
	local start end pid
	start=$(date +%s.%N)
	"$@" >/dev/null 2>&1 </dev/null &
	pid=$!
	for _ in $(seq 1 6000); do
		if grep -qF "$MARKER" "$log" 2>/dev/null; then break; fi
		sleep 0.01
	done
	end=$(date +%s.%N)
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	grep -qF "$MARKER" "$log" || { echo "timeout" ; return; }
	echo "$end - $start" | bc
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

ours=() qemu=()
for i in $(seq 1 "$RUNS"); do
	ours+=("$(time_one "$TMP/ours.log" "$VMM" --firmware "$BIOS" --mem 256M --serial null --debugcon "file=$TMP/ours.log")")
	qemu+=("$(time_one "$TMP/qemu.log" qemu-system-x86_64 -M pc -enable-kvm -cpu host,-arch-capabilities -m 256 \
		-nodefaults -nographic -bios "$BIOS" -debugcon "file:$TMP/qemu.log" -global isa-debugcon.iobase=0x402)")
	echo "run $i: iovirt-vmm ${ours[-1]} s, qemu ${qemu[-1]} s"
done
echo "median iovirt-vmm: $(printf '%s\n' "${ours[@]}" | median) s"
echo "median qemu:       $(printf '%s\n' "${qemu[@]}" | median) s"
