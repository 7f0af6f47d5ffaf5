#!/usr/bin/env python3
"""The content tests' HTTP/3 server (crates/flowgate/tests/content.rs), on aioquic.

Run with the test venv's python (scripts/test.sh makes /opt/flowgate-test-venv with the pinned
packages of requirements.txt) inside the lab's srv namespace:

    quic_server.py --addr 203.0.113.10 --port 443 --cert cert.pem --key key.pem --log quic.jsonl

Logs one JSON line when a QUIC connection gets its first datagram
(`{"event": "connection", "peer": "addr:port"}`: a client's Initial reached the server and was
accepted) and one per HTTP/3 request (`{"event": "request", "peer": ..., "authority": ...,
"path": ...}`); answers every GET with `200` and the body `hello h3 <authority>\\n`.
"""

import argparse
import asyncio
import json
import sys

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

LOG = None


def log(record):
    with open(LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


class H3Server(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._peer = None

    def datagram_received(self, data, addr):
        # The first datagram of a connection names its peer: log the connection then.
        if self._peer is None:
            self._peer = "%s:%d" % tuple(addr[:2])
            log({"event": "connection", "peer": self._peer})
        super().datagram_received(data, addr)

    def quic_event_received(self, event):
        for ev in self._h3.handle_event(event):
            if isinstance(ev, HeadersReceived):
                headers = dict(ev.headers)
                authority = headers.get(b":authority", b"").decode("latin-1")
                path = headers.get(b":path", b"").decode("latin-1")
                log({"event": "request", "peer": self._peer, "authority": authority, "path": path})
                body = f"hello h3 {authority}\n".encode()
                self._h3.send_headers(
                    ev.stream_id,
                    [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
                )
                self._h3.send_data(ev.stream_id, body, end_stream=True)
        self.transmit()


async def run(a):
    config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
    config.load_cert_chain(a.cert, a.key)
    await serve(a.addr, a.port, configuration=config, create_protocol=H3Server)
    print(f"listening h3 {a.addr}:{a.port}", flush=True)
    await asyncio.Future()


def main():
    global LOG
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    LOG = a.log
    try:
        asyncio.run(run(a))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
