#!/usr/bin/env bash
# Live benchmark: the real `flowgate run` daemon in the namespace lab, against the same traffic
# with no filter (see bench/README.md, "Live"). Needs root. Builds the release flowgate binary
# and the benchmark, then runs it; extra arguments go to the benchmark, e.g.
#   bench/live.sh --json /tmp/live.json     # also write the JSON result to a file
#   bench/live.sh --connects 1000           # fewer connections (default 3000)
# The last line of stdout is the result as one JSON object. BENCH_BIN=verdicts runs the verdict
# and adoption benchmark instead (that is what bench/verdicts.sh does); BENCH_EXTRA_BINS names
# more benchmark binaries to build beside it (bench/owners.sh: its short-lived program).
set -euo pipefail
bin=${BENCH_BIN:-live}
extra=()
for b in ${BENCH_EXTRA_BINS:-}; do
    extra+=(--bin "$b")
done

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/$bin.sh: must run as root (it creates network namespaces and runs flowgate, which" >&2
    echo "installs iptables rules and binds NFQUEUE queues); try: sudo bench/$bin.sh" >&2
    exit 1
fi

cd "$(dirname "$0")/.."

missing=()
command -v iptables-restore >/dev/null 2>&1 || missing+=(iptables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v conntrack >/dev/null 2>&1 || missing+=(conntrack)
if ((${#missing[@]})); then
    echo "bench/$bin.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

# The daemon (and the CLI the verdict benchmark runs): the ordinary release build.
cargo build --release -p flowgate

# The benchmark: release optimisations with unwinding panics (as the workspace's release profile
# has them too), so that a failure unwinds through the lab's Drop guards. A profile of its own
# keeps target/release untouched.
cargo build -p flowgate-bench --bin "$bin" "${extra[@]}" --profile live-bench \
    --config 'profile.live-bench.inherits="release"' \
    --config 'profile.live-bench.panic="unwind"'

target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

exec "$target_dir/live-bench/$bin" --flowgate "$target_dir/release/flowgate" "$@"
