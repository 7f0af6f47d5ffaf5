#!/usr/bin/env bash
# Builds and runs flowgate's fuzz targets (libFuzzer on stable Rust; see fuzz/README.md).
#
#   fuzz/run.sh TARGET SECONDS   run one target for SECONDS
#   fuzz/run.sh --all SECONDS    run every target for SECONDS each, FUZZ_JOBS (default 2) at once
#   fuzz/run.sh --smoke          every target over its corpus, then FUZZ_SMOKE_SECONDS (default 4)
#                                of fuzzing with a fixed seed: what scripts/test.sh runs
#   fuzz/run.sh --list           the targets
#
# Each run starts from the committed seeds (fuzz/corpus/TARGET, never written to) and what earlier
# runs found (fuzz/work/TARGET, not committed). A crash, panic, time-out (30 s for one input) or
# memory blow-up (2 GiB) fails the run: the script exits 1, names the input libFuzzer saved under
# fuzz/artifacts/TARGET/ and prints the panic; reproduce with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# Logs: fuzz/work/TARGET.log. The `control` target runs the real daemon in a network namespace of
# its own and needs root; without root it is skipped (with a message), or fails when CI is set.
set -euo pipefail
cd "$(dirname "$0")"
FUZZ=$PWD
TARGETS=(packet engine packet_stage conntrack nfqueue nflog sockdiag procinfo replay config netfilter control control_reply http dns hosts_file reassembly defrag tls quic)
BIN=$FUZZ/target/x86_64-unknown-linux-gnu/release

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

build() {
    # Not --locked: the fuzz workspace has its own Cargo.lock, and the project's crates add
    # dependencies under it; cargo adds what they need and keeps the versions it has.
    cargo build --release --quiet --bins
}

# run TARGET SECONDS [LIBFUZZER-OPTION...]: one libFuzzer run; returns non-zero on a failure.
run() {
    local t=$1 secs=$2
    shift 2
    if [[ $t == control && $(id -u) -ne 0 ]]; then
        # Skipped is not passed: under CI a missing privilege fails the run.
        if [[ -n ${CI:-} ]]; then
            echo "fuzz $t: FAILED: needs root (it runs the daemon in a network namespace) and CI is set" >&2
            return 1
        fi
        echo "fuzz $t: SKIPPED: needs root (it runs the daemon in a network namespace)"
        return 0
    fi
    mkdir -p "work/$t" "artifacts/$t"
    local log=work/$t.log start=$SECONDS status=0
    # Targets keep their scratch files (a capture file, fake tools, the daemon's run_dir and
    # socket) in a temporary directory of their own, removed after the run. Short: a Unix
    # socket's path must fit in 108 bytes.
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/fgfuzz-$t.XXXXXX")
    # -rss_limit_mb: the targets hold kilobytes; -timeout: one input; -max_len: captures and
    # netlink dumps need more than libFuzzer's default of 4 KiB.
    TMPDIR=$tmp RUST_BACKTRACE=1 "$BIN/$t" "work/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$@" >"$log" 2>&1 || status=$?
    rm -rf "$tmp"
    if ((status == 0)); then
        local runs cov
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
        cov=$(grep -aEo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
        echo "fuzz $t: ok: ${runs:-?} runs in $((SECONDS - start)) s, $cov," \
            "corpus $(ls "work/$t" | wc -l) + $(ls "corpus/$t" | wc -l) seeds"
        return 0
    fi
    local input
    input=$(grep -aEo "(crash|timeout|oom|leak|slow-unit)-[0-9a-f]+" "$log" | tail -1 || true)
    echo "fuzz $t: FAILED after $((SECONDS - start)) s; the input is fuzz/artifacts/$t/${input:-<none saved>}" >&2
    echo "fuzz $t: reproduce: $BIN/$t fuzz/artifacts/$t/${input:-...}   (log: fuzz/$log)" >&2
    grep -aE -A30 "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | head -60 >&2 || tail -30 "$log" >&2
    return 1
}

# many SECONDS TARGET...: runs targets FUZZ_JOBS at a time (with FUZZ_OPTIONS); fails if any
# failed.
many() {
    local secs=$1
    shift
    local jobs=${FUZZ_JOBS:-2} failed=0 pids=()
    for t in "$@"; do
        # shellcheck disable=SC2086 # options are words
        run "$t" "$secs" ${FUZZ_OPTIONS:-} &
        pids+=($!)
        if ((${#pids[@]} >= jobs)); then
            wait "${pids[0]}" || failed=1
            pids=("${pids[@]:1}")
        fi
    done
    for p in "${pids[@]}"; do
        wait "$p" || failed=1
    done
    return $failed
}

case "${1:-}" in
    --list) printf '%s\n' "${TARGETS[@]}" ;;
    --smoke)
        [[ $# -eq 1 ]] || usage
        start=$SECONDS
        build
        echo "fuzz: built in $((SECONDS - start)) s"
        start=$SECONDS
        # One at a time, with a fixed seed: the same mutations every time, so a smoke failure is
        # a finding that reproduces, not luck.
        FUZZ_JOBS=${FUZZ_JOBS:-1} FUZZ_OPTIONS="-seed=1" many "${FUZZ_SMOKE_SECONDS:-4}" "${TARGETS[@]}"
        echo "fuzz: smoke run of ${#TARGETS[@]} targets passed in $((SECONDS - start)) s"
        ;;
    --all)
        [[ $# -eq 2 && $2 =~ ^[0-9]+$ ]] || usage
        build
        many "$2" "${TARGETS[@]}"
        ;;
    -* | "") usage ;;
    *)
        [[ $# -eq 2 && $2 =~ ^[0-9]+$ ]] || usage
        [[ " ${TARGETS[*]} " == *" $1 "* ]] || { echo "unknown target $1; targets: ${TARGETS[*]}" >&2; exit 2; }
        build
        run "$1" "$2"
        ;;
esac
