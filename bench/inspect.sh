#!/usr/bin/env bash
# Inspection benchmark (issue 10): packets per second of short TLS connections through flowgate
# holding and sniffing every flow's first bytes (a host rule) against the minimal accept-all
# queue reader that sees the same packets, and the added latency of a held flow's first request,
# in interleaved rounds (see the module doc of bench/src/bin/inspect.rs). Needs root. Builds the
# release flowgate binary and the benchmark, then runs it; extra arguments go to the benchmark:
#   bench/inspect.sh --rounds 3 --connections 1000 --out /tmp/inspect   # a short run
#   bench/inspect.sh --only floor,flowgate-inspect                      # two configurations
#   bench/inspect.sh --help
# Writes bench/results/inspect.md and bench/results/inspect.json (unless --out says elsewhere); the
# last line of stdout is the result as one JSON object.
set -euo pipefail
# bench/live.sh checks for root, installs what is missing, builds the daemon and this benchmark,
# and runs it.
INSPECT_COMMAND="bench/inspect.sh${*:+ $*}" BENCH_BIN=inspect exec "$(dirname "$0")/live.sh" "$@"
