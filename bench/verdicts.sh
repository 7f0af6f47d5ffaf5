#!/usr/bin/env bash
# Live benchmark of verdict changes and adoption: how fast a block tears down both ends of an
# idle, kernel-handled connection, and how long `flowgate run` takes to start with 10,000
# connections already open, which must all keep working (see bench/README.md, "Verdict changes
# and adoption"). Needs root. Builds the release flowgate binary and the benchmark, then runs it;
# extra arguments go to the benchmark, e.g.
#   bench/verdicts.sh --json /tmp/verdicts.json   # also write the JSON result to a file
#   bench/verdicts.sh --parts adoption --connections 20000
# The last line of stdout is the result as one JSON object.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/verdicts.sh: must run as root (it creates network namespaces and runs flowgate, which" >&2
    echo "installs iptables rules and binds NFQUEUE queues); try: sudo bench/verdicts.sh" >&2
    exit 1
fi

cd "$(dirname "$0")/.."

missing=()
command -v iptables-restore >/dev/null 2>&1 || missing+=(iptables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
if ((${#missing[@]})); then
    echo "bench/verdicts.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# The daemon (and the CLI the block part runs): the ordinary release build.
cargo build --release -p flowgate

# The benchmark: release optimisations, but with unwinding panics (the workspace's release
# profile aborts on panic), so that a failure unwinds through the lab's Drop guards. The same
# profile as bench/live.sh, so the two share their build.
cargo build -p flowgate-bench --bin verdicts --profile live-bench \
    --config 'profile.live-bench.inherits="release"' \
    --config 'profile.live-bench.panic="unwind"'

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

exec "$target_dir/live-bench/verdicts" --flowgate "$target_dir/release/flowgate" "$@"
