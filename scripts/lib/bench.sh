# Shared pieces of the daemon benchmark scripts (examples/vhost-user-blk/scripts/compare.sh,
# vic.sh, scripts/filter-cost.sh). Source it after setting REPO_DIR; the caller keeps the
# daemon's PID in PID (empty when none runs).
# shellcheck shell=bash

# die MESSAGE: print "SCRIPT: MESSAGE" and exit 1.
die() { echo "$(basename "$0"): $*" >&2 && exit 1; }

# bench_binaries PROFILE BUILD: build (if BUILD is 1) and locate the daemon and the load
# generator of PROFILE (release or debug) in CARGO_TARGET_DIR; sets DAEMON and LOADGEN.
bench_binaries() {
	local profile=$1 build=$2 target=${CARGO_TARGET_DIR:-$REPO_DIR/target} flag=--release
	[[ $profile == debug ]] && flag=
	if ((build)); then
		# shellcheck disable=SC2086 # an empty $flag is no argument
		(cd "$REPO_DIR" && cargo build $flag -q -p iovirt-vhost-user-blk) || die "cargo build failed"
	fi
	DAEMON=$target/$profile/iovirt-vhost-user-blk
	LOADGEN=$target/$profile/iovirt-blk-loadgen
	[[ -x $DAEMON && -x $LOADGEN ]] ||
		die "no $profile binaries in $target/$profile (set CARGO_TARGET_DIR)"
}

# wait_sockets LOG SOCKET...: wait up to 10 s for the daemon ($PID) to create every SOCKET.
wait_sockets() {
	local log=$1 s _
	shift
	for s in "$@"; do
		for _ in $(seq 200); do
			[[ -S $s ]] && break
			kill -0 "$PID" 2>/dev/null || die "daemon exited early; see $log"
			sleep 0.05
		done
		[[ -S $s ]] || die "daemon did not create $s; see $log"
	done
}

# stop_daemon: kill the daemon ($PID), if any, and reap it.
stop_daemon() {
	if [[ -n $PID ]]; then
		kill "$PID" 2>/dev/null || true
		wait "$PID" 2>/dev/null || true
	fi
	PID=
}
