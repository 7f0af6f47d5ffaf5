"""Community ID reference values (used by tests/event_formats.rs).

Reads lines "PROTO SADDR DADDR SPORT DPORT" on stdin (for ICMP and ICMPv6, SPORT and DPORT are
the message type and code; for protocols without ports they are "-") and prints the Community
ID (v1, seed 0, base64) of each, computed by the reference implementation (PyPI `communityid`).
"""
import sys

import communityid

cid = communityid.CommunityID(seed=0)
for line in sys.stdin:
    proto, saddr, daddr, sport, dport = line.split()
    proto = int(proto)
    if proto == 6:
        t = communityid.FlowTuple.make_tcp(saddr, daddr, int(sport), int(dport))
    elif proto == 17:
        t = communityid.FlowTuple.make_udp(saddr, daddr, int(sport), int(dport))
    elif proto == 132:
        t = communityid.FlowTuple.make_sctp(saddr, daddr, int(sport), int(dport))
    elif proto == 1:
        t = communityid.FlowTuple.make_icmp(saddr, daddr, int(sport), int(dport))
    elif proto == 58:
        t = communityid.FlowTuple.make_icmp6(saddr, daddr, int(sport), int(dport))
    else:
        t = communityid.FlowTuple.make_ip(saddr, daddr, proto)
    print(cid.calc(t))
