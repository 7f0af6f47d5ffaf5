#!/usr/bin/env python3
"""Writes the QUIC client Initial fixtures of flowgate-core's sniff::quic tests, made by aioquic.

    python3 -m venv /tmp/aq && /tmp/aq/bin/pip install aioquic
    /tmp/aq/bin/python crates/flowgate-core/src/sniff/testdata/aioquic_initials.py

Each file holds the datagrams a fresh aioquic client sends first (server_name h3.example, ALPN h3),
framed as the `quic` fuzz target reads its input: a 2-byte big-endian length, then that many bytes,
repeated. Nothing is sent anywhere: the datagrams are taken from the connection object.

- aioquic-h3-initial.bin: QUIC v1, one datagram;
- aioquic-h3-v2-initial.bin: QUIC v2 (RFC 9369), one datagram;
- aioquic-h3-pq-initials.bin: QUIC v1 with a 1,216-byte X25519MLKEM768 key share (group 0x11ec,
  random bytes: aioquic has no ML-KEM, so the entry is added to its ClientHello as it is written)
  in front of its own, as Chrome sends; the ~1.8 KB hello takes two Initial datagrams.
"""
import os
import struct

from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion

HERE = os.path.dirname(os.path.abspath(__file__))


def initials(version, big_key_share=False):
    original = tls.push_client_hello

    def with_pq_share(buf, hello):
        hello.key_share.insert(0, (0x11EC, os.urandom(1216)))
        hello.supported_groups.insert(0, 0x11EC)
        original(buf, hello)

    if big_key_share:
        tls.push_client_hello = with_pq_share
    try:
        config = QuicConfiguration(
            is_client=True, server_name="h3.example", alpn_protocols=["h3"], supported_versions=[version]
        )
        conn = QuicConnection(configuration=config)
        conn.connect(("198.51.100.7", 443), now=0.0)
        return [d for d, _ in conn.datagrams_to_send(now=0.0)]
    finally:
        tls.push_client_hello = original


def write(name, datagrams):
    with open(os.path.join(HERE, name), "wb") as f:
        for d in datagrams:
            f.write(struct.pack(">H", len(d)) + d)
    print(name, [len(d) for d in datagrams])


write("aioquic-h3-initial.bin", initials(QuicProtocolVersion.VERSION_1))
write("aioquic-h3-v2-initial.bin", initials(QuicProtocolVersion.VERSION_2))
write("aioquic-h3-pq-initials.bin", initials(QuicProtocolVersion.VERSION_1, big_key_share=True))
