//! `flowgate check`: which kernel features this host has, before anything is installed, and what
//! each missing one costs; exit status 0 when `flowgate run` can filter, 1 when it cannot.
//!
//! Every feature is probed for real, the way the daemon will use it, without changing the host:
//!
//! - Probes that need rules, queues or connections run in a **private network namespace**: a
//!   thread of its own calls `unshare(CLONE_NEWNET)` and probes from there. Sockets it opens and
//!   programs it starts (iptables, ip6tables, nft) belong to that namespace, and the namespace
//!   disappears when the thread and those programs end: nothing is named or mounted, so even a
//!   `flowgate check` killed mid-probe leaves nothing behind. There it brings loopback up, restores
//!   and lists test chains, installs and removes flowgate's own chains ([`netfilter::install`]),
//!   binds NFQUEUE queue 0 and has iptables' NFQUEUE target queue a UDP packet to it, watches the
//!   packet's conntrack entry appear (event, dump, mark update), destroys one end of a loopback TCP
//!   connection with `SOCK_DESTROY`, and tries nftables' `queue` expression.
//! - On the host it only reads: the process's uid and capabilities, the `nf_conntrack_acct`
//!   sysctl (opened for writing to learn whether it could be changed, never written), and
//!   `/sys/kernel/btf/vmlinux`. Two exceptions, both undone at once: a no-op BPF program is loaded
//!   and attached to a raw tracepoint for the instant of the probe (BPF is not per namespace), and
//!   a `run_dir` that does not exist is created and removed again (one that exists gets a test
//!   file, removed again).
//!
//! The tools are looked up like the daemon looks them up ([`netfilter::search_dirs`]); the
//! environment variable [`PATH_ENV`] replaces those directories, for testing this command (it
//! changes nothing for `flowgate run`).
//!
//! The report is plain data ([`Report`], one [`Feature`] per [`Id`]), so the verdict, the text
//! and the JSON are tested without a kernel. Which features are required follows what the daemon
//! does today ([`Id::need`]): a feature whose absence makes `flowgate run` refuse to start or
//! unable to filter is required; one it works around is recommended; one it does not use is
//! optional.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use flowgate_linux::conntrack::{self, Conntrack, EventKind, Tuple};
use flowgate_linux::netfilter::{self, ChainSpec, PacketChains, PacketInterface, Tools};
use flowgate_linux::nfqueue::{Queue, QueueConfig, Verdict};
use flowgate_linux::sockdiag::{self, DiagError, SockDiag};
use flowgate_linux::{bpf, marks};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Value, json};

use crate::config;

/// Directories (separated by `:`, like `PATH`) where `flowgate check`, and only it, looks for
/// iptables, ip6tables, their restore tools and nft, instead of the daemon's search path.
pub const PATH_ENV: &str = "FLOWGATE_CHECK_PATH";

const ACCT_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";
const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// The raw tracepoint the BPF probe attaches to: process starts, what process attribution
/// will follow.
const TRACEPOINT: &std::ffi::CStr = c"sched_process_exec";
/// The queue the NFQUEUE probe binds: any number works, the namespace is private.
const PROBE_QUEUE: u16 = 0;
/// How long a probe waits for the kernel to deliver something (a queued packet, an event, a
/// datagram). On a working kernel these arrive in microseconds; the wait is a safety net, each
/// one ends as soon as its event is there.
const WAIT: Duration = Duration::from_secs(2);
/// The chain names of the probes' test rules.
const TEST_CHAIN: &str = "FLOWGATE-CHECK";
/// `CAP_NET_ADMIN` of `linux/capability.h`: its bit in the capability masks.
const CAP_NET_ADMIN: u32 = 12;

/// How much `flowgate run` depends on a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Without it `flowgate run` cannot filter (it refuses to start, or cannot judge flows).
    Required,
    /// `flowgate run` filters without it, but loses something (see [`Id::cost`]).
    Recommended,
    /// Nothing uses it today.
    Optional,
}

impl Need {
    pub fn name(self) -> &'static str {
        match self {
            Need::Required => "required",
            Need::Recommended => "recommended",
            Need::Optional => "optional",
        }
    }
}

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    /// Not probed: something it depends on (root, a tool, loopback) was not there, so whether the
    /// kernel has it is not known. A required feature in this state fails the check.
    Unknown,
}

/// The features `flowgate check` probes, in the order it reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Id {
    Root,
    RunDir,
    Iptables,
    Ip6tables,
    Mangle,
    Connmark,
    Nfqueue,
    Chains,
    Conntrack,
    ConntrackAcct,
    SockDiag,
    SockDestroy,
    NftQueue,
    Bpf,
    Btf,
    BpfTracepoint,
    OwnerCapture,
}

impl Id {
    pub const ALL: [Id; 17] = [
        Id::Root,
        Id::RunDir,
        Id::Iptables,
        Id::Ip6tables,
        Id::Mangle,
        Id::Connmark,
        Id::Nfqueue,
        Id::Chains,
        Id::Conntrack,
        Id::ConntrackAcct,
        Id::SockDiag,
        Id::SockDestroy,
        Id::NftQueue,
        Id::Bpf,
        Id::Btf,
        Id::BpfTracepoint,
        Id::OwnerCapture,
    ];

    /// The features probed inside the private network namespace.
    const IN_NAMESPACE: [Id; 10] = [
        Id::Iptables,
        Id::Ip6tables,
        Id::Mangle,
        Id::Connmark,
        Id::Nfqueue,
        Id::Chains,
        Id::Conntrack,
        Id::SockDiag,
        Id::SockDestroy,
        Id::NftQueue,
    ];

    /// The name in the text and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            Id::Root => "root",
            Id::RunDir => "run_dir",
            Id::Iptables => "iptables",
            Id::Ip6tables => "ip6tables",
            Id::Mangle => "mangle",
            Id::Connmark => "connmark",
            Id::Nfqueue => "nfqueue",
            Id::Chains => "chains",
            Id::Conntrack => "conntrack",
            Id::ConntrackAcct => "conntrack_acct",
            Id::SockDiag => "sock_diag",
            Id::SockDestroy => "sock_destroy",
            Id::NftQueue => "nft_queue",
            Id::Bpf => "bpf",
            Id::Btf => "btf",
            Id::BpfTracepoint => "bpf_tracepoint",
            Id::OwnerCapture => "owner_capture",
        }
    }

    /// How much `flowgate run` depends on it, as the daemon is written today. Mangle and
    /// accounting are required, not merely used by one feature: the packet stage's mangle chains
    /// are installed with the flow chains, even empty, and the start fails when they cannot be;
    /// the start also fails when accounting is off and cannot be turned on.
    pub fn need(self) -> Need {
        match self {
            Id::SockDestroy => Need::Recommended,
            Id::Bpf | Id::Btf | Id::BpfTracepoint | Id::OwnerCapture => Need::Recommended,
            Id::NftQueue => Need::Optional,
            _ => Need::Required,
        }
    }

    /// What its absence costs.
    pub fn cost(self) -> &'static str {
        match self {
            Id::Root => {
                "flowgate run cannot filter: it refuses to start without root (it installs netfilter rules and binds NFQUEUE queues)"
            }
            Id::RunDir => {
                "flowgate run cannot filter: it refuses to start (its control socket and instance lock live in run_dir)"
            }
            Id::Iptables => {
                "flowgate run cannot filter: it installs its IPv4 chains with iptables-restore and lists them with iptables"
            }
            Id::Ip6tables => {
                "flowgate run cannot filter: it installs its IPv6 chains with ip6tables-restore and lists them with ip6tables (IPv6 support is required)"
            }
            Id::Mangle => {
                "flowgate run cannot filter: the packet stage's chains ([packet_filter], [[packet_rule]]) live in the mangle table and are installed with the flow chains, even when empty"
            }
            Id::Connmark => {
                "flowgate run cannot filter: a decided flow is passed or stopped in the kernel by its conntrack mark (CONNMARK saves the verdict, connmark and mark match it)"
            }
            Id::Nfqueue => "flowgate run cannot filter: every new flow is judged through NFQUEUE",
            Id::Chains => {
                "flowgate run cannot filter: these are the chains it installs (static rules need the ipset tool and the kernel's set match, the NFLOG and u32 modules)"
            }
            Id::Conntrack => {
                "flowgate run cannot filter: it refuses to start without ctnetlink (adopting existing connections, marks of decided flows, events and counters of flows the kernel handles)"
            }
            Id::ConntrackAcct => {
                "flowgate run cannot filter: it refuses to start when accounting is off and cannot be turned on (without accounting, flow counters of kernel-handled flows would stay at 0)"
            }
            Id::SockDiag => {
                "flowgate run cannot filter: it refuses to start without listing the host's sockets (connections open before the start are adopted from that list)"
            }
            Id::SockDestroy => {
                "blocking a live connection cannot tear down the local socket; the flow is cut by its conntrack mark only (the application and its peer wait for their timeouts instead of an error and a reset)"
            }
            Id::NftQueue => {
                "nothing today: flowgate queues through iptables' NFQUEUE target; only a native nftables data plane would use it"
            }
            Id::Bpf | Id::Btf | Id::BpfTracepoint | Id::OwnerCapture => {
                "flows' owners are found through /proc instead of the kernel capture: a process that exits right after it sent (a short UDP exchange) is often not named, and rules on process, user, unit or cgroup then do not match its flows"
            }
        }
    }

    fn position(self) -> usize {
        Id::ALL.iter().position(|id| *id == self).unwrap_or(Id::ALL.len())
    }
}

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub id: Id,
    pub status: Status,
    /// One line: what was found, or what failed and where.
    pub detail: String,
    /// A machine-readable value, for the features that have one: the iptables backend (`nft` or
    /// `legacy`), the `nf_conntrack_acct` value.
    pub value: Option<String>,
}

impl Feature {
    pub fn ok(id: Id, detail: impl Into<String>) -> Feature {
        Feature { id, status: Status::Ok, detail: detail.into(), value: None }
    }

    pub fn missing(id: Id, detail: impl Into<String>) -> Feature {
        Feature { id, status: Status::Missing, detail: detail.into(), value: None }
    }

    pub fn unknown(id: Id, detail: impl Into<String>) -> Feature {
        Feature { id, status: Status::Unknown, detail: detail.into(), value: None }
    }

    fn with_value(mut self, value: impl Into<String>) -> Feature {
        self.value = Some(value.into());
        self
    }

    /// `ok`, `missing`, `optional-missing` (an optional feature is absent) or `unknown`.
    pub fn status_name(&self) -> &'static str {
        match (self.status, self.id.need()) {
            (Status::Ok, _) => "ok",
            (Status::Missing, Need::Optional) => "optional-missing",
            (Status::Missing, _) => "missing",
            (Status::Unknown, _) => "unknown",
        }
    }
}

/// Everything `flowgate check` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The kernel release (`uname -r`).
    pub kernel: String,
    pub run_dir: PathBuf,
    /// The private network namespace the probes ran in (`net:[inode]`), gone by now.
    pub namespace: Option<String>,
    /// In [`Id::ALL`] order.
    pub features: Vec<Feature>,
}

impl Report {
    /// Orders the features as [`Id::ALL`]; a feature missing from `features` counts as not
    /// probed.
    pub fn new(kernel: String, run_dir: PathBuf, namespace: Option<String>, mut features: Vec<Feature>) -> Report {
        for id in Id::ALL {
            if !features.iter().any(|f| f.id == id) {
                features.push(Feature::unknown(id, "not probed"));
            }
        }
        features.sort_by_key(|f| f.id.position());
        Report { kernel, run_dir, namespace, features }
    }

    /// Required features that are not known to be there.
    pub fn blocking(&self) -> impl Iterator<Item = &Feature> {
        self.features.iter().filter(|f| f.id.need() == Need::Required && f.status != Status::Ok)
    }

    /// Whether `flowgate run` can filter here: every required feature is there.
    pub fn can_filter(&self) -> bool {
        self.blocking().next().is_none()
    }

    /// 0 when `flowgate run` can filter, 1 when it cannot.
    pub fn exit_code(&self) -> u8 {
        if self.can_filter() { 0 } else { 1 }
    }

    /// One sentence: can `flowgate run` filter, and if not, what stands in the way.
    pub fn verdict(&self) -> String {
        let names = |f: &dyn Fn(&Feature) -> bool| {
            self.features.iter().filter(|x| f(x)).map(|x| x.id.name()).collect::<Vec<_>>().join(", ")
        };
        let required = |x: &Feature| x.id.need() == Need::Required;
        if self.can_filter() {
            let mut s = String::from("flowgate run can filter on this host");
            let lost = names(&|x| x.id.need() == Need::Recommended && x.status != Status::Ok);
            if !lost.is_empty() {
                let _ = write!(s, "; without {lost}, see its cost");
            }
            s
        } else {
            let mut s = String::from("flowgate run cannot filter on this host:");
            let missing = names(&|x| required(x) && x.status == Status::Missing);
            let unknown = names(&|x| required(x) && x.status == Status::Unknown);
            if !missing.is_empty() {
                let _ = write!(s, " missing {missing}");
            }
            if !unknown.is_empty() {
                let _ = write!(s, "{} not probed {unknown}", if missing.is_empty() { "" } else { ";" });
            }
            s
        }
    }

    /// The report for people: one line per feature, what a missing one costs under it, and the
    /// verdict last.
    pub fn text(&self) -> String {
        let mut out = format!("flowgate check: Linux {}, run_dir {}", self.kernel, self.run_dir.display());
        match &self.namespace {
            Some(ns) => {
                let _ = writeln!(out, "; kernel probes ran in a private network namespace ({ns}), gone now\n");
            }
            None => out.push_str("\n\n"),
        }
        const STATUS: usize = 16;
        const NAME: usize = 14;
        for f in &self.features {
            let _ = writeln!(out, "{:<STATUS$}  {:<NAME$}  {}", f.status_name(), f.id.name(), f.detail);
            if f.status != Status::Ok {
                let _ = writeln!(out, "{:<STATUS$}  {:<NAME$}  without it: {}", "", "", f.id.cost());
            }
        }
        let _ = writeln!(out, "\n{}", self.verdict());
        out
    }

    /// The report as one JSON object.
    pub fn json(&self) -> Value {
        json!({
            "can_filter": self.can_filter(),
            "verdict": self.verdict(),
            "kernel": self.kernel,
            "run_dir": self.run_dir.display().to_string(),
            "namespace": self.namespace,
            "features": self.features.iter().map(|f| json!({
                "name": f.id.name(),
                "need": f.id.need().name(),
                "status": f.status_name(),
                "detail": f.detail,
                "value": f.value,
                "cost": f.id.cost(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// What to probe with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The `run_dir` `flowgate run` would use.
    pub run_dir: PathBuf,
    /// Where to look for the tools; `None`: where the daemon looks.
    pub tool_dirs: Option<Vec<PathBuf>>,
}

impl Options {
    /// `run_dir`, and the tool directories of [`PATH_ENV`] if it is set.
    pub fn from_env(run_dir: PathBuf) -> Options {
        let tool_dirs = std::env::var_os(PATH_ENV).map(|p: OsString| std::env::split_paths(&p).collect());
        Options { run_dir, tool_dirs }
    }
}

/// `flowgate check [--config FILE] [--json]`: exit status 0 when `flowgate run` can filter, 1
/// when it cannot, 2 when the config cannot be read (a usage error: nothing was probed).
pub fn command(config_path: Option<&Path>, json: bool) -> ExitCode {
    let run_dir = match config_path {
        Some(p) => match config::load(p) {
            Ok(c) => c.live.run_dir,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        None => config::Live::default().run_dir,
    };
    let report = probe(&Options::from_env(run_dir));
    let mut stdout = io::stdout().lock();
    let printed = if json { writeln!(stdout, "{}", report.json()) } else { write!(stdout, "{}", report.text()) };
    // A reader that stopped early (`| head`) is not worth a message; the status still tells.
    if let Err(e) = printed.and_then(|()| stdout.flush())
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing the report: {e}");
    }
    ExitCode::from(report.exit_code())
}

/// Probes every feature (see the module documentation for what that touches).
pub fn probe(options: &Options) -> Report {
    let dirs = options.tool_dirs.clone().unwrap_or_else(netfilter::search_dirs);
    let found = Found::lookup(&dirs);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "?".into(), |s| s.trim().into());
    let (root, is_root) = probe_root();
    let mut features = vec![root];
    let mut namespace = None;
    if is_root {
        features.push(probe_run_dir(&options.run_dir));
        match in_private_namespace(|| probe_namespace(&found)) {
            Ok((ns, probed)) => {
                namespace = ns;
                features.extend(probed);
            }
            Err(e) => features.extend(Id::IN_NAMESPACE.map(|id| Feature::unknown(id, format!("not probed: {e}")))),
        }
        features.extend(probe_bpf());
        features.push(probe_owner_capture());
    } else {
        let why = "not probed: needs root";
        features.push(Feature::unknown(Id::RunDir, format!("{why} (flowgate run creates it as root)")));
        for id in Id::IN_NAMESPACE {
            let tool_missing = match id {
                Id::Iptables => found.v4.missing(),
                Id::Ip6tables => found.v6.missing(),
                _ => None,
            };
            features.push(match tool_missing {
                Some(m) => Feature::missing(id, m),
                None => Feature::unknown(id, format!("{why} (the probes run in a private network namespace)")),
            });
        }
        for id in [Id::Bpf, Id::BpfTracepoint, Id::OwnerCapture] {
            features.push(Feature::unknown(id, why));
        }
    }
    // After the namespace probes: on a kernel with conntrack as a module they load it, and with
    // it the sysctl (the daemon's start would load it the same way).
    features.push(probe_accounting(is_root));
    features.push(probe_btf());
    Report::new(kernel, options.run_dir.clone(), namespace, features)
}

// ---- the host ----

/// `root`: uid 0 with CAP_NET_ADMIN in effect. Returns whether the process is root, which the
/// other probes need.
fn probe_root() -> (Feature, bool) {
    let euid = nix::unistd::geteuid();
    let caps = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| effective_caps(&s));
    let net_admin = caps.map(|c| c & (1 << CAP_NET_ADMIN) != 0);
    let feature = match (euid.is_root(), net_admin) {
        (true, Some(true)) => Feature::ok(Id::Root, "uid 0, CAP_NET_ADMIN in effect"),
        (true, Some(false)) => {
            Feature::missing(Id::Root, "uid 0 but without CAP_NET_ADMIN (a restricted capability set)")
        }
        (true, None) => Feature::ok(Id::Root, "uid 0 (capabilities unreadable from /proc/self/status)"),
        (false, _) => Feature::missing(Id::Root, format!("running as uid {euid}, not root")),
    };
    (feature, euid.is_root())
}

/// The `CapEff` mask of a `/proc/PID/status` text.
fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// `run_dir`: exists as a writable directory (a test file is created and removed), or can be
/// created (it is, and removed again with every parent that had to be made).
fn probe_run_dir(dir: &Path) -> Feature {
    let shown = dir.display();
    if !dir.is_absolute() {
        return Feature::missing(Id::RunDir, format!("{shown}: not an absolute path"));
    }
    if dir.exists() {
        if !dir.is_dir() {
            return Feature::missing(Id::RunDir, format!("{shown} exists and is not a directory"));
        }
        let test = dir.join(format!(".flowgate-check-{}", std::process::id()));
        return match std::fs::OpenOptions::new().write(true).create_new(true).open(&test) {
            Ok(file) => {
                drop(file);
                match std::fs::remove_file(&test) {
                    Ok(()) => Feature::ok(Id::RunDir, format!("{shown} exists and is writable")),
                    Err(e) => Feature::ok(
                        Id::RunDir,
                        format!(
                            "{shown} exists and is writable; removing the test file {} failed: {e}",
                            test.display()
                        ),
                    ),
                }
            }
            Err(e) => Feature::missing(Id::RunDir, format!("{shown} exists but a file cannot be created in it: {e}")),
        };
    }
    // The directories create_dir_all will make, deepest first.
    let made: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if let Err(e) = std::fs::create_dir_all(dir) {
        // Whatever was made before the failure goes again.
        for d in &made {
            let _ = std::fs::remove_dir(d);
        }
        return Feature::missing(Id::RunDir, format!("{shown} does not exist and cannot be created: {e}"));
    }
    let mut left = Vec::new();
    for d in &made {
        if let Err(e) = std::fs::remove_dir(d) {
            left.push(format!("{}: {e}", d.display()));
        }
    }
    let mut detail = format!("{shown} does not exist and can be created (it was, and removed again)");
    if !left.is_empty() {
        let _ = write!(detail, "; could not remove again {}", left.join(", "));
    }
    Feature::ok(Id::RunDir, detail)
}

/// `conntrack_acct`: the host's `nf_conntrack_acct` exists, and is on or could be turned on
/// (it is opened for writing, never written).
fn probe_accounting(is_root: bool) -> Feature {
    let value = match std::fs::read_to_string(ACCT_SYSCTL) {
        Ok(v) => v.trim().to_string(),
        Err(e) => {
            return Feature::missing(Id::ConntrackAcct, format!("{ACCT_SYSCTL}: {e} (a kernel without conntrack?)"));
        }
    };
    let on = value != "0";
    let feature = match std::fs::OpenOptions::new().write(true).open(ACCT_SYSCTL) {
        Ok(_) => Feature::ok(
            Id::ConntrackAcct,
            format!("net.netfilter.nf_conntrack_acct = {value}, writable (flowgate run turns it on while it runs)"),
        ),
        Err(e) if on => Feature::ok(
            Id::ConntrackAcct,
            format!("net.netfilter.nf_conntrack_acct = {value}: on already, so not being writable ({e}) costs nothing"),
        ),
        Err(e) if !is_root => Feature::unknown(
            Id::ConntrackAcct,
            format!("net.netfilter.nf_conntrack_acct = {value}, not writable by this user ({e}); root was not probed"),
        ),
        Err(e) => Feature::missing(
            Id::ConntrackAcct,
            format!("net.netfilter.nf_conntrack_acct = {value} and cannot be turned on: {ACCT_SYSCTL}: {e}"),
        ),
    };
    feature.with_value(value)
}

/// `btf`: the kernel's own BTF, which CO-RE BPF programs are relocated against.
fn probe_btf() -> Feature {
    let mut magic = [0u8; 2];
    let read = std::fs::File::open(BTF_VMLINUX).and_then(|mut f| {
        f.read_exact(&mut magic)?;
        f.metadata()
    });
    match read {
        // BTF_MAGIC 0xeB9F, in the kernel's byte order.
        Ok(meta) if magic == 0xeb9f_u16.to_ne_bytes() => {
            Feature::ok(Id::Btf, format!("{BTF_VMLINUX}: {} bytes of BTF", meta.len()))
        }
        Ok(_) => Feature::missing(Id::Btf, format!("{BTF_VMLINUX} does not start with the BTF magic")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Feature::missing(Id::Btf, format!("{BTF_VMLINUX} does not exist (a kernel without CONFIG_DEBUG_INFO_BTF)"))
        }
        Err(e) => Feature::missing(Id::Btf, format!("{BTF_VMLINUX}: {e}")),
    }
}

/// `bpf` and `bpf_tracepoint`: a no-op program is loaded, attached to a raw tracepoint, and
/// both are undone at once (the descriptors are dropped).
fn probe_bpf() -> [Feature; 2] {
    let program = match bpf::load_noop_program() {
        Ok(p) => p,
        Err(e) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS) => " (no bpf() system call: a kernel without CONFIG_BPF_SYSCALL)",
                Some(libc::EPERM) => " (not permitted: a kernel lockdown, or a capability missing)",
                _ => "",
            };
            return [
                Feature::missing(Id::Bpf, format!("bpf(BPF_PROG_LOAD) of a no-op program failed: {e}{why}")),
                Feature::unknown(Id::BpfTracepoint, "not probed: no program could be loaded"),
            ];
        }
    };
    let loaded = Feature::ok(Id::Bpf, "bpf() loads a program (a no-op, unloaded at once)");
    let tracepoint = TRACEPOINT.to_string_lossy();
    let attached = match bpf::attach_raw_tracepoint(&program, TRACEPOINT) {
        Ok(link) => {
            drop(link);
            Feature::ok(
                Id::BpfTracepoint,
                format!("a no-op program attached to the raw tracepoint {tracepoint} and detached"),
            )
        }
        Err(e) => {
            Feature::missing(Id::BpfTracepoint, format!("attaching to the raw tracepoint {tracepoint} failed: {e}"))
        }
    };
    [loaded, attached]
}

/// `owner_capture`: the kernel capture of flows' owners starts (its programs load and attach),
/// and is taken down at once.
fn probe_owner_capture() -> Feature {
    match flowgate_linux::owner_bpf::OwnerCapture::start() {
        Ok(c) => {
            drop(c);
            Feature::ok(Id::OwnerCapture, "the kernel capture of flow owners loads and attaches (and was detached)")
        }
        Err(e) => Feature::missing(Id::OwnerCapture, format!("the kernel capture of flow owners cannot run: {e}")),
    }
}

// ---- the private network namespace ----

/// Runs `f` on a new thread that has moved into a network namespace of its own. The namespace
/// ends with the thread (and the programs it started, which have been waited for): nothing names
/// or mounts it.
fn in_private_namespace<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new().name("check-netns".into()).spawn_scoped(scope, || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("cannot create a private network namespace: unshare(CLONE_NEWNET): {e}"))?;
            Ok(f())
        });
        match thread {
            Ok(t) => t.join().unwrap_or_else(|_| Err("the probe thread panicked".into())),
            Err(e) => Err(format!("cannot start the probe thread: {e}")),
        }
    })
}

/// Every probe that runs inside the private namespace, on its thread. Returns the namespace's
/// name (`net:[inode]`).
fn probe_namespace(found: &Found) -> (Option<String>, Vec<Feature>) {
    let ns = std::fs::read_link("/proc/thread-self/ns/net").ok().map(|p| p.display().to_string());
    let loopback =
        bring_up_loopback().map_err(|e| format!("not probed: loopback could not be brought up in the namespace: {e}"));
    let v4 = probe_iptables(Id::Iptables, &found.v4);
    let v6 = probe_iptables(Id::Ip6tables, &found.v6);
    let tables_work = v4.status == Status::Ok && v6.status == Status::Ok;
    let mut features = Vec::new();
    if tables_work {
        features.push(probe_mangle(found));
        features.push(probe_connmark(found));
        features.push(probe_chains(found));
    } else {
        for id in [Id::Mangle, Id::Connmark, Id::Chains] {
            features.push(Feature::unknown(id, "not probed: iptables and ip6tables do not both work"));
        }
    }
    features.extend([v4, v6]);
    match &loopback {
        Ok(()) => {
            features.extend(probe_queue_and_conntrack(found, tables_work));
            features.extend(probe_sockets());
        }
        Err(e) => {
            for id in [Id::Nfqueue, Id::Conntrack, Id::SockDiag, Id::SockDestroy] {
                features.push(Feature::unknown(id, e.clone()));
            }
        }
    }
    features.push(probe_nft_queue(found.nft.as_deref()));
    (ns, features)
}

/// Sets `lo` up: a new namespace has it down, and the probes' connections run over it.
fn bring_up_loopback() -> io::Result<()> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    // SAFETY: `ifreq` is plain data for which all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes the flags of the `ifreq`,
    // which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags of the `ifreq`, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One family's tools.
#[derive(Debug)]
struct FamilyTools {
    family: &'static str,
    lister_name: &'static str,
    restore_name: &'static str,
    lister: Option<PathBuf>,
    restore: Option<PathBuf>,
    loopback: IpAddr,
    searched: String,
}

impl FamilyTools {
    /// Which tool is missing, as a detail line.
    fn missing(&self) -> Option<String> {
        let gone: Vec<&str> = [(self.lister_name, &self.lister), (self.restore_name, &self.restore)]
            .into_iter()
            .filter(|(_, p)| p.is_none())
            .map(|(n, _)| n)
            .collect();
        (!gone.is_empty()).then(|| format!("{} not found (searched {})", gone.join(" and "), self.searched))
    }
}

/// The programs the probes run, looked up once.
#[derive(Debug)]
struct Found {
    v4: FamilyTools,
    v6: FamilyTools,
    nft: Option<PathBuf>,
}

impl Found {
    fn lookup(dirs: &[PathBuf]) -> Found {
        let searched = std::env::join_paths(dirs).map_or_else(|_| "?".into(), |p| p.to_string_lossy().into_owned());
        let find = |name| netfilter::find_program_in(name, dirs);
        let family = |family, lister_name, restore_name, loopback| FamilyTools {
            family,
            lister_name,
            restore_name,
            lister: find(lister_name),
            restore: find(restore_name),
            loopback,
            searched: searched.clone(),
        };
        Found {
            v4: family("IPv4", "iptables", "iptables-restore", IpAddr::V4(Ipv4Addr::LOCALHOST)),
            v6: family("IPv6", "ip6tables", "ip6tables-restore", IpAddr::V6(Ipv6Addr::LOCALHOST)),
            nft: find("nft"),
        }
    }

    /// The daemon's [`Tools`], as found here.
    fn tools(&self) -> Tools {
        let or_name = |p: &Option<PathBuf>, name: &str| p.clone().unwrap_or_else(|| PathBuf::from(name));
        Tools {
            iptables_restore: or_name(&self.v4.restore, "iptables-restore"),
            ip6tables_restore: or_name(&self.v6.restore, "ip6tables-restore"),
            iptables: or_name(&self.v4.lister, "iptables"),
            ip6tables: or_name(&self.v6.lister, "ip6tables"),
            ipset: Tools::default().ipset,
        }
    }

    fn families(&self) -> [&FamilyTools; 2] {
        [&self.v4, &self.v6]
    }
}

/// Runs `program args` (never through a shell) with `input` on its stdin; its stdout, or an
/// error naming the command and what it said.
fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{shown}`: cannot run it: {e}"))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        // Small inputs that fit the pipe; a tool that quits early is judged by its status below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| format!("`{shown}`: {e}"))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    // Without usage hints and nft's carets under the command it echoes.
    let said = said
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `") && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" / ");
    Err(format!("`{shown}` failed ({}): {}", out.status, if said.is_empty() { "no error output" } else { &said }))
}

/// The backend an `iptables -V` line names: `nft` or `legacy` (iptables before 1.8 names none
/// and is legacy).
fn backend(version: &str) -> &'static str {
    if version.contains("(nf_tables)") {
        "nft"
    } else if version.contains("(legacy)") || !version.contains('(') {
        "legacy"
    } else {
        "unknown"
    }
}

/// Restores `text` with `iptables-restore --noflush` (or the IPv6 one).
fn restore(tools: &FamilyTools, text: &str) -> Result<(), String> {
    let program = tools.restore.as_deref().ok_or_else(|| format!("{} not found", tools.restore_name))?;
    run(program, &["-w", "--noflush"], Some(text)).map(drop)
}

/// Runs the family's lister (`iptables` or `ip6tables`) with `args`.
fn list(tools: &FamilyTools, args: &[&str]) -> Result<String, String> {
    let program = tools.lister.as_deref().ok_or_else(|| format!("{} not found", tools.lister_name))?;
    run(program, args, None)
}

/// `iptables` / `ip6tables`: both tools present, a test chain restored with one is listed by the
/// other (so the daemon's removal sees what it installed), and their backends agree.
fn probe_iptables(id: Id, tools: &FamilyTools) -> Feature {
    if let Some(m) = tools.missing() {
        return Feature::missing(id, m);
    }
    let (lister_name, restore_name) = (tools.lister_name, tools.restore_name);
    let versions = (list(tools, &["-V"]), tools.restore.as_deref().map(|p| run(p, &["-V"], None)));
    let (lister_version, restore_version) = match versions {
        (Ok(l), Some(Ok(r))) => (l.trim().to_string(), r.trim().to_string()),
        (Err(e), _) | (_, Some(Err(e))) => return Feature::missing(id, e),
        (_, None) => return Feature::missing(id, format!("{restore_name} not found")),
    };
    let (lister_backend, restore_backend) = (backend(&lister_version), backend(&restore_version));
    if lister_backend != restore_backend {
        return Feature::missing(
            id,
            format!(
                "{lister_name} ({lister_backend}) and {restore_name} ({restore_backend}) use different backends: chains one installs, the other cannot list or remove"
            ),
        )
        .with_value(lister_backend);
    }
    let text =
        format!("*filter\n:{TEST_CHAIN} - [0:0]\n-A {TEST_CHAIN} -j RETURN\n-I OUTPUT 1 -j {TEST_CHAIN}\nCOMMIT\n");
    if let Err(e) = restore(tools, &text) {
        return Feature::missing(id, e).with_value(lister_backend);
    }
    match list(tools, &["-w", "-t", "filter", "-S"]) {
        Ok(listing) if listing.lines().any(|l| l.trim() == format!("-A OUTPUT -j {TEST_CHAIN}")) => {}
        Ok(_) => {
            return Feature::missing(id, format!("{lister_name} -S does not list the chain {restore_name} installed"))
                .with_value(lister_backend);
        }
        Err(e) => return Feature::missing(id, e).with_value(lister_backend),
    }
    let dir =
        tools.lister.as_deref().and_then(Path::parent).map_or_else(String::new, |d| format!(" in {}", d.display()));
    Feature::ok(
        id,
        format!(
            "{lister_version}{dir}: a chain {restore_name} installs, {lister_name} lists ({lister_backend} backend)"
        ),
    )
    .with_value(lister_backend)
}

/// `mangle`: both families take a chain and a jump in the mangle table.
fn probe_mangle(found: &Found) -> Feature {
    let text =
        format!("*mangle\n:{TEST_CHAIN} - [0:0]\n-A {TEST_CHAIN} -j RETURN\n-I OUTPUT 1 -j {TEST_CHAIN}\nCOMMIT\n");
    for tools in found.families() {
        if let Err(e) = restore(tools, &text) {
            return Feature::missing(Id::Mangle, format!("{}: {e}", tools.family));
        }
    }
    Feature::ok(Id::Mangle, "the mangle table takes chains and jumps (IPv4 and IPv6)")
}

/// `connmark`: the mark and connmark matches and the CONNMARK target, as flowgate's chains use
/// them, one rule at a time so that a failure names which one.
fn probe_connmark(found: &Found) -> Feature {
    let chain = format!("{TEST_CHAIN}-MARK");
    let rules = [
        (
            "the CONNMARK target",
            format!(
                "-m mark ! --mark 0x0/{mask:#x} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}",
                mask = marks::MASK
            ),
        ),
        ("the connmark match", format!("-m connmark --mark {:#x}/{:#x} -j RETURN", marks::ALLOW, marks::VERDICT)),
        ("the mark match", format!("-m mark --mark {:#x}/{:#x} -j DROP", marks::DROP, marks::VERDICT)),
    ];
    for tools in found.families() {
        for (what, rule) in &rules {
            let text = format!("*filter\n:{chain} - [0:0]\n-A {chain} {rule}\nCOMMIT\n");
            if let Err(e) = restore(tools, &text) {
                return Feature::missing(Id::Connmark, format!("{}: {what} was refused: {e}", tools.family));
            }
        }
    }
    Feature::ok(Id::Connmark, "the mark and connmark matches and the CONNMARK --save-mark target work (IPv4 and IPv6)")
}

/// `chains`: flowgate's own chains, exactly as the daemon installs them (two flow queues spread
/// by ports, a packet stage on `tun*`, failing open, two static rules: an allow whose networks
/// are an ipset and a reject logged to NFLOG), installed and removed again.
fn probe_chains(found: &Found) -> Feature {
    use flowgate_linux::static_rules::{StaticHook, StaticProtocol, StaticRule, StaticRules, StaticVerdict};
    let nets = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32", "2001:db8:1::/48"];
    let rule = |id, verdict| StaticRule {
        protocol: StaticProtocol::Tcp,
        remote: nets.iter().filter_map(|n| n.parse().ok()).collect(),
        remote_ports: vec![(443, 443)],
        ..StaticRule::new(id, StaticHook::Output, verdict)
    };
    let statics = StaticRules {
        rules: vec![rule(1, StaticVerdict::Allow), rule(2, StaticVerdict::Reject)],
        log_group: 17991,
        generation: 1,
    };
    let spec = ChainSpec {
        queues: 0..=1,
        fail_open: true,
        loopback: false,
        packet: PacketChains {
            queues: 2..=2,
            interfaces: vec![PacketInterface {
                glob: Some("tun*".into()),
                inbound: true,
                outbound: true,
                forwarded: true,
            }],
        },
        statics,
    };
    let tools = found.tools();
    match netfilter::install(&spec, &tools) {
        Ok(installed) => match installed.remove() {
            Ok(()) => Feature::ok(
                Id::Chains,
                "flowgate's chains (filter and mangle, IPv4 and IPv6: NFQUEUE, CONNMARK, REJECT, conntrack, u32; static rules: ipset sets, NFLOG) install and remove",
            ),
            Err(e) => {
                Feature::missing(Id::Chains, format!("flowgate's chains installed but could not be removed: {e}"))
            }
        },
        Err(e) => Feature::missing(Id::Chains, format!("flowgate's chains cannot be installed: {e}")),
    }
}

/// Waits until `fd` is readable or `deadline` passes; whether it is readable.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// A UDP datagram the NFQUEUE probe sends over loopback.
struct ProbeFlow {
    family: &'static str,
    sender: UdpSocket,
    receiver: UdpSocket,
    from: SocketAddr,
    to: SocketAddr,
}

impl ProbeFlow {
    fn tuple(&self) -> Tuple {
        Tuple {
            protocol: 17,
            src: self.from.ip(),
            dst: self.to.ip(),
            src_port: self.from.port(),
            dst_port: self.to.port(),
        }
    }
}

/// `nfqueue` and `conntrack`, on one probe flow per family: queue 0 is bound through nfnetlink,
/// iptables' and ip6tables' NFQUEUE target (`--queue-bypass`) send a UDP datagram to it, the
/// accepted datagram arrives, and its conntrack entry shows up as an event, in a dump (with
/// counters) and takes a mark update.
fn probe_queue_and_conntrack(found: &Found, tables_work: bool) -> [Feature; 2] {
    // The conntrack sockets first: the event socket must listen before the flow starts.
    let ct = Conntrack::open();
    let events = Conntrack::open_events(true, false, false);
    // Accounting of this namespace, so the entry carries counters.
    let accounting = conntrack::set_accounting(true).is_ok();
    let (nfqueue, flows) = probe_nfqueue(found, tables_work);
    let conntrack = match (ct, events) {
        (Err(e), _) | (_, Err(e)) => Feature::missing(Id::Conntrack, format!("cannot open a ctnetlink socket: {e}")),
        (Ok(mut ct), Ok(mut events)) => probe_conntrack(&mut ct, &mut events, &flows, accounting),
    };
    [nfqueue, conntrack]
}

/// The NFQUEUE half: the feature, and the flows whose packets went through the queue (for the
/// conntrack half).
fn probe_nfqueue(found: &Found, tables_work: bool) -> (Feature, Vec<ProbeFlow>) {
    let config = QueueConfig { num: PROBE_QUEUE, max_len: 64, fail_open: false, copy_range: 0xffff };
    let mut queue = match Queue::open(&config) {
        Ok(q) => q,
        Err(e) => {
            return (
                Feature::missing(Id::Nfqueue, format!("cannot bind NFQUEUE queue {PROBE_QUEUE}: {e}")),
                Vec::new(),
            );
        }
    };
    if !tables_work {
        let detail = format!(
            "queue {PROBE_QUEUE} binds through nfnetlink; the NFQUEUE target was not probed: iptables and ip6tables do not both work"
        );
        return (Feature::unknown(Id::Nfqueue, detail), Vec::new());
    }
    let mut flows = Vec::new();
    let mut notes = Vec::new();
    for tools in found.families() {
        // A conntrack match makes the namespace track connections at all, so that the flow has
        // an entry for the conntrack half (a failure here shows there).
        let _ = list(tools, &["-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
        let receiver = match UdpSocket::bind(SocketAddr::new(tools.loopback, 0)) {
            Ok(s) => s,
            Err(e) => {
                // A host with IPv6 turned off: the target is still checked, without a packet.
                notes.push(format!("{}: no packet sent ({} unusable: {e})", tools.family, tools.loopback));
                let rule = ["-w", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", "9", "-j", "NFQUEUE"];
                if let Err(e) = list(tools, &[&rule[..], &["--queue-num", "0", "--queue-bypass"]].concat()) {
                    return (Feature::missing(Id::Nfqueue, format!("the NFQUEUE target was refused: {e}")), flows);
                }
                continue;
            }
        };
        let made = receiver.local_addr().and_then(|to| {
            let sender = UdpSocket::bind(SocketAddr::new(tools.loopback, 0))?;
            sender.connect(to)?;
            receiver.set_read_timeout(Some(WAIT))?;
            Ok(ProbeFlow { family: tools.family, from: sender.local_addr()?, to, sender, receiver })
        });
        let flow = match made {
            Ok(f) => f,
            Err(e) => {
                return (Feature::unknown(Id::Nfqueue, format!("{}: loopback UDP sockets: {e}", tools.family)), flows);
            }
        };
        let port = flow.to.port().to_string();
        let queue_num = PROBE_QUEUE.to_string();
        let rule = ["-w", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", &port, "-j", "NFQUEUE", "--queue-num"];
        if let Err(e) = list(tools, &[&rule[..], &[queue_num.as_str(), "--queue-bypass"]].concat()) {
            return (Feature::missing(Id::Nfqueue, format!("the NFQUEUE target was refused: {e}")), flows);
        }
        flows.push(flow);
    }
    let marker = format!("flowgate check {}", std::process::id());
    for flow in &flows {
        if let Err(e) = flow.sender.send(marker.as_bytes()) {
            return (Feature::unknown(Id::Nfqueue, format!("{}: sending the probe datagram: {e}", flow.family)), flows);
        }
    }
    // Every packet that comes is accepted; ours are counted.
    let deadline = Instant::now() + WAIT;
    let mut seen = 0;
    while seen < flows.len() && wait_readable(queue.as_fd(), deadline) {
        let mut ids = Vec::new();
        let received = queue.recv(|p| {
            ids.push(p.id);
            seen += usize::from(p.payload.ends_with(marker.as_bytes()));
        });
        for id in ids {
            queue.verdict(id, Verdict::Accept, None);
        }
        if let Err(e) = received.and_then(|_| queue.flush()) {
            return (Feature::missing(Id::Nfqueue, e.to_string()), flows);
        }
    }
    if seen < flows.len() {
        let detail =
            format!("the NFQUEUE target took the rule but {seen} of {} probe packets reached the queue", flows.len());
        return (Feature::missing(Id::Nfqueue, detail), flows);
    }
    for flow in &flows {
        let mut buf = [0u8; 64];
        match flow.receiver.recv(&mut buf) {
            Ok(n) if buf.get(..n) == Some(marker.as_bytes()) => {}
            Ok(_) => {
                return (
                    Feature::missing(Id::Nfqueue, format!("{}: a different datagram arrived", flow.family)),
                    flows,
                );
            }
            Err(e) => {
                let detail =
                    format!("{}: the packet was queued but did not arrive after an accept verdict: {e}", flow.family);
                return (Feature::missing(Id::Nfqueue, detail), flows);
            }
        }
    }
    let glue = if queue.has_conntrack() { "with" } else { "without" };
    let families = flows.iter().map(|f| f.family).collect::<Vec<_>>().join(" and ");
    let mut detail = format!(
        "queue {PROBE_QUEUE} binds through nfnetlink ({glue} conntrack glue); {families} packets the NFQUEUE target sent to it arrived and passed on accept"
    );
    for n in notes {
        let _ = write!(detail, "; {n}");
    }
    (Feature::ok(Id::Nfqueue, detail), flows)
}

/// The conntrack half (see [`probe_queue_and_conntrack`]).
fn probe_conntrack(ct: &mut Conntrack, events: &mut Conntrack, flows: &[ProbeFlow], accounting: bool) -> Feature {
    let mut entries = 0usize;
    if let Err(e) = ct.dump(|_| entries += 1) {
        return Feature::missing(Id::Conntrack, format!("ctnetlink dump failed: {e}"));
    }
    let Some(flow) = flows.first() else {
        return Feature::unknown(
            Id::Conntrack,
            "a ctnetlink dump works; events and mark updates were not probed (no probe flow went through NFQUEUE)",
        );
    };
    let tuple = flow.tuple();
    let deadline = Instant::now() + WAIT;
    let mut announced = false;
    while !announced && wait_readable(events.as_fd(), deadline) {
        let got = events.recv_events(|e| announced |= e.kind == EventKind::New && e.entry.original == tuple);
        if let Err(e) = got {
            return Feature::missing(Id::Conntrack, format!("reading conntrack events: {e}"));
        }
    }
    if !announced {
        return Feature::missing(Id::Conntrack, format!("no conntrack event for the probe flow within {WAIT:?}"));
    }
    let find = |ct: &mut Conntrack| {
        let mut entry = None;
        ct.dump(|e| {
            if e.original == tuple {
                entry = Some(e.clone());
            }
        })
        .map(|()| entry)
    };
    let entry = match find(ct) {
        Ok(Some(e)) => e,
        Ok(None) => return Feature::missing(Id::Conntrack, "a dump does not list the probe flow's entry"),
        Err(e) => return Feature::missing(Id::Conntrack, format!("ctnetlink dump failed: {e}")),
    };
    if let Err(e) = ct.set_mark(&entry.original, marks::ALLOW, marks::VERDICT) {
        return Feature::missing(Id::Conntrack, format!("setting a conntrack mark failed: {e}"));
    }
    match find(ct) {
        Ok(Some(e)) if e.mark & marks::VERDICT == marks::ALLOW => {}
        Ok(_) => {
            return Feature::missing(Id::Conntrack, "a mark update was acknowledged but the entry does not carry it");
        }
        Err(e) => return Feature::missing(Id::Conntrack, format!("ctnetlink dump failed: {e}")),
    }
    let counters = match (accounting, entry.counters_original.is_some()) {
        (_, true) => " (with accounting counters)",
        (true, false) => " (without counters, although accounting is on)",
        (false, false) => "",
    };
    Feature::ok(Id::Conntrack, format!("ctnetlink: the probe flow's entry was announced, dumped{counters} and marked"))
}

/// `sock_diag` and `sock_destroy`, on a loopback TCP connection and a UDP socket: the dumps list
/// them, and destroying the TCP client's socket makes its next read fail with `ECONNABORTED`.
fn probe_sockets() -> [Feature; 2] {
    let made = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| {
        let client = TcpStream::connect(l.local_addr()?)?;
        let (server, _) = l.accept()?;
        client.set_read_timeout(Some(WAIT))?;
        server.set_read_timeout(Some(WAIT))?;
        Ok((client, server))
    });
    let (mut client, mut server) = match made {
        Ok(c) => c,
        Err(e) => {
            let why = format!("not probed: a loopback TCP connection failed: {e}");
            return [Feature::unknown(Id::SockDiag, why.clone()), Feature::unknown(Id::SockDestroy, why)];
        }
    };
    let ends = client.local_addr().and_then(|l| Ok((l, client.peer_addr()?)));
    let (local, remote) = match ends {
        Ok(e) => e,
        Err(e) => {
            let why = format!("not probed: the loopback connection's addresses: {e}");
            return [Feature::unknown(Id::SockDiag, why.clone()), Feature::unknown(Id::SockDestroy, why)];
        }
    };
    let not_probed = || Feature::unknown(Id::SockDestroy, "not probed: sock_diag does not work");
    let mut diag = match SockDiag::open() {
        Ok(d) => d,
        Err(e) => {
            return [Feature::missing(Id::SockDiag, format!("cannot open a sock_diag socket: {e}")), not_probed()];
        }
    };
    let mut listed = false;
    if let Err(e) = diag.dump(sockdiag::TCP, sockdiag::state::TCP_CONNECTIONS, |s| {
        listed |= s.local == local && s.remote == remote;
    }) {
        return [Feature::missing(Id::SockDiag, format!("listing TCP sockets failed: {e}")), not_probed()];
    }
    if !listed {
        return [
            Feature::missing(Id::SockDiag, "a TCP socket dump does not list the probe's connection"),
            not_probed(),
        ];
    }
    // UDP sockets come from a module of their own (udp_diag), and the daemon lists them too.
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|u| u.local_addr().map(|a| (u, a)));
    let listing = match udp {
        Err(e) => Feature::unknown(Id::SockDiag, format!("TCP sockets are listed; UDP not probed: a UDP socket: {e}")),
        Ok((_socket, bound)) => {
            let mut listed = false;
            match diag.dump(sockdiag::UDP, sockdiag::state::UDP_ALL, |s| listed |= s.local == bound) {
                Ok(()) if listed => Feature::ok(
                    Id::SockDiag,
                    "TCP and UDP socket dumps list the probe's loopback connection and UDP socket",
                ),
                Ok(()) => Feature::missing(Id::SockDiag, "a UDP socket dump does not list the probe's UDP socket"),
                Err(e) => Feature::missing(Id::SockDiag, format!("listing UDP sockets failed: {e}")),
            }
        }
    };
    let destroyed = match diag.destroy_matching(sockdiag::TCP, local, remote) {
        Ok(1) => {
            let mut buf = [0u8; 1];
            match client.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                    let peer = match server.read(&mut buf) {
                        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => ", its peer a reset",
                        _ => "",
                    };
                    Feature::ok(
                        Id::SockDestroy,
                        format!("SOCK_DESTROY of a loopback TCP connection: the program got ECONNABORTED{peer}"),
                    )
                }
                other => Feature::missing(
                    Id::SockDestroy,
                    format!("SOCK_DESTROY answered but the socket lives on (its next read: {other:?})"),
                ),
            }
        }
        Ok(n) => {
            Feature::missing(Id::SockDestroy, format!("SOCK_DESTROY destroyed {n} sockets instead of the probe's one"))
        }
        Err(e @ DiagError::Unsupported { .. }) => Feature::missing(Id::SockDestroy, format!("EOPNOTSUPP: {e}")),
        Err(e) => Feature::missing(Id::SockDestroy, e.to_string()),
    };
    [listing, destroyed]
}

/// `nft_queue` (optional): nftables takes a base chain, and a rule with the `queue` expression.
fn probe_nft_queue(nft: Option<&Path>) -> Feature {
    let Some(nft) = nft else {
        return Feature::unknown(Id::NftQueue, "not probed: the nft program is not installed");
    };
    let table = ["inet", "flowgate_check"];
    let base = run(nft, &[&["add", "table"][..], &table].concat(), None).and_then(|_| {
        let chain = "{ type filter hook output priority 0 ; policy accept ; }";
        run(nft, &[&["add", "chain"][..], &table, &["out", chain]].concat(), None)
    });
    if let Err(e) = base {
        return Feature::missing(Id::NftQueue, format!("nftables does not work: {e}"));
    }
    let queued = run(nft, &[&["add", "rule"][..], &table, &["out", "queue", "num", "0", "bypass"]].concat(), None);
    // The namespace goes anyway; the table goes first so nothing depends on that.
    let _ = run(nft, &[&["delete", "table"][..], &table].concat(), None);
    match queued {
        Ok(_) => Feature::ok(Id::NftQueue, "nftables takes a rule with the queue expression"),
        Err(e) => {
            Feature::missing(Id::NftQueue, format!("the kernel refuses nftables' queue expression (no nft_queue): {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ok() -> Vec<Feature> {
        Id::ALL.iter().map(|id| Feature::ok(*id, format!("{} works", id.name()))).collect()
    }

    fn report(features: Vec<Feature>) -> Report {
        Report::new("6.1.0".into(), PathBuf::from("/run/flowgate"), Some("net:[4026532000]".into()), features)
    }

    fn with(id: Id, status: Status) -> Report {
        let mut features = all_ok();
        for f in &mut features {
            if f.id == id {
                f.status = status;
                f.detail = format!("{} is gone", id.name());
            }
        }
        report(features)
    }

    #[test]
    fn every_feature_there_can_filter_and_exits_0() {
        let r = report(all_ok());
        assert!(r.can_filter());
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.verdict(), "flowgate run can filter on this host");
        let text = r.text();
        assert!(!text.contains("without it:"), "{text}");
        assert!(text.ends_with("flowgate run can filter on this host\n"), "{text}");
    }

    #[test]
    fn a_missing_required_feature_exits_1_and_names_it_and_its_cost() {
        for id in Id::ALL.into_iter().filter(|id| id.need() == Need::Required) {
            let r = with(id, Status::Missing);
            assert!(!r.can_filter(), "{id:?}");
            assert_eq!(r.exit_code(), 1, "{id:?}");
            assert_eq!(r.verdict(), format!("flowgate run cannot filter on this host: missing {}", id.name()));
            assert!(id.cost().starts_with("flowgate run cannot filter"), "{id:?}: {}", id.cost());
            let text = r.text();
            let line = format!("{:<16}  {:<14}  {} is gone", "missing", id.name(), id.name());
            assert!(text.contains(&line), "{text}");
            assert!(text.contains(&format!("without it: {}", id.cost())), "{text}");
        }
    }

    #[test]
    fn a_required_feature_not_probed_fails_the_check_too() {
        let r = with(Id::Nfqueue, Status::Unknown);
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.verdict(), "flowgate run cannot filter on this host: not probed nfqueue");
        let mut features = all_ok();
        features[0].status = Status::Missing; // root
        features.retain(|f| f.id != Id::Chains); // never probed at all
        let r = report(features);
        assert_eq!(r.verdict(), "flowgate run cannot filter on this host: missing root; not probed chains");
        assert_eq!(r.features.len(), Id::ALL.len());
    }

    #[test]
    fn recommended_and_optional_features_cost_something_but_not_filtering() {
        let r = with(Id::SockDestroy, Status::Missing);
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.verdict(), "flowgate run can filter on this host; without sock_destroy, see its cost");
        assert!(r.text().contains("without it: blocking a live connection cannot tear down the local socket"));
        for id in [Id::NftQueue, Id::Bpf, Id::Btf, Id::BpfTracepoint, Id::OwnerCapture] {
            let r = with(id, Status::Missing);
            assert_eq!(r.exit_code(), 0, "{id:?}");
            let f = r.features.iter().find(|f| f.id == id).expect("feature");
            let kind = if id == Id::NftQueue { "optional-missing" } else { "missing" };
            assert_eq!(f.status_name(), kind);
        }
        assert_eq!(with(Id::Btf, Status::Unknown).exit_code(), 0);
    }

    #[test]
    fn features_come_out_in_a_fixed_order_whatever_order_they_were_found_in() {
        let mut features = all_ok();
        features.reverse();
        let r = report(features);
        assert_eq!(r.features.iter().map(|f| f.id).collect::<Vec<_>>(), Id::ALL.to_vec());
    }

    #[test]
    fn json_is_one_object_with_every_feature() {
        let mut features = all_ok();
        features[2] = Feature::ok(Id::Iptables, "iptables v1.8.9 (nf_tables)").with_value("nft");
        features[6] = Feature::missing(Id::Nfqueue, "cannot bind");
        let v = report(features).json();
        assert_eq!(v["can_filter"], false);
        assert_eq!(v["verdict"], "flowgate run cannot filter on this host: missing nfqueue");
        assert_eq!(v["kernel"], "6.1.0");
        assert_eq!(v["run_dir"], "/run/flowgate");
        assert_eq!(v["namespace"], "net:[4026532000]");
        let list = v["features"].as_array().expect("features");
        assert_eq!(list.len(), Id::ALL.len());
        assert_eq!(list[2]["name"], "iptables");
        assert_eq!(list[2]["value"], "nft");
        assert_eq!(
            list[6],
            json!({
                "name": "nfqueue",
                "need": "required",
                "status": "missing",
                "detail": "cannot bind",
                "value": null,
                "cost": "flowgate run cannot filter: every new flow is judged through NFQUEUE",
            })
        );
        let sock = list.iter().find(|f| f["name"] == "sock_destroy").expect("sock_destroy");
        assert_eq!(sock["need"], "recommended");
        // The text form round-trips through the JSON printer.
        let text = v.to_string();
        assert_eq!(serde_json::from_str::<Value>(&text).expect("valid JSON"), v);
    }

    #[test]
    fn iptables_backends_are_read_from_the_version_line() {
        assert_eq!(backend("iptables v1.8.9 (nf_tables)"), "nft");
        assert_eq!(backend("iptables-restore v1.8.9 (legacy)"), "legacy");
        assert_eq!(backend("iptables v1.6.1"), "legacy");
        assert_eq!(backend("iptables v9 (something-new)"), "unknown");
    }

    #[test]
    fn effective_capabilities_are_read_from_proc_status() {
        let status = "Name:\tflowgate\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_caps("CapEff:\t0000000000001000\n").map(|c| c & (1 << CAP_NET_ADMIN)), Some(1 << 12));
        assert_eq!(effective_caps("Name:\tx\n"), None);
        assert_eq!(effective_caps("CapEff:\tnot hex\n"), None);
    }

    /// A directory under the temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let d = std::env::temp_dir().join(format!("flowgate-check-unit-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("temp dir");
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_missing_run_dir_is_created_and_removed_again() {
        let t = TempDir::new("rundir");
        let dir = t.0.join("a/b/run");
        let f = probe_run_dir(&dir);
        assert_eq!(f.status, Status::Ok, "{}", f.detail);
        assert!(f.detail.contains("can be created"), "{}", f.detail);
        assert!(!t.0.join("a").exists(), "the probe left {}", t.0.join("a").display());
        // An existing one gets a test file, removed again.
        let f = probe_run_dir(&t.0);
        assert_eq!(f.status, Status::Ok, "{}", f.detail);
        assert_eq!(std::fs::read_dir(&t.0).expect("list").count(), 0);
        // A file in its place, or under it, is not a run_dir.
        std::fs::write(t.0.join("file"), "").expect("write");
        let f = probe_run_dir(&t.0.join("file"));
        assert_eq!(f.status, Status::Missing);
        assert!(f.detail.contains("not a directory"), "{}", f.detail);
        let f = probe_run_dir(&t.0.join("file/run"));
        assert_eq!(f.status, Status::Missing);
        assert!(f.detail.contains("cannot be created"), "{}", f.detail);
        assert_eq!(probe_run_dir(Path::new("relative")).status, Status::Missing);
    }

    #[test]
    fn tools_are_looked_up_only_in_the_directories_given() {
        let t = TempDir::new("tools");
        let found = Found::lookup(std::slice::from_ref(&t.0));
        assert_eq!(found.v4.lister, None);
        let missing = found.v4.missing().expect("missing");
        assert!(missing.starts_with("iptables and iptables-restore not found (searched "), "{missing}");
        assert!(missing.contains(&t.0.display().to_string()), "{missing}");
        let f = probe_iptables(Id::Iptables, &found.v4);
        assert_eq!((f.status, f.detail.as_str()), (Status::Missing, missing.as_str()));
        // An executable of that name is found; a file that is not executable is not.
        let exe = t.0.join("ip6tables");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        std::fs::write(t.0.join("ip6tables-restore"), "").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let found = Found::lookup(std::slice::from_ref(&t.0));
        assert_eq!(found.v6.lister.as_deref(), Some(exe.as_path()));
        assert_eq!(found.v6.missing().as_deref().map(|m| m.starts_with("ip6tables-restore not found")), Some(true));
    }

    #[test]
    fn run_names_the_command_and_what_it_said() {
        let e = run(Path::new("/bin/sh"), &["-c", "echo oops >&2; exit 3"], None).expect_err("fails");
        assert!(e.starts_with("`/bin/sh -c echo oops >&2; exit 3` failed (exit status: 3): oops"), "{e}");
        assert_eq!(run(Path::new("/bin/cat"), &[], Some("in")).as_deref(), Ok("in"));
        let e = run(Path::new("/nonexistent/iptables"), &["-V"], None).expect_err("fails");
        assert!(e.contains("/nonexistent/iptables -V`: cannot run it"), "{e}");
    }
}
