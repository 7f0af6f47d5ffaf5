#!/usr/bin/env bash
# Owners benchmark (issue 11): attribution accuracy for short-lived processes with the kernel
# capture and with /proc, and the connect() latency a process rule adds (see bench/README.md,
# "Owners"). Needs root. Builds the release flowgate binary, the benchmark and its short-lived
# program (connect_once), then runs it; extra arguments go to the benchmark, e.g.
#   bench/owners.sh --tcp-runs 1000 --udp-runs 200 --rounds 3 --out /tmp/owners   # a short run
#   bench/owners.sh --help
# Writes bench/results/owners.md and bench/results/owners.json (unless --out says elsewhere); the
# last line of stdout is the result as one JSON object.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/owners.sh: must run as root (it creates network namespaces and runs flowgate, which" >&2
    echo "installs iptables rules, binds NFQUEUE queues and loads BPF programs); try: sudo bench/owners.sh" >&2
    exit 1
fi

cd "$(dirname "$0")/.."

missing=()
command -v iptables-restore >/dev/null 2>&1 || missing+=(iptables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
if ((${#missing[@]})); then
    echo "bench/owners.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# The daemon: the ordinary release build.
cargo build --release -p flowgate

# The benchmark and connect_once: release optimisations with unwinding panics (as bench/live.sh
# builds its benchmarks), in a profile of their own that keeps target/release untouched.
cargo build -p flowgate-bench --bin owners --bin connect_once --profile live-bench \
    --config 'profile.live-bench.inherits="release"' \
    --config 'profile.live-bench.panic="unwind"'

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

OWNERS_COMMAND="bench/owners.sh${*:+ $*}" exec "$target_dir/live-bench/owners" \
    --flowgate "$target_dir/release/flowgate" \
    --connect-once "$target_dir/live-bench/connect_once" "$@"
