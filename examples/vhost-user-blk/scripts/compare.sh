#!/usr/bin/env bash
# Side-by-side vhost-user-blk load test: iovirt-vhost-user-blk vs qemu-storage-daemon on the same
# back-ends (null: null-co vs our null disk; file: O_DIRECT io_uring vs our cache=none), each daemon
# pinned to one core, the load generator (iovirt-blk-loadgen, libblkio) on another.
# Prints a markdown table; raw JSON and logs stay in --out.
#
# IOPS per core: the load generator reads each daemon's CPU time (utime + stime of all its threads,
# /proc/PID/stat) at the start and end of every job's measured window (--cpu-pid), and the table
# gives I/Os per daemon CPU-second next to raw IOPS, and our ratio to qemu-storage-daemon on both.
# CPU-seconds per I/O are steadier than IOPS on a shared, noisy machine.
#
# The two daemons take turns for --rounds rounds and the table shows each one's median IOPS (and the
# latencies of that median run), which keeps a shared, noisy machine from favouring either side.
#
# Usage: examples/vhost-user-blk/scripts/compare.sh [--duration SECS] [--rounds N] [--out DIR]
#        [--no-build] [--daemon-cpu N] [--loadgen-cpu N] [--backends "null file"]
#        [--iovirt-args "ARGS"]   (extra daemon arguments for iovirt, e.g. "--poll-us 0")
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SELF_DIR/../../.." && pwd)
DURATION=5
ROUNDS=3
OUT=
BUILD=1
DAEMON_CPU=0
LOADGEN_CPU=1
BACKENDS="null file"
IOVIRT_ARGS=
while (($#)); do
	case $1 in
	--duration) DURATION=${2:?} && shift ;;
	--rounds) ROUNDS=${2:?} && shift ;;
	--out) OUT=${2:?} && shift ;;
	--no-build) BUILD=0 ;;
	--daemon-cpu) DAEMON_CPU=${2:?} && shift ;;
	--loadgen-cpu) LOADGEN_CPU=${2:?} && shift ;;
	--backends) BACKENDS=${2:?} && shift ;;
	--iovirt-args) IOVIRT_ARGS=${2?} && shift ;;
	-h | --help) sed -n '2,17p' "$0" && exit 0 ;;
	*) echo "compare.sh: unknown argument $1" >&2 && exit 2 ;;
	esac
	shift
done

# shellcheck source=SCRIPTDIR/../../../scripts/lib/bench.sh
source "$REPO_DIR/scripts/lib/bench.sh"
command -v qemu-storage-daemon >/dev/null || die "qemu-storage-daemon is not installed"
command -v taskset >/dev/null || die "taskset (util-linux) is not installed"
command -v python3 >/dev/null || die "python3 is needed for the table"

bench_binaries release "$BUILD"

OUT=${OUT:-$(mktemp -d /tmp/vhost-compare.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMG=$OUT/disk.img
SOCK=$OUT/vhost.sock
PID=

cleanup() {
	stop_daemon
	rm -f "$IMG" "$SOCK"
}
trap cleanup EXIT

# run NAME BACKEND -- DAEMON ARGS...: start the pinned daemon, run the load, stop the daemon.
run() {
	local name=$1 backend=$2
	shift 3
	rm -f "$SOCK"
	taskset -c "$DAEMON_CPU" "$@" >"$OUT/$name-$backend.log" 2>&1 &
	PID=$!
	wait_sockets "$OUT/$name-$backend.log" "$SOCK"
	taskset -c "$LOADGEN_CPU" "$LOADGEN" --socket "$SOCK" --duration "$DURATION" --depths 1,32 \
		--ops randread,randwrite --label "$name-$backend" --json "$OUT/$name-$backend-$ROUND.json" \
		--cpu-pid "$PID" >&2
	stop_daemon
}

for backend in $BACKENDS; do
	if [[ $backend == file ]]; then
		# A real 1 GiB file (written, not sparse), so reads reach the disk through O_DIRECT.
		dd if=/dev/zero of="$IMG" bs=1M count=1024 conv=fsync status=none
	fi
	for ROUND in $(seq "$ROUNDS"); do
		case $backend in
		null)
			run qsd null -- qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=1073741824 \
				--export "type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path=$SOCK,writable=on"
			# shellcheck disable=SC2086 # IOVIRT_ARGS is split into words on purpose
			run iovirt null -- "$DAEMON" --socket "$SOCK" --disk null,size=1G $IOVIRT_ARGS
			;;
		file)
			run qsd file -- qemu-storage-daemon \
				--blockdev "driver=file,node-name=f,filename=$IMG,cache.direct=on,aio=io_uring" \
				--export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$SOCK,writable=on"
			# shellcheck disable=SC2086
			run iovirt file -- "$DAEMON" --socket "$SOCK" --disk "path=$IMG,cache=none" $IOVIRT_ARGS
			;;
		*) die "unknown back-end $backend (null, file)" ;;
		esac
	done
done

python3 - "$OUT" "$DURATION" "$ROUNDS" $BACKENDS <<'EOF'
import json, sys
out, duration, rounds, backends = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def median_runs(name, b):
    runs = {}
    for r in range(1, rounds + 1):
        for job in json.load(open(f"{out}/{name}-{b}-{r}.json")):
            runs.setdefault((job["op"], job["queue_depth"]), []).append(job)
    return {k: sorted(v, key=lambda j: j["iops"])[len(v) // 2] for k, v in runs.items()}

def median_per_cpu(name, b):
    # Median over the rounds of I/Os per daemon CPU-second (each round's own ratio).
    runs = {}
    for r in range(1, rounds + 1):
        for job in json.load(open(f"{out}/{name}-{b}-{r}.json")):
            v = job.get("iops_per_cpu_s")
            if v:
                runs.setdefault((job["op"], job["queue_depth"]), []).append(v)
    return {k: sorted(v)[len(v) // 2] for k, v in runs.items()}

print(f"4 KiB random I/O, {duration} s per job, median of {rounds} alternating rounds; "
      "daemon pinned to 1 core, libblkio frontend on another. IOPS/CPU-s: I/Os per second of the "
      "daemon's CPU time (all threads, user + system) in the measured window.\n")
print("| back-end | op | QD | qsd IOPS | iovirt IOPS | iovirt/qsd IOPS | qsd IOPS/CPU-s | iovirt IOPS/CPU-s | iovirt/qsd per core | qsd p50 / p99 / p99.9 (µs) | iovirt p50 / p99 / p99.9 (µs) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
lat = lambda r: f'{r["lat_p50_us"]:.1f} / {r["lat_p99_us"]:.1f} / {r["lat_p999_us"]:.1f}'
for b in backends:
    q, i = median_runs("qsd", b), median_runs("iovirt", b)
    qc, ic = median_per_cpu("qsd", b), median_per_cpu("iovirt", b)
    for k, a in q.items():
        c = i.get(k)
        if c is None:
            continue
        ratio = c["iops"] / a["iops"] if a["iops"] else float("nan")
        pq, pi = qc.get(k), ic.get(k)
        fmt = lambda v: f"{v:,.0f}" if v else "–"
        pr = f"{pi / pq:.2f}x" if pq and pi else "–"
        print(f'| {b} | {k[0]} | {k[1]} | {a["iops"]:,.0f} | {c["iops"]:,.0f} | {ratio:.2f}x | {fmt(pq)} | {fmt(pi)} | {pr} | {lat(a)} | {lat(c)} |')
EOF
echo
echo "raw results: $OUT" >&2
