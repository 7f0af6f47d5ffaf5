#!/usr/bin/env bash
# Builds flowgate (release) and runs it. With no arguments it does flowgate's main job with its
# safe built-in default: judge the bundled capture of real traffic with the example rules and
# print the flow events (JSON lines). Any arguments are passed to `flowgate` as they are, e.g.
#   scripts/run.sh replay my.pcapng --config my.toml
#   scripts/run.sh rules check my.toml
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --release --locked -q --manifest-path "$root/Cargo.toml" -p flowgate
bin="$root/target/release/flowgate"
if (($# == 0)); then
    set -- replay "$root/tests/data/mixed_v4v6.pcapng" --config "$root/examples/flowgate.toml"
fi
exec "$bin" "$@"
