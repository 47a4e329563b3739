#!/usr/bin/env bash
# Runs every cargo-fuzz target for a few seconds so none of them can rot.
# Usage: scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-20}"
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz-smoke: no nightly toolchain; installing it" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
fi
# A fixed seed keeps CI reproducible (IOVIRT_FUZZ_SEED=0 lets libFuzzer pick one);
# longer campaigns are run by hand (DEVELOPERS.md). On a failure the end of the
# log names the crash artifact and the panic.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in $(cargo +nightly fuzz list); do
    echo "fuzz-smoke: $t for ${secs}s"
    if ! cargo +nightly fuzz run "$t" -- -seed="${IOVIRT_FUZZ_SEED:-1}" -max_total_time="$secs" \
        -rss_limit_mb=2048 >"$log" 2>&1; then
        grep -v '^"' "$log" | tail -n 60
        echo "fuzz-smoke: $t FAILED" >&2
        exit 1
    fi
    grep -v '^"' "$log" | tail -n 1
done
