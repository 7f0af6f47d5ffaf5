#!/usr/bin/env python3
"""Writes the seed corpora of flowgate's fuzz targets into fuzz/corpus/<target>/.

Run from anywhere: `python3 fuzz/seeds/generate.py [TARGET...]` (all targets by default; as root
for the sockdiag, conntrack and nflog seeds recorded from the kernel: they are taken inside a
private network namespace made with `unshare -n`; without root those three get only the
hand-built seeds). Everything comes from the repository's real data: the captures in tests/data
(whole files, and IP packets cut out of them), examples/flowgate.toml and the README's config
reference, and netlink messages laid out as the kernel sends them (byte for byte as the unit
tests in crates/flowgate-linux/src build them, and answers recorded from the kernel). The input
framings are those described in each target's doc comment and in fuzz/src/lib.rs.
"""
import os
import re
import socket
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
DATA = os.path.join(ROOT, "tests", "data")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- captures ---------------------------------------------------------------------------------

def frames(path):
    """(linktype, frame bytes) of every packet of a pcap or pcapng file."""
    b = open(path, "rb").read()
    out = []
    magic = struct.unpack("<I", b[:4])[0]
    if magic in (0xA1B2C3D4, 0xA1B23C4D):
        link = struct.unpack("<I", b[20:24])[0]
        at = 24
        while at + 16 <= len(b):
            incl = struct.unpack("<I", b[at + 8:at + 12])[0]
            out.append((link, b[at + 16:at + 16 + incl]))
            at += 16 + incl
    elif magic == 0x0A0D0D0A:
        at, links = 0, []
        while at + 12 <= len(b):
            ty, ln = struct.unpack("<II", b[at:at + 8])
            body = b[at + 8:at + ln - 4]
            if ty == 1:
                links.append(struct.unpack("<H", body[:2])[0])
            elif ty == 6:
                iface, _, _, cap, _ = struct.unpack("<IIIII", body[:20])
                out.append((links[iface], body[20:20 + cap]))
            at += ln
    return out


def ip_of(link, frame):
    if link == 1:  # Ethernet, maybe VLAN-tagged
        at, ethertype = 12, struct.unpack("!H", frame[12:14])[0]
        while ethertype in (0x8100, 0x88A8):
            at += 4
            ethertype = struct.unpack("!H", frame[at:at + 2])[0]
        return frame[at + 2:] if ethertype in (0x0800, 0x86DD) else None
    if link == 113:  # Linux cooked v1
        return frame[16:]
    if link == 276:  # Linux cooked v2
        return frame[20:]
    if link in (101, 12, 228, 229):  # raw IP
        return frame
    return None


CAPTURES = sorted(f for f in os.listdir(DATA) if f.endswith((".pcap", ".pcapng")))
PACKETS = []  # (capture, index, ip packet)
for cap in CAPTURES:
    for i, (link, fr) in enumerate(frames(os.path.join(DATA, cap))):
        ip = ip_of(link, fr)
        if ip:
            PACKETS.append((cap, i, ip))


def packet_seeds():
    seen = set()
    for cap, i, ip in PACKETS:
        # One packet of each kind per capture: protocol, flags byte, payload or not.
        key = (cap, ip[0] >> 4, ip[9] if ip[0] >> 4 == 4 else ip[6], len(ip) > 80, ip[33] if len(ip) > 33 else 0)
        if key in seen:
            continue
        seen.add(key)
        put("packet", "%s-%03d" % (cap.split(".")[0], i), ip)


def replay_seeds():
    for cap in CAPTURES:
        data = open(os.path.join(DATA, cap), "rb").read()
        put("replay", cap, data)
        # The head of each capture: the reader's header paths with few frames.
        put("replay", cap + ".head", data[:600])


# ---- engine -----------------------------------------------------------------------------------

def engine_seeds():
    def header(settings, extra, script=b""):
        return bytes([settings, extra, len(script)]) + script

    def raw(meta, dt, ip):
        return bytes([0, meta, dt]) + struct.pack("<H", len(ip)) + ip

    # Whole conversations from the captures, packet after packet, with time passing after.
    for cap in CAPTURES:
        pk = [ip for c, _, ip in PACKETS if c == cap][:40]
        for settings, extra, script, name in [
            (0x01, 0x00, b"", "allow"),
            (0x21, 0x11, b"\x03\x02\x00\x01", "offload-inspect"),
            # (0x40 in the second byte turned on a packet filter that delayed packets; the packet
            # stage has it now, and the engine target ignores the bit.)
            (0x9b, 0x62, b"\x04\x01\x09\x03\x01\x00", "pause-delay"),
        ]:
            ops = b"".join(raw(i & 7, 5, ip) for i, ip in enumerate(pk))
            ops += bytes([5]) + struct.pack("<H", 3000)
            put("engine", "%s-%s" % (cap.split(".")[0], name), header(settings, extra, script) + ops)

    # Built packets: a TCP handshake, data, FIN both ways; UDP; ICMP echo; then commands.
    def synth(meta, shape, hosts, ports, flags, seq, ln):
        return bytes([1, 2, meta, shape, hosts, ports, flags]) + struct.pack("<H", seq) + bytes([ln])

    tcp = (synth(1, 0, 0x08, 0x20, 1, 1, 0) + synth(1, 2, 0x08, 0x20, 3, 5, 0) + synth(1, 0, 0x08, 0x20, 2, 1, 40)
           + synth(1, 2, 0x08, 0x20, 2, 5, 90) + synth(1, 0, 0x08, 0x20, 6, 2, 0) + synth(1, 2, 0x08, 0x20, 6, 6, 0))
    udp = synth(4, 8, 0x09, 0x12, 0, 0, 30) + synth(4, 10, 0x09, 0x12, 0, 0, 60)
    icmp = synth(2, 12, 0x02, 0, 0, 0, 16) + synth(2, 14, 0x02, 0, 1, 0, 16)
    v6 = synth(1, 1, 0x04, 0x20, 1, 1, 0) + synth(1, 9, 0x04, 0x12, 0, 0, 20)
    cmds = (bytes([6, 0, 1, 0x80]) + bytes([6, 1, 2, 0x00]) + bytes([6, 0, 0, 0x40]) + bytes([7, 0, 1])
            + bytes([8, 0, 0x18, 5, 0]) + bytes([9, 1]) + bytes([8, 1, 0x9a, 0, 0]) + bytes([9, 0x81])
            + bytes([10, 0x15, 0x1a, 0x89]) + bytes([11, 0x81]) + bytes([12, 0x6f, 1, 0]) + bytes([12, 0x21, 1, 0])
            + bytes([5]) + struct.pack("<H", 60000) + bytes([13, 3]) + tcp[:40])
    for settings, extra, script, name in [
        (0x01, 0x00, b"", "plain"),
        (0x21, 0x11, b"\x03\x00\x02\x04", "offload"),
        (0x1b, 0x62, b"\x04\x03\x01\x09\x00\x05", "held"),
        (0x00, 0x20, b"\x02\x03\x03\x03", "default-drop"),
    ]:
        put("engine", "synth-" + name, header(settings, extra, script) + tcp + udp + icmp + v6 + cmds)


# ---- config -----------------------------------------------------------------------------------

def config_seeds():
    put("config", "example", open(os.path.join(ROOT, "examples", "flowgate.toml")).read())
    readme = open(os.path.join(ROOT, "README.md")).read()
    ref = readme.split("## Config reference", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    put("config", "reference", ref)
    put("config", "reference-uncommented", ref.replace("# silent", "silent").replace("# peek", "peek"))
    put("config", "empty", "")
    put("config", "inspect", 'default_action = "drop"\n[[rule]]\nremote = ["203.0.113.0/24", "2001:db8::/32"]\n'
        'action = "inspect"\npeek = { outbound = 512, inbound = 0 }\n')
    put("config", "lints", '[[rule]]\nname = "all"\nremote = "0.0.0.0/0"\naction = "drop"\n[[rule]]\nname = "never"\n'
        'remote = "192.0.2.1"\nlocal = "2001:db8::1"\naction = "allow"\n')
    put("config", "bad-key", 'default_action = "allow"\nfial = "open"\n')
    put("config", "bad-cidr", '[[rule]]\nremote = "203.0.113.7/33"\naction = "drop"\n')


# ---- netlink ----------------------------------------------------------------------------------

def nlmsg(ty, flags, seq, payload):
    ln = 16 + len(payload)
    return struct.pack("=IHHII", ln, ty, flags, seq, 0) + payload + b"\0" * (-ln % 4)


def nla(ty, payload):
    ln = 4 + len(payload)
    return struct.pack("=HH", ln, ty) + payload + b"\0" * (-ln % 4)


def nest(ty, *members):
    return nla(ty | 0x8000, b"".join(members))


def record(data, stamp=False, pid=False):
    return bytes([(1 if stamp else 0) | (2 if pid else 0)]) + struct.pack("<H", len(data)) + data


def netlink_input(mode, script, records):
    return bytes([mode, len(script)]) + bytes(script) + b"".join(records)


def ct_tuple(ty, family, proto, src, dst, sport, dport):
    if family == socket.AF_INET:
        ip = nest(1, nla(1, socket.inet_pton(family, src)), nla(2, socket.inet_pton(family, dst)))
    else:
        ip = nest(1, nla(3, socket.inet_pton(family, src)), nla(4, socket.inet_pton(family, dst)))
    if proto in (1, 58):
        pr = nest(2, nla(1, bytes([proto])), nla(4 if proto == 1 else 7, struct.pack("!H", sport)),
                  nla(5 if proto == 1 else 8, bytes([8 if proto == 1 else 128])), nla(6 if proto == 1 else 9, b"\0"))
    else:
        pr = nest(2, nla(1, bytes([proto])), nla(2, struct.pack("!H", sport)), nla(3, struct.pack("!H", dport)))
    return nest(ty, ip, pr)


def ct_message(msg, flags, family, proto, src, dst, sport, dport, tcp_state=3):
    body = bytes([family, 0, 0, 0])
    body += ct_tuple(1, family, proto, src, dst, sport, dport) + ct_tuple(2, family, proto, dst, src, dport, sport)
    body += nest(9, nla(1, struct.pack("!Q", 3)), nla(2, struct.pack("!Q", 1164)))
    body += nest(10, nla(1, struct.pack("!Q", 2)), nla(2, struct.pack("!Q", 112)), nla(5, b"\0" * 8))
    body += nla(3, struct.pack("!I", 0x18E)) + nla(7, struct.pack("!I", 431999)) + nla(8, struct.pack("!I", 0x10001))
    body += nla(11, struct.pack("!I", 1)) + nla(12, struct.pack("!I", 0xDEADBEEF)) + nla(18, struct.pack("!H", 7))
    if proto == 6:
        body += nest(4, nest(1, nla(1, bytes([tcp_state])), nla(2, b"\x07")))
    return nlmsg((1 << 8) | msg, flags, 0, body)


CT_CASES = [
    (socket.AF_INET, 6, "192.0.2.1", "198.51.100.2", 40000, 443),
    (socket.AF_INET6, 6, "2001:db8::1", "2001:db8::2", 51000, 80),
    (socket.AF_INET, 1, "192.0.2.1", "198.51.100.2", 77, 77),
    (socket.AF_INET6, 58, "2001:db8::1", "2001:db8::2", 99, 99),
    (socket.AF_INET, 17, "198.51.100.1", "203.0.113.10", 5353, 53),
]


def run_in_netns(code):
    """Runs python `code` in a new network namespace; returns its stdout, or None."""
    if os.geteuid() != 0:
        return None
    try:
        r = subprocess.run(["unshare", "-n", sys.executable, "-c", code], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        sys.stderr.write("recording from the kernel failed: %s\n" % r.stderr.decode(errors="replace")[-400:])
        return None
    return r.stdout


RECORDER = r'''
import os, socket, struct, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
def dump(proto, req):
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, proto)
    s.bind((0, 0))
    s.send(req)
    out = []
    while True:
        d = s.recv(65536)
        out.append(d)
        ty = struct.unpack("=H", d[4:6])[0]
        if ty in (2, 3) or len(out) > 20:
            break
    return out
'''


def conntrack_seeds():
    events = [ct_message(m, f, *c) for c in CT_CASES for (m, f) in [(0, 0x600), (0, 0), (2, 0)]]
    done = nlmsg(3, 2, 0, struct.pack("=i", 0))
    # Events, one datagram each; then a dump part answering the dump (stamped with its seq).
    put("conntrack", "events", netlink_input(0x0f, [], [record(e) for e in events[:12]]))
    part = b"".join(ct_message(0, 2, *c) for c in CT_CASES)
    put("conntrack", "dump", netlink_input(0x70, [0x05, 0, 0, 0], [record(part, stamp=True), record(done, stamp=True)]))
    put("conntrack", "events-then-dump", netlink_input(0x33, [0x02, 0xe0], [record(events[0]), record(events[5]),
                                                                             record(events[14]), record(part, stamp=True)]))
    put("conntrack", "overrun-and-stranger", netlink_input(0x05, [], [bytes([0x40]), record(events[1], pid=True),
                                                                      bytes([0x80]), record(events[2])]))
    put("conntrack", "batch", netlink_input(0x01, [], [record(b"".join(events[:6]))]))
    # A real dump, recorded from the kernel in a private namespace with a few entries made by
    # the conntrack tool (as the daemon's adoption reads them).
    code = RECORDER + r'''
for args in (["-p", "tcp", "-s", "192.0.2.1", "-d", "198.51.100.2", "--sport", "40000", "--dport", "443",
              "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED", "-m", "65537"],
             ["-p", "udp", "-s", "2001:db8::1", "-d", "2001:db8::2", "--sport", "5353", "--dport", "53"],
             ["-p", "icmp", "-s", "192.0.2.1", "-d", "198.51.100.2", "--icmp-type", "8", "--icmp-code", "0",
              "--icmp-id", "77"]):
    subprocess.run(["conntrack", "-I"] + args + ["-t", "100"], check=True, capture_output=True)
req = struct.pack("=IHHII", 20, 0x0101, 0x0301, 1, 0) + bytes([0, 0, 0, 0])
for d in dump(12, req):
    sys.stdout.buffer.write(struct.pack("<I", len(d)) + d)
'''
    out = run_in_netns(code)
    if out:
        recs, at = [], 0
        while at < len(out):
            n = struct.unpack("<I", out[at:at + 4])[0]
            recs.append(record(out[at + 4:at + 4 + n]))
            at += 4 + n
        put("conntrack", "kernel-dump", netlink_input(0x10, [], recs))
        put("conntrack", "kernel-dump-as-events", netlink_input(0x0f, [], recs))


def nfq_packet(pid, ip, full=True):
    body = bytes([socket.AF_INET if ip[0] >> 4 == 4 else socket.AF_INET6, 0, 0, 3])
    proto = 0x0800 if ip[0] >> 4 == 4 else 0x86DD
    body += nla(1, struct.pack("!IHB", pid, proto, 3))
    if full:
        body += nla(3, struct.pack("!I", 0x55)) + nla(4, b"\0" * 16) + nla(5, struct.pack("!I", 7))
        body += nla(6, struct.pack("!I", 1)) + nla(9, bytes([0, 6, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0]))
        body += nest(11, nest(1, nla(1, b"\x01\x02\x03")), nla(3, struct.pack("!I", 0x188)),
                     nla(8, struct.pack("!I", 0x00010004)), nla(12, struct.pack("!I", 99)))
        body += nla(12, struct.pack("!I", 2)) + nla(13, struct.pack("!I", len(ip))) + nla(14, struct.pack("!I", 0))
        body += nla(16, struct.pack("!I", 1000)) + nla(17, struct.pack("!I", 100))
    body += nla(10, ip)
    return nlmsg((3 << 8) | 0, 0, 0, body)


def nfqueue_seeds():
    ips = [ip for _, _, ip in PACKETS]
    sample = [ips[0], ips[3], ips[len(ips) // 2], ips[-1]]
    pk = [record(nfq_packet(i + 1, ip, full=i % 2 == 0)) for i, ip in enumerate(sample)]
    # Packets after a clean bind (five acknowledgements at once), then verdicts.
    put("nfqueue", "packets", netlink_input(0x80, [0, 0, 0, 0, 0, 0, 0], pk))
    # Packets arriving while the queue is configured: the third ack comes after two of them.
    put("nfqueue", "during-open", netlink_input(0x41, [0, 0, 2, 0, 0, 0, 0], pk))
    # The kernel refuses conntrack in the queue (EOPNOTSUPP), then wants a retry (EAGAIN).
    put("nfqueue", "no-conntrack", netlink_input(0x08, [0, 0, 0, 0, 0, 0, 0xc0, 0xd0, 0], pk[:2]))
    put("nfqueue", "already-bound", netlink_input(0x00, [0, 0, 0, 0, 0xb0], []))
    put("nfqueue", "batch", netlink_input(0x18, [0] * 7, [record(b"".join(nfq_packet(i + 10, ip) for i, ip in enumerate(sample))),
                                                          bytes([0x40]), record(nfq_packet(20, ips[1]), pid=True)]))
    err = nlmsg(2, 0, 0, struct.pack("=i", -2) + struct.pack("=IHHII", 36, 0x0301, 1, 9, 0))
    put("nfqueue", "verdict-error", netlink_input(0x80, [0] * 7, [record(err), pk[0]]))


def nflog_packet(ip, group=7, hook=3, prefix=b"fg-test", mark=0, indev=None, outdev=4, owner=(0, 0)):
    """A log message as the kernel's __build_packet_message lays it out (and as the unit tests in
    crates/flowgate-linux/src/nflog.rs build it)."""
    v6 = ip[:1] and ip[0] >> 4 == 6
    body = bytes([socket.AF_INET6 if v6 else socket.AF_INET, 0]) + struct.pack("!H", group)
    body += nla(1, struct.pack("!HBB", 0x86DD if v6 else 0x0800, hook, 0))
    if mark:
        body += nla(2, struct.pack("!I", mark))
    if indev is not None:
        body += nla(4, struct.pack("!I", indev)) + nla(8, bytes([0, 6, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0]))
        body += nla(15, struct.pack("!H", 1)) + nla(16, b"\xaa" * 14) + nla(17, struct.pack("!H", 14))
    if outdev is not None:
        body += nla(5, struct.pack("!I", outdev))
    if owner:
        body += nla(11, struct.pack("!I", owner[0])) + nla(14, struct.pack("!I", owner[1]))
    if prefix is not None:
        body += nla(10, prefix + b"\0")
    if ip:
        body += nla(9, ip)
    return nlmsg((4 << 8) | 0, 0, 0, body)


NFLOG_RECORDER = r'''
import select, socket, struct, subprocess, sys
def sh(*a):
    subprocess.run(a, check=True, capture_output=True)
def nlmsg(ty, flags, seq, payload):
    ln = 16 + len(payload)
    return struct.pack("=IHHII", ln, ty, flags, seq, 0) + payload + b"\0" * (-ln % 4)
def nla(ty, p):
    ln = 4 + len(p)
    return struct.pack("=HH", ln, ty) + p + b"\0" * (-ln % 4)
sh("ip", "link", "set", "lo", "up")
sh("ip", "link", "add", "fgl0", "type", "veth", "peer", "name", "fgl1")
sh("ip", "addr", "add", "192.0.2.1/24", "dev", "fgl0")
sh("ip", "addr", "add", "2001:db8::1/64", "dev", "fgl0", "nodad")
sh("ip", "link", "set", "fgl0", "up")
sh("ip", "link", "set", "fgl1", "up")
for tool, dst in (("iptables", "192.0.2.9"), ("ip6tables", "2001:db8::9")):
    sh(tool, "-w", "-A", "OUTPUT", "-d", dst, "-j", "NFLOG", "--nflog-group", "7", "--nflog-prefix", "fg-test",
       "--nflog-size", "128")
    sh(tool, "-w", "-A", "OUTPUT", "-d", dst, "-j", "DROP")
# A marked packet logged without a prefix; three logged to group 8, bound with a threshold of 3,
# so they come in one datagram (which the kernel ends with NLMSG_DONE; a rule's
# --nflog-threshold could only lower the group's threshold, never raise it); and one received
# on loopback (INPUT: the incoming interface, hardware type and header).
sh("iptables", "-w", "-t", "mangle", "-A", "OUTPUT", "-d", "192.0.2.10", "-j", "MARK", "--set-mark", "0x30000")
sh("iptables", "-w", "-A", "OUTPUT", "-d", "192.0.2.10", "-j", "NFLOG", "--nflog-group", "7", "--nflog-size", "128")
sh("iptables", "-w", "-A", "OUTPUT", "-d", "192.0.2.11", "-j", "NFLOG", "--nflog-group", "8", "--nflog-prefix",
   "fg-batch")
sh("iptables", "-w", "-A", "OUTPUT", "-d", "192.0.2.10/31", "-j", "DROP")
sh("iptables", "-w", "-A", "INPUT", "-i", "lo", "-p", "udp", "--dport", "9", "-j", "NFLOG", "--nflog-group", "7",
   "--nflog-prefix", "in-lo", "--nflog-size", "64")
def bind(group, threshold):
    # BIND with the configuration flowgate's Nflog::bind sends (copy 0xffff, timeout 10 ms,
    # threshold 1), or another threshold.
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    s.bind((0, 0))
    s.send(nlmsg(0x0401, 0x05, 1, bytes([0, 0]) + struct.pack("!H", group) + nla(1, b"\x01")
                 + nla(2, struct.pack("!IBB", 0xFFFF, 2, 0)) + nla(4, struct.pack("!I", 1))
                 + nla(5, struct.pack("!I", threshold))))
    s.recv(4096)
    return s
s = bind(7, 1)
batch = bind(8, 3)
def drain(sock=s):
    out = []
    while select.select([sock], [], [], 0.3)[0]:
        out.append(sock.recv(65536))
    return out
def send(family, addr, data):
    u = socket.socket(family, socket.SOCK_DGRAM)
    try:
        u.sendto(data, addr)
    except OSError:
        pass
    u.close()
def syn(family, addr):
    t = socket.socket(family, socket.SOCK_STREAM)
    t.setblocking(False)
    t.connect_ex(addr)
    return t
got = []
send(socket.AF_INET, ("192.0.2.9", 5353), b"x" * 300)
got += drain()
keep = [syn(socket.AF_INET, ("192.0.2.9", 80))]
got += drain()
send(socket.AF_INET6, ("2001:db8::9", 5353), b"six" * 20)
got += drain()
keep.append(syn(socket.AF_INET6, ("2001:db8::9", 443)))
got += drain()
send(socket.AF_INET, ("192.0.2.10", 9), b"marked")
got += drain()
for i in range(3):
    send(socket.AF_INET, ("192.0.2.11", 9), bytes([i]) * 40)
got += drain(batch)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("127.0.0.1", 9))
send(socket.AF_INET, ("127.0.0.1", 9), b"in on lo")
got += drain()
for d in got:
    sys.stdout.buffer.write(struct.pack("<I", len(d)) + d)
'''


def nflog_seeds():
    # The input is the datagram itself (fuzz/fuzz_targets/nflog.rs).
    ips = [ip for _, _, ip in PACKETS]
    v4 = next(ip for ip in ips if ip[0] >> 4 == 4)
    v6 = next((ip for ip in ips if ip[0] >> 4 == 6), v4)
    put("nflog", "v4-out", nflog_packet(v4[:128]))
    put("nflog", "v6-in-marked", nflog_packet(v6[:128], hook=1, mark=0x30000, indev=3, outdev=None, owner=None))
    put("nflog", "metadata-only", nflog_packet(b"", prefix=b""))
    done = nlmsg(3, 2, 0, bytes([0, 0, 0, 0]))
    put("nflog", "batch-with-done", b"".join(nflog_packet(ip[:64], prefix=b"fg-batch") for ip in ips[:3]) + done)
    # A malformed message (a mark of 3 bytes) between two good ones, and an acknowledgement.
    bad = nlmsg(0x0400, 0, 0, bytes([2, 0, 0, 7]) + nla(1, b"\x08\x00\x03\x00") + nla(2, b"\x00\x00\x01"))
    ack = nlmsg(2, 0x100, 1, struct.pack("=i", 0) + struct.pack("=IHHII", 56, 0x0401, 5, 1, 0))
    put("nflog", "malformed-between", nflog_packet(v4[:40]) + bad + ack + nflog_packet(v6[:40]))
    # Recorded from the kernel in a private namespace: the live test's rules and traffic, and
    # the other kinds of message (mark, no prefix, a batch, the INPUT hook).
    out = run_in_netns(NFLOG_RECORDER)
    at, seen = 0, set()
    while out and at < len(out):
        n = struct.unpack("<I", out[at:at + 4])[0]
        d = out[at + 4:at + 4 + n]
        at += 4 + n
        # One datagram of each kind (a SYN's retransmissions are the same message again), named
        # after what its first log says.
        logs = nflog_logs(d)
        if not logs:
            continue
        prefix, family, hook, proto = logs[0]
        name = "kernel-%s-%s-%s-hook%d%s" % (prefix or "noprefix", family, proto, hook,
                                             "-x%d" % len(logs) if len(logs) > 1 else "")
        if name not in seen:
            seen.add(name)
            put("nflog", name, d)


def nflog_logs(d):
    """(prefix, family, hook, protocol) of each log message in a datagram."""
    out, at = [], 0
    while at + 16 <= len(d):
        ln, ty = struct.unpack("=IH", d[at:at + 6])
        if ln < 16:
            break
        body, attrs, a = d[at + 16:at + ln], {}, 4
        while a + 4 <= len(body):
            l, t = struct.unpack("=HH", body[a:a + 4])
            if l < 4:
                break
            attrs[t & 0x3FFF] = body[a + 4:a + l]
            a += (l + 3) & ~3
        if ty == 0x0400 and 1 in attrs:
            ip = attrs.get(9, b"")
            proto = (ip[9] if ip[:1] and ip[0] >> 4 == 4 else ip[6]) if len(ip) > 9 else -1
            out.append((attrs.get(10, b"").split(b"\0")[0].decode(), "v6" if body[0] == 10 else "v4",
                        attrs[1][2], {6: "tcp", 17: "udp", -1: "none"}.get(proto, str(proto))))
        at += (ln + 3) & ~3
    return out


def sockdiag_msg(family, state, local, lport, remote, rport, cookie, uid=1000, inode=4242):
    raw = lambda a: socket.inet_pton(family, a).ljust(16, b"\0")
    body = bytes([family, state, 1, 0]) + struct.pack("!HH", lport, rport) + raw(local) + raw(remote)
    body += struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", 100, 0, 7, uid, inode)
    body += nla(8, b"\0") + nla(0x3FF0, b"from a future kernel")
    return nlmsg(20, 2, 0, body)


def sockdiag_seeds():
    v4 = sockdiag_msg(socket.AF_INET, 1, "192.0.2.1", 40000, "198.51.100.2", 443, 0x1234)
    v6 = sockdiag_msg(socket.AF_INET6, 1, "2001:db8::1", 51000, "2001:db8::2", 80, 0x5678)
    mapped = sockdiag_msg(socket.AF_INET6, 1, "::ffff:192.0.2.1", 40000, "::ffff:198.51.100.2", 443, 0x9abc)
    done = nlmsg(3, 2, 0, struct.pack("=i", 0))
    # The sockdiag input has one more byte after the script: which ends destroy_matching uses.
    put("sockdiag", "dump", netlink_input(0x02, [0x01, 0x02], [b"\x00", record(v4 + v4, stamp=True), record(v6 + mapped)]))
    # destroy_matching: the lookup finds the socket (its answer before the ack), then destroys it.
    put("sockdiag", "destroy", bytes([0x04, 2, 0x01, 0x00, 0x00]) + record(v4, stamp=True))
    put("sockdiag", "destroy-mapped", bytes([0x04, 2, 0x01, 0x00, 0x1a]) + record(mapped, stamp=True))
    put("sockdiag", "destroy-gone", bytes([0x0e, 3, 0x00, 0xe0, 0x00, 0x00]) + record(done, stamp=True))
    # A real dump of TCP and UDP sockets (IPv4, IPv6, dual-stack), recorded from the kernel.
    code = RECORDER + r'''
socks = []
l4 = socket.socket(); l4.bind(("127.0.0.1", 0)); l4.listen(); socks.append(l4)
c4 = socket.create_connection(l4.getsockname()); socks.append(c4)
l6 = socket.socket(socket.AF_INET6); l6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
l6.bind(("::", 0)); l6.listen(); socks.append(l6)
c6 = socket.create_connection(("::1", l6.getsockname()[1])); socks.append(c6)
cm = socket.create_connection(("127.0.0.1", l6.getsockname()[1])); socks.append(cm)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(("127.0.0.1", 9)); socks.append(u)
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u6.bind(("::", 0)); socks.append(u6)
for seq, (family, proto, states) in enumerate([(2, 6, 0xffe), (10, 6, 0xffe), (2, 17, 0x82), (10, 17, 0x82)], 1):
    req = struct.pack("=IHHII", 72, 20, 0x301, seq, 0) + bytes([family, proto, 0, 0]) + struct.pack("=I", states)
    req += b"\0" * 48
    for d in dump(4, req):
        sys.stdout.buffer.write(struct.pack("<IB", len(d), seq) + d)
'''
    out = run_in_netns(code)
    if out:
        by_seq, at = {}, 0
        while at < len(out):
            n, seq = struct.unpack("<IB", out[at:at + 5])
            by_seq.setdefault(seq, []).append(out[at + 5:at + 5 + n])
            at += 5 + n
        # dump() asks IPv4 (seq 1) then IPv6 (seq 2) of one protocol: TCP from seqs 1-2, UDP 3-4.
        for name, mode, seqs in [("kernel-tcp", 0x02, (1, 2)), ("kernel-udp", 0x03, (3, 4))]:
            recs = [b"\x00"] + [record(d, stamp=True) for s in seqs for d in by_seq.get(s, [])]
            put("sockdiag", name, netlink_input(mode, [0xf0, 0xf0], recs))


# ---- control protocol -------------------------------------------------------------------------

def control_seeds():
    reqs = {
        "stats": '{"cmd":"stats"}\n',
        "stats-v1": '{"v":1,"cmd":"stats"}\n',
        "flows": '{"v":1,"cmd":"flows"}\n',
        "flows-filtered": '{"v":1,"cmd":"flows","remote":"127.0.0.0/8","port":9,"protocol":"udp","fresh":true}\n',
        "block-ids": '{"v":1,"cmd":"block","ids":[1,2,3]}\n',
        "block-remote": '{"v":1,"cmd":"block","remote":"127.0.0.1","port":7,"protocol":"any"}\n',
        "allow-port": '{"v":1,"cmd":"allow","port":53}\n',
        "allow-empty": '{"cmd":"allow"}\n',
        "reload": '{"cmd":"reload"}\n',
        "version-2": '{"v":2,"cmd":"stats"}\n',
        "unknown": '{"cmd":"format-disk"}\n',
        "no-newline": '{"cmd":"stats"}',
        "bad-cidr": '{"cmd":"flows","remote":"10.0.0.0/40"}\n',
        "bad-protocol": '{"cmd":"block","protocol":"sctp"}\n',
    }
    for name, text in reqs.items():
        put("control", name, text)
    flow = ('{"flow":{"id":7,"protocol":"tcp","direction":"outbound","local":"198.51.100.1:40000",'
            '"remote":"203.0.113.10:443","interface":"eth0","existing":false},"verdict":"allow","rule":"default",'
            '"packets_out":3,"packets_in":2,"bytes_out":180,"bytes_in":120,"payload_out":0,"payload_in":0,"age_ms":12}')
    replies = {
        "stats": b"\x00" + b'{"v":1,"ok":true,"stats":{"packets":1}}\n',
        "refused": b"\x02" + b'{"v":1,"ok":false,"error":"no live flow has id 1"}\n',
        "blocked": b"\x04" + b'{"v":1,"ok":true,"flows":[1,7]}\n',
        "reloaded": b"\x02" + b'{"v":1,"ok":true,"rules":3}\n',
        "listing": b"\x01" + ('{"v":1,"ok":true}\n%s\n%s\n{"v":1,"ok":true,"end":true,"count":2}\n' % (flow, flow)).encode(),
        "listing-broken": b"\x01" + ('{"ok":true}\n%s\n{"ok":true,"end":true,"count":1,"error":"engine gone"}\n' % flow).encode(),
        "listing-cut": b"\x03" + ('{"ok":true}\n%s\n%s\n%s\n' % (flow, flow, flow)).encode(),
    }
    for name, data in replies.items():
        put("control_reply", name, data)


# ---- netfilter --------------------------------------------------------------------------------

def netfilter_seeds():
    # The listing of the unit test in crates/flowgate-linux/src/netfilter.rs: host rules, a
    # comment that mentions our chain, a quoted comment with escapes, a host chain jumping to ours.
    test = (
        "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N FLOWGATE-FWD\n-N FLOWGATE-IN\n"
        "-N FLOWGATE-OUT\n-N HOST-CHAIN\n-N FLOWGATE-OTHER\n-A INPUT -j FLOWGATE-IN\n"
        "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n-A FORWARD -j FLOWGATE-FWD\n-A OUTPUT -j FLOWGATE-OUT\n"
        '-A OUTPUT -m comment --comment "-j FLOWGATE-OUT" -j ACCEPT\n'
        '-A OUTPUT -m comment --comment "say \\"hi\\"" -g FLOWGATE-OUT\n-A OUTPUT -j FLOWGATE-OUT\n'
        "-A OUTPUT -p tcp -m tcp --dport 25 -j DROP\n-A HOST-CHAIN -j FLOWGATE-OUT\n"
        "-A FLOWGATE-OUT -j NFQUEUE --queue-num 0\n")
    put("netfilter", "unit-test-listing", b"\0" + test.encode())
    put("netfilter", "unit-test-listing-restore-fails", b"\1" + test.encode())
    # What `iptables -S` prints while flowgate runs (as installed by ruleset_text), and a host
    # table without flowgate.
    installed = ["-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT"]
    for builtin, chain, lo in [("OUTPUT", "FLOWGATE-OUT", "-o"), ("INPUT", "FLOWGATE-IN", "-i"), ("FORWARD", "FLOWGATE-FWD", None)]:
        installed.append("-N " + chain)
    for builtin, chain, lo in [("OUTPUT", "FLOWGATE-OUT", "-o"), ("INPUT", "FLOWGATE-IN", "-i"), ("FORWARD", "FLOWGATE-FWD", None)]:
        installed.append("-A %s -j %s" % (builtin, chain))
        if lo:
            installed.append("-A %s %s lo -j RETURN" % (chain, lo))
        installed += ["-A %s -m mark ! --mark 0x0/0x7f0000 -j CONNMARK --save-mark --nfmask 0x7f0000 --ctmask 0x7f0000" % chain,
                      "-A %s -m connmark --mark 0x10000/0x30000 -j RETURN" % chain,
                      "-A %s -p tcp -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset" % chain,
                      "-A %s -j NFQUEUE --queue-balance 0:1 --queue-bypass" % chain]
    put("netfilter", "installed", b"\0" + ("\n".join(installed) + "\n").encode())
    put("netfilter", "host-only", b"\0-P INPUT DROP\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n-N DOCKER\n"
        b"-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        b"-A FORWARD -o docker0 -j DOCKER\n")
    # Both tables (the filter listing, a NUL, the mangle listing): the packet stage's chains as
    # packet_ruleset_text installs them; and listings where each table names the other's chains,
    # a host chain of the mangle table jumps to ours, and comments mention them.
    mangle = ["-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P FORWARD ACCEPT", "-P OUTPUT ACCEPT",
              "-P POSTROUTING ACCEPT", "-N FLOWGATE-PKT-FWD", "-N FLOWGATE-PKT-IN", "-N FLOWGATE-PKT-OUT",
              "-A INPUT -j FLOWGATE-PKT-IN", "-A FORWARD -j FLOWGATE-PKT-FWD", "-A OUTPUT -j FLOWGATE-PKT-OUT"]
    q = "-j NFQUEUE --queue-balance 2:3 --queue-bypass"
    mangle += ["-A FLOWGATE-PKT-OUT -o tun+ " + q, "-A FLOWGATE-PKT-IN -i tun+ " + q,
               "-A FLOWGATE-PKT-FWD -i tun+ " + q, "-A FLOWGATE-PKT-FWD -o tun+ " + q,
               "-A FLOWGATE-PKT-OUT -o lo -j RETURN", "-A FLOWGATE-PKT-OUT " + q]
    put("netfilter", "installed-both-tables",
        b"\0" + ("\n".join(installed) + "\n\0" + "\n".join(mangle) + "\n").encode())
    put("netfilter", "mangle-only", b"\0-P OUTPUT ACCEPT\n\0" + ("\n".join(mangle) + "\n").encode())
    crossed_filter = ("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n-N FLOWGATE-PKT-OUT\n-N FLOWGATE-IN\n"
                      "-A OUTPUT -j FLOWGATE-PKT-OUT\n-A INPUT -j FLOWGATE-IN\n-A INPUT -g FLOWGATE-PKT-IN\n")
    crossed_mangle = ("-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N FLOWGATE-OUT\n-N FLOWGATE-PKT-IN\n-N HOST-MARKS\n"
                      "-A PREROUTING -j MARK --set-xmark 0x1/0xffffffff\n-A POSTROUTING -j FLOWGATE-PKT-OUT\n"
                      "-A OUTPUT -j FLOWGATE-OUT\n-A OUTPUT -m comment --comment \"-j FLOWGATE-PKT-OUT\" -j HOST-MARKS\n"
                      '-A INPUT -m comment --comment "a \\"b\\"" -j FLOWGATE-PKT-IN\n-A HOST-MARKS -j FLOWGATE-PKT-IN\n')
    put("netfilter", "tables-crossed", b"\0" + (crossed_filter + "\0" + crossed_mangle).encode())
    put("netfilter", "tables-crossed-restore-fails", b"\1" + (crossed_filter + "\0" + crossed_mangle).encode())


# ---- packet stage -----------------------------------------------------------------------------

def packet_stage_seeds():
    # Framing: fuzz/fuzz_targets/packet_stage.rs. Settings c0 (max_delayed index | 0x08
    # expired_accept | 0x10 fail open | 0x20 stopwatch | 0x40 no filter | 0x80 release_all
    # accepts), c1 (max_delay index | first id << 3 | step << 5), c2 (filter globs: 1 tun*, 2 wg0,
    # 4 *, 8 eth?, 16 tun0, 32 l?), c3 (filter directions: 1 in, 2 out, 4 forwarded, 0 all).
    def header(c0, c1, c2, c3, rules=()):
        return bytes([c0, c1, c2, c3, len(rules)]) + b"".join(bytes(r) for r in rules)

    def rule(glob, dirs, proto, drop, remote=0, local=0):
        # glob 0 none, 1..6 as above; proto 0 any, 1 tcp, 2 udp, 3 icmp, 4 GRE; networks 0 none,
        # 2 192.0.2.0/24, 3 198.51.100.0/24, 4 10.0.0.0/8, 5 203.0.113.53/32, 6 0.0.0.0/0,
        # 7 2001:db8::/32, 8 2001:db8:1::/48, 9 ::/0.
        return (glob | dirs << 3, proto | (0x80 if drop else 0), remote | local << 4)

    def meta(iface, direction):
        # iface: 0 none, 1 tun0, 2 tun1, 3 wg0, 4 eth0, 5 lo; direction: 0 in, 1 out, 2 forwarded.
        return iface | direction << 3

    def built(m, verdict, dt, shape, hosts, extra):
        # verdict % 8: 0 allow, 2 drop, 3 delay, 5 panic, 6 delay over budget, 7 allow at budget;
        # 0x80: release from inside the call (0x40: accept). shape: 1 IPv6 | kind << 1 (0 TCP,
        # 1 UDP, 2 echo request, 3 echo reply, 4 GRE, 5 damaged, 6 TCP SYN) | cut << 4.
        return bytes([1, m, verdict, dt, shape, hosts, extra])

    def raw(m, verdict, dt, data):
        return bytes([0, m, verdict, dt]) + struct.pack("<H", len(data)) + data

    out_tun = meta(1, 1)
    # Every third echo in the tunnel dropped by the filter; other interfaces pass untouched.
    ops = b"".join(built(out_tun, [0, 0, 2][i % 3], 10, 4, 0x36, 8) for i in range(9))
    ops += built(meta(4, 1), 2, 10, 4, 0x36, 8) + built(meta(0, 2), 0, 10, 4, 0x36, 8)
    put("packet_stage", "every-third-echo", header(0x35, 0x0c, 0x01, 0) + ops)
    # Delays bounded in count (two) and time (500 ms): a third is dropped, one is released through
    # the handle, one expires (accepted), then one left for release_all.
    ops = (built(out_tun, 3, 0, 2, 0x09, 20) + built(out_tun, 3, 100, 2, 0x09, 20) + built(out_tun, 3, 100, 2, 0x09, 20)
           + bytes([6, 0x41, 1]) + bytes([5, 50]) + bytes([4]) + struct.pack("<H", 600) + bytes([11])
           + built(out_tun, 4, 10, 3, 0x19, 4) + built(meta(3, 0), 3, 10, 3, 0x19, 4))
    put("packet_stage", "delays-bounded", header(0x3a, 0x0c, 0x03, 0x03) + ops)
    # Packet rules: allow DNS to 203.0.113.53 in the tunnel, cut the rest of tun* (in and out);
    # then the rules replaced through the handle, and directly, and the filter's coverage changed.
    rules = [rule(1, 0, 2, False, remote=5), rule(1, 3, 0, True)]
    ops = (built(out_tun, 0, 1, 2, 0x3d, 12) + built(out_tun, 0, 1, 2, 0x39, 12) + built(meta(2, 0), 0, 1, 0, 0x13, 0)
           + built(meta(1, 2), 0, 1, 0, 0x13, 0) + built(meta(4, 1), 0, 1, 0, 0x13, 0)
           + bytes([7, 1]) + bytes(rule(3, 0, 3, True, remote=6)) + built(out_tun, 3, 1, 4, 0x09, 4)
           + built(meta(4, 1), 0, 1, 4, 0x09, 4) + bytes([9, 0x05, 0x02]) + built(meta(4, 1), 3, 1, 0, 0x09, 4)
           + bytes([8, 0]) + bytes([9, 0x10, 0x81]) + built(out_tun, 3, 1, 2, 0x09, 4) + bytes([5, 0]))
    put("packet_stage", "rules-cut-tunnel", header(0x25, 0x0c, 0x01, 0, rules) + ops)
    # Unreadable packets: garbage, a cut IPv4 header, an IPv6 packet whose extension header chain
    # is broken; a drop rule (TCP to 192.0.2.0/24) takes them, an allow rule (UDP) does not.
    rules = [rule(0, 0, 2, False), rule(0, 0, 1, True, remote=2)]
    ops = (raw(out_tun, 0, 1, b"\x45\x00\x00") + raw(out_tun, 0, 1, b"not even IP") + raw(meta(0, 0), 0, 1, b"")
           + built(out_tun, 0, 1, 11, 0x2d, 4) + built(out_tun, 0, 1, 10, 0x00, 4) + built(out_tun, 0, 1, 0x22, 0x00, 30)
           + built(meta(1, 0), 0, 1, 2, 0x01, 4) + built(meta(1, 2), 0, 1, 13, 0x26, 4))
    put("packet_stage", "unreadable-packets", header(0x15, 0x0c, 0x01, 0, rules) + ops)
    # A filter that panics, one over its budget (its delay not honoured), one just at it; fail
    # closed, then a delay.
    ops = (built(meta(4, 1), 5, 1, 2, 0x09, 4) + built(meta(4, 0), 6, 1, 2, 0x09, 4) + built(meta(4, 2), 7, 1, 2, 0x09, 4)
           + built(meta(3, 1), 3, 1, 2, 0x09, 4) + built(meta(3, 1), 5, 1, 2, 0x09, 4) + bytes([11]))
    put("packet_stage", "filter-faults", header(0x22, 0x0d, 0x04, 0) + ops)
    # The filter releases what it delayed from inside its next calls; ids start at 3, step 2.
    ops = b"".join(built(out_tun, v, 5, 2, 0x09, 4) for v in [3, 0x83, 0xc3, 0x80, 0xc0, 3])
    ops += bytes([6, 0x80, 1]) + bytes([6, 0x45, 0]) + bytes([10, 1]) + built(out_tun, 3, 5, 2, 0x09, 4)
    put("packet_stage", "release-inside-filter", header(0x86, 0x5b, 0x11, 0x02) + ops)
    # No filter installed; packets of every interface and direction, the default rules empty.
    ops = b"".join(built(meta(i, d), 3, 7, 1 + 2 * d, 0x1b, 9) for i in range(6) for d in range(3))
    put("packet_stage", "no-filter", header(0x40, 0x33, 0x3f, 0) + ops)




SEEDS = {
    "packet": packet_seeds,
    "replay": replay_seeds,
    "engine": engine_seeds,
    "config": config_seeds,
    "conntrack": conntrack_seeds,
    "nfqueue": nfqueue_seeds,
    "nflog": nflog_seeds,
    "sockdiag": sockdiag_seeds,
    "control": control_seeds,
    "netfilter": netfilter_seeds,
    "packet_stage": packet_stage_seeds,
}


if __name__ == "__main__":
    # `generate.py [TARGET...]`: the seeds of the named targets only (all by default), so one
    # target's seeds can be made again without re-recording the others'.
    wanted = sys.argv[1:] or list(SEEDS)
    unknown = [t for t in wanted if t not in SEEDS]
    if unknown:
        sys.exit("unknown targets %s; targets: %s" % (" ".join(unknown), " ".join(SEEDS)))
    for t in wanted:
        SEEDS[t]()
    for t in sorted(os.listdir(CORPUS)):
        d = os.path.join(CORPUS, t)
        files = os.listdir(d)
        print("%-14s %3d seeds %7d bytes" % (t, len(files), sum(os.path.getsize(os.path.join(d, f)) for f in files)))
