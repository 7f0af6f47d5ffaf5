//! A process's identity from `/proc`: its executable, command line, parent, owner, start time and
//! cgroup, so that a flow's program can be named and matched by rules; the user names of
//! `/etc/passwd`; the chain of a process's ancestors.
//!
//! This room reads `/proc` and `/etc/passwd` and touches nothing else: it opens no socket, writes
//! nothing and decides nothing. A process can exit between two reads, so every read can fail with
//! `NotFound`, and a reader must take a missing process as the ordinary case it is; the errors say
//! which file failed.
//!
//! Written by hand rather than with the `procfs` crate (0.18): flowgate needs a few fields of five
//! files (`stat`, `status`, `cmdline`, `cgroup`, the `exe` link) and `/etc/passwd`, which the
//! crate does not read. `procfs` parses every field of those files into large structures and
//! brings `procfs-core`, `rustix`, `bitflags` and `hex` (with default features also `chrono` and
//! `flate2`), none of which the workspace has; the reader here is a few dozen lines per file, with
//! tests on fixture text, and the only subtle part, `stat`'s `comm` that can hold spaces and
//! parentheses, is handled below (the fields are read after the last `)`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Where the kernel's process file system is.
const PROC: &str = "/proc";
const PASSWD: &str = "/etc/passwd";

/// What `/proc/<pid>` tells of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The process (thread group) id: the `Tgid` of `status`, also when a thread's id was asked.
    pub pid: u32,
    pub ppid: u32,
    /// The real user id (the first field of `status`'s `Uid:` line).
    pub uid: u32,
    /// The real group id.
    pub gid: u32,
    /// Where the `exe` link points, with the kernel's ` (deleted)` suffix when the file was
    /// removed or replaced since it was started. `None` when the link cannot be read: a kernel
    /// thread, a process that is gone, or one this process may not inspect.
    pub exe: Option<String>,
    /// The arguments (`cmdline` split at NUL bytes); empty for kernel threads and zombies.
    /// Invalid UTF-8 is replaced.
    pub cmdline: Vec<String>,
    /// The kernel's short name of the process (at most 15 bytes, set by the program or from its
    /// file name).
    pub comm: String,
    /// When the process started, in clock ticks after boot (field 22 of `stat`). With the pid it
    /// names a process uniquely: a pid is reused, a (pid, start) pair is not.
    pub start_ticks: u64,
    /// See [`cgroup_path`]; `None` if `cgroup` could not be read.
    pub cgroup: Option<String>,
}

/// Reads process `pid` from `/proc`.
pub fn read_process(pid: u32) -> io::Result<ProcessInfo> {
    read_process_at(Path::new(PROC), pid)
}

/// Reads process `pid` from a `/proc` at `proc_root` (tests give a directory of their own).
/// `stat` and `status` must be readable; the others give `None` or empty when they are not.
pub fn read_process_at(proc_root: &Path, pid: u32) -> io::Result<ProcessInfo> {
    let dir = proc_root.join(pid.to_string());
    let stat_path = dir.join("stat");
    let stat_text = read_text(&stat_path)?;
    let stat = parse_stat(&stat_text).ok_or_else(|| malformed(&stat_path))?;
    let status_path = dir.join("status");
    let status = parse_status(&read_text(&status_path)?).ok_or_else(|| malformed(&status_path))?;
    let exe = fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let cmdline = fs::read(dir.join("cmdline")).map(|raw| split_cmdline(&raw)).unwrap_or_default();
    let cgroup = fs::read_to_string(dir.join("cgroup")).ok().and_then(|text| cgroup_path(&text));
    Ok(assemble(stat, status, exe, cmdline, cgroup))
}

/// A process from the texts of its `stat`, `status`, `cmdline` and `cgroup` files (`exe` is a
/// link, not text: `None` here). `None` when `stat` or `status` is not in the kernel's format.
/// What [`read_process_at`] does after reading the files; public for the fuzz target, since a
/// process names itself (`comm`, arguments) and so writes part of what this parses.
pub fn parse_process(stat: &str, status: &str, cmdline: &[u8], cgroup: &str) -> Option<ProcessInfo> {
    Some(assemble(parse_stat(stat)?, parse_status(status)?, None, split_cmdline(cmdline), cgroup_path(cgroup)))
}

fn assemble(
    stat: Stat,
    status: Status,
    exe: Option<String>,
    cmdline: Vec<String>,
    cgroup: Option<String>,
) -> ProcessInfo {
    ProcessInfo {
        pid: status.tgid,
        ppid: stat.ppid,
        uid: status.uid,
        gid: status.gid,
        exe,
        cmdline,
        comm: stat.comm,
        start_ticks: stat.start_ticks,
        cgroup,
    }
}

/// A file of `/proc` as text; the error names the file and keeps the kind (`NotFound` when the
/// process is gone).
fn read_text(path: &Path) -> io::Result<String> {
    fs::read(path)
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))
}

fn malformed(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: not in the kernel's format", path.display()))
}

/// The fields of `/proc/<pid>/stat` this room uses.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    ppid: u32,
    start_ticks: u64,
}

/// `pid (comm) state ppid ...`: `comm` is whatever the program set, spaces and parentheses
/// included, so it runs from the first `(` to the last `)`, and the numbered fields are counted
/// after that (`state` is field 3, `ppid` 4, `starttime` 22).
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    // rest starts at field 3.
    let ppid = rest.nth(1)?.parse().ok()?;
    let start_ticks = rest.nth(22 - 5)?.parse().ok()?;
    Some(Stat { comm, ppid, start_ticks })
}

/// The fields of `/proc/<pid>/status` this room uses.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    tgid: u32,
    uid: u32,
    gid: u32,
}

fn parse_status(text: &str) -> Option<Status> {
    let (mut tgid, mut uid, mut gid) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let first = || value.split_ascii_whitespace().next()?.parse::<u32>().ok();
        match key {
            "Tgid" => tgid = first(),
            "Uid" => uid = first(),
            "Gid" => gid = first(),
            _ => {}
        }
    }
    Some(Status { tgid: tgid?, uid: uid?, gid: gid? })
}

/// The arguments of a `cmdline` file: NUL-terminated strings. A program that rewrote its
/// arguments may leave a last one without its NUL; it is kept.
fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&b| b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect()
}

/// The cgroup that says most about a process, from the text of `/proc/<pid>/cgroup` (lines of
/// `id:controllers:path`): the unified hierarchy's path (the `0::` line) if it is not `/`, else
/// the path in the v1 `name=systemd` hierarchy if present and not `/`, else the first v1 path
/// that is not `/`, else the `0::` path, else `/`. `None` when no line has the format.
///
/// Why this order: on a cgroup v2 host (current systemd distributions) the unified path is the
/// one systemd and container runtimes place processes in (`/system.slice/nginx.service`,
/// `/system.slice/docker-<id>.scope`), and the v1 lines are absent or `/`. On a v1 or hybrid host
/// (such as the machine this was written on, whose v2 hierarchy is mounted but unused: every
/// process has `0::/`), systemd keeps its units in the `name=systemd` hierarchy, which is the
/// same placement; docker on v1 puts a container in `/docker/<id>` in every controller. A host
/// without systemd may place processes in some controllers only, so the first placed one is the
/// best that is left.
pub fn cgroup_path(text: &str) -> Option<String> {
    let mut unified = None;
    let mut systemd = None;
    let mut first_v1 = None;
    let mut any = false;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        any = true;
        if id == "0" && controllers.is_empty() {
            unified.get_or_insert(path);
        } else if path != "/" {
            if controllers.split(',').any(|c| c == "name=systemd") {
                systemd.get_or_insert(path);
            }
            first_v1.get_or_insert(path);
        }
    }
    if !any {
        return None;
    }
    let chosen = unified.filter(|p| *p != "/").or(systemd).or(first_v1).or(unified).unwrap_or("/");
    Some(chosen.to_owned())
}

/// The systemd unit a cgroup path denotes: walking the path's components from the end, the first
/// that ends in `.service` or `.scope` (`/system.slice/nginx.service` → `nginx.service`,
/// `/system.slice/docker-<id>.scope` → `docker-<id>.scope`, `/user.slice/user-1000.slice/
/// user@1000.service/app.slice/app-foo.scope` → `app-foo.scope`); `None` for a path with no unit,
/// such as docker's `/docker/<id>` on cgroup v1, which rules match by the cgroup path instead.
pub fn unit_of(cgroup: &str) -> Option<String> {
    cgroup
        .rsplit('/')
        .find(|c| [".service", ".scope"].iter().any(|unit| c.strip_suffix(unit).is_some_and(|stem| !stem.is_empty())))
        .map(str::to_owned)
}

/// The ancestors of `pid`, parent first, with where their `exe` links point: up to `max` of them,
/// ending with pid 1 (which is included) or before the first one that cannot be read (gone, or in
/// another pid namespace: parent 0). Empty if `pid` itself cannot be read.
pub fn parents(pid: u32, max: usize) -> Vec<(u32, Option<String>)> {
    parents_at(Path::new(PROC), pid, max)
}

/// [`parents`] in a `/proc` at `proc_root`.
pub fn parents_at(proc_root: &Path, pid: u32, max: usize) -> Vec<(u32, Option<String>)> {
    let ppid_of = |pid: u32| {
        let text = fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
        Some(parse_stat(&text)?.ppid)
    };
    let mut out = Vec::new();
    let mut current = pid;
    while out.len() < max {
        let Some(parent) = ppid_of(current).filter(|&p| p != 0) else { break };
        let dir = proc_root.join(parent.to_string());
        if !dir.join("stat").exists() {
            break;
        }
        let exe = fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
        out.push((parent, exe));
        if parent == 1 {
            break;
        }
        current = parent;
    }
    out
}

/// User names and ids from `/etc/passwd`, parsed once and read again when the file changes (its
/// modification time or size differ at the next call; one `stat` per call). Users that only a
/// name service knows (LDAP, sssd, systemd's dynamic users) are not here: this reads the file,
/// not NSS, so that it does no network lookups and loads no NSS modules into the daemon.
///
/// When several lines have the same uid, the first one names it (as `getpwuid` does with files).
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    /// The file's (mtime, size) when it was read; `None` before the first read or when it
    /// could not be read.
    seen: Option<(SystemTime, u64)>,
    names: HashMap<u32, Arc<str>>,
    uids: HashMap<Arc<str>, u32>,
}

impl Default for Users {
    fn default() -> Self {
        Users::new()
    }
}

impl Users {
    /// The users of `/etc/passwd`.
    pub fn new() -> Users {
        Users::from_path(PASSWD)
    }

    /// The users of a passwd file at `path` (read at the first call, not here).
    pub fn from_path(path: impl Into<PathBuf>) -> Users {
        Users { path: path.into(), seen: None, names: HashMap::new(), uids: HashMap::new() }
    }

    /// The name of user `uid`, `None` if the file has no such user (or cannot be read).
    pub fn name(&mut self, uid: u32) -> Option<Arc<str>> {
        self.refresh();
        self.names.get(&uid).cloned()
    }

    /// The uid of user `name`.
    pub fn uid(&mut self, name: &str) -> Option<u32> {
        self.refresh();
        self.uids.get(name).copied()
    }

    /// Reads the file again if it changed since the last read. A file that cannot be read
    /// leaves no users (and is tried again at the next call).
    fn refresh(&mut self) {
        let now = fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        if now.is_some() && now == self.seen {
            return;
        }
        self.names.clear();
        self.uids.clear();
        self.seen = None;
        let Ok(raw) = fs::read(&self.path) else { return };
        for (name, uid) in parse_passwd(&String::from_utf8_lossy(&raw)) {
            let name: Arc<str> = name.into();
            self.names.entry(uid).or_insert_with(|| name.clone());
            self.uids.entry(name).or_insert(uid);
        }
        self.seen = now;
    }
}

/// The (name, uid) pairs of passwd text (`name:password:uid:gid:gecos:home:shell`). Comments,
/// blank lines, NIS `+`/`-` entries and lines without a numeric uid are skipped.
pub fn parse_passwd(text: &str) -> impl Iterator<Item = (&str, u32)> {
    text.lines().filter_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?.trim();
        if name.is_empty() || name.starts_with(['#', '+', '-']) {
            return None;
        }
        let uid = fields.nth(1)?.trim().parse().ok()?;
        Some((name, uid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `stat` line with the given comm; the other fields as on a real process (starttime
    /// 123456).
    fn stat_line(pid: u32, comm: &str, ppid: u32) -> String {
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 1000 0 0 0 5 3 0 0 20 0 1 0 123456 \
             10000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"
        )
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        for comm in ["python3", "a b c", "x) S 99 (y", ")", "(", "", "tmux: server"] {
            let got = parse_stat(&stat_line(42, comm, 7)).unwrap_or_else(|| panic!("{comm:?}"));
            assert_eq!(got, Stat { comm: comm.to_owned(), ppid: 7, start_ticks: 123456 }, "{comm:?}");
        }
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("1 (init) S"), None);
        assert_eq!(parse_stat("1 init S 0 1"), None);
        let line = stat_line(1, "x", 0);
        for cut in 0..line.len() {
            let _ = parse_stat(&line[..cut]);
        }
    }

    #[test]
    fn status_gives_the_thread_group_and_the_real_ids() {
        let text = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t100\nNgid:\t0\nPid:\t101\n\
                    PPid:\t1\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\nGroups:\t100 \n";
        assert_eq!(parse_status(text), Some(Status { tgid: 100, uid: 1000, gid: 100 }));
        assert_eq!(parse_status("Tgid:\t1\nUid:\t0\t0\t0\t0\n"), None);
        assert_eq!(parse_status("Tgid:\tx\nUid:\t0\nGid:\t0\n"), None);
    }

    #[test]
    fn cmdline_splits_at_nul_bytes() {
        assert_eq!(split_cmdline(b"python3\0-c\0print(1)\0"), ["python3", "-c", "print(1)"]);
        assert_eq!(split_cmdline(b"nginx: worker process"), ["nginx: worker process"]);
        assert_eq!(split_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert!(split_cmdline(b"").is_empty());
        assert_eq!(split_cmdline(b"\xff\0"), ["\u{fffd}"]);
    }

    #[test]
    fn cgroup_path_prefers_unified_then_systemd_then_any_v1() {
        // cgroup v1 (and an unused v2 hierarchy), as on a systemd host with v1 or hybrid mounts.
        let v1 = "12:pids:/system.slice/nginx.service\n11:memory:/system.slice/nginx.service\n\
                  9:name=systemd:/system.slice/nginx.service\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(cgroup_path(v1).as_deref(), Some("/system.slice/nginx.service"));
        let systemd_elsewhere = "4:memory:/process_api/e729\n9:name=systemd:/user.slice/session-2.scope\n0::/\n";
        assert_eq!(cgroup_path(systemd_elsewhere).as_deref(), Some("/user.slice/session-2.scope"));
        // As on the machine this was written on: one controller placed, the rest at the root.
        let here = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/e729bedf\n3:cpuset:/\n0::/\n";
        assert_eq!(cgroup_path(here).as_deref(), Some("/process_api/e729bedf"));
        let docker_v1 = "9:name=systemd:/docker/0123abcd\n4:memory:/docker/0123abcd\n";
        assert_eq!(cgroup_path(docker_v1).as_deref(), Some("/docker/0123abcd"));
        // cgroup v2.
        assert_eq!(
            cgroup_path("0::/system.slice/docker-abc.scope\n").as_deref(),
            Some("/system.slice/docker-abc.scope")
        );
        assert_eq!(cgroup_path("0::/init.scope\n1:name=systemd:/x\n").as_deref(), Some("/init.scope"));
        // Nothing placed anywhere; paths with a colon.
        assert_eq!(cgroup_path("9:name=systemd:/\n0::/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_path("1:cpu:/\n").as_deref(), Some("/"));
        assert_eq!(cgroup_path("0::/a:b\n").as_deref(), Some("/a:b"));
        assert_eq!(cgroup_path(""), None);
        assert_eq!(cgroup_path("garbage\n"), None);
    }

    #[test]
    fn unit_of_takes_the_innermost_service_or_scope() {
        assert_eq!(unit_of("/system.slice/nginx.service").as_deref(), Some("nginx.service"));
        assert_eq!(unit_of("/system.slice/docker-abc.scope").as_deref(), Some("docker-abc.scope"));
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.scope").as_deref(),
            Some("app-foo.scope")
        );
        assert_eq!(unit_of("/system.slice/foo.service/payload").as_deref(), Some("foo.service"));
        assert_eq!(unit_of("/docker/0123abcd"), None);
        assert_eq!(unit_of("/system.slice"), None);
        assert_eq!(unit_of("/"), None);
        assert_eq!(unit_of("/.service"), None);
    }

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("flowgate-procinfo-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn users_parse_passwd_and_follow_changes() {
        let dir = TempDir::new("passwd");
        let path = dir.0.join("passwd");
        fs::write(
            &path,
            "root:x:0:0:root:/root:/bin/bash\n# comment\n\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n\
             toor:x:0:0::/:/bin/sh\nbroken:x:notanumber:0::/:\n+nis::::::\nshort:x\nalice:x:1000:1000:Alice, Room 1:/home/alice:/bin/zsh\n",
        )
        .unwrap();
        let mut users = Users::from_path(&path);
        assert_eq!(users.name(0).as_deref(), Some("root"), "the first line of a uid names it");
        assert_eq!(users.name(65534).as_deref(), Some("nobody"));
        assert_eq!(users.name(1000).as_deref(), Some("alice"));
        assert_eq!(users.name(1001), None);
        assert_eq!(
            (users.uid("toor"), users.uid("alice"), users.uid("broken"), users.uid("+nis")),
            (Some(0), Some(1000), None, None)
        );

        // A changed file (another size: the check does not depend on the clock's granularity).
        fs::write(&path, "root:x:0:0::/:\nbob:x:1000:1000::/:\n").unwrap();
        assert_eq!(users.name(1000).as_deref(), Some("bob"));
        assert_eq!(users.uid("alice"), None);
        fs::remove_file(&path).unwrap();
        assert_eq!(users.name(0), None, "no file, no users");
        assert_eq!(Users::from_path(dir.0.join("missing")).uid("root"), None);
    }

    /// A fake `/proc/<pid>` with the files this room reads.
    fn fake_process(root: &Path, pid: u32, tgid: u32, ppid: u32, comm: &str, exe: Option<&str>) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("stat"), stat_line(pid, comm, ppid)).unwrap();
        fs::write(
            dir.join("status"),
            format!("Name:\t{comm}\nTgid:\t{tgid}\nPid:\t{pid}\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\n"),
        )
        .unwrap();
        fs::write(dir.join("cmdline"), format!("{comm}\0--flag\0")).unwrap();
        fs::write(dir.join("cgroup"), "1:name=systemd:/system.slice/x.service\n0::/\n").unwrap();
        if let Some(exe) = exe {
            std::os::unix::fs::symlink(exe, dir.join("exe")).unwrap();
        }
    }

    #[test]
    fn reads_a_process_and_its_parents_from_a_proc_tree() {
        let dir = TempDir::new("proc");
        let root = &dir.0;
        fake_process(root, 1, 1, 0, "systemd", Some("/usr/lib/systemd/systemd"));
        fake_process(root, 50, 50, 1, "sshd", Some("/usr/sbin/sshd"));
        fake_process(root, 60, 60, 50, "bash (x)", None);
        fake_process(root, 61, 60, 50, "worker", Some("/usr/bin/bash (deleted)"));
        fake_process(root, 70, 70, 99, "orphan", None);

        let p = read_process_at(root, 61).unwrap();
        assert_eq!(
            p,
            ProcessInfo {
                pid: 60,
                ppid: 50,
                uid: 1000,
                gid: 100,
                exe: Some("/usr/bin/bash (deleted)".into()),
                cmdline: vec!["worker".into(), "--flag".into()],
                comm: "worker".into(),
                start_ticks: 123456,
                cgroup: Some("/system.slice/x.service".into()),
            }
        );
        assert_eq!(read_process_at(root, 60).unwrap().exe, None);
        let gone = read_process_at(root, 2).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::NotFound);
        assert!(gone.to_string().contains("/2/stat"), "{gone}");
        fs::write(root.join("70/status"), "Name:\tx\n").unwrap();
        let bad = read_process_at(root, 70).unwrap_err();
        assert!(bad.to_string().contains("70/status: not in the kernel's format"), "{bad}");

        let sshd = Some("/usr/sbin/sshd".to_owned());
        let init = Some("/usr/lib/systemd/systemd".to_owned());
        assert_eq!(parents_at(root, 60, 8), vec![(50, sshd.clone()), (1, init)]);
        assert_eq!(parents_at(root, 60, 1), vec![(50, sshd)]);
        assert_eq!(parents_at(root, 60, 0), vec![]);
        assert_eq!(parents_at(root, 1, 8), vec![]);
        assert_eq!(parents_at(root, 70, 8), vec![], "parent 99 is not there");
        assert_eq!(parents_at(root, 3, 8), vec![]);
    }
}
