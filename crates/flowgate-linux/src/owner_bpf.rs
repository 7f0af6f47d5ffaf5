//! Kernel-side process attribution: which process owns a flow, recorded by BPF programs in the
//! kernel at the moment the flow is made, so the owner of a packet that NFQUEUE hands to user
//! space is known at once, also for a process that exited right after sending it (when reading
//! `/proc` would come too late).
//!
//! # What this room does, and what it may touch
//!
//! [`OwnerCapture::start`] loads the committed object `bpf/owner.bpf.o` (built from
//! `bpf/owner.bpf.c` by `bpf/build.sh`), attaches its programs, and keeps them attached for as
//! long as the [`OwnerCapture`] lives; lookups read the maps the programs fill. The programs only
//! observe: each returns "allow" and none changes a socket, an address or a packet. Attaching
//! needs the cgroup v2 root: if the host has a cgroup2 mount of the hierarchy's root it is opened,
//! else the hierarchy is mounted on a fresh private directory, opened, lazily unmounted and the
//! directory removed, all before `start` returns; the attachments hold the cgroup through the kept
//! descriptor. Nothing is pinned, nothing stays mounted: dropping the [`OwnerCapture`] closes the
//! links and the maps, which detaches and unloads everything. Cgroup programs are attached through
//! BPF links, which the kernel attaches in "allow multiple" mode, so several instances (and other
//! tools' programs) coexist.
//!
//! # The hooks, and why these
//!
//! BPF trampolines (fentry/fexit, BPF LSM) are not available everywhere (a kernel with lockdown in
//! integrity mode refuses them with EPERM, as measured on kernel 6.18), and kprobes may not be
//! built in; so only cgroup hooks and BTF-typed tracepoints are used:
//!
//! - `sockops` at `TCP_CONNECT_CB` (IPv4 and IPv6): runs inside `connect()` on the connecting
//!   thread, after the local port is chosen and before the SYN is built.
//! - `cgroup/sendmsg4`, `cgroup/sendmsg6`: unconnected UDP (`sendto` with an address). They run on
//!   the sending thread with the socket already autobound, so its port is known on the first
//!   datagram. The entry is rewritten for every datagram from another thread than its owner.
//! - Connected UDP: `cgroup/connect4`/`connect6` run before the autobind, so the local port is not
//!   known yet; the owner is parked by thread id in a small `pending` map. `connect()` then looks
//!   the route up on the same thread, and the `fib_table_lookup`/`fib6_table_lookup` tracepoints
//!   see a flowi with the autobound source port: when the current thread has a pending connect to
//!   that protocol, address and port, the flow's entry is written with that port. Route lookups
//!   also run in softirq for received packets, with whatever thread is current: the match on the
//!   pending destination, and on the loopback input interface that output lookups carry, keeps
//!   those out. A socket bound before `connect()` gets its entry in the connect hook itself.
//! - `cgroup/post_bind4`, `post_bind6`: `bind()` of TCP and UDP sockets, for [`OwnerCapture::listener`].
//! - `tp_btf/sched_process_exec`: the process table ([`OwnerCapture::process`]): the path given to
//!   `execve` (for a script, the interpreter the kernel ran instead, `bprm->interp`), the first
//!   256 bytes of argv read from the new image's stack, parent, uid, start time, cgroup.
//!   `tp_btf/sched_process_fork` copies the parent's record to a new process (not a thread),
//!   which then has its parent's exe and argv until it exec's itself.
//!
//! Every program returns "allow" and none writes a reply: for the sockops callbacks that ask for
//! one (initial RTO, receive window, ECN), a reply of 0 leaves the kernel's defaults in place.
//!
//! Entries are not deleted when a process exits (user space may look up right after); the maps
//! are LRU hashes, bounded in size: 65536 flows, 16384 listeners, 16384 processes.
//!
//! # The loader, and why aya
//!
//! The programs are C, compiled by clang into an object committed beside its source (the test
//! `bpf_object_matches_its_source` rebuilds it and compares bytes), so building flowgate needs no
//! clang. Of the loaders that build on stable Rust, `libbpf-rs` wraps libbpf itself (C, with
//! libelf and zlib: a C build at compile time and, unless linked statically, two more runtime
//! dependencies of the package); `aya` is pure Rust: it parses the ELF object, applies the CO-RE
//! relocations against the kernel's BTF and makes the `bpf()` calls itself. It does what these
//! programs need (BTF tracepoints, sockops and cgroup sock_addr hooks, hash maps); what it lacks
//! (netfilter BPF programs, for one) is not used. It adds about 0.9 MB to the release binary.
//!
//! # Limits
//!
//! Only TCP and UDP: ICMP, raw sockets, UDP-Lite and SCTP are not recorded. The flow key has the
//! local port, not the local address. A process started before the capture has no process record
//! (the caller uses `/proc`); its flows are still recorded. The exe is the path as given to
//! `execve`, not resolved (relative, or `/dev/fd/N` for `fexecve`). The owner of a flow is the
//! thread that made it; a socket passed to another process afterwards keeps its maker as owner,
//! except unconnected UDP, which is attributed per datagram. A connected UDP socket whose
//! `connect()` is rerouted by another cgroup program is not recorded. Inside a cgroup namespace
//! (a container) the root opened is the namespace's, so only its processes are seen.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use aya::maps::{HashMap, MapData, MapError};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError, SockOps};
use aya::{Btf, BtfError, Ebpf, EbpfError, Pod};

/// The compiled programs (see `bpf/build.sh`; a test checks that this is what the source builds).
static OBJECT: &[u8] = aya::include_bytes_aligned!("../bpf/owner.bpf.o");

/// The protocol numbers the keys use.
const TCP: u8 = 6;
const UDP: u8 = 17;

/// The owner of a flow or of a bound socket: the thread that made it, as the kernel saw it then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelOwner {
    /// The process (thread group) id.
    pub tgid: u32,
    /// The thread id.
    pub tid: u32,
    /// The real uid, in the initial user namespace.
    pub uid: u32,
    /// The real gid, in the initial user namespace.
    pub gid: u32,
    /// The cgroup v2 id of the thread (the inode number of its cgroup's directory).
    pub cgroup_id: u64,
    /// The thread's name (`comm`, at most 15 bytes).
    pub comm: String,
    /// When it was recorded, in CLOCK_MONOTONIC nanoseconds.
    pub captured_ns: u64,
}

/// A process as its last exec (or its fork from a recorded parent) left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelProcess {
    pub tgid: u32,
    /// The parent's process id at exec or fork.
    pub ppid: u32,
    /// The real uid at exec.
    pub uid: u32,
    /// The process's start time, in CLOCK_MONOTONIC nanoseconds (`task->start_time`).
    pub start_ns: u64,
    pub cgroup_id: u64,
    /// The name at exec (`comm`).
    pub comm: String,
    /// The path given to `execve`, unresolved; for a script, the interpreter's path (from the
    /// `#!` line) instead.
    pub exe: String,
    /// The first 256 bytes of argv, split; the last argument may be cut short.
    pub args: Vec<String>,
}

/// What failed in [`OwnerCapture::start`], and where. The message carries the whole cause (aya's
/// error and the OS error under it, or the verifier's log), so the errors have no separate source.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {}", chain(.0))]
    Btf(BtfError),
    #[error("loading the BPF object owner.bpf.o (maps, relocations): {}", chain(.0))]
    Object(EbpfError),
    #[error("the BPF object has no {kind} named {name}")]
    Missing { kind: &'static str, name: &'static str },
    #[error("BPF program {program} ({hook}): the program's type does not match: {}", chain(.error))]
    Kind { program: &'static str, hook: &'static str, error: ProgramError },
    #[error("BPF program {program} ({hook}): loading it into the kernel: {}", chain(.error))]
    Load { program: &'static str, hook: &'static str, error: ProgramError },
    #[error("BPF program {program} ({hook}): attaching it: {}", chain(.error))]
    Attach { program: &'static str, hook: &'static str, error: ProgramError },
    #[error("BPF map {map}: {}", chain(.error))]
    Map { map: &'static str, error: MapError },
    #[error("cgroup v2 root: {what} {path}: {error}")]
    Cgroup { what: &'static str, path: PathBuf, error: io::Error },
}

/// An error's message and its causes', joined by ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// `struct owner` in owner.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct OwnerValue {
    tgid: u32,
    tid: u32,
    uid: u32,
    gid: u32,
    cgroup_id: u64,
    time_ns: u64,
    comm: [u8; 16],
}

/// `struct flow_key` in owner.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowKey {
    protocol: u8,
    pad: [u8; 3],
    local_port: u16,
    remote_port: u16,
    remote: [u8; 16],
}

/// `struct listener_key` in owner.bpf.c.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ListenerKey {
    protocol: u8,
    pad: u8,
    local_port: u16,
    local: [u8; 16],
}

/// `struct proc` in owner.bpf.c.
#[repr(C)]
#[derive(Clone, Copy)]
struct ProcValue {
    ppid: u32,
    uid: u32,
    start_ns: u64,
    cgroup_id: u64,
    comm: [u8; 16],
    exe: [u8; 256],
    args: [u8; 256],
    args_len: u16,
    flags: u8,
    pad: [u8; 5],
}

// SAFETY: plain `repr(C)` data without padding the kernel could not fill (the explicit pad fields
// and the C layout match), every bit pattern valid.
unsafe impl Pod for OwnerValue {}
// SAFETY: as above.
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for ListenerKey {}
// SAFETY: as above.
unsafe impl Pod for ProcValue {}

const _: () = {
    assert!(size_of::<OwnerValue>() == 48);
    assert!(size_of::<FlowKey>() == 24);
    assert!(size_of::<ListenerKey>() == 20);
    assert!(size_of::<ProcValue>() == 560);
};

/// An address as the maps key it: 16 bytes in network order, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`), which is also how a dual-stack IPv6 socket names an IPv4 peer.
fn key_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn flow_key(protocol: u8, local: SocketAddr, remote: SocketAddr) -> FlowKey {
    FlowKey {
        protocol,
        pad: [0; 3],
        local_port: local.port(),
        remote_port: remote.port(),
        remote: key_addr(remote.ip()),
    }
}

/// The text up to the first NUL, invalid UTF-8 replaced.
fn c_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// argv bytes (NUL-separated, maybe cut short) as arguments.
fn split_args(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

impl From<OwnerValue> for KernelOwner {
    fn from(v: OwnerValue) -> KernelOwner {
        KernelOwner {
            tgid: v.tgid,
            tid: v.tid,
            uid: v.uid,
            gid: v.gid,
            cgroup_id: v.cgroup_id,
            comm: c_text(&v.comm),
            captured_ns: v.time_ns,
        }
    }
}

/// The attached programs and their maps. Dropping it detaches and unloads them all.
pub struct OwnerCapture {
    flows: HashMap<MapData, FlowKey, OwnerValue>,
    listeners: HashMap<MapData, ListenerKey, OwnerValue>,
    procs: HashMap<MapData, u32, ProcValue>,
    /// The programs and their links (dropped after the maps; either order detaches all).
    _ebpf: Ebpf,
}

/// How the cgroup programs are attached. aya attaches through a BPF link (kernel 5.7 and later), and
/// the kernel always attaches a cgroup link in "allow multiple" mode; it refuses the flag itself
/// there (EINVAL, measured on 6.18), so the mode passed is the one that sends no flag.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The tracepoints: (program, tracepoint).
const TRACEPOINTS: [(&str, &str); 4] = [
    ("fg_exec", "sched_process_exec"),
    ("fg_fork", "sched_process_fork"),
    ("fg_fib4", "fib_table_lookup"),
    ("fg_fib6", "fib6_table_lookup"),
];
/// The cgroup socket-address programs: (program, hook).
const SOCK_ADDR: [(&str, &str); 4] = [
    ("fg_connect4", "cgroup/connect4"),
    ("fg_connect6", "cgroup/connect6"),
    ("fg_sendmsg4", "cgroup/sendmsg4"),
    ("fg_sendmsg6", "cgroup/sendmsg6"),
];
/// The cgroup socket programs: (program, hook).
const SOCK: [(&str, &str); 2] = [("fg_post_bind4", "cgroup/post_bind4"), ("fg_post_bind6", "cgroup/post_bind6")];

impl OwnerCapture {
    /// Loads and attaches everything; Err if any part is missing (the caller then falls back to
    /// /proc). Needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; CAP_SYS_ADMIN when it has to
    /// mount the cgroup2 hierarchy).
    pub fn start() -> Result<OwnerCapture, CaptureError> {
        let btf = Btf::from_sys_fs().map_err(CaptureError::Btf)?;
        let mut ebpf = aya::EbpfLoader::new().btf(Some(&btf)).load(OBJECT).map_err(CaptureError::Object)?;

        // The process table and the route lookups first: a connect hook's pending entry is only
        // useful once the route lookup that completes it is watched.
        for (program, hook) in TRACEPOINTS {
            let p: &mut BtfTracePoint = program_mut(&mut ebpf, program, hook)?;
            p.load(hook, &btf).map_err(|error| CaptureError::Load { program, hook, error })?;
            p.attach().map_err(|error| CaptureError::Attach { program, hook, error })?;
        }

        let cgroup = open_cgroup2_root()?;
        let hook = "sockops";
        let program = "fg_sockops";
        let p: &mut SockOps = program_mut(&mut ebpf, program, hook)?;
        p.load().map_err(|error| CaptureError::Load { program, hook, error })?;
        p.attach(cgroup.as_fd(), LINK_MODE).map_err(|error| CaptureError::Attach { program, hook, error })?;
        for (program, hook) in SOCK_ADDR {
            let p: &mut CgroupSockAddr = program_mut(&mut ebpf, program, hook)?;
            p.load().map_err(|error| CaptureError::Load { program, hook, error })?;
            p.attach(cgroup.as_fd(), LINK_MODE).map_err(|error| CaptureError::Attach { program, hook, error })?;
        }
        for (program, hook) in SOCK {
            let p: &mut CgroupSock = program_mut(&mut ebpf, program, hook)?;
            p.load().map_err(|error| CaptureError::Load { program, hook, error })?;
            p.attach(cgroup.as_fd(), LINK_MODE).map_err(|error| CaptureError::Attach { program, hook, error })?;
        }
        // The links hold the cgroup now.
        drop(cgroup);

        Ok(OwnerCapture {
            flows: take_map(&mut ebpf, "flows")?,
            listeners: take_map(&mut ebpf, "listeners")?,
            procs: take_map(&mut ebpf, "procs")?,
            _ebpf: ebpf,
        })
    }

    /// Owner of the outbound flow with this protocol (6 or 17), local end and remote end (local
    /// address ignored in the key; IPv4-mapped normalised).
    pub fn outbound(&self, protocol: u8, local: SocketAddr, remote: SocketAddr) -> Option<KernelOwner> {
        if protocol != TCP && protocol != UDP {
            return None;
        }
        self.flows.get(&flow_key(protocol, local, remote), 0).ok().map(KernelOwner::from)
    }

    /// Owner of the socket bound to this local end: exact address first, then the unspecified
    /// address of either family (the local address's own family first).
    pub fn listener(&self, protocol: u8, local: SocketAddr) -> Option<KernelOwner> {
        if protocol != TCP && protocol != UDP {
            return None;
        }
        let any4 = key_addr(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let any6 = Ipv6Addr::UNSPECIFIED.octets();
        let exact = key_addr(local.ip());
        let order = if exact[..12] == any4[..12] { [exact, any4, any6] } else { [exact, any6, any4] };
        order.iter().enumerate().find_map(|(i, addr)| {
            if i > 0 && *addr == exact {
                return None;
            }
            let key = ListenerKey { protocol, pad: 0, local_port: local.port(), local: *addr };
            self.listeners.get(&key, 0).ok().map(KernelOwner::from)
        })
    }

    /// The process with this id as its last exec (or its fork from a recorded parent) left it;
    /// None for a process that started before the capture and did not exec since.
    pub fn process(&self, tgid: u32) -> Option<KernelProcess> {
        let v = self.procs.get(&tgid, 0).ok()?;
        let args_len = usize::from(v.args_len).min(v.args.len());
        Some(KernelProcess {
            tgid,
            ppid: v.ppid,
            uid: v.uid,
            start_ns: v.start_ns,
            cgroup_id: v.cgroup_id,
            comm: c_text(&v.comm),
            exe: c_text(&v.exe),
            args: split_args(&v.args[..args_len]),
        })
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, program: &'static str, hook: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(program).ok_or(CaptureError::Missing { kind: "program", name: program })?;
    p.try_into().map_err(|error| CaptureError::Kind { program, hook, error })
}

fn take_map<K: Pod, V: Pod>(ebpf: &mut Ebpf, map: &'static str) -> Result<HashMap<MapData, K, V>, CaptureError> {
    let m = ebpf.take_map(map).ok_or(CaptureError::Missing { kind: "map", name: map })?;
    HashMap::try_from(m).map_err(|error| CaptureError::Map { map, error })
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = File::options().read(true).custom_flags(libc::O_DIRECTORY).open(path)?;
    Ok(OwnedFd::from(dir))
}

/// A descriptor of the cgroup v2 hierarchy's root: an existing mount of it, or a private one
/// made, opened and undone at once.
fn open_cgroup2_root() -> Result<OwnedFd, CaptureError> {
    if let Some(path) = mounted_cgroup2_root()
        && let Ok(fd) = open_dir(&path)
    {
        return Ok(fd);
    }
    mount_cgroup2_root()
}

/// Where /proc/self/mountinfo has the cgroup2 hierarchy's root mounted, if anywhere.
fn mounted_cgroup2_root() -> Option<PathBuf> {
    let file = File::open("/proc/self/mountinfo").ok()?;
    BufReader::new(file).lines().map_while(Result::ok).find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = mount.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        (root == "/").then(|| PathBuf::from(unescape_mountinfo(point)))
    })
}

/// A mountinfo path with its octal escapes (`\040` for a space, ...) undone.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && let Some(digits @ [a, b1, c]) = b.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push(((a - b'0') << 6) | ((b1 - b'0') << 3) | (c - b'0'));
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mounts the cgroup2 hierarchy on a new directory of this process's own, opens its root,
/// detaches the mount and removes the directory: the descriptor stays, nothing else does.
fn mount_cgroup2_root() -> Result<OwnedFd, CaptureError> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "flowgate-cgroup2-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let err = |what, error| CaptureError::Cgroup { what, path: dir.clone(), error };
    std::fs::create_dir(&dir).map_err(|e| err("creating", e))?;
    let result = mount_open_unmount(&dir);
    let removed = std::fs::remove_dir(&dir);
    let fd = result?;
    removed.map_err(|e| err("removing", e))?;
    Ok(fd)
}

fn mount_open_unmount(dir: &Path) -> Result<OwnedFd, CaptureError> {
    let err = |what, error| CaptureError::Cgroup { what, path: dir.to_path_buf(), error };
    let target = CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| err("naming", io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe { libc::mount(c"none".as_ptr(), target.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(err("mounting cgroup2 on", io::Error::last_os_error()));
    }
    let opened = open_dir(dir);
    // SAFETY: as above.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    let unmounted = if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    let fd = opened.map_err(|e| err("opening", e))?;
    unmounted.map_err(|e| err("unmounting", e))?;
    Ok(fd)
}

// The daemon moves the capture to one thread.
const _: () = {
    const fn send<T: Send>() {}
    send::<OwnerCapture>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn ipv4_and_ipv4_mapped_make_the_same_key() {
        let v4: SocketAddr = "198.51.100.7:53".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:53".parse().unwrap();
        let local4: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let local6: SocketAddr = "[2001:db8::5]:40000".parse().unwrap();
        let key = flow_key(UDP, local4, v4);
        assert_eq!(key, flow_key(UDP, local6, mapped), "the local address is not in the key");
        assert_eq!(key.remote, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 7]);
        assert_eq!((key.protocol, key.local_port, key.remote_port), (UDP, 40000, 53));
        let v6: SocketAddr = "[2001:db8::7]:53".parse().unwrap();
        assert_ne!(flow_key(UDP, local4, v6).remote, key.remote);
        assert_eq!(flow_key(UDP, local4, v6).remote, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).octets());
        // The unspecified addresses of the two families stay apart.
        assert_ne!(key_addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), key_addr(IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
    }

    #[test]
    fn kernel_text_is_cut_at_nul_and_args_split() {
        assert_eq!(c_text(b"python3\0\0\0garbage"), "python3");
        assert_eq!(c_text(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(split_args(b"/bin/sh\0-c\0echo hi\0"), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(split_args(b"/bin/sh\0-c\0ech"), ["/bin/sh", "-c", "ech"], "cut short");
        assert_eq!(split_args(b"a\0\0b\0"), ["a", "", "b"], "an empty argument stays");
        assert!(split_args(b"").is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo(r"/mnt/a\040b\134c"), r"/mnt/a b\c");
        assert_eq!(unescape_mountinfo(r"/mnt/x\04"), r"/mnt/x\04", "cut short: kept");
        assert_eq!(unescape_mountinfo(r"/mnt/é\0"), r"/mnt/é\0");
    }

    #[test]
    fn errors_name_the_program_the_hook_and_the_os_error() {
        let io_error = io::Error::from_raw_os_error(libc::EINVAL);
        let os = io_error.to_string();
        let error = ProgramError::SyscallError(aya::sys::SyscallError { call: "bpf_link_create", io_error });
        let text = CaptureError::Attach { program: "fg_sockops", hook: "sockops", error }.to_string();
        assert!(text.starts_with("BPF program fg_sockops (sockops): attaching it: "), "{text}");
        assert!(text.contains("bpf_link_create") && text.ends_with(&os), "{text}");
    }

    /// Both ways to the cgroup2 root (a mount of the host's, or a private mount made and undone
    /// at once) give the same directory, and the private one leaves no mount and no directory.
    #[test]
    fn the_cgroup2_root_is_found_or_mounted_privately() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "the_cgroup2_root_is_found_or_mounted_privately: needs root");
            eprintln!("flowgate_linux: the_cgroup2_root_is_found_or_mounted_privately: skipped, needs root");
            return;
        }
        const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
        let mounts = || std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let before = mounts();
        let private = mount_cgroup2_root().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(mounts(), before, "the private mount is gone");
        let leftover = std::fs::read_dir(std::env::temp_dir())
            .expect("temp dir")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&format!("flowgate-cgroup2-{}-", std::process::id())));
        assert!(!leftover, "the private mount's directory is gone");
        let fs = nix::sys::statfs::fstatfs(&private).expect("fstatfs");
        assert_eq!(fs.filesystem_type().0 as i64, CGROUP2_SUPER_MAGIC);
        let found = open_cgroup2_root().unwrap_or_else(|e| panic!("{e}"));
        let (a, b) = (nix::sys::stat::fstat(&private).expect("fstat"), nix::sys::stat::fstat(&found).expect("fstat"));
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino), "the same cgroup (the root)");
        eprintln!("flowgate_linux: cgroup2 root mounted at {:?}", mounted_cgroup2_root());
    }

    /// Where a build tool is, if installed.
    fn tool(name: &str) -> Option<std::path::PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/bin", "/usr/local/bin"].map(Into::into))
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    }

    /// The committed object is what `bpf/build.sh` makes of the committed source. Needs clang-14,
    /// llvm-strip-14 and libbpf's headers (Debian: clang-14 llvm-14 libbpf-dev); without them
    /// the test says it is skipped, and fails under CI (`CI` set).
    #[test]
    fn bpf_object_matches_its_source() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bpf");
        let missing: Vec<&str> = ["clang-14", "llvm-strip-14"].into_iter().filter(|t| tool(t).is_none()).collect();
        let headers = Path::new("/usr/include/bpf/bpf_helpers.h").exists();
        if !missing.is_empty() || !headers {
            let what = format!("missing {missing:?}{}", if headers { "" } else { " and libbpf's headers" });
            assert!(std::env::var_os("CI").is_none(), "bpf_object_matches_its_source: {what}, and CI is set");
            eprintln!("flowgate_linux: bpf_object_matches_its_source: skipped, {what}");
            return;
        }
        let out = std::env::temp_dir().join(format!("flowgate-owner-bpf-{}.o", std::process::id()));
        let status = Command::new("sh").arg(dir.join("build.sh")).arg(&out).status().expect("running bpf/build.sh");
        let built = std::fs::read(&out);
        let _ = std::fs::remove_file(&out);
        assert!(status.success(), "bpf/build.sh failed: {status}");
        let built = built.expect("reading the rebuilt object");
        let committed = std::fs::read(dir.join("owner.bpf.o")).expect("reading bpf/owner.bpf.o");
        assert!(
            built == committed,
            "bpf/owner.bpf.o ({} bytes) is not what bpf/owner.bpf.c builds to ({} bytes): run bpf/build.sh and commit",
            committed.len(),
            built.len()
        );
        assert_eq!(committed.as_slice(), OBJECT, "the embedded object is the committed file");
    }
}
