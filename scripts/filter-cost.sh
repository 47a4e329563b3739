#!/usr/bin/env bash
# What each interposition filter costs: iovirt-vhost-user-blk serves the same tmpfs back-end
# through each filter stack in turn, and iovirt-blk-loadgen (libblkio, playing the VMM) runs
# 4 KiB random reads and writes at queue depths 1 and 32 against it. Prints a markdown table of
# IOPS and p50/p99 latency per stack, with IOPS relative to the bare back-end.
#
# Stacks (docs/FILTERS.md), all over files in a tmpfs directory with cache = "writeback", so the
# filters' own cost is what differs:
#   bare        the file alone
#   fault       fault filter, no rules (pass-through)
#   crypt       LUKS2 (cryptsetup luksFormat, aes-xts-plain64, 512-bit key, 4 KiB sectors, PBKDF2)
#   mirror      2-way mirror (region 64K, no bitmap file)
#   redolog     redo log over the file (log in the same tmpfs)
#   stripe      2 files of half the size, 64K chunks
#   concat      2 files of half the size
#   multipath   2 paths to the same file, failover
#   migrate     the migration filter, idle (no migration started)
#
# Each daemon is pinned to --daemon-cpu, the load generator to --loadgen-cpu. Raw JSON and logs
# stay in --out. Numbers from a busy machine are only indicative: re-measure on a quiet one.
#
# Usage: scripts/filter-cost.sh [--duration SECS] [--size MIB] [--stacks "bare fault ..."]
#        [--out DIR] [--no-build] [--debug] [--daemon-cpu N] [--loadgen-cpu N] [--tmpfs DIR]
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=5
SIZE_MIB=256
STACKS="bare fault crypt mirror redolog stripe concat multipath migrate"
OUT=
BUILD=1
PROFILE=release
DAEMON_CPU=0
LOADGEN_CPU=1
TMPFS=/dev/shm
while (($#)); do
	case $1 in
	--duration) DURATION=${2:?} && shift ;;
	--size) SIZE_MIB=${2:?} && shift ;;
	--stacks) STACKS=${2:?} && shift ;;
	--out) OUT=${2:?} && shift ;;
	--no-build) BUILD=0 ;;
	--debug) PROFILE=debug ;;
	--daemon-cpu) DAEMON_CPU=${2:?} && shift ;;
	--loadgen-cpu) LOADGEN_CPU=${2:?} && shift ;;
	--tmpfs) TMPFS=${2:?} && shift ;;
	-h | --help) sed -n '2,24p' "$0" && exit 0 ;;
	*) echo "filter-cost.sh: unknown argument $1" >&2 && exit 2 ;;
	esac
	shift
done

# shellcheck source=SCRIPTDIR/lib/bench.sh
source "$REPO_DIR/scripts/lib/bench.sh"
command -v taskset >/dev/null || die "taskset (util-linux) is not installed"
command -v python3 >/dev/null || die "python3 is needed for the table"
if ! [[ $SIZE_MIB =~ ^[0-9]+$ ]] || ((SIZE_MIB < 16 || SIZE_MIB % 2 != 0)); then
	die "--size $SIZE_MIB: expected an even number of MiB, at least 16"
fi

bench_binaries "$PROFILE" "$BUILD"

OUT=${OUT:-$(mktemp -d /tmp/filter-cost.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=$(mktemp -d "$TMPFS/iovirt-filter-cost.XXXXXX")
SOCK=$OUT/vhost.sock
PID=

cleanup() {
	stop_daemon
	rm -rf "$DATA"
	rm -f "$SOCK"
}
trap cleanup EXIT

# img NAME MIB: a fully written file (not sparse), so reads find data.
img() {
	dd if=/dev/zero of="$DATA/$1" bs=1M count="$2" status=none
}

# The stack description of $1, written to $DATA/$1.toml (files made fresh for each stack).
make_stack() {
	local s=$1 half=$((SIZE_MIB / 2)) file='backend = "file"
cache = "writeback"'
	rm -f "$DATA"/*.img "$DATA"/*.redo
	case $s in
	bare)
		img a.img "$SIZE_MIB"
		printf '[vda]\n%s\npath = "a.img"\n' "$file"
		;;
	fault)
		img a.img "$SIZE_MIB"
		printf '[vda]\nfilter = "fault"\n[vda.child]\n%s\npath = "a.img"\n' "$file"
		;;
	crypt)
		command -v cryptsetup >/dev/null || die "crypt needs cryptsetup (cryptsetup-bin)"
		img a.img $((SIZE_MIB + 16))
		printf 'filter-cost' >"$DATA/key"
		cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
			--sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
			--key-file "$DATA/key" "$DATA/a.img" >&2 || die "cryptsetup luksFormat failed"
		printf '[vda]\nfilter = "crypt"\nkey-file = "key"\n[vda.child]\n%s\npath = "a.img"\n' "$file"
		;;
	mirror)
		img a.img "$SIZE_MIB" && img b.img "$SIZE_MIB"
		printf '[vda]\nfilter = "mirror"\n'
		printf '[[vda.children]]\n%s\npath = "%s"\n' "$file" a.img "$file" b.img
		;;
	redolog)
		img a.img "$SIZE_MIB"
		printf '[vda]\nfilter = "redolog"\nlog = "a.redo"\n[vda.child]\n%s\npath = "a.img"\n' "$file"
		;;
	stripe | concat)
		img a.img "$half" && img b.img "$half"
		printf '[vda]\nfilter = "%s"\n' "$s"
		printf '[[vda.children]]\n%s\npath = "%s"\n' "$file" a.img "$file" b.img
		;;
	multipath)
		img a.img "$SIZE_MIB"
		printf '[vda]\nfilter = "multipath"\n'
		printf '[[vda.children]]\n%s\npath = "%s"\n' "$file" a.img "$file" a.img
		;;
	migrate)
		img a.img "$SIZE_MIB"
		printf '[vda]\nfilter = "migrate"\n[vda.child]\n%s\npath = "a.img"\n' "$file"
		;;
	*) die "unknown stack $s (bare fault crypt mirror redolog stripe concat multipath migrate)" ;;
	esac >"$DATA/$s.toml"
}

for s in $STACKS; do
	make_stack "$s"
	rm -f "$SOCK"
	log=$OUT/$s.log
	RUST_LOG=warn taskset -c "$DAEMON_CPU" "$DAEMON" --socket "$SOCK" --disk "stack=$DATA/$s.toml" \
		>"$log" 2>&1 &
	PID=$!
	wait_sockets "$log" "$SOCK"
	echo "filter-cost.sh: $s" >&2
	taskset -c "$LOADGEN_CPU" "$LOADGEN" --socket "$SOCK" --duration "$DURATION" --depths 1,32 \
		--ops randread,randwrite --label "$s" --json "$OUT/$s.json" --cpu-pid "$PID" >"$OUT/$s.txt" ||
		die "load generator failed on $s; see $OUT/$s.txt and $log"
	stop_daemon
done

# shellcheck disable=SC2086 # one argument per stack
python3 - "$OUT" "$DURATION" "$SIZE_MIB" "$PROFILE" $STACKS <<'EOF'
import json, sys
out, duration, size, profile, stacks = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
runs = {s: {(j["op"], j["queue_depth"]): j for j in json.load(open(f"{out}/{s}.json"))} for s in stacks}
base = runs.get("bare", {})
print(f"4 KiB random I/O, {duration} s per job, {size} MiB tmpfs files (cache = writeback), "
      f"{profile} build; daemon and libblkio load generator each pinned to one core. "
      "vs bare: IOPS relative to the bare back-end.\n")
print("| stack | op | QD | IOPS | vs bare | p50 (µs) | p99 (µs) | IOPS/CPU-s |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for s in stacks:
    for (op, qd), j in sorted(runs[s].items(), key=lambda kv: (kv[0][0], kv[0][1])):
        b = base.get((op, qd))
        rel = f'{j["iops"] / b["iops"]:.2f}x' if b and b["iops"] else "–"
        per = j.get("iops_per_cpu_s")
        per = f"{per:,.0f}" if per else "–"
        print(f'| {s} | {op} | {qd} | {j["iops"]:,.0f} | {rel} | {j["lat_p50_us"]:.1f} | {j["lat_p99_us"]:.1f} | {per} |')
EOF
echo "raw results: $OUT" >&2
