#!/usr/bin/env bash
# Packet-stage benchmark: UDP packets per second through flowgate's packet stage (embedded, with a
# counting packet filter) against a minimal accept-all NFQUEUE reader, and bulk TCP on an
# interface the packet stage does not cover, with the stage on elsewhere and off (see
# bench/README.md, "Packet stage"). Needs root. The same build and setup as bench/live.sh; extra
# arguments go to the benchmark, e.g.
#   bench/packets.sh --json /tmp/packets.json   # also write the JSON result to a file
#   bench/packets.sh --rounds 9 --seconds 3     # more and longer rounds
#   bench/packets.sh --parts pps                # only the packets-per-second part
set -euo pipefail
BENCH_BIN=packets exec "$(dirname "$0")/live.sh" "$@"
