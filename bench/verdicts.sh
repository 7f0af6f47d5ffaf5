#!/usr/bin/env bash
# Live benchmark of verdict changes and adoption: how fast a block tears down both ends of an
# idle, kernel-handled connection, and how long `flowgate run` takes to start with 10,000
# connections already open, which must all keep working (see bench/README.md, "Verdict changes
# and adoption"). Needs root. The same build and setup as bench/live.sh; extra arguments go to
# the benchmark, e.g.
#   bench/verdicts.sh --json /tmp/verdicts.json   # also write the JSON result to a file
#   bench/verdicts.sh --parts adoption --connections 20000
set -euo pipefail
BENCH_BIN=verdicts exec "$(dirname "$0")/live.sh" "$@"
