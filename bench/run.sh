#!/usr/bin/env bash
# Runs flowgate's benchmarks and prints their results as ratios against the baselines measured
# in the same run (see bench/README.md). Extra arguments go to `cargo bench`, e.g.
#   bench/run.sh -- classify      # only the classify group
# Results older than this run are reported as missing, never mixed in.
set -euo pipefail
cd "$(dirname "$0")/.."

marker=$(mktemp)
trap 'rm -f "$marker"' EXIT

cargo bench -p flowgate-bench "$@"

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

python3 - "$target_dir/criterion" "$marker" <<'PY'
import json
import os
import sys

root, marker = sys.argv[1], sys.argv[2]
since = os.path.getmtime(marker)


def load(bench_id, name):
    path = os.path.join(root, *bench_id.split("/"), "new", name)
    try:
        if os.path.getmtime(path) < since:
            return None  # left over from an earlier run
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def median_ns(bench_id):
    e = load(bench_id, "estimates.json")
    return None if e is None else e["median"]["point_estimate"]


def elements(bench_id):
    b = load(bench_id, "benchmark.json")
    t = (b or {}).get("throughput") or {}
    return t.get("Elements")


def fmt_ns(ns):
    return f"{ns / 1000:.2f} µs" if ns >= 1000 else f"{ns:.1f} ns"


print()
print("== classify: median time per lookup, ratio to the 100-rule baseline (same lookup)")
sizes = [("10k-rules", "10,000"), ("1m-rules", "1,000,000")]
for lookup in ["last_rule", "no_match", "ipv6"]:
    base = median_ns(f"classify/baseline-100-rules/{lookup}")
    if base is None:
        print(f"classify {lookup}: baseline not measured in this run")
        continue
    print(f"classify {lookup:<9} 100 rules (baseline): {fmt_ns(base)}")
    for size, label in sizes:
        t = median_ns(f"classify/{size}/{lookup}")
        if t is None:
            print(f"classify {lookup:<9} {label} rules: not measured in this run")
        else:
            print(f"classify {lookup:<9} {label} rules / 100 rules: {t / base:.2f}x ({fmt_ns(t)})")

print()
print("== replay: packets per second (median), ratio to reading the capture without an engine")
base_id = "replay/pcap-read-baseline"
base, n = median_ns(base_id), elements(base_id)
if base is None or n is None:
    print("replay: pcap read baseline not measured in this run")
else:
    rate = lambda ns: n / (ns * 1e-9) / 1e6
    print(f"replay pcap read baseline: {rate(base):.2f} M packets/s ({n} packets in {fmt_ns(base)})")
    allow = median_ns("replay/allow-all")
    for bench_id, label in [("replay/allow-all", "allow-all"), ("replay/rules-10k", "10,000 rules")]:
        t = median_ns(bench_id)
        if t is None:
            print(f"replay {label}: not measured in this run")
            continue
        extra = f", {allow / t:.2f}x the speed of allow-all" if allow and bench_id != "replay/allow-all" else ""
        print(f"replay {label}: {rate(t):.2f} M packets/s ({base / t:.2f}x of pcap read baseline{extra})")
PY
