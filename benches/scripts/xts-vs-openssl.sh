#!/usr/bin/env bash
# AES-256-XTS on 4 KiB sectors, one core: OpenSSL's `speed` and our bench
# (benches/benches/luks_xts.rs: XtsCipher, 64 sectors of 4 KiB per call) back to back
# in rounds, so each pair sees the same machine state. Two comparisons per round:
#   cpu:  GB per CPU-second, what `openssl speed` reports by default, against the
#         bench's XTS_CPU_SECONDS mode (thread CPU time): immune to other load;
#   wall: `openssl speed -elapsed` against criterion's wall-clock median.
# Prints a markdown table and the medians. Usage: xts-vs-openssl.sh [rounds, default 5]
set -uo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-5}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cargo bench -p iovirt-benches --bench luks_xts --no-run >/dev/null 2>&1 ||
    { echo "the luks_xts bench does not build" >&2; exit 1; }
bin=$(cargo bench -p iovirt-benches --bench luks_xts --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "luks_xts" and m.get("executable"):
        print(m["executable"])')

ossl() { # extra openssl args
    openssl speed "$@" -evp aes-256-xts -bytes 4096 -seconds 2 2>/dev/null |
        awk 'tolower($1) == "aes-256-xts" {v=$NF; sub("k","",v); printf "%.2f", v*1000/1e9}'
}
# Median throughput of one criterion benchmark in GB/s (criterion prints GiB/s or MiB/s).
median_of() {
    awk -v id="$1" '$1 == id {f=1} f && /thrpt:  \[[0-9]/ {
        v=$4; u=$5; sub("/s","",u);
        if (u == "GiB") v *= 1.073741824; else if (u == "MiB") v *= 0.001048576;
        printf "%.2f", v; exit }' "$2"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a/b; else print "nan"}'; }

echo "| round | openssl cpu | ours enc cpu | ours dec cpu | enc/openssl cpu | openssl wall | ours enc wall | ours dec wall | enc/openssl wall |"
echo "|---|---|---|---|---|---|---|---|---|"
: >"$tmp/rows"
for r in $(seq 1 "$rounds"); do
    oc=$(ossl)
    XTS_CPU_SECONDS=2 "$bin" --bench >"$tmp/cpu" 2>&1
    ec=$(awk '/cpu-time encrypt/ {print $3}' "$tmp/cpu")
    dc=$(awk '/cpu-time decrypt/ {print $3}' "$tmp/cpu")
    ow=$(ossl -elapsed)
    "$bin" --bench --noplot --warm-up-time 1 --measurement-time 2 'xts/ours-(en|de)crypt/64' >"$tmp/bench" 2>&1
    ew=$(median_of xts/ours-encrypt/64 "$tmp/bench")
    dw=$(median_of xts/ours-decrypt/64 "$tmp/bench")
    if [ -z "$oc" ] || [ -z "$ec" ] || [ -z "$ow" ] || [ -z "$ew" ]; then
        echo "| $r | round failed |"
        continue
    fi
    rc=$(ratio "$ec" "$oc")
    rw=$(ratio "$ew" "$ow")
    echo "$oc $ec $dc $rc $ow $ew $dw $rw" >>"$tmp/rows"
    echo "| $r | $oc | $ec | $dc | ${rc}x | $ow | $ew | $dw | ${rw}x |"
done
med() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
row="| median"
for c in 1 2 3 4 5 6 7 8; do
    v=$(cut -d' ' -f$c "$tmp/rows" | med)
    if [ "$c" = 4 ] || [ "$c" = 8 ]; then v="${v}x"; fi
    row="$row | $v"
done
echo "$row |"
