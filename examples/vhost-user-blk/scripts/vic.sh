#!/usr/bin/env bash
# Virtual interrupt coalescing (vIC) in iovirt-vhost-user-blk: queue depth 1, 8 and 32, with and
# without `--coalesce on`, on back-ends where requests really are in flight at the device:
#   file  a real (written, not sparse) file with O_DIRECT (cache=none, io_uring)
#   slow  a null disk under a fault filter that delays every request by 1 ms (a slow array)
# (a null disk completes every request inline, so nothing is ever in flight and vIC, which follows
# the commands in flight, rightly never holds an interrupt back; add "null" to see that).
#
# For each job the table gives IOPS, interrupts per request (the daemon counts its call-eventfd
# writes; the load generator reads them through the daemon's control socket, `export-stats`, at the
# start and end of its measured window), IOPS per daemon CPU-second (--cpu-pid: utime + stime of all
# the daemon's threads) and latency percentiles. The daemon is pinned to one core, the load
# generator (iovirt-blk-loadgen, libblkio) to another; off and on take turns for --rounds rounds and
# the table shows each one's median-IOPS run.
#
# Usage: examples/vhost-user-blk/scripts/vic.sh [--duration SECS] [--rounds N] [--out DIR]
#        [--no-build] [--daemon-cpu N] [--loadgen-cpu N] [--backends "file slow"] [--depths 1,8,32]
set -euo pipefail

SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SELF_DIR/../../.." && pwd)
DURATION=5
ROUNDS=3
OUT=
BUILD=1
DAEMON_CPU=0
LOADGEN_CPU=1
BACKENDS="file slow"
DEPTHS=1,8,32
while (($#)); do
	case $1 in
	--duration) DURATION=${2:?} && shift ;;
	--rounds) ROUNDS=${2:?} && shift ;;
	--out) OUT=${2:?} && shift ;;
	--no-build) BUILD=0 ;;
	--daemon-cpu) DAEMON_CPU=${2:?} && shift ;;
	--loadgen-cpu) LOADGEN_CPU=${2:?} && shift ;;
	--backends) BACKENDS=${2:?} && shift ;;
	--depths) DEPTHS=${2:?} && shift ;;
	-h | --help) sed -n '2,19p' "$0" && exit 0 ;;
	*) echo "vic.sh: unknown argument $1" >&2 && exit 2 ;;
	esac
	shift
done

# shellcheck source=SCRIPTDIR/../../../scripts/lib/bench.sh
source "$REPO_DIR/scripts/lib/bench.sh"
command -v taskset >/dev/null || die "taskset (util-linux) is not installed"
command -v python3 >/dev/null || die "python3 is needed for the table"

bench_binaries release "$BUILD"

OUT=${OUT:-$(mktemp -d /tmp/vhost-vic.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMG=$OUT/disk.img
SOCK=$OUT/vhost.sock
CTL=$OUT/control.sock
PID=

cleanup() {
	stop_daemon
	rm -f "$IMG" "$SOCK" "$CTL"
}
trap cleanup EXIT

cat >"$OUT/slow.toml" <<EOF
[slow]
filter = "fault"
slow = [{ ms = 1 }]
[slow.child]
backend = "null"
size = "1G"
EOF

disk_of() {
	case $1 in
	null) echo "null,size=1G" ;;
	file) echo "path=$IMG,cache=none" ;;
	slow) echo "stack=$OUT/slow.toml" ;;
	*) die "unknown back-end $1 (file, slow, null)" ;;
	esac
}

# run BACKEND off|on: start the pinned daemon, run every depth, stop the daemon.
run() {
	local backend=$1 co=$2 log=$OUT/$1-$2-$ROUND.log
	rm -f "$SOCK" "$CTL"
	taskset -c "$DAEMON_CPU" "$DAEMON" --control "$CTL" --export vic --socket "$SOCK" \
		--disk "$(disk_of "$backend")" --coalesce "$co" >"$log" 2>&1 &
	PID=$!
	wait_sockets "$log" "$SOCK" "$CTL"
	taskset -c "$LOADGEN_CPU" "$LOADGEN" --socket "$SOCK" --duration "$DURATION" --depths "$DEPTHS" \
		--ops randread --label "$backend-$co" --json "$OUT/$backend-$co-$ROUND.json" \
		--cpu-pid "$PID" --control "$CTL" --export vic >&2
	stop_daemon
}

for backend in $BACKENDS; do
	if [[ $backend == file ]]; then
		# A real 1 GiB file (written, not sparse), so reads reach the disk through O_DIRECT.
		dd if=/dev/zero of="$IMG" bs=1M count=1024 conv=fsync status=none
	fi
	for ROUND in $(seq "$ROUNDS"); do
		run "$backend" off
		run "$backend" on
	done
	rm -f "$IMG"
done

# shellcheck disable=SC2086 # BACKENDS is split into words on purpose
python3 - "$OUT" "$DURATION" "$ROUNDS" $BACKENDS <<'EOF'
import json, sys
out, duration, rounds, backends = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def median_runs(b, co):
    runs = {}
    for r in range(1, rounds + 1):
        for job in json.load(open(f"{out}/{b}-{co}-{r}.json")):
            runs.setdefault(job["queue_depth"], []).append(job)
    return {k: sorted(v, key=lambda j: j["iops"])[len(v) // 2] for k, v in runs.items()}

print(f"4 KiB random reads, {duration} s per job, median-IOPS run of {rounds} alternating rounds; "
      "daemon pinned to 1 core, libblkio frontend on another. irq/req: interrupts the daemon sent "
      "per request it completed; IOPS/CPU-s: I/Os per second of the daemon's CPU time.\n")
print("| back-end | QD | vIC | IOPS | irq/req | IOPS/CPU-s | p50 / p99 / p99.9 (µs) |")
print("|---|---:|---|---:|---:|---:|---|")
fmt = lambda v, f: format(v, f) if v is not None else "–"
for b in backends:
    off, on = median_runs(b, "off"), median_runs(b, "on")
    for qd in sorted(off):
        for name, r in (("off", off.get(qd)), ("on", on.get(qd))):
            if r is None:
                continue
            print(f'| {b} | {qd} | {name} | {r["iops"]:,.0f} | {fmt(r.get("interrupts_per_request"), ".3f")} | '
                  f'{fmt(r.get("iops_per_cpu_s"), ",.0f")} | '
                  f'{r["lat_p50_us"]:.1f} / {r["lat_p99_us"]:.1f} / {r["lat_p999_us"]:.1f} |')
EOF
echo
echo "raw results: $OUT" >&2
