#!/usr/bin/env bash
# record.sh - record the packet captures used by flowgate's replay tests.
#
# Run BY HAND, AS ROOT, on a disposable Debian machine:  sudo bash tests/data/record.sh
# It is NOT run by CI; the captures it writes are committed next to it and the
# replay tests only read them.
#
# What it does:
#   * installs what is missing from Debian's archive (tcpdump, socat, curl,
#     iproute2, ethtool, iputils-ping, tshark/dumpcap, python3);
#   * builds a two-namespace lab with unique names (fgrec-<pid>-cli and
#     fgrec-<pid>-srv) joined by one veth pair (fgc<pid> / fgs<pid>), all
#     offloads off so the captured packets are MTU-sized with valid checksums:
#         cli  fgc<pid>  198.51.100.1/24  2001:db8:1::1/64
#         srv  fgs<pid>  198.51.100.2/24  2001:db8:1::2/64
#         srv  lo        203.0.113.10/32  2001:db8:2::10/128
#         cli routes     203.0.113.0/24 via 198.51.100.2, 2001:db8:2::/64 via 2001:db8:1::2
#     Neither namespace has any other interface or a default route, so no
#     packet can go anywhere but between the two namespaces;
#   * runs real programs (python3 -m http.server, curl, socat, ping) and
#     captures on the CLIENT's veth (so 198.51.100.1 / 2001:db8:1::1 is the
#     local side), with tcpdump for .pcap and dumpcap for .pcapng;
#   * waits for events rather than sleeping: servers listening (ss -l),
#     clients exiting, TCP sockets gone or in TIME-WAIT in both namespaces,
#     and finally the capture file itself showing every expected packet
#     (count_flows.py) before the capture tool is stopped with SIGINT (the
#     only sleeps are the 50 ms ticks of bounded poll loops);
#   * checks every capture with count_flows.py (complete TCP handshakes and
#     FIN closes, no RST, valid checksums, expected payload sizes) and only
#     then writes it next to this script;
#   * removes namespaces, temp files and every process it started on exit,
#     even on failure.
#
# The capture filter keeps IPv4, ARP and IPv6 except ICMPv6 types 130-143
# (MLD, router/neighbour discovery) and packets with a hop-by-hop header
# (MLD), so the captures hold only the intended flows plus a few ARP frames.
#
# Outputs (next to this script): http_curl_v4.pcap socat_tcp_v4.pcap
# socat_udp_v4.pcap socat_tcp_v6.pcapng icmp_ping.pcap mixed_v4v6.pcapng
# socat_tcp_inbound_v4.pcap.  Their contents are described in README.md.
# Re-recording changes ports, timestamps, sequence numbers and the HTTP packet
# counts: regenerate README.md's tables with
#     python3 count_flows.py --markdown <the 7 files>
# and update any test that asserts per-flow numbers.
#
#     sudo bash tests/data/record.sh              # writes next to this script
#     sudo OUT=/some/dir bash tests/data/record.sh

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-$HERE}
COUNT="$HERE/count_flows.py"

if [ "$(id -u)" -ne 0 ]; then
    echo "record.sh: must be run as root" >&2
    exit 1
fi

log() { printf '[record] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ tools

install_tools() {
    local need=() pair cmd pkg
    for pair in tcpdump:tcpdump socat:socat curl:curl ip:iproute2 ss:iproute2 \
                ethtool:ethtool ping:iputils-ping dumpcap:tshark python3:python3 \
                head:coreutils dd:coreutils timeout:coreutils; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        log "installing: ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
}
install_tools

if [ -x /usr/bin/python3 ]; then PY=/usr/bin/python3; else PY=$(command -v python3); fi

# ------------------------------------------------------------------ state

ID=$$
NS_CLI="fgrec-$ID-cli"
NS_SRV="fgrec-$ID-srv"
VC="fgc$ID"
VS="fgs$ID"
WORK=$(mktemp -d /tmp/fgrec.XXXXXXXX)
PIDS=()           # background processes started by this script
CAP_PID=""        # the running capture tool
LAB_UP=0

FILTER='arp or ip or (ip6 and not ip6[6] == 0 and not (ip6[6] == 58 and ip6[40] >= 130 and ip6[40] <= 143))'

cleanup() {
    local rc=$? pid ns
    set +e
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    if [ "$LAB_UP" = 1 ]; then
        # Anything still running inside our own namespaces was started by us.
        for ns in "$NS_CLI" "$NS_SRV"; do
            for pid in $(ip netns pids "$ns" 2>/dev/null); do
                kill -KILL "$pid" 2>/dev/null
            done
        done
        for _ in $(seq 1 100); do
            [ -z "$(ip netns pids "$NS_CLI" 2>/dev/null)$(ip netns pids "$NS_SRV" 2>/dev/null)" ] && break
            sleep 0.05
        done
    fi
    ip netns del "$NS_CLI" 2>/dev/null
    ip netns del "$NS_SRV" 2>/dev/null
    rm -rf "$WORK"
    if [ "$rc" -ne 0 ]; then log "failed (exit $rc); lab cleaned up"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget() {  # forget PID: drop it from PIDS after it has been waited for
    local p keep=()
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]+"${keep[@]}"}")
}

# Foreground helpers only: a background job must be started as
# "ip netns exec NS prog &" (not through a function) so that $! is the
# program itself (ip netns exec execs it) and signals reach it.
in_cli() { ip netns exec "$NS_CLI" "$@"; }
in_srv() { ip netns exec "$NS_SRV" "$@"; }

# ------------------------------------------------------------------ lab

setup_lab() {
    local ns
    ip netns add "$NS_CLI"
    ip netns add "$NS_SRV"
    LAB_UP=1
    for ns in "$NS_CLI" "$NS_SRV"; do
        ip netns exec "$ns" sysctl -q -w \
            net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0 \
            net.ipv6.conf.all.router_solicitations=0 net.ipv6.conf.default.router_solicitations=0 \
            net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
            net.ipv6.conf.default.dad_transmits=0 >/dev/null
        ip -n "$ns" link set lo up
    done
    ip link add "$VC" netns "$NS_CLI" address 02:00:00:00:00:01 type veth \
        peer name "$VS" netns "$NS_SRV" address 02:00:00:00:00:02
    local feat
    for feat in tx rx sg tso gso gro lro ufo; do
        in_cli ethtool -K "$VC" "$feat" off >/dev/null 2>&1 || true
        in_srv ethtool -K "$VS" "$feat" off >/dev/null 2>&1 || true
    done
    local feats
    for ns in "$NS_CLI:$VC" "$NS_SRV:$VS"; do
        feats=$(ip netns exec "${ns%%:*}" ethtool -k "${ns#*:}")
        if grep -E '^(tx-checksumming|generic-segmentation-offload|generic-receive-offload|tcp-segmentation-offload): on' <<<"$feats" >/dev/null; then
            die "could not turn offloads off on ${ns#*:}"
        fi
    done

    ip -n "$NS_CLI" addr add 198.51.100.1/24 dev "$VC"
    ip -n "$NS_CLI" addr add 2001:db8:1::1/64 dev "$VC" nodad
    ip -n "$NS_SRV" addr add 198.51.100.2/24 dev "$VS"
    ip -n "$NS_SRV" addr add 2001:db8:1::2/64 dev "$VS" nodad
    ip -n "$NS_SRV" addr add 203.0.113.10/32 dev lo
    ip -n "$NS_SRV" addr add 2001:db8:2::10/128 dev lo
    ip -n "$NS_CLI" link set "$VC" up
    ip -n "$NS_SRV" link set "$VS" up
    ip -n "$NS_CLI" route add 203.0.113.0/24 via 198.51.100.2
    ip -n "$NS_CLI" -6 route add 2001:db8:2::/64 via 2001:db8:1::2

    local i state addrs
    for i in $(seq 1 100); do
        state="$(ip -n "$NS_CLI" link show "$VC") $(ip -n "$NS_SRV" link show "$VS")"
        addrs="$(ip -n "$NS_CLI" -6 addr show dev "$VC") $(ip -n "$NS_SRV" -6 addr show dev "$VS")"
        if [[ $state == *LOWER_UP*LOWER_UP* && $addrs != *tentative* ]]; then
            log "lab up: $NS_CLI ($VC) <-> $NS_SRV ($VS)"
            return 0
        fi
        sleep 0.05
    done
    die "veth link did not come up"
}

make_data() {
    mkdir -p "$WORK/www"
    "$PY" - "$WORK" <<'EOF'
import sys
work = sys.argv[1]
def text(tag, n):
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"flowgate %s line %05d abcdefghijklmnopqrstuvwxyz\n" % (tag.encode(), i)
        i += 1
    return bytes(out[:n])
files = {
    "www/fg5000.bin": text("http-body", 5000),
    "req1000.bin": text("tcp-request", 1000),
    "reply2000.bin": text("tcp-reply", 2000),
    "req100.bin": text("inbound-request", 100),
    "reply500.bin": text("inbound-reply", 500),
    "dgram1.bin": text("udp-datagram-1", 100),
    "dgram2.bin": text("udp-datagram-2", 100),
    "dgram3.bin": text("udp-datagram-3", 100),
}
for name, data in files.items():
    with open(work + "/" + name, "wb") as f:
        f.write(data)
EOF
    # reply.sh N FILE: swallow an N-byte request from stdin, answer with FILE.
    printf '%s\n' 'head -c "$1" >/dev/null' 'exec cat "$2"' >"$WORK/reply.sh"
}

# ------------------------------------------------------------------ waiting

wait_listen() {  # wait_listen NS tcp|udp PORT
    local ns=$1 proto=$2 port=$3 opt i
    if [ "$proto" = tcp ]; then opt=-Hltn; else opt=-Huln; fi
    for i in $(seq 1 200); do
        if [ -n "$(ip netns exec "$ns" ss $opt "sport = :$port")" ]; then return 0; fi
        sleep 0.05
    done
    die "nothing listening on $proto port $port in $ns"
}

tcp_busy() {  # number of sockets on PORT, in both namespaces, not LISTEN / TIME-WAIT
    local port=$1 ns
    for ns in "$NS_CLI" "$NS_SRV"; do
        ip netns exec "$ns" ss -Htan "( sport = :$port or dport = :$port )"
    done | awk '$1 != "LISTEN" && $1 != "TIME-WAIT"' | wc -l
}

wait_tcp_settled() {  # every TCP connection on PORT fully closed (FINs acked)
    local port=$1 i
    for i in $(seq 1 200); do
        if [ "$(tcp_busy "$port")" -eq 0 ]; then return 0; fi
        sleep 0.05
    done
    die "TCP connections on port $port did not close"
}

# capture_matches FILE EXPR: count_flows.py's JSON for FILE satisfies the
# Python expression EXPR (F = list of flows, I = whole report).
capture_matches() {
    "$PY" "$COUNT" --json "$1" 2>/dev/null | "$PY" -c '
import json, sys
I = json.load(sys.stdin)
F = I["flows"]
sys.exit(0 if eval(sys.argv[1]) else 1)
' "$2" 2>/dev/null
}

# ------------------------------------------------------------------ capture

start_capture() {  # start_capture FILE  (.pcap -> tcpdump, .pcapng -> dumpcap)
    local file=$1 ready i
    : > "$WORK/cap.err"
    ip -n "$NS_CLI" neigh flush all
    ip -n "$NS_SRV" neigh flush all
    case "$file" in
    *.pcapng)
        ip netns exec "$NS_CLI" dumpcap -i "$VC" -n -q -f "$FILTER" -w "$file" 2>"$WORK/cap.err" &
        # dumpcap prints "Capturing on" BEFORE it opens the interface; "File:"
        # comes after the ring is bound, the filter attached and the output
        # file created (checked with strace), so that is the ready signal.
        ready="^File: "
        ;;
    *.pcap)
        ip netns exec "$NS_CLI" tcpdump -i "$VC" -U --immediate-mode -s 0 -n -Z root -w "$file" "$FILTER" 2>"$WORK/cap.err" &
        # tcpdump prints "listening on" after pcap_activate and setfilter.
        ready="^tcpdump: listening on"
        ;;
    *) die "unknown capture format: $file" ;;
    esac
    CAP_PID=$!
    PIDS+=("$CAP_PID")
    for i in $(seq 1 200); do
        if grep -q "$ready" "$WORK/cap.err"; then
            log "capturing to $(basename "$file")"
            return 0
        fi
        kill -0 "$CAP_PID" 2>/dev/null || { cat "$WORK/cap.err" >&2; die "capture tool exited"; }
        sleep 0.05
    done
    cat "$WORK/cap.err" >&2
    die "capture tool did not start"
}

# stop_capture FILE EXPR: wait until FILE shows what EXPR expects, then SIGINT
# the capture tool and wait for it.
stop_capture() {
    local file=$1 expr=$2 i
    for i in $(seq 1 100); do
        if capture_matches "$file" "$expr"; then break; fi
        sleep 0.05
    done
    kill -INT "$CAP_PID"
    wait "$CAP_PID" || die "capture tool failed: $(cat "$WORK/cap.err")"
    forget "$CAP_PID"
    CAP_PID=""
}

# finish NAME EXPR: verify the finished capture and move it into place.
finish() {
    local name=$1 expr=$2
    case "$name" in *.pcapng) expr+=" and I['interfaces'] == ['$VC']" ;; esac
    "$PY" "$COUNT" --check "$WORK/$name" >&2 || die "$name failed the completeness check"
    capture_matches "$WORK/$name" "$expr" || die "$name does not contain the expected flows"
    install -m 0644 "$WORK/$name" "$OUT/$name"
    log "wrote $OUT/$name"
}

stop_server() {  # stop_server PID: end a server we started, wait for it
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    forget "$1"
}

# ------------------------------------------------------------------ traffic

CURL=(curl -s -o /dev/null --noproxy '*' --max-time 10 -w '%{http_code} %{size_download}')

curl_get() {  # curl_get URL  (from the client namespace; must get 200 and 5000 bytes)
    local res
    res=$(in_cli "${CURL[@]}" "$1")
    [ "$res" = "200 5000" ] || die "curl $1 returned '$res'"
}

start_http() {  # start_http BIND -> SRV_PID
    ip netns exec "$NS_SRV" "$PY" -m http.server 8080 --bind "$1" --directory "$WORK/www" \
        >>"$WORK/http.log" 2>&1 &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_listen "$NS_SRV" tcp 8080
}

start_tcp_reply() {  # start_tcp_reply NS LISTEN_ADDRESS PORT REQ_BYTES REPLY_FILE -> SRV_PID
    # One connection (no fork): read the request, answer with the reply
    # file, close.  LISTEN_ADDRESS is a socat address without the options,
    # e.g. TCP4-LISTEN:7000,bind=203.0.113.10
    # EXEC with nofork: after accept() socat execs the helper on the socket
    # itself, so the process we wait for is the whole server and no child is
    # left behind (SYSTEM or a forking EXEC can orphan their child).
    ip netns exec "$1" socat "$2,reuseaddr" EXEC:"/bin/sh $WORK/reply.sh $4 $5",nofork &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_listen "$1" tcp "$3"
}

tcp_exchange() {  # tcp_exchange NS TARGET REQ_FILE EXPECTED_REPLY_FILE
    ip netns exec "$1" socat -t 5 -T 10 - "$2" <"$3" >"$WORK/got.bin"
    cmp -s "$WORK/got.bin" "$4" || die "wrong reply from $2 ($(wc -c <"$WORK/got.bin") bytes)"
}

start_udp_echo() {  # -> SRV_PID
    ip netns exec "$NS_SRV" socat UDP4-LISTEN:5353,bind=203.0.113.10 PIPE &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    wait_listen "$NS_SRV" udp 5353
}

udp_exchange() {  # 3 x 100-byte datagrams from one client socket, each echo awaited
    local i
    coproc UDPC { exec ip netns exec "$NS_CLI" socat -b 100 - UDP4:203.0.113.10:5353; }
    local upid=$UDPC_PID in_fd=${UDPC[0]} out_fd=${UDPC[1]}
    PIDS+=("$upid")
    for i in 1 2 3; do
        cat "$WORK/dgram$i.bin" >&"$out_fd"
        timeout 5 dd bs=100 count=1 iflag=fullblock status=none <&"$in_fd" >"$WORK/echo$i.bin" \
            || die "no echo for datagram $i"
        cmp -s "$WORK/dgram$i.bin" "$WORK/echo$i.bin" || die "bad echo for datagram $i"
    done
    exec {out_fd}>&-
    wait "$upid" || die "UDP client failed"
    forget "$upid"
    if [ -e "/proc/$$/fd/$in_fd" ]; then exec {in_fd}<&-; fi
}

# ------------------------------------------------------------------ captures

NOT_ARP='set(I["non_ip_frames"]) <= {"ARP"}'
TCP_DONE='f["proto"] == "TCP" and f["tcp"]["complete"]'

rec_http_curl_v4() {
    local f=http_curl_v4.pcap
    start_http 203.0.113.10
    start_capture "$WORK/$f"
    curl_get http://203.0.113.10:8080/fg5000.bin
    wait_tcp_settled 8080
    curl_get http://203.0.113.10:8080/fg5000.bin
    wait_tcp_settled 8080
    local e="len(F) == 2 and $NOT_ARP and all($TCP_DONE and f['initiator'] == 'local' and f['remote_addr'] == '203.0.113.10' and f['remote_port'] == 8080 and f['payload_in'] > 5000 and f['payload_out'] > 0 for f in F)"
    stop_capture "$WORK/$f" "$e"
    stop_server "$SRV_PID"
    finish "$f" "$e"
}

rec_socat_tcp() {  # rec_socat_tcp FILE LISTEN_ADDRESS TARGET REMOTE_ADDR
    local f=$1
    start_tcp_reply "$NS_SRV" "$2" 7000 1000 "$WORK/reply2000.bin"
    start_capture "$WORK/$f"
    tcp_exchange "$NS_CLI" "$3" "$WORK/req1000.bin" "$WORK/reply2000.bin"
    wait "$SRV_PID" || die "socat server failed"
    forget "$SRV_PID"
    wait_tcp_settled 7000
    local e="len(F) == 1 and $NOT_ARP and all($TCP_DONE and f['initiator'] == 'local' and f['remote_addr'] == '$4' and f['remote_port'] == 7000 and f['payload_out'] == 1000 and f['payload_in'] == 2000 for f in F)"
    stop_capture "$WORK/$f" "$e"
    finish "$f" "$e"
}

rec_socat_udp_v4() {
    local f=socat_udp_v4.pcap
    start_udp_echo
    start_capture "$WORK/$f"
    udp_exchange
    local e="len(F) == 1 and $NOT_ARP and all(f['proto'] == 'UDP' and f['initiator'] == 'local' and f['remote_addr'] == '203.0.113.10' and f['remote_port'] == 5353 and f['packets_out'] == 3 and f['packets_in'] == 3 and f['payload_out'] == 300 and f['payload_in'] == 300 for f in F)"
    stop_capture "$WORK/$f" "$e"
    stop_server "$SRV_PID"
    finish "$f" "$e"
}

rec_icmp_ping() {
    local f=icmp_ping.pcap
    start_capture "$WORK/$f"
    in_cli ping -n -q -c 2 -i 0.2 -W 1 203.0.113.10 >/dev/null || die "ping failed"
    in_cli ping -6 -n -q -c 2 -i 0.2 -W 1 2001:db8:2::10 >/dev/null || die "ping -6 failed"
    local e="len(F) == 2 and $NOT_ARP and F[0]['proto'] == 'ICMP' and F[0]['remote_addr'] == '203.0.113.10' and F[1]['proto'] == 'ICMPv6' and F[1]['remote_addr'] == '2001:db8:2::10' and all(f['packets_out'] == 2 and f['packets_in'] == 2 for f in F)"
    stop_capture "$WORK/$f" "$e"
    finish "$f" "$e"
}

rec_mixed_v4v6() {
    local f=mixed_v4v6.pcapng http_pid tcp_pid udp_pid
    start_http ::
    http_pid=$SRV_PID
    start_tcp_reply "$NS_SRV" TCP4-LISTEN:7000,bind=203.0.113.10 7000 1000 "$WORK/reply2000.bin"
    tcp_pid=$SRV_PID
    start_udp_echo
    udp_pid=$SRV_PID
    start_capture "$WORK/$f"
    curl_get 'http://[2001:db8:2::10]:8080/fg5000.bin'
    wait_tcp_settled 8080
    tcp_exchange "$NS_CLI" TCP4:203.0.113.10:7000 "$WORK/req1000.bin" "$WORK/reply2000.bin"
    wait "$tcp_pid" || die "socat server failed"
    forget "$tcp_pid"
    wait_tcp_settled 7000
    udp_exchange
    local e="len(F) == 3 and $NOT_ARP"
    e+=" and F[0]['proto'] == 'TCP' and F[0]['tcp']['complete'] and F[0]['remote_addr'] == '2001:db8:2::10' and F[0]['remote_port'] == 8080 and F[0]['payload_in'] > 5000"
    e+=" and F[1]['proto'] == 'TCP' and F[1]['tcp']['complete'] and F[1]['remote_addr'] == '203.0.113.10' and F[1]['remote_port'] == 7000 and F[1]['payload_out'] == 1000 and F[1]['payload_in'] == 2000"
    e+=" and F[2]['proto'] == 'UDP' and F[2]['remote_port'] == 5353 and F[2]['packets_out'] == 3 and F[2]['packets_in'] == 3 and F[2]['payload_out'] == 300 and F[2]['payload_in'] == 300"
    stop_capture "$WORK/$f" "$e"
    stop_server "$http_pid"
    stop_server "$udp_pid"
    finish "$f" "$e"
}

rec_socat_tcp_inbound_v4() {
    local f=socat_tcp_inbound_v4.pcap
    start_tcp_reply "$NS_CLI" TCP4-LISTEN:9000,bind=198.51.100.1 9000 100 "$WORK/reply500.bin"
    start_capture "$WORK/$f"
    tcp_exchange "$NS_SRV" TCP4:198.51.100.1:9000,bind=203.0.113.10 "$WORK/req100.bin" "$WORK/reply500.bin"
    wait "$SRV_PID" || die "socat server failed"
    forget "$SRV_PID"
    wait_tcp_settled 9000
    local e="len(F) == 1 and $NOT_ARP and all($TCP_DONE and f['initiator'] == 'remote' and f['local_addr'] == '198.51.100.1' and f['local_port'] == 9000 and f['remote_addr'] == '203.0.113.10' and f['payload_in'] == 100 and f['payload_out'] == 500 for f in F)"
    stop_capture "$WORK/$f" "$e"
    finish "$f" "$e"
}

# ------------------------------------------------------------------ main

make_data
setup_lab
rec_http_curl_v4
rec_socat_tcp socat_tcp_v4.pcap TCP4-LISTEN:7000,bind=203.0.113.10 TCP4:203.0.113.10:7000 203.0.113.10
rec_socat_udp_v4
rec_socat_tcp socat_tcp_v6.pcapng 'TCP6-LISTEN:7000,bind=[2001:db8:2::10]' 'TCP6:[2001:db8:2::10]:7000' 2001:db8:2::10
rec_icmp_ping
rec_mixed_v4v6
rec_socat_tcp_inbound_v4

"$PY" "$COUNT" "$OUT"/http_curl_v4.pcap "$OUT"/socat_tcp_v4.pcap "$OUT"/socat_udp_v4.pcap \
    "$OUT"/socat_tcp_v6.pcapng "$OUT"/icmp_ping.pcap "$OUT"/mixed_v4v6.pcapng \
    "$OUT"/socat_tcp_inbound_v4.pcap
log "done"
