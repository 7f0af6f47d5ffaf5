#!/usr/bin/env python3
"""Count packets and bytes per flow in a pcap or pcapng capture.

Pure Python 3 standard library; no scapy, no dpkt.  This is the oracle for
the replay tests: the numbers in tests/data/README.md were produced by this
script from the capture bytes.

    python3 count_flows.py FILE...              # human-readable table
    python3 count_flows.py --markdown FILE...   # the README tables
    python3 count_flows.py --json FILE...       # machine-readable
    python3 count_flows.py --check FILE...      # exit 1 unless every TCP flow
                                                # is complete (SYN, SYN-ACK,
                                                # both FINs acked, no RST) and
                                                # every checksum is valid

Definitions (per flow, per direction; "out" = sent by a local address):
  packets      IP packets (non-IP frames such as ARP are not in any flow)
  ip_bytes     sum of the IP total length (IPv4 total length field; IPv6
               40 + payload length).  Link-layer headers and Ethernet padding
               are not counted.
  payload      TCP: bytes after the TCP header (data offset);
               UDP: UDP length - 8;
               ICMP/ICMPv6: bytes after the 8-byte ICMP header.

Flow key: (protocol, local address, local port, remote address, remote port);
ICMP/ICMPv6 flows are keyed by (protocol, local address, remote address).
The local addresses default to the lab client's, 198.51.100.1 and
2001:db8:1::1 (change with --local).  A packet whose source and destination
are both non-local is attributed as if its source were local.

Frame numbers are 1-based positions in the file, as tcpdump/Wireshark count.

Link types handled: EN10MB (1), RAW (101, 12, 14), IPV4 (228), IPV6 (229),
NULL (0), LOOP (108), LINUX_SLL (113), LINUX_SLL2 (276).  A truncated last
record (a capture still being written) is tolerated and reported.
"""

import argparse
import ipaddress
import json
import struct
import sys

DEFAULT_LOCAL = ["198.51.100.1", "2001:db8:1::1"]

ETHERTYPE_NAMES = {0x0806: "ARP", 0x8035: "RARP", 0x88CC: "LLDP", 0x8809: "SLOW"}
PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}
LINKTYPE_NAMES = {0: "NULL", 1: "ETHERNET", 12: "RAW", 14: "RAW", 101: "RAW",
                  108: "LOOP", 113: "LINUX_SLL", 228: "IPV4", 229: "IPV6",
                  276: "LINUX_SLL2"}


class Truncated(Exception):
    pass


# ---------------------------------------------------------------- file formats

def read_frames(data, info):
    """Yield (linktype, frame_bytes, orig_len) for every record in a pcap or
    pcapng file.  Fills info with format details."""
    if len(data) < 4:
        raise ValueError("file too short")
    magic = data[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        info["format"] = "pcapng"
        yield from _read_pcapng(data, info)
    elif magic in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",
                   b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d"):
        info["format"] = "pcap"
        yield from _read_pcap(data, info)
    else:
        raise ValueError("not a pcap or pcapng file (magic %s)" % magic.hex())


def _read_pcap(data, info):
    if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        e = "<"
    else:
        e = ">"
    if len(data) < 24:
        info["truncated"] = True
        return
    _magic, vmaj, vmin, _tz, _sig, snaplen, network = struct.unpack(e + "IHHiIII", data[:24])
    linktype = network & 0x0FFFFFFF
    info["linktypes"] = [linktype]
    info["snaplen"] = snaplen
    off = 24
    while off < len(data):
        if off + 16 > len(data):
            info["truncated"] = True
            return
        _sec, _frac, incl, orig = struct.unpack(e + "IIII", data[off:off + 16])
        off += 16
        if off + incl > len(data):
            info["truncated"] = True
            return
        yield linktype, data[off:off + incl], orig
        off += incl


def _pcapng_options(body, e):
    opts = []
    off = 0
    while off + 4 <= len(body):
        code, length = struct.unpack(e + "HH", body[off:off + 4])
        off += 4
        if code == 0:
            break
        opts.append((code, body[off:off + length]))
        off += (length + 3) & ~3
    return opts


def _read_pcapng(data, info):
    e = "<"
    interfaces = []  # list of (linktype, name)
    info["linktypes"] = []
    info["interfaces"] = []
    off = 0
    while off < len(data):
        if off + 12 > len(data):
            info["truncated"] = True
            return
        btype_raw = data[off:off + 4]
        if btype_raw == b"\x0a\x0d\x0d\x0a":  # Section Header Block
            bom = data[off + 8:off + 12]
            e = "<" if bom == b"\x4d\x3c\x2b\x1a" else ">"
            interfaces = []
        btype, blen = struct.unpack(e + "II", data[off:off + 8])
        if blen < 12 or off + blen > len(data):
            info["truncated"] = True
            return
        body = data[off + 8:off + blen - 4]
        if btype == 0x00000001:  # Interface Description Block
            linktype, _res, _snap = struct.unpack(e + "HHI", body[:8])
            name = None
            for code, val in _pcapng_options(body[8:], e):
                if code == 2:  # if_name
                    name = val.rstrip(b"\0").decode("utf-8", "replace")
            interfaces.append((linktype, name))
            info["linktypes"].append(linktype)
            info["interfaces"].append(name)
        elif btype == 0x00000006:  # Enhanced Packet Block
            ifid, _th, _tl, caplen, orig = struct.unpack(e + "IIIII", body[:20])
            yield interfaces[ifid][0], body[20:20 + caplen], orig
        elif btype == 0x00000003:  # Simple Packet Block (interface 0)
            (orig,) = struct.unpack(e + "I", body[:4])
            caplen = min(orig, len(body) - 4)
            yield interfaces[0][0], body[4:4 + caplen], orig
        elif btype == 0x00000002:  # obsolete Packet Block
            ifid, _drops, _th, _tl, caplen, orig = struct.unpack(e + "HHIIII", body[:20])
            yield interfaces[ifid][0], body[20:20 + caplen], orig
        # other blocks (NRB, ISB, DSB, custom...) are ignored
        off += blen


# ---------------------------------------------------------------- link layer

def link_payload(linktype, frame):
    """Return ("ip", bytes) or ("nonip", name) or ("short", None)."""
    if linktype == 1:
        if len(frame) < 14:
            return "short", None
        etype = struct.unpack("!H", frame[12:14])[0]
        off = 14
        while etype in (0x8100, 0x88A8, 0x9100):
            if len(frame) < off + 4:
                return "short", None
            etype = struct.unpack("!H", frame[off + 2:off + 4])[0]
            off += 4
        return _by_ethertype(etype, frame[off:])
    if linktype == 113:
        if len(frame) < 16:
            return "short", None
        return _by_ethertype(struct.unpack("!H", frame[14:16])[0], frame[16:])
    if linktype == 276:
        if len(frame) < 20:
            return "short", None
        return _by_ethertype(struct.unpack("!H", frame[0:2])[0], frame[20:])
    if linktype in (12, 14, 101, 228, 229):
        return "ip", frame
    if linktype in (0, 108):
        if len(frame) < 4:
            return "short", None
        fam_le = struct.unpack("<I", frame[:4])[0]
        fam_be = struct.unpack(">I", frame[:4])[0]
        fam = fam_be if linktype == 108 else (fam_le if fam_le < 256 else fam_be)
        if fam in (2, 10, 24, 28, 30):
            return "ip", frame[4:]
        return "nonip", "AF_%d" % fam
    raise ValueError("unsupported link type %d" % linktype)


def _by_ethertype(etype, payload):
    if etype in (0x0800, 0x86DD):
        return "ip", payload
    return "nonip", ETHERTYPE_NAMES.get(etype, "ethertype 0x%04x" % etype)


# ---------------------------------------------------------------- checksums

def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _l4_ok(version, src, dst, proto, l4):
    if proto == 1:
        return _csum(l4) == 0xFFFF
    if proto not in (6, 17, 58):
        return True
    if proto == 17 and version == 4 and l4[6:8] == b"\0\0":
        return True  # UDP over IPv4 without checksum
    if version == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
    return _csum(pseudo + l4) == 0xFFFF


# ---------------------------------------------------------------- IP / L4

def parse_ip(pkt):
    """Return a dict describing one IP packet, or None if unparseable."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4:
        if len(pkt) < 20:
            return None
        ihl = (pkt[0] & 0x0F) * 4
        total = struct.unpack("!H", pkt[2:4])[0]
        frag = struct.unpack("!H", pkt[6:8])[0]
        proto = pkt[9]
        src, dst = pkt[12:16], pkt[16:20]
        hdr_ok = _csum(pkt[:ihl]) == 0xFFFF
        l4_off = ihl
        ip_len = total
        first_frag = (frag & 0x1FFF) == 0
        is_frag = (frag & 0x3FFF) != 0
    elif version == 6:
        if len(pkt) < 40:
            return None
        plen = struct.unpack("!H", pkt[4:6])[0]
        proto = pkt[6]
        src, dst = pkt[8:24], pkt[24:40]
        ip_len = 40 + plen
        l4_off = 40
        hdr_ok = True
        first_frag, is_frag = True, False
        while proto in (0, 43, 60, 44, 51):
            if len(pkt) < l4_off + 8:
                return None
            nxt = pkt[l4_off]
            if proto == 44:
                fo = struct.unpack("!H", pkt[l4_off + 2:l4_off + 4])[0]
                is_frag = True
                first_frag = (fo & 0xFFF8) == 0
                hlen = 8
            elif proto == 51:
                hlen = (pkt[l4_off + 1] + 2) * 4
            else:
                hlen = (pkt[l4_off + 1] + 1) * 8
            proto = nxt
            l4_off += hlen
    else:
        return None
    end = min(ip_len, len(pkt))
    complete = len(pkt) >= ip_len
    l4 = pkt[l4_off:end]
    r = {"version": version, "proto": proto, "src": src, "dst": dst,
         "ip_len": ip_len, "sport": None, "dport": None, "payload": 0,
         "flags": 0, "seq": 0, "ack": 0, "icmp_type": None, "is_frag": is_frag,
         "csum_ok": hdr_ok}
    if not first_frag:
        r["payload"] = ip_len - l4_off
        return r
    if proto == 6 and len(l4) >= 20:
        r["sport"], r["dport"], r["seq"], r["ack"] = struct.unpack("!HHII", l4[:12])
        doff = (l4[12] >> 4) * 4
        r["flags"] = l4[13] | ((l4[12] & 1) << 8)
        r["payload"] = (ip_len - l4_off) - doff
    elif proto == 17 and len(l4) >= 8:
        r["sport"], r["dport"], ulen = struct.unpack("!HHH", l4[:6])
        r["payload"] = ulen - 8
    elif proto in (1, 58) and len(l4) >= 8:
        r["icmp_type"] = l4[0]
        r["payload"] = (ip_len - l4_off) - 8
    else:
        r["payload"] = ip_len - l4_off
    if complete and not is_frag:
        r["csum_ok"] = r["csum_ok"] and _l4_ok(version, src, dst, proto, l4)
    return r


def _addr(b):
    return str(ipaddress.ip_address(b))


def _seq_ge(a, b):
    return ((a - b) & 0xFFFFFFFF) < 0x80000000


# ---------------------------------------------------------------- analysis

def analyse(path, local):
    with open(path, "rb") as f:
        data = f.read()
    info = {"file": path, "format": None, "linktypes": [], "truncated": False}
    frames = 0
    nonip = {}
    nonip_frames = []
    bad_csum = 0
    flows = {}
    order = []
    for linktype, frame, _orig in read_frames(data, info):
        frames += 1
        kind, val = link_payload(linktype, frame)
        if kind == "nonip":
            nonip[val] = nonip.get(val, 0) + 1
            nonip_frames.append(frames)
            continue
        if kind == "short":
            nonip["short frame"] = nonip.get("short frame", 0) + 1
            nonip_frames.append(frames)
            continue
        p = parse_ip(val)
        if p is None:
            nonip["bad IP"] = nonip.get("bad IP", 0) + 1
            nonip_frames.append(frames)
            continue
        if not p["csum_ok"]:
            bad_csum += 1
        src, dst = _addr(p["src"]), _addr(p["dst"])
        out = src in local or dst not in local
        l_ip, r_ip = (src, dst) if out else (dst, src)
        l_port, r_port = (p["sport"], p["dport"]) if out else (p["dport"], p["sport"])
        pname = PROTO_NAMES.get(p["proto"], "IP proto %d" % p["proto"])
        if p["proto"] in (1, 58):
            l_port = r_port = None
        key = (pname, l_ip, l_port, r_ip, r_port)
        fl = flows.get(key)
        if fl is None:
            fl = flows[key] = {
                "proto": pname, "ip_version": p["version"],
                "local_addr": l_ip, "local_port": l_port,
                "remote_addr": r_ip, "remote_port": r_port,
                "initiator": "local" if out else "remote",
                "packets_out": 0, "packets_in": 0,
                "ip_bytes_out": 0, "ip_bytes_in": 0,
                "payload_out": 0, "payload_in": 0,
                "tcp": None, "icmp_types_out": [], "icmp_types_in": [],
                "_fin_end": {}, "_max_ack": {},
            }
            if p["proto"] == 6:
                fl["tcp"] = {"syn_out": 0, "syn_in": 0, "synack_out": 0, "synack_in": 0,
                             "fin_out": 0, "fin_in": 0, "rst_out": 0, "rst_in": 0}
            order.append(key)
        d = "out" if out else "in"
        fl["packets_" + d] += 1
        fl["ip_bytes_" + d] += p["ip_len"]
        fl["payload_" + d] += p["payload"]
        if p["proto"] in (1, 58) and p["icmp_type"] is not None:
            if p["icmp_type"] not in fl["icmp_types_" + d]:
                fl["icmp_types_" + d].append(p["icmp_type"])
        if p["proto"] == 6 and p["sport"] is not None:
            t = fl["tcp"]
            flags = p["flags"]
            syn, ack, fin, rst = flags & 2, flags & 16, flags & 1, flags & 4
            if syn and not ack:
                t["syn_" + d] += 1
                if fl["packets_out"] + fl["packets_in"] == 1:
                    fl["initiator"] = "local" if out else "remote"
            if syn and ack:
                t["synack_" + d] += 1
            if fin:
                t["fin_" + d] += 1
                end = (p["seq"] + p["payload"] + (1 if syn else 0) + 1) & 0xFFFFFFFF
                fl["_fin_end"][d] = end
            if rst:
                t["rst_" + d] += 1
            if ack:
                prev = fl["_max_ack"].get(d)
                if prev is None or _seq_ge(p["ack"], prev):
                    fl["_max_ack"][d] = p["ack"]
    result = []
    for key in order:
        fl = flows[key]
        if fl["tcp"] is not None:
            t = fl["tcp"]
            fe, ma = fl["_fin_end"], fl["_max_ack"]
            fin_acked_out = "out" in fe and "in" in ma and _seq_ge(ma["in"], fe["out"])
            fin_acked_in = "in" in fe and "out" in ma and _seq_ge(ma["out"], fe["in"])
            syn_d = "out" if fl["initiator"] == "local" else "in"
            other = "in" if syn_d == "out" else "out"
            t["handshake"] = bool(t["syn_" + syn_d] and t["synack_" + other])
            t["closed"] = bool(fin_acked_out and fin_acked_in)
            t["complete"] = t["handshake"] and t["closed"] and not (t["rst_out"] or t["rst_in"])
        del fl["_fin_end"], fl["_max_ack"]
        if fl["proto"] not in ("ICMP", "ICMPv6"):
            del fl["icmp_types_out"], fl["icmp_types_in"]
        result.append(fl)
    info.update({"frames": frames,
                 "ip_packets": frames - sum(nonip.values()),
                 "non_ip_frames": nonip, "non_ip_frame_numbers": nonip_frames,
                 "bad_checksums": bad_csum,
                 "flows": result})
    return info


# ---------------------------------------------------------------- output

def _ep(addr, port):
    if port is None:
        return addr
    return ("[%s]:%d" % (addr, port)) if ":" in addr else ("%s:%d" % (addr, port))


def _tcp_note(fl):
    t = fl["tcp"]
    if t is None:
        if fl["proto"] in ("ICMP", "ICMPv6"):
            return "types out %s / in %s" % (
                ",".join(map(str, fl["icmp_types_out"])) or "-",
                ",".join(map(str, fl["icmp_types_in"])) or "-")
        return ""
    parts = ["SYN %d/%d" % (t["syn_out"], t["syn_in"]),
             "SYN-ACK %d/%d" % (t["synack_out"], t["synack_in"]),
             "FIN %d/%d" % (t["fin_out"], t["fin_in"]),
             "RST %d/%d" % (t["rst_out"], t["rst_in"])]
    parts.append("complete" if t["complete"] else "INCOMPLETE")
    return ", ".join(parts)


def _nonip_text(info):
    if not info["non_ip_frames"]:
        return "none"
    return "%s (frame numbers %s)" % (
        ", ".join("%s: %d" % kv for kv in sorted(info["non_ip_frames"].items())),
        ", ".join(str(n) for n in info["non_ip_frame_numbers"]))


def print_text(info):
    print("%s: %s, linktype %s%s, %d frames (%d IP), non-IP: %s, bad checksums: %d%s" % (
        info["file"], info["format"],
        ",".join("%d (%s)" % (l, LINKTYPE_NAMES.get(l, "?")) for l in info["linktypes"]),
        (", interfaces " + ",".join(str(i) for i in info["interfaces"])) if info.get("interfaces") else "",
        info["frames"], info["ip_packets"], _nonip_text(info), info["bad_checksums"],
        ", TRUNCATED" if info["truncated"] else ""))
    for fl in info["flows"]:
        print("  %-6s %-7s %s -> %s  pkts out/in %d/%d  ip bytes out/in %d/%d  payload out/in %d/%d  %s" % (
            fl["proto"], "outbound" if fl["initiator"] == "local" else "inbound",
            _ep(fl["local_addr"], fl["local_port"]), _ep(fl["remote_addr"], fl["remote_port"]),
            fl["packets_out"], fl["packets_in"], fl["ip_bytes_out"], fl["ip_bytes_in"],
            fl["payload_out"], fl["payload_in"], _tcp_note(fl)))


def print_markdown(info):
    name = info["file"].rsplit("/", 1)[-1]
    print("#### `%s`" % name)
    print()
    print("%s, link type %s%s; %d frames, %d IP packets; non-IP frames: %s; bad checksums: %d." % (
        info["format"],
        ", ".join("%d (%s)" % (l, LINKTYPE_NAMES.get(l, "?")) for l in info["linktypes"]),
        ("; interface name(s) in IDB: " + ", ".join("`%s`" % i for i in info["interfaces"]))
        if info.get("interfaces") else "",
        info["frames"], info["ip_packets"], _nonip_text(info), info["bad_checksums"]))
    print()
    print("| # | proto | dir | local | remote | pkts out | pkts in | IP bytes out | IP bytes in | payload out | payload in | notes |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for i, fl in enumerate(info["flows"], 1):
        print("| %d | %s | %s | %s | %s | %d | %d | %d | %d | %d | %d | %s |" % (
            i, fl["proto"], "outbound" if fl["initiator"] == "local" else "inbound",
            _ep(fl["local_addr"], fl["local_port"]), _ep(fl["remote_addr"], fl["remote_port"]),
            fl["packets_out"], fl["packets_in"], fl["ip_bytes_out"], fl["ip_bytes_in"],
            fl["payload_out"], fl["payload_in"], _tcp_note(fl)))
    print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--local", action="append",
                    help="a local address (repeatable; default %s)" % ", ".join(DEFAULT_LOCAL))
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--markdown", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 unless every TCP flow is complete, no checksum is bad, "
                         "and the file is not truncated")
    args = ap.parse_args(argv)
    local = set(str(ipaddress.ip_address(a)) for a in (args.local or DEFAULT_LOCAL))
    infos = [analyse(f, local) for f in args.files]
    if args.json:
        json.dump(infos if len(infos) > 1 else infos[0], sys.stdout, indent=1)
        print()
    elif args.markdown:
        for info in infos:
            print_markdown(info)
    else:
        for info in infos:
            print_text(info)
    if args.check:
        ok = True
        for info in infos:
            problems = []
            if info["truncated"]:
                problems.append("truncated")
            if info["bad_checksums"]:
                problems.append("%d bad checksums" % info["bad_checksums"])
            for fl in info["flows"]:
                if fl["tcp"] is not None and not fl["tcp"]["complete"]:
                    problems.append("incomplete TCP flow %s -> %s" % (
                        _ep(fl["local_addr"], fl["local_port"]),
                        _ep(fl["remote_addr"], fl["remote_port"])))
            if problems:
                ok = False
                print("CHECK FAILED %s: %s" % (info["file"], "; ".join(problems)), file=sys.stderr)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
