#!/usr/bin/env bash
# Runs the packaged service under a real systemd, the check `systemd-analyze verify` cannot
# make: that the daemon starts, reloads, stops and restarts with exactly the unit's capabilities
# and sandbox. Boots this machine's own system in a systemd-nspawn container (its root mounted
# read-only under a throwaway overlay, a private network: nothing outside is touched), installs
# the .deb there and checks:
#   install: neither enabled nor started, /run/xtables.lock made; start: READY (the unit's
#   status line), capabilities, nice -10 workers, / read-only for the daemon, chains in; a TCP
#   connection on lo is logged, listed and blocked; reload (RELOADING/READY); stop (chains
#   gone, ExecStopPost finds nothing to clean); SIGKILL (ExecStopPost removes the dead chains,
#   Restart= starts it again); the legacy iptables backend; control_group; purge.
# The packaging test runs it on the package it builds (about 20 s); by hand:
#
#   sudo packaging/systemd-check.sh [DEB]     # default: target/debian/flowgate_*.deb
#
# Exits 0 when every check passed; the container, mounts and files are removed in any case.
set -euo pipefail
cd "$(dirname "$0")/.."

deb=${1:-$(ls target/debian/flowgate_*.deb 2>/dev/null | head -1)}
[[ -f $deb ]] || { echo "systemd-check.sh: no .deb (run packaging/build-deb.sh, or name one)" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "systemd-check.sh: needs root (containers, mounts)" >&2; exit 1; }
if ! command -v systemd-nspawn >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container >/dev/null
fi

work=$(mktemp -d /tmp/flowgate-systemd-check.XXXXXX)
root="$work/root"
cleanup() {
    mountpoint -q "$root" && umount "$root"
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$root" "$work/share"
# nspawn refuses "/" itself; a bind mount of it is the same tree under another name.
mount --bind / "$root"
cp "$deb" "$work/share/flowgate.deb"

cat >"$work/share/check.target" <<'EOF'
[Unit]
Description=flowgate systemd check
Requires=basic.target check.service
After=basic.target
AllowIsolate=yes
EOF
cat >"$work/share/check.service" <<'EOF'
[Unit]
Description=flowgate systemd check script
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/bash /share/check.sh
StandardOutput=file:/share/out.log
StandardError=inherit
EOF
cat >"$work/share/check.sh" <<'EOF'
#!/bin/bash
# Inside the container. Each check prints "ok: ..." or "FAIL: ..." and stops at the first failure.
exec 2>&1
trap 'systemctl poweroff --no-block' EXIT
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; journalctl -u flowgate --no-pager -o cat | tail -20; exit 1; }
show() { systemctl show -p "$1" --value flowgate; }
chains() { "${1:-iptables}" -S 2>/dev/null | grep -c FLOWGATE; }
ip link set lo up

dpkg -i /share/flowgate.deb >/dev/null || fail "dpkg -i"
[[ $(systemctl is-enabled flowgate) == disabled && $(systemctl is-active flowgate) == inactive ]] \
    || fail "installing enabled or started the service"
[[ -f /run/xtables.lock ]] || fail "postinst did not make /run/xtables.lock"
ok "installed, neither enabled nor started; /run/xtables.lock made"

systemctl start flowgate || fail "systemctl start"
[[ $(show StatusText) == "filtering, 0 rules" ]] || fail "status after start: $(show StatusText)"
pid=$(show MainPID)
grep -q '^CapEff:.*0000000000803001$' /proc/$pid/status || fail "capabilities: $(grep CapEff /proc/$pid/status)"
grep -q '^NoNewPrivs:.*1$' /proc/$pid/status || fail "NoNewPrivs is off"
grep -h . /proc/$pid/task/*/stat | grep -q '(flowgate-q0) .* -10 ' || fail "the queue worker is not at nice -10"
nsenter -t "$pid" -m touch /usr/flowgate-check 2>/dev/null && fail "the daemon can write /usr"
nsenter -t "$pid" -m touch /var/log/flowgate/check || fail "the daemon cannot write its log directory"
started=$(chains)
((started > 0)) && (($(chains ip6tables) > 0)) || fail "no chains after start"
ok "started: READY with status, CapEff NET_ADMIN NET_RAW SYS_NICE CHOWN, NoNewPrivs, nice -10, /usr read-only, $started IPv4 rules"

sed -i '0,/^default_action/s//loopback = true\ndefault_action/' /etc/flowgate/config.toml
systemctl restart flowgate || fail "restart with loopback = true"
python3 - <<'PY' || fail "a connection on lo was not listed and blocked"
import socket, subprocess, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000)); s.listen()
c = socket.create_connection(("127.0.0.1", 7000)); a, _ = s.accept(); c.send(b"x"); assert a.recv(1) == b"x"
flows = subprocess.run(["flowgate", "flows"], capture_output=True, text=True, check=True).stdout
assert "127.0.0.1:7000" in flows, flows
subprocess.run(["flowgate", "block", "--port", "7000"], check=True, capture_output=True)
c.settimeout(5)
try:
    c.send(b"y"); c.recv(1); sys.exit("still open after block")
except ConnectionAbortedError:
    pass
PY
grep -q '"remote":"127.0.0.1:7000"' /var/log/flowgate/events.jsonl || fail "no event in /var/log/flowgate/events.jsonl"
ok "a connection on lo: logged, listed by flowgate flows, torn down by flowgate block (ECONNABORTED)"

cat >>/etc/flowgate/config.toml <<'TOML'
[[rule]]
name = "check"
remote = "203.0.113.7"
action = "drop"
TOML
systemctl reload flowgate || fail "systemctl reload"
journalctl -u flowgate --no-pager -o cat | grep -q "SIGHUP: reloaded /etc/flowgate/config.toml: 1 rules" \
    || fail "the reload did not reach the daemon"
[[ $(show StatusText) == "filtering, 1 rule" && $(systemctl is-active flowgate) == active ]] \
    || fail "status after reload: $(show StatusText)"
ok "reloaded: 1 rule, active"

systemctl stop flowgate || fail "systemctl stop"
[[ $(show Result) == success ]] || fail "stop result: $(show Result)"
(($(chains) == 0)) || fail "chains left after a stop"
journalctl -u flowgate --no-pager -o cat | grep -q "nothing to clean up" || fail "ExecStopPost after a clean stop"
ok "stopped: result success, no chains left, ExecStopPost: nothing to clean up"

systemctl start flowgate || fail "start before the crash"
started=$(chains)
kill -9 "$(show MainPID)"
for _ in $(seq 150); do
    [[ $(show NRestarts) == 1 && $(systemctl is-active flowgate) == active ]] && break
    sleep 0.1
done
[[ $(show NRestarts) == 1 && $(systemctl is-active flowgate) == active ]] || fail "not restarted after SIGKILL"
journalctl -u flowgate --no-pager -o cat | grep -q "removed flowgate's leftover netfilter chains" \
    || fail "ExecStopPost did not remove the dead instance's chains"
(($(chains) == started)) || fail "$(chains) rules after the restart, $started expected"
systemctl stop flowgate
ok "SIGKILL: ExecStopPost removed the dead chains, restarted once, one set of chains"

update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null
systemctl start flowgate || fail "start with legacy iptables"
(($(chains iptables-legacy) > 0)) || fail "no legacy chains"
systemctl stop flowgate
(($(chains iptables-legacy) == 0)) || fail "legacy chains left"
update-alternatives --set iptables /usr/sbin/iptables-nft >/dev/null
update-alternatives --set ip6tables /usr/sbin/ip6tables-nft >/dev/null
ok "legacy iptables backend: started (xtables.lock on a read-only /run) and stopped cleanly"

sed -i '0,/^default_action/s//control_group = "adm"\ndefault_action/' /etc/flowgate/config.toml
systemctl start flowgate || fail "start with control_group"
[[ $(stat -c '%a %G' /run/flowgate/control.sock) == "660 adm" ]] || fail "control socket: $(stat -c '%a %G' /run/flowgate/control.sock)"
systemctl stop flowgate
ok "control_group: the socket is 660 root:adm (CAP_CHOWN)"

echo "exposure: $(systemd-analyze security flowgate --no-pager | tail -1)"
dpkg --purge flowgate >/dev/null || fail "dpkg --purge"
[[ ! -e /etc/flowgate && ! -e /var/log/flowgate && ! -e /usr/bin/flowgate ]] || fail "files left after a purge"
ok "purged: nothing left"
echo "ALL PASSED"
EOF

echo "== booting $(. /etc/os-release && echo "$PRETTY_NAME") in a container to check $deb"
timeout 300 systemd-nspawn -D "$root" --volatile=overlay --private-network --register=no --keep-unit \
    --link-journal=no --bind="$work/share:/share" \
    --bind-ro="$work/share/check.target:/etc/systemd/system/check.target" \
    --bind-ro="$work/share/check.service:/etc/systemd/system/check.service" \
    -b systemd.unit=check.target >"$work/console.log" 2>&1 || true
if [[ ! -f $work/share/out.log ]]; then
    echo "systemd-check.sh: the container did not run the check; its console:" >&2
    tail -40 "$work/console.log" >&2
    exit 1
fi
cat "$work/share/out.log"
grep -qx "ALL PASSED" "$work/share/out.log"
