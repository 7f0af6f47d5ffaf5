#!/usr/bin/env python3
"""The content tests' TLS and plain-HTTP servers (crates/flowgate/tests/content.rs).

Standard library only; run with Debian's /usr/bin/python3 inside the lab's srv namespace:

    servers.py tls  --addr 203.0.113.10 --port 443 --cert cert.pem --key key.pem --log tls.jsonl
    servers.py http --addr 203.0.113.10 --port 80 --log http.jsonl

Each connection is logged as one JSON line when it ends, so a test can tell whether a client it
ran reached the server at all, and how many bytes of it arrived: the peer (`addr:port`, which
the test matches with curl's local port), `bytes` (raw bytes received on the TCP connection,
before any TLS decryption), and what was understood of them: `sni` and `alpn` (TLS), the request
line and the Host header. The TLS server decrypts through memory BIOs rather than a wrapped
socket precisely so that it can count the raw bytes: a blocked client must have delivered none.

Every request is answered `200` with the body `hello <host>\\n`, then the connection closes.
"""

import argparse
import json
import socket
import socketserver
import ssl
import sys
import threading

LOG_LOCK = threading.Lock()


def log(path, record):
    with LOG_LOCK, open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def parse_head(head):
    """The request line and the Host header of an HTTP/1.x request head (bytes)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    host = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "host":
            host = value.strip()
    return lines[0], host


def answer(host):
    body = f"hello {host}\n".encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(10)
        peer = "%s:%d" % self.client_address[:2]
        record = {"peer": peer, "bytes": 0}
        try:
            if self.server.mode == "tls":
                self.serve_tls(sock, record)
            else:
                self.serve_http(sock, record)
        except (OSError, ssl.SSLError, ValueError) as e:
            record["error"] = f"{type(e).__name__}: {e}"
        finally:
            log(self.server.log_path, record)

    def recv(self, sock, record):
        data = sock.recv(65536)
        record["bytes"] += len(data)
        return data

    def serve_http(self, sock, record):
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self.recv(sock, record)
            if not data:
                return
            buf += data
        line, host = parse_head(buf.split(b"\r\n\r\n", 1)[0])
        record["request"], record["host"] = line, host
        sock.sendall(answer(host))

    def serve_tls(self, sock, record):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.server.context.wrap_bio(incoming, outgoing, server_side=True)
        names = self.server.sni_seen

        def pump_out():
            data = outgoing.read()
            if data:
                sock.sendall(data)

        def pump_in():
            data = self.recv(sock, record)
            if not data:
                incoming.write_eof()
                return False
            incoming.write(data)
            return True

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump_out()
                if not pump_in():
                    return
        pump_out()
        record["sni"] = names.pop(id(tls), None)
        record["alpn"] = tls.selected_alpn_protocol()
        buf = b""
        while b"\r\n\r\n" not in buf:
            try:
                buf += tls.read(65536)
            except ssl.SSLWantReadError:
                pump_out()
                if not pump_in():
                    return
        line, host = parse_head(buf.split(b"\r\n\r\n", 1)[0])
        record["request"], record["host"] = line, host
        tls.write(answer(host))
        try:
            tls.unwrap()
        except ssl.SSLError:
            pass
        pump_out()


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["tls", "http"])
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--log", required=True)
    a = p.parse_args()
    family = socket.AF_INET6 if ":" in a.addr else socket.AF_INET
    Server.address_family = family
    server = Server((a.addr, a.port), Handler)
    server.mode, server.log_path, server.sni_seen = a.mode, a.log, {}
    if a.mode == "tls":
        if not (a.cert and a.key):
            p.error("tls needs --cert and --key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.cert, a.key)
        ctx.set_alpn_protocols(["http/1.1"])

        def on_sni(obj, name, _ctx):
            server.sni_seen[id(obj)] = name

        ctx.sni_callback = on_sni
        server.context = ctx
    print(f"listening {a.mode} {a.addr}:{a.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
