#!/usr/bin/env bash
# iovirt's test command: set-up, lints, every unit/property/real-client test, and a
# short run of every fuzz target. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
export IOVIRT_GUEST_DIR="${IOVIRT_GUEST_DIR:-$PWD/.cache/guest}"
# Property tests draw the same cases on every run here, so CI is reproducible
# (proptest's own default is a fresh random seed; set PROPTEST_RNG_SEED to
# explore others, and check in any proptest-regressions file a failure writes).
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261126}"

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== tests (unit, property, doc, real clients)"
cargo test --workspace
if [ -x tools/guest-image/test.sh ]; then
    echo "== guest image under QEMU TCG"
    tools/guest-image/test.sh
fi
echo "== fuzz smoke"
scripts/fuzz-smoke.sh "${IOVIRT_FUZZ_SECONDS:-20}"
