#!/usr/bin/env bash
# Side-by-side benchmark (issue 14): no filter, the minimal accept-all NFQUEUE reader, flowgate
# with flows decided in the kernel, flowgate judging every flow in user space, and OpenSnitch, on
# the same workloads in interleaved rounds (see bench/README.md, "Side by side"). Needs root.
# Installs what it needs (iptables, iproute2, conntrack, opensnitch) with apt-get, without letting
# the opensnitch package start or enable its service on this machine; builds the release flowgate
# and the benchmark (as bench/live.sh does); runs it; then checks that no opensnitchd runs and
# that this machine's own iptables hold no NFQUEUE rule that was not there before.
#
# Writes bench/results/compare.md and bench/results/compare.json. Extra arguments go to the
# benchmark, e.g.
#   bench/compare.sh --rounds 7                 # more rounds (default 5)
#   bench/compare.sh --out /tmp/cmp             # write the results elsewhere
#   bench/compare.sh --help
# The last line of stdout is the result as one JSON object.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/compare.sh: must run as root (it creates network namespaces, runs flowgate and" >&2
    echo "opensnitchd in them, which install iptables rules and bind NFQUEUE queues); try: sudo bench/compare.sh" >&2
    exit 1
fi

cd "$(dirname "$0")/.."
started=$(date +%s)

# The machine's own NFQUEUE rules before anything runs, to compare with after.
nfqueue_rules() {
    { iptables-save 2>/dev/null || true; ip6tables-save 2>/dev/null || true; } | grep -- 'NFQUEUE' || true
}

if pgrep -x opensnitchd >/dev/null 2>&1; then
    echo "bench/compare.sh: an opensnitchd is already running on this machine (pids: $(pgrep -x opensnitchd | tr '\n' ' '))." >&2
    echo "It is not this benchmark's; stop it first (it would filter this machine's own traffic)." >&2
    exit 1
fi

# opensnitch's maintainer scripts start and enable its service. A policy-rc.d that denies
# everything (exit 101) keeps invoke-rc.d from starting it while the package installs; a
# policy-rc.d already in place is put back afterwards (else ours is removed).
policy=/usr/sbin/policy-rc.d
policy_backup=
policy_ours=
restore_policy() {
    if [[ -n $policy_backup ]]; then
        mv -f "$policy_backup" "$policy"
    elif [[ -n $policy_ours ]]; then
        rm -f "$policy"
    fi
    policy_backup=
    policy_ours=
}
if [[ ! -x /usr/bin/opensnitchd ]]; then
    trap restore_policy EXIT
    if [[ -e $policy ]]; then
        policy_backup=$(mktemp /usr/sbin/.policy-rc.d.XXXXXX)
        cp -p "$policy" "$policy_backup"
    fi
    policy_ours=1
    printf '#!/bin/sh\n# bench/compare.sh: no service starts while packages install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    echo "bench/compare.sh: installing opensnitch (its service kept from starting)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opensnitch >&2
    restore_policy
    trap - EXIT
fi
# Whatever the package enabled: off.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now opensnitch.service >/dev/null 2>&1 || true
fi
rm -f /etc/systemd/system/multi-user.target.wants/opensnitch.service
if pgrep -x opensnitchd >/dev/null 2>&1; then
    echo "bench/compare.sh: opensnitchd runs on this machine after the install (pids: $(pgrep -x opensnitchd | tr '\n' ' '));" >&2
    echo "stop it (systemctl stop opensnitch) before running the benchmark." >&2
    exit 1
fi

rules_before=$(nfqueue_rules)

# iptables, iproute2, conntrack; the release flowgate; the benchmark in the live-bench profile.
status=0
COMPARE_COMMAND="bench/compare.sh${*:+ $*}" BENCH_BIN=compare bench/live.sh "$@" || status=$?

# Nothing of the run may be left on this machine.
problems=()
if pgrep -x opensnitchd >/dev/null 2>&1; then
    problems+=("opensnitchd is running: pids $(pgrep -x opensnitchd | tr '\n' ' ')")
fi
rules_after=$(nfqueue_rules)
if [[ "$rules_after" != "$rules_before" ]]; then
    problems+=("this machine's NFQUEUE rules changed: before [$rules_before], after [$rules_after]")
fi
if ((${#problems[@]})); then
    printf 'bench/compare.sh: after the run: %s\n' "${problems[@]}" >&2
    exit 1
fi
echo "bench/compare.sh: after the run: no opensnitchd running; this machine's iptables/ip6tables NFQUEUE rules as before ($(printf '%s' "$rules_after" | grep -c NFQUEUE || true) rules); $(($(date +%s) - started)) s in all" >&2
exit "$status"
