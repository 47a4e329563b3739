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
for t in $(cargo +nightly fuzz list); do
    echo "fuzz-smoke: $t for ${secs}s"
    cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
    test "${PIPESTATUS[0]}" -eq 0
done
