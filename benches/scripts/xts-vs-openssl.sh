#!/usr/bin/env bash
# AES-256-XTS on 4 KiB sectors, one core: OpenSSL's `speed` and our criterion bench
# (benches/benches/luks_xts.rs, XtsCipher with 64 sectors per call) back to back in
# rounds, so each pair sees the same machine state; prints each round and the medians.
# Both are wall-clock rates (`openssl speed -elapsed`; by default openssl reports CPU time,
# which hides contention). On a shared machine, look at the per-round ratios.
# Usage: benches/scripts/xts-vs-openssl.sh [rounds, default 5]
set -uo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-5}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cargo bench -p iovirt-benches --bench luks_xts --no-run >/dev/null 2>&1 ||
    { echo "the luks_xts bench does not build" >&2; exit 1; }

# Median throughput of one benchmark in GB/s (criterion prints GiB/s or MiB/s).
median_of() {
    awk -v id="$1" '$1 == id {f=1} f && /thrpt:  \[[0-9]/ {
        v=$4; u=$5; sub("/s","",u);
        if (u == "GiB") v *= 1.073741824; else if (u == "MiB") v *= 0.001048576;
        printf "%.2f", v; exit }' "$2"
}

echo "| round | openssl aes-256-xts 4 KiB (GB/s) | ours encrypt (GB/s) | ours decrypt (GB/s) | encrypt/openssl | decrypt/openssl |"
echo "|---|---|---|---|---|---|"
: >"$tmp/rows"
for r in $(seq 1 "$rounds"); do
    ossl=$(openssl speed -elapsed -evp aes-256-xts -bytes 4096 -seconds 2 2>/dev/null |
        awk 'tolower($1) == "aes-256-xts" {v=$NF; sub("k","",v); printf "%.2f", v*1000/1e9}' || true)
    cargo bench -p iovirt-benches --bench luks_xts -- --noplot --warm-up-time 1 \
        --measurement-time 2 'xts/ours-(en|de)crypt/64' >"$tmp/bench" 2>&1 || true
    enc=$(median_of xts/ours-encrypt/64 "$tmp/bench")
    dec=$(median_of xts/ours-decrypt/64 "$tmp/bench")
    if [ -z "$ossl" ] || [ -z "$enc" ] || [ -z "$dec" ]; then
        echo "| $r | round failed: $(grep -m1 -iE 'error' "$tmp/bench" || echo 'no numbers') |"
        continue
    fi
    re=$(awk -v a="$enc" -v b="$ossl" 'BEGIN {printf "%.2f", a/b}')
    rd=$(awk -v a="$dec" -v b="$ossl" 'BEGIN {printf "%.2f", a/b}')
    echo "$ossl $enc $dec $re $rd" >>"$tmp/rows"
    echo "| $r | $ossl | $enc | $dec | ${re}x | ${rd}x |"
done
med() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "| median | $(cut -d' ' -f1 "$tmp/rows" | med) | $(cut -d' ' -f2 "$tmp/rows" | med) | $(cut -d' ' -f3 "$tmp/rows" | med) | $(cut -d' ' -f4 "$tmp/rows" | med)x | $(cut -d' ' -f5 "$tmp/rows" | med)x |"
