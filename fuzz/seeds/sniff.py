#!/usr/bin/env python3
"""Writes the seeds of the `http`, `dns` and `hosts_file` fuzz targets into fuzz/corpus/<target>/,
and (with --record) records the DNS answers they and the unit tests of
crates/flowgate-core/src/sniff/dns.rs use.

    python3 fuzz/seeds/sniff.py            # the three corpora, from the committed DNS answers
    sudo python3 fuzz/seeds/sniff.py --record   # record the answers again first

--record needs root and dnsmasq (`apt-get install -y dnsmasq-base`): it makes a network namespace
of its own (`ip netns add fgdnsseed<pid>`, deleted afterwards, also on failure), runs dnsmasq on
127.0.0.1:53 inside it with a host record, two CNAMEs, a sinkhole and a blocked name, asks it with
a small UDP and TCP client, and writes the answers to crates/flowgate-core/src/sniff/testdata/.
dnsmasq answers the same bytes each time (the ids are chosen here).
"""
import os
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TESTDATA = os.path.join(ROOT, "crates", "flowgate-core", "src", "sniff", "testdata")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def wire_name(text):
    return b"".join(bytes([len(l)]) + l.encode() for l in text.split(".") if l) + b"\0"


def query(name, qtype, qid):
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire_name(name) + struct.pack(">HH", qtype, 1)


# (file, name, type, id, over TCP)
ASKED = [
    ("dnsmasq-a.bin", "a.example", 1, 0x1000, False),
    ("dnsmasq-aaaa.bin", "a.example", 28, 0x1001, False),
    ("dnsmasq-cname-a.bin", "www.a.example", 1, 0x1002, False),
    ("dnsmasq-cname2-aaaa.bin", "cdn.b.example", 28, 0x1003, False),
    ("dnsmasq-sink-a.bin", "sink.example", 1, 0x1004, False),
    ("dnsmasq-sink-aaaa.bin", "sink.example", 28, 0x1005, False),
    ("dnsmasq-nxdomain.bin", "blocked.example", 1, 0x1006, False),
    ("dnsmasq-mixed-case.bin", "A.Example", 1, 0x1007, False),
    ("dnsmasq-tcp-cname2-a.bin", "cdn.b.example", 1, 0x2000, True),
]

# Runs inside the namespace: starts dnsmasq, asks, prints "file hex" lines.
CLIENT = r"""
import socket, struct, subprocess, sys, time
asked = %r
def query(name, qtype, qid):
    n = b"".join(bytes([len(l)]) + l.encode() for l in name.split(".") if l) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + n + struct.pack(">HH", qtype, 1)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
d = subprocess.Popen(["dnsmasq", "-k", "--no-resolv", "--no-hosts", "--listen-address=127.0.0.1",
    "--bind-interfaces", "--port=53", "--user=root", "--pid-file=", "--local-ttl=300",
    "--host-record=a.example,198.51.100.7,2001:db8::7",
    "--cname=www.a.example,a.example,60", "--cname=cdn.b.example,www.a.example,120",
    "--address=/sink.example/0.0.0.0", "--address=/sink.example/::", "--address=/blocked.example/"])
try:
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", 53), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    for f, name, qtype, qid, tcp in asked:
        m = query(name, qtype, qid)
        if tcp:
            c = socket.create_connection(("127.0.0.1", 53), timeout=2)
            c.sendall(struct.pack(">H", len(m)) + m)
            got = b""
            while len(got) < 2 or len(got) < 2 + struct.unpack(">H", got[:2])[0]:
                chunk = c.recv(4096)
                if not chunk:
                    break
                got += chunk
            c.close()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(m, ("127.0.0.1", 53))
            got = s.recvfrom(4096)[0]
            s.close()
        print(f, got.hex())
finally:
    d.terminate()
    d.wait()
"""


def record():
    ns = "fgdnsseed%d" % os.getpid()
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT % (ASKED,)],
                             check=True, capture_output=True, text=True, timeout=60).stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
    os.makedirs(TESTDATA, exist_ok=True)
    for line in out.splitlines():
        f, hexed = line.split()
        with open(os.path.join(TESTDATA, f), "wb") as fh:
            fh.write(bytes.fromhex(hexed))
    with open(os.path.join(TESTDATA, "query-a.bin"), "wb") as fh:
        fh.write(query("a.example", 1, 0x1000))


def dns_seeds():
    for f, *_ in ASKED:
        put("dns", f, open(os.path.join(TESTDATA, f), "rb").read())
    put("dns", "query-a.bin", open(os.path.join(TESTDATA, "query-a.bin"), "rb").read())
    q = query("a.example", 1, 7)
    put("dns", "tcp-query.bin", struct.pack(">H", len(q)) + q)
    # Built by hand: a name pointing at itself, one pointing forwards, a CNAME loop, a chain of
    # pointers, and an answer cut in its RDATA.
    hdr = struct.pack(">HHHHHH", 1, 0x8180, 1, 0, 0, 0)
    put("dns", "pointer-to-itself.bin", hdr + b"\xc0\x0c\x00\x01\x00\x01")
    put("dns", "pointer-forwards.bin", hdr + b"\xc0\x0e\x01a\x00\x00\x01\x00\x01")
    a, b = wire_name("a.example"), wire_name("b.example")
    loop = struct.pack(">HHHHHH", 2, 0x8180, 1, 3, 0, 0) + a + struct.pack(">HH", 1, 1)
    loop += b"\xc0\x0c" + struct.pack(">HHIH", 5, 1, 50, len(b)) + b
    loop += b + struct.pack(">HHIH", 5, 1, 50, len(a)) + a
    loop += b + struct.pack(">HHIH", 1, 1, 50, 4) + bytes([192, 0, 2, 1])
    put("dns", "cname-loop.bin", loop)
    put("dns", "cut-rdata.bin", loop[:-2])
    chain = struct.pack(">HHHHHH", 3, 0x8180, 0, 0, 0, 0) + a
    prev = 12
    for _ in range(20):
        here = len(chain)
        chain += struct.pack(">H", 0xC000 | prev)
        prev = here
    put("dns", "pointer-chain.bin", chain)


def http_seeds():
    heads = {
        "curl-get": b"GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
        "proxy-absolute": b"GET http://a.example:8080/p?q=1 HTTP/1.1\r\nHost: a.example:8080\r\n"
                          b"Proxy-Connection: Keep-Alive\r\n\r\n",
        "connect": b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
        "post-body": b"POST /form HTTP/1.0\r\nhost: A.Example.\r\nContent-Length: 3\r\n\r\nabc",
        "two-hosts": b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "conflicting-target": b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        "obs-fold": b"GET / HTTP/1.1\r\nHost: a.example\r\n b.example\r\n\r\n",
        "bare-lf": b"GET / HTTP/1.1\nHost: a.example\n\n",
        "leading-crlf": b"\r\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        "ipv6-host": b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
        "ipv4-host": b"OPTIONS * HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
        "cut": b"GET /index.html HTTP/1.1\r\nHost: a.exa",
        "many-headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150))
                        + b"Host: last.example\r\n\r\n",
        "tls": bytes([0x16, 0x03, 0x01, 0x00, 0xF4, 0x01, 0x00, 0x00, 0xF0, 0x03, 0x03]),
        "ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
        "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    }
    for name, data in heads.items():
        put("http", name, data)


def hosts_seeds():
    lists = {
        "hosts-file": "# A blocklist in hosts-file form\r\n127.0.0.1 localhost\r\n::1 localhost ip6-localhost "
                      "ip6-loopback\r\n0.0.0.0 0.0.0.0\r\n0.0.0.0 ads.example tracker.example  # two names\r\n"
                      "\r\n0.0.0.0 Metrics.Example.\r\nfe80::1%lo0 localhost\r\n",
        "domains": "# one domain a line\na.example\n*.b.example\n||c.example^\n\n  d.example  # comment\n",
        "bad-lines": "good.example\nbad name here\n0.0.0.0\n*.*.example\nexa$mple.com\n||x.example^$third-party\n"
                     + "a" * 70 + ".example\n",
        "adblock": "[Adblock Plus 2.0]\n! Title: a list\n||ads.example^\n||b.example^\n@@||ok.example^\n",
    }
    for name, text in lists.items():
        put("hosts_file", name, text)


def main():
    if "--record" in sys.argv[1:]:
        record()
    dns_seeds()
    http_seeds()
    hosts_seeds()


if __name__ == "__main__":
    main()
