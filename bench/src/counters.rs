//! The kernel's TCP counters in a lab namespace, for the live benchmarks (`src/bin/live.rs`,
//! `src/bin/verdicts.rs`, `src/bin/flows.rs`): `TcpExt` of `/proc/net/netstat` (SYN
//! retransmissions, listen queue overflows) and `Tcp` of `/proc/net/snmp` (retransmitted
//! segments), read before and after what they measure.
//!
//! It only reads: `cat` of those files through `ip netns exec` in the namespace given.

use crate::lab::Netns;

type Result<T> = std::result::Result<T, String>;

/// A `TcpExt` counter of `/proc/net/netstat` in `ns` (e.g. `TCPSynRetrans`).
pub fn tcp_ext(ns: &Netns, name: &str) -> Result<u64> {
    mib_counter(ns, "/proc/net/netstat", "TcpExt", name)
}

/// A `Tcp` counter of `/proc/net/snmp` in `ns` (e.g. `RetransSegs`).
pub fn tcp(ns: &Netns, name: &str) -> Result<u64> {
    mib_counter(ns, "/proc/net/snmp", "Tcp", name)
}

/// Counter `name` of section `section` of `file` (a line of names, then a line of values, both
/// starting with `section:`), read in `ns`.
fn mib_counter(ns: &Netns, file: &str, section: &str, name: &str) -> Result<u64> {
    let o = ns.run(&["cat", file]);
    let text = String::from_utf8_lossy(&o.stdout);
    let prefix = format!("{section}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    if let (Some(names), Some(values)) = (lines.next(), lines.next())
        && let Some((_, v)) = names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == name)
    {
        return v.parse().map_err(|e| format!("{file} {section} {name} = {v:?}: {e}"));
    }
    Err(format!("no {section} {name} in {file} of {}", ns.name))
}
