#!/usr/bin/env python3
"""Writes the seed inputs of the `reassembly` and `defrag` fuzz targets into fuzz/corpus/.

Run from anywhere: `python3 fuzz/seeds/reassembly_defrag.py`. The inputs are built by hand in
the framings the targets' doc comments describe (fuzz/fuzz_targets/reassembly.rs, defrag.rs).
"""
import os
import random
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- reassembly: [base][start][limit u16] then ops [kind][offset u16][len][fill] -------------

INSERT, FILL, FORGET, HAS = 0, 0x10, 6, 7


def ra(base, start, limit, ops):
    out = struct.pack("<BBH", base, start, limit)
    for kind, offset, length, fill in ops:
        out += struct.pack("<BHBB", kind, offset, length, fill)
    return out


def reassembly_seeds():
    segs = [(INSERT, o, 100, 0) for o in range(0, 1500, 100)]
    put("reassembly", "in-order", ra(0, 0, 4096, segs + [(HAS, 0, 255, 0)]))
    put("reassembly", "reversed", ra(1, 0, 2000, list(reversed(segs))))
    rng = random.Random(7)
    shuffled = [(INSERT, o, 1 + rng.randrange(40), 0) for o in range(0, 1200, 30)]
    rng.shuffle(shuffled)
    put("reassembly", "shuffled-overlapping", ra(0, 5, 1500, shuffled + [(INSERT, 0, 255, 0)] * 6))
    islands = [(INSERT, 10 + 2 * k, 1, 0) for k in range(70)]
    put("reassembly", "islands-then-stream", ra(0, 0, 4096, islands + [(INSERT, 0, 200, 0), (HAS, 0, 200, 0)]))
    conflict = [(INSERT, 100, 50, 0), (FILL, 120, 10, 0x41), (FILL, 90, 100, 0x42), (FILL, 140, 20, 0x43),
                (FILL, 95, 10, 0x44), (INSERT, 0, 255, 0)]
    put("reassembly", "conflicts", ra(0, 0, 1000, conflict))
    beyond = [(INSERT, 3000 - 40, 100, 0), (FORGET, 2000, 0, 0), (INSERT, 3000, 200, 0), (HAS, 2900, 100, 0)]
    put("reassembly", "near-the-top", ra(2, 0, 4000, beyond))
    forget = [(INSERT, 0, 200, 0), (INSERT, 250, 100, 0), (FORGET, 150, 0, 0), (INSERT, 200, 50, 0),
              (FORGET, 400, 0, 0), (INSERT, 390, 30, 0), (HAS, 0, 255, 0), (HAS, 390, 30, 0)]
    put("reassembly", "forget", ra(1, 3, 300, forget))


# ---- defrag: [datagrams-1][KiB-1][timeout-1] then records -----------------------------------
# Fragmentable lengths of the target's eight templates.
LENS = [3008, 20, 60008, 120, 3008, 1408, 60008, 24]


def frag(k, start, size, flags=0):
    """Template k's fragment of [start, start + size) bytes (multiples of 8, size 8 to 2048)."""
    return struct.pack("<BHBB", k, start // 8, size // 8 - 1, flags)


def cuts(k, size):
    return [(a, size) for a in range(0, LENS[k], size)]


def df(settings, records):
    return bytes(settings) + b"".join(records)


def raw(packet):
    return struct.pack("<BH", 0x80, len(packet)) + packet


def v4_fragment(ident, offset, more, payload, proto=17):
    flags = (0x2000 if more else 0) | offset // 8
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags, 64, proto, 0,
                    bytes([198, 51, 100, 1]), bytes([203, 0, 113, 7]))
    s = sum(struct.unpack("!10H", h))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return h[:10] + struct.pack("!H", ~s & 0xFFFF) + h[12:] + payload


def defrag_seeds():
    roomy = [7, 255, 29]
    for k in range(8):
        size = 1480 if LENS[k] > 1480 else 8
        if LENS[k] > 20000:
            size = 2048
        records = [frag(k, a, s) for a, s in cuts(k, size)]
        put("defrag", "template-%d-in-order" % k, df(roomy, records))
        put("defrag", "template-%d-reversed" % k, df(roomy, list(reversed(records))))
    rng = random.Random(3)
    tiny = [frag(0, a, 8) for a in range(0, 3008, 8)]
    rng.shuffle(tiny)
    put("defrag", "tiny-shuffled", df(roomy, tiny))
    dup = [frag(4, a, s) for a, s in cuts(4, 1232) for _ in range(2)]
    put("defrag", "v6-duplicated", df(roomy, dup))
    overlap = [frag(0, 0, 1488), frag(0, 1480, 1488), frag(0, 2960, 48)]
    put("defrag", "v4-identical-overlaps", df(roomy, overlap))
    put("defrag", "v6-overlap-refused", df(roomy, [frag(4, 0, 1488), frag(4, 1480, 1488), frag(4, 2960, 48)]))
    changed = [frag(0, 0, 1480), frag(0, 1472, 1480, 2), frag(0, 1480, 1480), frag(0, 2960, 48)]
    put("defrag", "v4-conflict-refused", df(roomy, changed))
    flipped = [frag(0, 1480, 1480, 1), frag(0, 2960, 48), frag(0, 0, 1480)]
    put("defrag", "two-ends", df(roomy, flipped))
    put("defrag", "early-end", df(roomy, [frag(0, 1480, 1480, 1), frag(0, 0, 1480)]))
    slow = [frag(0, 0, 1480, 0xF8), frag(0, 1480, 1480, 0xFC), frag(0, 2960, 48, 0xF8)]
    put("defrag", "timeout", df([7, 255, 0], slow))
    many = [frag(k, 0, 8) for k in range(8)] + [frag(k, 8, 8) for k in range(8)]
    put("defrag", "too-many-datagrams", df([1, 255, 29], many))
    put("defrag", "too-many-bytes", df([7, 3, 29], [frag(2, 0, 2048), frag(2, 58000, 2008), frag(6, 30000, 8)]))
    crafted = [raw(v4_fragment(77, 8, False, bytes(range(16)))), raw(v4_fragment(77, 0, True, bytes(8))),
               raw(v4_fragment(78, 65520, True, bytes(16))), raw(b"\x60" + bytes(39)), raw(b"")]
    put("defrag", "raw-fragments", df(roomy, crafted))


if __name__ == "__main__":
    reassembly_seeds()
    defrag_seeds()
    for t in ("reassembly", "defrag"):
        d = os.path.join(CORPUS, t)
        files = os.listdir(d)
        print("%-11s %3d seeds %7d bytes" % (t, len(files), sum(os.path.getsize(os.path.join(d, f)) for f in files)))
