#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this and nothing else).
# Run as root on a fresh Debian machine: installs what the suite needs, then runs format and
# lint checks, every unit, replay and integration test, the library example, a smoke run of
# every fuzz target (fuzz/run.sh --smoke), and compiles the benchmarks. Exits non-zero on the
# first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the suite needs: iproute2 for the namespace lab, iptables for the chains the
# daemon installs, ping for ICMP tests, python3 for the replay oracle, conntrack for the
# conntrack cross-checks, python3-scapy for crafted packets. Under CI a test that lacks one of them fails rather than skips.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v ping >/dev/null || need+=(iputils-ping)
command -v python3 >/dev/null || need+=(python3)
command -v conntrack >/dev/null || need+=(conntrack)
# ipset: the static rules' sets (flowgate runs it; the netfilter live tests list the sets).
command -v ipset >/dev/null || need+=(ipset)
# Crafted hostile packets (fragments, IPv6 extension headers, a spoofed SYN flood) in live tests.
/usr/bin/python3 -c 'import scapy' 2>/dev/null || need+=(python3-scapy)
# The metrics live tests read /metrics with a real Prometheus text parser (prometheus_client's).
/usr/bin/python3 -c 'import prometheus_client.parser' 2>/dev/null || need+=(python3-prometheus-client)
# ping: the packet stage's live test counts echoes inside the tunnel.
command -v ping >/dev/null || need+=(iputils-ping)
# Process attribution's live tests drive curl and setpriv (util-linux); the kernel capture's
# object is checked against its source by rebuilding it with clang-14, llvm-strip-14 and
# libbpf-dev's BPF headers (crates/flowgate-linux/bpf/build.sh).
command -v curl >/dev/null || need+=(curl)
command -v setpriv >/dev/null || need+=(util-linux)
command -v clang-14 >/dev/null || need+=(clang-14)
command -v llvm-strip-14 >/dev/null || need+=(llvm-14)
[[ -e /usr/include/bpf/bpf_helpers.h ]] || need+=(libbpf-dev)
# A C++ compiler: libfuzzer-sys builds libFuzzer for the fuzz smoke run (fuzz/README.md).
command -v c++ >/dev/null || need+=(g++)
# Event formats (crates/flowgate/tests/event_formats.rs): a JSON Schema validator, and pip for
# the Python modules below.
/usr/bin/python3 -c 'import jsonschema' 2>/dev/null || need+=(python3-jsonschema)
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# The packaging tests (crates/flowgate/tests/packaging.rs): dpkg-dev for dpkg-shlibdeps (the
# package's library dependencies) and binutils' strip, groff to check the man pages, systemd for
# systemd-analyze verify on the unit, systemd-container for the nspawn container in which
# packaging/systemd-check.sh runs the service under a real systemd.
command -v dpkg-shlibdeps >/dev/null || need+=(dpkg-dev)
command -v strip >/dev/null || need+=(binutils)
command -v groff >/dev/null || need+=(groff-base)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
# Content inspection's live tests (crates/flowgate/tests/content.rs): openssl for the test
# certificate and s_client, dnsmasq (dnsmasq-base) and dig (bind9-dnsutils) for DNS-learnt
# hosts, python3-venv for the aioquic venv below.
command -v openssl >/dev/null || need+=(openssl)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v dig >/dev/null || need+=(bind9-dnsutils)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "test.sh: missing ${need[*]}; run as root so they can be installed" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Python modules from PyPI, pinned, for the event-format tests: the Community ID reference
# implementation and the OCSF schemas (1.0.0-1.8.0) as JSON Schema. Neither has dependencies.
if ! /usr/bin/python3 -c 'import communityid, ocsf_json_schema' 2>/dev/null; then
    /usr/bin/python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --break-system-packages communityid==1.5.0 ocsf-json-schema==1.2.0
fi

# The HTTP/3 client and server of the content tests (crates/flowgate/tests/content/quic_*.py) run
# on aioquic (Debian has no package of it), installed with its dependencies at the versions
# pinned in crates/flowgate/tests/content/requirements.txt into a venv of their own, where the
# tests look for it.
venv=/opt/flowgate-test-venv
if ! "$venv/bin/python" -c 'import aioquic' 2>/dev/null; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        -r crates/flowgate/tests/content/requirements.txt
fi

# Suricata's EVE schema, for the EVE records' validation: fetched from Debian's source package
# of Suricata (not part of this repository), cached under target/schemas/.
scripts/eve-schema.sh >/dev/null

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy
# cargo-deb, at the version packaging/build-deb.sh pins, for the packaging test.
packaging/build-deb.sh --tools-only

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy (all targets, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets --locked
cargo test --workspace --doc --locked
echo "== example: custom provider"
cargo run --locked -q -p flowgate-core --example custom_provider >/dev/null
echo "== fuzz smoke run: every fuzz target over its seed corpus, then a few seconds of fuzzing"
fuzz/run.sh --smoke
echo "== all tests passed"
