#!/usr/bin/env python3
"""A TLS client that writes its ClientHello one byte per send() (crates/flowgate/tests/content.rs).

    tiny_client.py --addr 203.0.113.10 --port 443 --server-name blocked.example --ca cert.pem \\
                   --timeout 8

Standard library only (Debian's /usr/bin/python3). The ClientHello is the real one Python's ssl
module makes for --server-name (through memory BIOs); with TCP_NODELAY each of its bytes leaves
in a segment of its own, as far as the congestion window lets it (the kernel sends the rest,
and what it must send again, as it sees fit). Then the handshake and `GET /` go on normally.
Prints the response body; exit status 0 when the page arrived, 1 when the exchange failed or
took longer than --timeout seconds. The first line of stderr says `local_port N`.
"""

import argparse
import socket
import ssl
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--server-name", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--timeout", type=float, default=8.0)
    a = p.parse_args()
    deadline = time.monotonic() + a.timeout
    ctx = ssl.create_default_context(cafile=a.ca)
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=a.server_name)
    sock = socket.create_connection((a.addr, a.port), timeout=a.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"local_port {sock.getsockname()[1]}", file=sys.stderr, flush=True)
    first = True

    def left():
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError("timed out")
        return t

    def flush():
        nonlocal first
        data = outgoing.read()
        if first and data:
            # The ClientHello: one byte per send().
            for i in range(len(data)):
                sock.settimeout(left())
                sock.sendall(data[i : i + 1])
            first = False
        elif data:
            sock.settimeout(left())
            sock.sendall(data)

    def fill():
        sock.settimeout(left())
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the peer")
        incoming.write(data)

    try:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                fill()
        flush()
        tls.write(f"GET / HTTP/1.1\r\nHost: {a.server_name}\r\nConnection: close\r\n\r\n".encode())
        flush()
        response = b""
        while True:
            try:
                chunk = tls.read(65536)
                if not chunk:
                    break
                response += chunk
            except ssl.SSLWantReadError:
                try:
                    fill()
                except ConnectionError:
                    break
            except ssl.SSLZeroReturnError:
                break
    except (OSError, ssl.SSLError, TimeoutError) as e:
        print(f"tiny_client: {a.server_name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        print(f"tiny_client: {a.server_name}: unexpected answer {head[:80]!r}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
