//! # flowgate-linux
//!
//! The Linux data plane of flowgate: everything that talks to the kernel, and nothing that
//! decides. The engine (`flowgate-core`) judges; this crate moves packets and verdicts between
//! the kernel and the engine.
//!
//! - [`nfqueue`]: NFQUEUE over a raw netlink socket: bind a queue, receive packets with their
//!   hook, interfaces and conntrack state, send batched verdicts that can set the conntrack mark.
//! - [`nflog`]: NFLOG over a raw netlink socket: bind a log group and receive what the kernel
//!   logs to it (prefix, interfaces, the start of the packet), so flows that rules drop in the
//!   kernel are still logged.
//! - [`netfilter`]: the iptables/ip6tables chains flowgate installs and removes (atomically, with
//!   rollback), and the cleanup of what a dead instance left.
//! - [`conntrack`]: conntrack over netlink: end-of-flow events with counters, dumps, mark
//!   updates and deletion of entries.
//! - [`sockdiag`]: local TCP and UDP sockets: list them, destroy one to cut its connection at once.
//! - [`procinfo`]: a process's identity from `/proc` (executable, command line, parent, owner,
//!   start time, cgroup and systemd unit), user names from `/etc/passwd`.
//! - [`socket_owner`]: the process that holds a flow's socket, found through sock_diag and
//!   `/proc/*/fd`: how a flow is attributed when the kernel-side capture is not there.
//! - [`static_rules`]: the rules the kernel decides alone: flowgate's static chains and ipsets.
//! - [`ifname`]: interface index → name, cached.
//! - [`bpf`]: the `bpf()` syscall, as far as `flowgate check` probes it (load a no-op program,
//!   attach it to a raw tracepoint).
//! - [`owner_bpf`]: kernel-side process attribution: BPF programs (C, `bpf/owner.bpf.c`, loaded
//!   with aya) record the owning process of every new outbound TCP/UDP flow and bound socket, and
//!   exec'd processes, before the first packet leaves; lookups by flow, local end or pid.
//! - `netlink` (private): the netlink framing of nfqueue, nflog, conntrack and sockdiag, written
//!   by hand.

pub mod bpf;
pub mod conntrack;
pub mod ifname;
pub mod netfilter;
mod netlink;
pub mod nflog;
pub mod nfqueue;
pub mod owner_bpf;
pub mod procinfo;
pub mod sockdiag;
pub mod socket_owner;
pub mod static_rules;

/// The mark bits flowgate owns, on packets and on conntrack entries. A decided flow carries its
/// verdict in its conntrack mark, and the installed chains act on it without asking user space;
/// a packet that gets a drop verdict also carries it in its packet mark, so the chains can reject
/// it even when it has no conntrack entry. Beside the verdict, the mark names the queue worker
/// that owns the flow: the chains queue an owned flow's packets to its owner, and conntrack's
/// reports on it go to that worker alone. A flow a static rule decided in the kernel carries the
/// rule's id instead of an owner. Other bits of both marks (the low 16) are left alone.
pub mod marks {
    /// The verdict bits.
    pub const VERDICT: u32 = 0x0003_0000;
    /// Decided: allowed. The chains let the flow through to the host's own rules.
    pub const ALLOW: u32 = 0x0001_0000;
    /// Decided: dropped, and the sender is told (TCP reset, ICMP unreachable).
    pub const REJECT: u32 = 0x0002_0000;
    /// Decided: dropped silently.
    pub const DROP: u32 = 0x0003_0000;
    /// The owning worker's index plus one (0: no owner).
    pub const OWNER: u32 = 0x007c_0000;
    const OWNER_SHIFT: u32 = 18;
    /// Most workers the owner bits can name.
    pub const MAX_OWNERS: usize = 31;
    /// The id of the static rule that decided the flow in the kernel (0: none; see
    /// [`crate::static_rules`]).
    pub const RULE: u32 = 0xff80_0000;
    const RULE_SHIFT: u32 = 23;
    /// Most static rule ids the rule bits can name.
    pub const MAX_RULE_IDS: u16 = 511;
    /// All of flowgate's bits.
    pub const MASK: u32 = VERDICT | OWNER | RULE;

    /// The rule bits of static rule `id` (1 to [`MAX_RULE_IDS`]).
    pub const fn rule(id: u16) -> u32 {
        ((id as u32) << RULE_SHIFT) & RULE
    }

    /// The static rule a mark names.
    pub const fn rule_of(mark: u32) -> Option<u16> {
        match (mark & RULE) >> RULE_SHIFT {
            0 => None,
            n => Some(n as u16),
        }
    }

    /// The owner bits of worker `index` (below [`MAX_OWNERS`]).
    pub const fn owner(index: usize) -> u32 {
        ((index as u32 + 1) << OWNER_SHIFT) & OWNER
    }

    /// The worker a mark names as owner.
    pub const fn owner_of(mark: u32) -> Option<usize> {
        match (mark & OWNER) >> OWNER_SHIFT {
            0 => None,
            n => Some(n as usize - 1),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn owners_round_trip_and_stay_in_their_bits() {
            assert_eq!(owner_of(0), None);
            assert_eq!(owner_of(ALLOW), None);
            for i in 0..MAX_OWNERS {
                assert_eq!(owner(i) & !OWNER, 0);
                assert_eq!(owner_of(owner(i) | REJECT | 0xff), Some(i));
            }
        }

        #[test]
        fn rule_ids_round_trip_and_stay_in_their_bits() {
            assert_eq!(rule_of(ALLOW | owner(3)), None);
            for id in 1..=MAX_RULE_IDS {
                assert_eq!(rule(id) & !RULE, 0);
                assert_eq!(rule_of(rule(id) | DROP | owner(30) | 0xffff), Some(id));
            }
            assert_eq!(MASK, 0xffff_0000);
        }
    }
}
