#!/usr/bin/env bash
# AES-256-XTS on 4 KiB sectors, one core: OpenSSL's `speed` and our criterion bench
# (benches/benches/luks_xts.rs) in the same run, so both see the same machine state.
# Usage: benches/scripts/xts-vs-openssl.sh [seconds for openssl, default 3]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-3}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== openssl speed -evp aes-256-xts -bytes 4096 -seconds $secs"
openssl speed -evp aes-256-xts -bytes 4096 -seconds "$secs" 2>/dev/null | tail -2 | tee "$tmp/openssl"
# OpenSSL prints thousands of bytes per second.
ossl=$(awk 'tolower($1) == "aes-256-xts" {v=$NF; sub("k","",v); printf "%.2f", v*1000/1e9}' "$tmp/openssl")

echo "== cargo bench -p iovirt-benches --bench luks_xts -- xts/"
cargo bench -p iovirt-benches --bench luks_xts -- --noplot 'xts/' 2>&1 | tee "$tmp/bench" | grep -E '^xts/|thrpt:  \[[0-9]' || true

# Median throughput of one benchmark in GB/s (criterion prints GiB/s or MiB/s).
median() {
    awk -v id="$1" '$1 == id {f=1} f && /thrpt:  \[[0-9]/ {
        v=$4; u=$5; sub("/s","",u);
        if (u == "GiB") v *= 1.073741824; else if (u == "MiB") v *= 0.001048576;
        printf "%.2f", v; exit }' "$tmp/bench"
}
enc=$(median xts/ours-encrypt/64)
dec=$(median xts/ours-decrypt/64)
echo
echo "| AES-256-XTS, 4 KiB sectors, 1 core | GB/s | vs OpenSSL |"
echo "|---|---|---|"
echo "| openssl speed -evp aes-256-xts -bytes 4096 | $ossl | 1.00x |"
echo "| iovirt XtsCipher encrypt, 64 sectors/call | $enc | $(awk -v a="$enc" -v b="$ossl" 'BEGIN {printf "%.2fx", a/b}') |"
echo "| iovirt XtsCipher decrypt, 64 sectors/call | $dec | $(awk -v a="$dec" -v b="$ossl" 'BEGIN {printf "%.2fx", a/b}') |"
