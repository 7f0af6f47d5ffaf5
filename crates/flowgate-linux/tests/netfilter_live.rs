//! Live tests of [`flowgate_linux::netfilter`]: the chains are really installed with
//! iptables-restore and removed again, each test in its own network namespace (`fgnf-<pid>-<n>`,
//! deleted at the end even when the test fails), so the host's rules are never touched.
//!
//! They need root; without it each test says so and passes without doing anything.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use flowgate_linux::marks;
use flowgate_linux::netfilter::{self, CHAIN_FWD, CHAIN_IN, CHAIN_OUT, ChainSpec, Family, NetfilterError, Step, Tools};

mod common;
use common::{Netns, cmd, root};

/// How long a datagram or an answer is waited for.
const WAIT: Duration = Duration::from_millis(300);

/// `iptables-save` output without the tables that hold no rule and only `ACCEPT` policies: such
/// a table filters nothing, and installing and removing leaves one (filter, mangle) in a
/// namespace where the table did not exist before (iptables cannot delete a table).
fn without_empty_tables(saved: &str) -> String {
    let mut out = Vec::new();
    let mut table: Vec<&str> = Vec::new();
    for line in saved.lines() {
        table.push(line);
        if line == "COMMIT" {
            let empty = table.iter().all(|l| {
                l.starts_with('*')
                    || *l == "COMMIT"
                    || (l.starts_with(':') && l.split_whitespace().nth(1) == Some("ACCEPT"))
            });
            if !empty {
                out.append(&mut table);
            }
            table.clear();
        }
    }
    out.append(&mut table);
    out.join("\n")
}

const BUILTINS: [(&str, &str); 3] = [("OUTPUT", CHAIN_OUT), ("INPUT", CHAIN_IN), ("FORWARD", CHAIN_FWD)];

/// A namespace of its own (`fgnf-<pid>-<n>`), empty: no rules, loopback down.
fn netns() -> Netns {
    Netns::new("fgnf")
}

fn tool(ipv6: bool, name: &str) -> String {
    if ipv6 { name.replacen("iptables", "ip6tables", 1) } else { name.to_owned() }
}

/// `iptables-save` (or the IPv6 one) without comments, chain counters and empty tables.
fn save(ipv6: bool) -> String {
    let saved = cmd(&tool(ipv6, "iptables-save"), &[])
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(counters)) => &l[..counters],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    without_empty_tables(&saved)
}

fn saves() -> [String; 2] {
    [save(false), save(true)]
}

/// The rules of one chain, as `-A CHAIN …` lines.
fn rules(ipv6: bool, chain: &str) -> Vec<String> {
    cmd(&tool(ipv6, "iptables"), &["-w", "-t", "filter", "-S", chain])
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}

/// Asserts the namespace's rules are back to `before`. The one difference allowed: where there
/// was no filter or mangle table, an empty one is left (iptables cannot delete a table).
fn assert_restored(before: &[String; 2]) {
    for (ipv6, before) in [false, true].into_iter().zip(before) {
        let after = save(ipv6);
        assert_eq!(&after, before, "rules not restored (IPv6: {ipv6})");
    }
}

/// Asserts flowgate's chains hold exactly the rules of `spec` and each jump is rule 1 of its
/// built-in chain, once, for both families.
fn assert_installed(spec: &ChainSpec) {
    for ipv6 in [false, true] {
        let text = netfilter::ruleset_text(spec, ipv6);
        for (builtin, chain) in BUILTINS {
            let builtin_rules = rules(ipv6, builtin);
            assert_eq!(builtin_rules.first(), Some(&format!("-A {builtin} -j {chain}")), "IPv6: {ipv6}");
            assert_eq!(builtin_rules.iter().filter(|r| r.contains("FLOWGATE")).count(), 1, "IPv6: {ipv6}");
            let prefix = format!("-A {chain} ");
            let expected: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            assert!(expected.len() >= 10);
            assert_eq!(rules(ipv6, chain), expected, "IPv6: {ipv6}");
        }
    }
}

/// Gives the namespace some rules of its own, in both families: a policy, a chain of its own,
/// rules in OUTPUT and INPUT.
fn add_host_rules() {
    for ipv6 in [false, true] {
        let iptables = tool(ipv6, "iptables");
        for args in [
            &["-P", "FORWARD", "DROP"][..],
            &["-N", "HOST-LOG"],
            &["-A", "HOST-LOG", "-p", "udp", "--dport", "514", "-j", "ACCEPT"],
            &["-A", "OUTPUT", "-p", "tcp", "--dport", "25", "-j", "DROP"],
            &["-A", "OUTPUT", "-j", "HOST-LOG"],
            &["-A", "INPUT", "-p", "tcp", "--dport", "22", "-m", "comment", "--comment", "host ssh", "-j", "ACCEPT"],
            &["-A", "INPUT", "-p", "udp", "-j", "DROP"],
        ] {
            cmd(&iptables, args);
        }
    }
}

fn spec(queues: std::ops::RangeInclusive<u16>, fail_open: bool, loopback: bool) -> ChainSpec {
    ChainSpec { queues, fail_open, loopback, packet: netfilter::PacketChains::none(), statics: Default::default() }
}

#[test]
fn install_then_remove_in_an_empty_namespace() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let before = saves();
        assert_eq!(before, [String::new(), String::new()], "a new namespace has no rules");
        let spec = spec(0..=1, true, false);
        let installed = netfilter::install(&spec, &Tools::default()).expect("install");
        assert!(!installed.removed_leftovers());
        assert_installed(&spec);
        installed.remove().expect("remove");
        assert_restored(&before);
        assert!(!netfilter::cleanup(&Tools::default()).expect("cleanup"), "nothing left to clean");
    });
}

#[test]
fn install_then_remove_keeps_host_rules_in_place() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        assert!(before[0].contains("-A OUTPUT -p tcp -m tcp --dport 25 -j DROP"), "{}", before[0]);
        let host_rules = |ipv6: bool| BUILTINS.map(|(builtin, _)| rules(ipv6, builtin));
        let host_before = [host_rules(false), host_rules(true)];

        for spec in [spec(2..=5, false, true), spec(7..=7, true, false)] {
            let installed = netfilter::install(&spec, &Tools::default()).expect("install");
            assert_installed(&spec);
            for (ipv6, host_before) in [false, true].into_iter().zip(&host_before) {
                // The host's rules follow flowgate's jump, unchanged and in the same order ...
                let now = host_rules(ipv6);
                for (now, was) in now.iter().zip(host_before) {
                    assert_eq!(&now[1..], &was[..], "IPv6: {ipv6}");
                }
                // ... and nothing else of the host's changed either.
                let installed_save = save(ipv6);
                let without_flowgate: Vec<&str> = installed_save.lines().filter(|l| !l.contains("FLOWGATE")).collect();
                assert_eq!(
                    without_empty_tables(&without_flowgate.join("\n")),
                    before[usize::from(ipv6)],
                    "IPv6: {ipv6}"
                );
            }
            installed.remove().expect("remove");
            assert_eq!(saves(), before);
        }
    });
}

#[test]
fn cleanup_removes_what_a_killed_instance_left() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        let tools = Tools::default();
        // A killed daemon never removes its chains.
        std::mem::forget(netfilter::install(&spec(0..=3, false, false), &tools).expect("install"));
        assert!(saves()[0].contains("FLOWGATE") && saves()[1].contains("FLOWGATE"));
        assert!(netfilter::cleanup(&tools).expect("cleanup"), "leftovers found");
        assert_eq!(saves(), before);
        assert!(!netfilter::cleanup(&tools).expect("second cleanup"), "nothing found the second time");
        assert_eq!(saves(), before);
    });
}

#[test]
fn install_after_a_killed_instance_replaces_its_chains() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        let tools = Tools::default();
        std::mem::forget(netfilter::install(&spec(0..=3, false, false), &tools).expect("first install"));
        let spec = spec(4..=4, true, true);
        let installed = netfilter::install(&spec, &tools).expect("second install");
        assert!(installed.removed_leftovers());
        assert_installed(&spec);
        installed.remove().expect("remove");
        assert_eq!(saves(), before);
    });
}

#[test]
fn remove_deletes_every_copy_of_the_jumps() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        let installed = netfilter::install(&spec(0..=0, true, false), &Tools::default()).expect("install");
        // Someone copies a jump further down.
        cmd("iptables", &["-A", "OUTPUT", "-j", CHAIN_OUT]);
        cmd("ip6tables", &["-I", "INPUT", "3", "-j", CHAIN_IN]);
        installed.remove().expect("remove");
        assert_eq!(saves(), before);
    });
}

#[test]
fn dropping_installed_removes_the_chains() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        drop(netfilter::install(&spec(0..=0, false, false), &Tools::default()).expect("install"));
        assert_eq!(saves(), before);
    });
}

#[test]
fn failed_ipv6_install_rolls_back_ipv4() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        add_host_rules();
        let before = saves();
        let tools = Tools { ip6tables_restore: "/bin/false".into(), ..Default::default() };
        let err = netfilter::install(&spec(0..=1, true, false), &tools).expect_err("install must fail");
        let message = err.to_string();
        eprintln!("install failed as expected: {message}");
        assert!(message.contains("IPv6"), "{message}");
        assert!(matches!(err, NetfilterError::Failed { family: Family::Ipv6, step: Step::Installing, .. }), "{err:?}");
        assert!(!save(false).contains("FLOWGATE"), "IPv4 rolled back");
        assert_eq!(saves(), before);
    });
}

#[test]
fn failed_ipv6_install_in_an_empty_namespace_leaves_no_trace() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let before = saves();
        let tools = Tools { ip6tables_restore: "/bin/false".into(), ..Default::default() };
        let message = netfilter::install(&spec(0..=0, false, true), &tools).expect_err("must fail").to_string();
        assert!(message.starts_with("ip6tables-restore (IPv6, installing chains) failed with exit status 1"));
        assert!(!save(false).contains("FLOWGATE"));
        assert_restored(&before);
    });
}

/// Receives one datagram, waiting at most [`WAIT`]. A wait with a socket timeout is not
/// restarted after a signal or a stop and continue (EINTR), so it is resumed here.
fn recv_within_wait(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<usize> {
    let deadline = Instant::now() + WAIT;
    socket.set_read_timeout(Some(WAIT))?;
    loop {
        match socket.recv(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                socket.set_read_timeout(Some(left))?;
            }
            result => return result,
        }
    }
}

fn lo_up() {
    cmd("ip", &["link", "set", "lo", "up"]);
}

/// Sends one datagram to a fresh socket on `addr` and says whether it arrived within [`WAIT`].
fn datagram_arrives(addr: &str) -> bool {
    let receiver = UdpSocket::bind(format!("{addr}:0")).expect("bind receiver");
    let to = receiver.local_addr().expect("address");
    let sender = UdpSocket::bind(format!("{addr}:0")).expect("bind sender");
    sender.send_to(b"flowgate", to).expect("send: queueing with no listener drops silently");
    let mut buf = [0; 16];
    match recv_within_wait(&receiver, &mut buf) {
        Ok(n) => {
            assert_eq!(&buf[..n], b"flowgate");
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
        Err(e) => panic!("receiving: {e}"),
    }
}

#[test]
fn fail_open_passes_packets_while_no_one_listens() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        lo_up();
        let installed = netfilter::install(&spec(0..=0, true, true), &Tools::default()).expect("install");
        assert!(datagram_arrives("127.0.0.1"), "IPv4 datagram bypasses the unbound queue");
        assert!(datagram_arrives("[::1]"), "IPv6 datagram bypasses the unbound queue");
        installed.remove().expect("remove");
    });
}

#[test]
fn fail_closed_drops_packets_while_no_one_listens() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        lo_up();
        let installed = netfilter::install(&spec(0..=0, false, true), &Tools::default()).expect("install");
        assert!(!datagram_arrives("127.0.0.1"), "IPv4 datagram dropped at the unbound queue");
        assert!(!datagram_arrives("[::1]"), "IPv6 datagram dropped at the unbound queue");
        installed.remove().expect("remove");
        assert!(datagram_arrives("127.0.0.1"), "IPv4 passes again after removal");
        assert!(datagram_arrives("[::1]"), "IPv6 passes again after removal");
    });
}

/// What became of a datagram sent on a connected socket, or of a TCP connection attempt.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Delivered,
    Refused,
    /// Neither delivered nor answered within [`WAIT`].
    Lost,
}

fn io_fate(e: &io::Error) -> Fate {
    match e.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Fate::Refused,
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::PermissionDenied => Fate::Lost,
        _ => panic!("unexpected error: {e}"),
    }
}

fn udp_fate(receiver: &UdpSocket) -> Fate {
    let to = receiver.local_addr().expect("address");
    let sender = UdpSocket::bind(SocketAddr::new(to.ip(), 0)).expect("bind sender");
    sender.connect(to).expect("connect");
    // A packet dropped on the way out (REJECT or DROP in OUTPUT) fails the send with EPERM; a
    // REJECT's ICMP answer then arrives as ECONNREFUSED on the next receive.
    let _ = sender.send(b"flowgate");
    let mut buf = [0; 16];
    if recv_within_wait(receiver, &mut buf).is_ok() {
        return Fate::Delivered;
    }
    match recv_within_wait(&sender, &mut buf) {
        Ok(_) => panic!("nothing answers on UDP"),
        Err(e) => io_fate(&e),
    }
}

fn tcp_fate(listener: &TcpListener) -> Fate {
    match TcpStream::connect_timeout(&listener.local_addr().expect("address"), WAIT) {
        Ok(_) => Fate::Delivered,
        Err(e) => io_fate(&e),
    }
}

/// Marks every packet to `port` in the mangle table, before the filter table sees it, as the
/// daemon's verdict would: the conntrack mark with target `CONNMARK`, the packet mark with `MARK`.
fn mark_port(ipv6: bool, proto: &str, port: u16, target: &str, mark: u32) {
    let mark = format!("{mark:#x}/{:#x}", marks::MASK);
    let port = port.to_string();
    let args = ["-t", "mangle", "-A", "OUTPUT", "-p", proto, "--dport", &port, "-j", target, "--set-xmark", &mark];
    cmd(&tool(ipv6, "iptables"), &args);
}

#[test]
fn decided_marks_act_without_the_daemon() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        lo_up();
        // Fail closed, nothing bound to the queue: only the marks let anything through.
        let installed = netfilter::install(&spec(0..=0, false, true), &Tools::default()).expect("install");
        for (ipv6, addr) in [(false, "127.0.0.1:0"), (true, "[::1]:0")] {
            let udp = || UdpSocket::bind(addr).expect("bind");
            let (allowed, rejected, dropped, undecided, mark_rejected) = (udp(), udp(), udp(), udp(), udp());
            let tcp_rejected = TcpListener::bind(addr).expect("listen");
            let tcp_allowed = TcpListener::bind(addr).expect("listen");
            let port = |a: io::Result<SocketAddr>| a.expect("address").port();
            mark_port(ipv6, "udp", port(allowed.local_addr()), "CONNMARK", marks::ALLOW);
            mark_port(ipv6, "udp", port(rejected.local_addr()), "CONNMARK", marks::REJECT);
            mark_port(ipv6, "udp", port(dropped.local_addr()), "CONNMARK", marks::DROP);
            mark_port(ipv6, "udp", port(mark_rejected.local_addr()), "MARK", marks::REJECT);
            mark_port(ipv6, "tcp", port(tcp_rejected.local_addr()), "CONNMARK", marks::REJECT);
            mark_port(ipv6, "tcp", port(tcp_allowed.local_addr()), "CONNMARK", marks::ALLOW);

            assert_eq!(udp_fate(&allowed), Fate::Delivered, "allowed UDP, IPv6: {ipv6}");
            assert_eq!(tcp_fate(&tcp_allowed), Fate::Delivered, "allowed TCP, IPv6: {ipv6}");
            // The port unreachable and the reset carry the rejected flow's conntrack mark and
            // still get through.
            assert_eq!(udp_fate(&rejected), Fate::Refused, "rejected UDP, IPv6: {ipv6}");
            assert_eq!(tcp_fate(&tcp_rejected), Fate::Refused, "rejected TCP, IPv6: {ipv6}");
            assert_eq!(udp_fate(&dropped), Fate::Lost, "dropped UDP, IPv6: {ipv6}");
            assert_eq!(udp_fate(&undecided), Fate::Lost, "undecided UDP, IPv6: {ipv6}");
            // A verdict's packet mark alone (what the daemon sets where the kernel cannot set
            // the conntrack mark from user space) is saved to the conntrack mark by the chain's
            // first rule, so the flow is rejected and its answer gets through like any other.
            assert_eq!(udp_fate(&mark_rejected), Fate::Refused, "packet-mark rejected UDP, IPv6: {ipv6}");
            let counters = cmd(&tool(ipv6, "iptables"), &["-w", "-v", "-x", "-n", "-L", CHAIN_OUT]);
            let saved = counters
                .lines()
                .find(|l| l.contains("CONNMARK") && l.contains("save"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok());
            assert!(
                saved.is_some_and(|n| n >= 1),
                "the save-mark rule saw the marked packet, IPv6: {ipv6}\n{counters}"
            );
        }
        installed.remove().expect("remove");
    });
}

/// The conntrack marks of the entries to `port`, as `conntrack -L` shows them.
fn conntrack_marks(ipv6: bool, proto: &str, port: u16) -> Vec<u32> {
    let family = if ipv6 { "ipv6" } else { "ipv4" };
    cmd("conntrack", &["-L", "-f", family, "-p", proto, "--dport", &port.to_string()])
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("mark=")))
        .filter_map(|m| m.parse().ok())
        .collect()
}

fn flowgate_sets() -> Vec<String> {
    cmd("ipset", &["list", "-n"]).lines().filter(|l| l.starts_with("flowgate-")).map(str::to_owned).collect()
}

#[test]
fn static_rules_decide_first_packets_in_the_kernel_and_a_reload_swaps_them() {
    use flowgate_linux::static_rules::{StaticHook, StaticProtocol, StaticRule, StaticRules, StaticVerdict};
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        lo_up();
        let before = saves();
        for ipv6 in [false, true] {
            let addr = if ipv6 { "[::1]:0" } else { "127.0.0.1:0" };
            let udp = || UdpSocket::bind(addr).expect("bind");
            let (allowed, dropped, undecided) = (udp(), udp(), udp());
            let (tcp_allowed, tcp_rejected) =
                (TcpListener::bind(addr).expect("listen"), TcpListener::bind(addr).expect("listen"));
            let port = |a: io::Result<SocketAddr>| a.expect("address").port();
            // Several networks per family: the remote end is matched in an ipset.
            let nets = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "2001:db8::/32"].map(|n| n.parse().expect("net"));
            let rule = |id, verdict, protocol, p: u16| StaticRule {
                protocol,
                remote: nets.to_vec(),
                remote_ports: vec![(p, p)],
                interface: Some("lo".into()),
                ..StaticRule::new(id, StaticHook::Output, verdict)
            };
            let statics = |generation, allowed_verdict| StaticRules {
                rules: vec![
                    rule(1, allowed_verdict, StaticProtocol::Udp, port(allowed.local_addr())),
                    rule(2, StaticVerdict::Allow, StaticProtocol::Tcp, port(tcp_allowed.local_addr())),
                    rule(3, StaticVerdict::Reject, StaticProtocol::Any, port(tcp_rejected.local_addr())),
                    rule(4, StaticVerdict::Drop, StaticProtocol::Udp, port(dropped.local_addr())),
                ],
                log_group: 3,
                generation,
            };
            // Fail closed and nothing bound to the queue: what passes was decided in the kernel.
            let mut spec = spec(0..=0, false, true);
            spec.statics = statics(1, StaticVerdict::Allow);
            let tools = Tools::default();
            let installed = netfilter::install(&spec, &tools).expect("install");
            let mut sets = flowgate_sets();
            sets.sort();
            let expected: Vec<String> =
                (1..=4).flat_map(|id| [format!("flowgate-1-{id}r4"), format!("flowgate-1-{id}r6")]).collect();
            assert_eq!(sets, expected);
            assert_eq!(udp_fate(&allowed), Fate::Delivered, "static allow, IPv6: {ipv6}");
            assert_eq!(tcp_fate(&tcp_allowed), Fate::Delivered, "static TCP allow, IPv6: {ipv6}");
            assert_eq!(tcp_fate(&tcp_rejected), Fate::Refused, "static reject, IPv6: {ipv6}");
            assert_eq!(udp_fate(&dropped), Fate::Lost, "static drop, IPv6: {ipv6}");
            assert_eq!(udp_fate(&undecided), Fate::Lost, "no static rule: queued, and no one reads, IPv6: {ipv6}");
            // The conntrack entry of an allowed flow names the rule that decided it.
            let allowed_port = port(allowed.local_addr());
            assert_eq!(conntrack_marks(ipv6, "udp", allowed_port), vec![marks::ALLOW | marks::rule(1)], "IPv6: {ipv6}");
            assert_eq!(
                conntrack_marks(ipv6, "tcp", port(tcp_allowed.local_addr())),
                vec![marks::ALLOW | marks::rule(2)],
                "IPv6: {ipv6}"
            );
            // A reload turns the allow into a drop: the next new flow is dropped in the kernel,
            // and the old generation's sets are gone.
            cmd("conntrack", &["-F"]);
            spec.statics = statics(2, StaticVerdict::Drop);
            netfilter::replace_rules(&spec, &tools).expect("replace");
            assert_eq!(udp_fate(&allowed), Fate::Lost, "reloaded to drop, IPv6: {ipv6}");
            assert_eq!(tcp_fate(&tcp_allowed), Fate::Delivered, "unchanged rule, IPv6: {ipv6}");
            let sets = flowgate_sets();
            assert!(!sets.is_empty() && sets.iter().all(|s| s.starts_with("flowgate-2-")), "{sets:?}");
            installed.remove().expect("remove");
            assert!(flowgate_sets().is_empty(), "sets removed with the chains");
            assert_restored(&before);
            cmd("conntrack", &["-F"]);
        }
    });
}
