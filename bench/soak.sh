#!/usr/bin/env bash
# Soak test of the live daemon: `flowgate run` for 30 minutes under a steady churn of new TCP
# connections (200/s) and UDP flows (50/s) and 5 long connections, sampling its resident memory,
# descriptors, threads, timers and flows every 30 s, with a flat/growing verdict per measure
# (see bench/README.md, "Soak"). Not part of the test command. Needs root. The same build and
# setup as bench/live.sh; extra arguments go to the benchmark, e.g.
#   bench/soak.sh --json /tmp/soak.json   # also write the JSON result to a file
#   bench/soak.sh --quick                 # 2 minutes, to try it out
#   bench/soak.sh --minutes 60 --tcp-rate 400
set -euo pipefail
BENCH_BIN=soak exec "$(dirname "$0")/live.sh" "$@"
