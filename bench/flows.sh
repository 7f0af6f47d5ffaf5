#!/usr/bin/env bash
# Live benchmark of flowgate's flow registry at very many live flows: the daemon's memory per
# flow, the time of `flowgate flows` over 100,000 and 1,000,000 flows, and how long new
# connections wait while such a listing runs (see bench/README.md, "Flow registry at 1,000,000
# flows"). Needs root; raises net.netfilter.nf_conntrack_max for the run and restores it. The
# same build and setup as bench/live.sh; extra arguments go to the benchmark, e.g.
#   bench/flows.sh --json /tmp/flows.json   # also write the JSON result to a file
#   bench/flows.sh --flows 100000           # one size only (--quick: 20,000 flows)
set -euo pipefail
BENCH_BIN=flows exec "$(dirname "$0")/live.sh" "$@"
