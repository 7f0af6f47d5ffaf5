#!/usr/bin/env bash
# Builds flowgate (release) and runs its main job: the live filter, as root, in the foreground.
# With no arguments it uses the safe built-in default: every flow is allowed (nothing is cut
# off), fail-open, loopback left alone, and every flow is logged as JSON lines on stdout. Stop it
# with Ctrl-C: it removes everything it installed. Any arguments are passed to `flowgate` as they
# are, e.g.
#   scripts/run.sh run --config /etc/flowgate.toml
#   scripts/run.sh flows
#   scripts/run.sh replay tests/data/mixed_v4v6.pcapng --config examples/flowgate.toml
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ $(id -u) -ne 0 ]]; then
    echo "run.sh: flowgate's live filter needs root (netfilter rules, NFQUEUE)" >&2
    exit 1
fi
# iptables for flowgate's chains, ipset for the sets of static rules with several networks.
if ! command -v iptables-restore >/dev/null || ! command -v ip6tables-restore >/dev/null || ! command -v ipset >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq iptables ipset >/dev/null
fi
cargo build --release --locked -q --manifest-path "$root/Cargo.toml" -p flowgate
bin="$root/target/release/flowgate"
if (($# == 0)); then
    set -- run
fi
exec "$bin" "$@"
