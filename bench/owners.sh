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
# bench/live.sh checks for root, installs what is missing, builds the daemon, this benchmark and
# connect_once (which the benchmark finds next to itself), and runs it.
OWNERS_COMMAND="bench/owners.sh${*:+ $*}" BENCH_BIN=owners BENCH_EXTRA_BINS=connect_once \
    exec "$(dirname "$0")/live.sh" "$@"
