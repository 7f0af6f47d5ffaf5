#!/usr/bin/env python3
"""The content tests' HTTP/3 client (crates/flowgate/tests/content.rs), on aioquic.

    quic_client.py --addr 203.0.113.10 --port 443 --server-name blocked.example --ca cert.pem \\
                   --local-port 20001 --timeout 3

Connects from UDP port --local-port (so the test can find its flow), with --server-name as the
TLS server name (the QUIC Initial's SNI) and the test CA as the only trusted one, sends
`GET https://<server-name>/` over HTTP/3 and prints the response body. Exit status 0 when the
body arrived, 1 when the exchange failed or took longer than --timeout seconds (the message on
stderr says which).
"""

import argparse
import asyncio
import ssl
import sys

from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._h3 = H3Connection(self._quic)
        self._done = {}
        self._bodies = {}

    async def get(self, authority, path):
        stream_id = self._quic.get_next_available_stream_id()
        self._h3.send_headers(
            stream_id,
            [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority.encode()), (b":path", path.encode())],
            end_stream=True,
        )
        done = asyncio.get_running_loop().create_future()
        self._done[stream_id] = done
        self._bodies[stream_id] = b""
        self.transmit()
        await done
        return self._bodies.pop(stream_id)

    def quic_event_received(self, event):
        for ev in self._h3.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)) and ev.stream_id in self._done:
                if isinstance(ev, DataReceived):
                    self._bodies[ev.stream_id] += ev.data
                if ev.stream_ended and not self._done[ev.stream_id].done():
                    self._done[ev.stream_id].set_result(None)


async def run(a):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.server_name)
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(a.ca)
    config.idle_timeout = a.timeout
    async with connect(a.addr, a.port, configuration=config, create_protocol=H3Client, local_port=a.local_port) as c:
        return await c.get(a.server_name, "/")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--server-name", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--local-port", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args()
    try:
        body = asyncio.run(asyncio.wait_for(run(a), a.timeout))
    except (asyncio.TimeoutError, ConnectionError, OSError) as e:
        print(f"quic_client: no answer from {a.addr}:{a.port} for {a.server_name}: {type(e).__name__} {e}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode("utf-8", "replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
