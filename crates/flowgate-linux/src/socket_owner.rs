//! The process behind a flow, found from user space: the flow's socket by its ends through
//! sock_diag ([`crate::sockdiag`]), then the process that holds that socket through the
//! `socket:[inode]` links of `/proc/*/fd`. This is how flows are attributed when the kernel-side
//! capture (BPF) is not available; it sees the socket only while it exists, so a flow whose
//! socket has closed already (a short UDP exchange, a connection refused) is not attributed.
//!
//! This room owns one sock_diag socket of the calling thread's network namespace (so the
//! [`SocketOwners`] must be made in the namespace whose flows it attributes) and reads `/proc`;
//! it changes nothing.
//!
//! Which socket: the kernel's own lookup by the flow's ends ([`SockDiag::find_receiver`]), which
//! gives the connection with these ends, else the TCP listener on the local port, else the
//! unconnected UDP socket bound to the local port (on the local address or the unspecified one).
//! For an outbound flow that is the socket that sent it (connected, or the unconnected UDP socket
//! whose replies come back to it); for an inbound TCP flow whose SYN is still queued it is the
//! listener, since the connection's socket does not exist yet. A TCP connection that has a socket
//! but no file (still in the listener's accept queue, or in `TIME_WAIT`: inode 0) is given to the
//! listener on its local port too, if there is one.
//!
//! Which process: the links of every process's `fd` directory are read into an index inode →
//! (pid, fd). Only processes are read, not their threads (`/proc/<pid>/task/*`), which share the
//! process's file table; the pid is the process's (thread group) id. A socket held by several
//! processes (inherited across a fork) goes to the one that started last (highest `starttime`,
//! then highest pid): after a fork and exec it is the new program that uses the socket, and a
//! server that forks workers hands them its listener, the workers being the ones that accept.
//!
//! The index is built by a scan and trusted on a hit only after a check that the link still
//! names the socket (one `readlink`). A miss rescans, but not sooner than [`RESCAN_INTERVAL`]
//! (50 ms) after the last scan, nor sooner than ten times as long as the last scan took: misses
//! come in bursts (a new program's first flows, sockets without a process), and a scan reads
//! every open file of the host, so the limit keeps scanning under a tenth of a CPU whatever the
//! host's size. A miss within the limit reads only the processes that started since the last
//! scan (the pids `/proc` lists that it had not seen): a new program's first flow, the usual
//! miss, is found at the cost of one listing of `/proc` and that program's descriptors. (Without
//! this, a host starting a program every millisecond had 96% of such flows without a process.)
//!
//! Measured on the 2-CPU VM this was written on (Linux 6.18, release build, best of five): a scan
//! of this host's ~75 processes and ~400 open files takes 1.7 ms; with 9,000 more sockets in ten
//! more processes (9,470 files) 40 ms: about 4 µs per open file, nearly all of it the kernel's
//! `readlink` of `/proc/<pid>/fd/<n>`. So on a busy host (tens of thousands of open files) a
//! scan costs a tenth of a second or more, which is why it is rate-limited and why the index is
//! kept between misses. A warm lookup (the socket's lookup by its ends, the index hit and its
//! check) takes about 8 µs, up to 20 µs with other tests running beside it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sockdiag::{DiagError, SockDiag, SocketInfo, TCP, state};

/// The shortest time between two scans of `/proc` a miss makes; longer after a scan that took
/// more than a tenth of it (see the module doc).
pub const RESCAN_INTERVAL: Duration = Duration::from_millis(50);

/// The socket of a flow and its process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    /// The socket's inode (`socket:[inode]` in `/proc/<pid>/fd`).
    pub inode: u32,
    /// The socket's owner: the effective uid of the process that created it.
    pub uid: u32,
    /// The process (thread group id) that holds the socket; `None` when no process does (a
    /// socket only the kernel holds, or one whose process has just exited) or when it was not
    /// found within the rescan limit.
    pub pid: Option<u32>,
}

/// What a scan of `/proc` read, and how long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Processes whose `fd` directory was read.
    pub processes: usize,
    /// Links read in them.
    pub fds: usize,
    /// Links that name a socket.
    pub sockets: usize,
    pub took: Duration,
}

/// Where a socket was seen: a process and the descriptor there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    pid: u32,
    fd: u32,
}

/// Finds the process of a flow's socket; see the module doc. One per thread.
#[derive(Debug)]
pub struct SocketOwners {
    diag: SockDiag,
    proc_root: PathBuf,
    index: HashMap<u32, Holder>,
    /// The processes the index has read since the last full scan.
    known: std::collections::HashSet<u32>,
    last_scan: Option<Instant>,
    stats: Option<ScanStats>,
}

impl SocketOwners {
    /// Opens a sock_diag socket in the calling thread's network namespace; the first lookup
    /// that needs a process scans `/proc`.
    pub fn new() -> Result<SocketOwners, DiagError> {
        Ok(SocketOwners {
            diag: SockDiag::open()?,
            proc_root: PathBuf::from("/proc"),
            index: HashMap::new(),
            known: std::collections::HashSet::new(),
            last_scan: None,
            stats: None,
        })
    }

    /// The socket of the flow of `protocol` ([`TCP`] or [`UDP`]) between this host's end `local`
    /// and the remote end `remote`, and the process that holds it: the connected socket, else
    /// the TCP listener or the unconnected UDP socket on the local port (see the module doc).
    /// `None` when there is no such socket; a socket without a process comes with `pid: None`.
    /// IPv4-mapped addresses are taken as IPv4.
    pub fn lookup(
        &mut self,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<SocketOwner>, DiagError> {
        let Some(socket) = self.socket(protocol, local, remote)? else { return Ok(None) };
        let pid = self.pid_of(socket.inode);
        Ok(Some(SocketOwner { inode: socket.inode, uid: socket.uid, pid }))
    }

    /// The socket [`SocketOwners::lookup`] attributes the flow to.
    fn socket(&mut self, protocol: u8, local: SocketAddr, remote: SocketAddr) -> Result<Option<SocketInfo>, DiagError> {
        let found = self.diag.find_receiver(protocol, local, remote)?;
        match found {
            Some(s) if s.inode != 0 => Ok(Some(s)),
            // A connection without a file: in the accept queue or TIME_WAIT. Its listener, if any.
            Some(_) if protocol == TCP => {
                let any = SocketAddr::new(unspecified(local.ip()), 0);
                let listener = self.diag.find_receiver(TCP, local, any)?;
                Ok(listener.filter(|l| l.state == state::LISTEN && l.inode != 0))
            }
            Some(_) | None => Ok(None),
        }
    }

    /// The process that holds the socket with this inode: from the index if it is there and
    /// still true, else from a new scan if the last one is older than [`RESCAN_INTERVAL`] and ten
    /// times its own duration.
    pub fn pid_of(&mut self, inode: u32) -> Option<u32> {
        if let Some(holder) = self.index.get(&inode).copied() {
            if holds(&self.proc_root, holder, inode) {
                return Some(holder.pid);
            }
            self.index.remove(&inode);
        }
        let took = self.stats.map_or(Duration::ZERO, |s| s.took);
        if self.last_scan.is_some_and(|at| at.elapsed() < RESCAN_INTERVAL.max(took * 10)) {
            self.scan_new();
            return self.index.get(&inode).map(|h| h.pid);
        }
        self.rescan();
        self.index.get(&inode).map(|h| h.pid)
    }

    /// Scans `/proc` now, whatever the rate limit, and replaces the index.
    pub fn rescan(&mut self) -> ScanStats {
        let (index, known, stats) = scan(&self.proc_root, None);
        self.index = index;
        self.known = known;
        self.last_scan = Some(Instant::now());
        self.stats = Some(stats);
        stats
    }

    /// Adds the processes that started since the last scan to the index.
    fn scan_new(&mut self) {
        let (index, known, _) = scan(&self.proc_root, Some(&self.known));
        self.known.extend(known);
        for (inode, holder) in index {
            self.index.entry(inode).or_insert(holder);
        }
    }

    /// What the last scan read; `None` before the first.
    pub fn last_scan(&self) -> Option<ScanStats> {
        self.stats
    }

    /// The sock_diag socket, for other lookups in the same namespace.
    pub fn diag(&mut self) -> &mut SockDiag {
        &mut self.diag
    }
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The inode of a `socket:[inode]` link target; `None` for anything else.
fn socket_inode(target: &[u8]) -> Option<u32> {
    std::str::from_utf8(target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?).ok()?.parse().ok()
}

fn link_inode(path: &Path) -> Option<u32> {
    socket_inode(fs::read_link(path).ok()?.as_os_str().as_bytes())
}

/// Whether `holder`'s descriptor is still this socket.
fn holds(proc_root: &Path, holder: Holder, inode: u32) -> bool {
    let link = proc_root.join(holder.pid.to_string()).join("fd").join(holder.fd.to_string());
    link_inode(&link) == Some(inode)
}

/// Reads the socket links of every process under `proc_root` (but those in `skip`), and returns
/// them with the processes read. A process that exits during the scan, or whose `fd` directory
/// cannot be read, is skipped; so is every entry that is not a number.
fn scan(
    proc_root: &Path,
    skip: Option<&std::collections::HashSet<u32>>,
) -> (HashMap<u32, Holder>, std::collections::HashSet<u32>, ScanStats) {
    let start = Instant::now();
    let mut index: HashMap<u32, Holder> = HashMap::new();
    let mut known = std::collections::HashSet::new();
    let mut stats = ScanStats::default();
    // Start times, read only for the processes that share a socket.
    let mut started: HashMap<u32, Option<u64>> = HashMap::new();
    let Ok(processes) = fs::read_dir(proc_root) else { return (index, known, stats) };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if skip.is_some_and(|s| s.contains(&pid)) {
            continue;
        }
        known.insert(pid);
        let fd_dir = process.path().join("fd");
        // The links are read relative to the directory: no path walk from / for each.
        let (Ok(dir), Ok(fds)) = (fs::File::open(&fd_dir), fs::read_dir(&fd_dir)) else { continue };
        stats.processes += 1;
        for entry in fds.flatten() {
            stats.fds += 1;
            let name = entry.file_name();
            let Some(fd) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(target) = nix::fcntl::readlinkat(&dir, name.as_os_str()) else { continue };
            let Some(inode) = socket_inode(target.as_bytes()) else { continue };
            stats.sockets += 1;
            let holder = Holder { pid, fd };
            match index.entry(inode) {
                Entry::Vacant(slot) => {
                    slot.insert(holder);
                }
                Entry::Occupied(mut slot) => {
                    let other = slot.get().pid;
                    if other != pid && later(proc_root, &mut started, pid, other) {
                        slot.insert(holder);
                    }
                }
            }
        }
    }
    stats.took = start.elapsed();
    (index, known, stats)
}

/// Whether process `a` started after `b` (by `starttime`, then pid). A process whose start
/// cannot be read (gone) is taken as the earlier.
fn later(proc_root: &Path, started: &mut HashMap<u32, Option<u64>>, a: u32, b: u32) -> bool {
    let mut start_of = |pid: u32| {
        *started.entry(pid).or_insert_with(|| {
            let text = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
            start_ticks(&text)
        })
    };
    (start_of(a), a) > (start_of(b), b)
}

/// Field 22 of a `stat` line, counted after the last `)` (see [`crate::procinfo`]).
fn start_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_are_recognised() {
        assert_eq!(socket_inode(b"socket:[78531501]"), Some(78_531_501));
        assert_eq!(socket_inode(b"socket:[0]"), Some(0));
        for other in
            [&b"pipe:[123]"[..], b"/dev/null", b"anon_inode:[eventfd]", b"socket:[]", b"socket:[12", b"socket:[x]"]
        {
            assert_eq!(socket_inode(other), None, "{}", String::from_utf8_lossy(other));
        }
        assert_eq!(socket_inode(b"socket:[99999999999]"), None, "more than 32 bits");
    }

    #[test]
    fn start_ticks_is_field_22() {
        let line = "42 (a) b) S 7 42 42 0 -1 4194560 1000 0 0 0 5 3 0 0 20 0 1 0 123456 10000000 500\n";
        assert_eq!(start_ticks(line), Some(123_456));
        assert_eq!(start_ticks("42 (a) S 7"), None);
    }

    /// A process of a fake `/proc`: pid, start time, (fd, link target) pairs.
    type FakeProcess<'a> = (u32, u64, &'a [(u32, &'a str)]);

    /// A fake `/proc` with processes that hold links to given targets.
    fn fake_proc(name: &str, processes: &[FakeProcess<'_>]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("flowgate-socket-owner-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for &(pid, start, fds) in processes {
            let dir = root.join(pid.to_string());
            fs::create_dir_all(dir.join("fd")).unwrap();
            let stat = format!("{pid} (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n");
            fs::write(dir.join("stat"), stat).unwrap();
            for &(fd, target) in fds {
                std::os::unix::fs::symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
            }
        }
        // Not processes: skipped.
        fs::create_dir_all(root.join("self/fd")).unwrap();
        fs::write(root.join("uptime"), "1 1\n").unwrap();
        root
    }

    #[test]
    fn a_scan_indexes_sockets_and_gives_a_shared_one_to_the_latest_process() {
        let root = fake_proc(
            "scan",
            &[
                (10, 500, &[(0, "/dev/null"), (3, "socket:[1000]"), (4, "socket:[2000]"), (5, "pipe:[7]")]),
                (20, 900, &[(3, "socket:[1000]"), (7, "socket:[3000]")]),
                (30, 100, &[(9, "socket:[3000]"), (10, "socket:[4000]")]),
                (40, 900, &[(5, "socket:[1000]")]),
            ],
        );
        let (index, known, stats) = scan(&root, None);
        let pid = |inode| index.get(&inode).map(|h| h.pid);
        assert_eq!(known.len(), 4);
        // Only the processes not read yet: 30 and 40 (which then holds 1000 alone).
        let skip: std::collections::HashSet<u32> = [10, 20].into();
        let (newer, read, _) = scan(&root, Some(&skip));
        assert_eq!(read, [30, 40].into());
        assert_eq!(newer.get(&1000).map(|h| h.pid), Some(40));
        assert!(!newer.contains_key(&2000));
        // 1000: started 500, 900, 900: the latest, and of equals the higher pid.
        assert_eq!(
            (pid(1000), pid(2000), pid(3000), pid(4000), pid(5)),
            (Some(40), Some(10), Some(20), Some(30), None)
        );
        assert_eq!(index[&3000], Holder { pid: 20, fd: 7 });
        assert_eq!((stats.processes, stats.fds, stats.sockets), (4, 9, 7));
        assert!(holds(&root, index[&3000], 3000));
        assert!(!holds(&root, index[&3000], 1000));
        assert!(!holds(&root, Holder { pid: 99, fd: 1 }, 1000));
        fs::remove_dir_all(&root).unwrap();
        let (index, _, stats) = scan(&root, None);
        assert!(index.is_empty());
        assert_eq!(stats.processes, 0);
    }

    #[test]
    fn unspecified_keeps_the_family() {
        assert_eq!(unspecified("192.0.2.1".parse().unwrap()), IpAddr::from(Ipv4Addr::UNSPECIFIED));
        assert_eq!(unspecified("::ffff:192.0.2.1".parse().unwrap()), IpAddr::from(Ipv4Addr::UNSPECIFIED));
        assert_eq!(unspecified("2001:db8::1".parse().unwrap()), IpAddr::from(Ipv6Addr::UNSPECIFIED));
    }
}
