//! Dropping an owner_bpf capture leaves nothing behind: no BPF descriptor in the process (the
//! programs, links and maps live only while one is open, nothing is pinned), no mount and no
//! directory of the private cgroup2 mount. Alone in its test binary, so no other capture's
//! descriptors are counted. As root; without root it says so and passes.

use std::collections::BTreeMap;

use flowgate_linux::owner_bpf::OwnerCapture;

#[allow(dead_code)] // Netns: this test makes no namespace
mod common;
use common::root;

/// This process's descriptors by what they are (`anon_inode:bpf-prog`, ...), BPF ones only.
fn bpf_fds() -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if target.starts_with("anon_inode:bpf") {
                *kinds.entry(target).or_insert(0) += 1;
            }
        }
    }
    kinds
}

fn leftovers() -> (String, Vec<String>) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dirs = std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("flowgate-cgroup2-{}-", std::process::id())))
        .collect();
    (mountinfo, dirs)
}

#[test]
fn dropping_the_capture_leaves_nothing_behind() {
    if !root() {
        return;
    }
    let before = leftovers();
    assert!(bpf_fds().is_empty(), "{:?}", bpf_fds());
    let capture = OwnerCapture::start().unwrap_or_else(|e| panic!("starting the capture: {e}"));
    let held = bpf_fds();
    eprintln!("owner_bpf_drop_live: a capture holds {held:?}");
    assert!(held.get("anon_inode:bpf-prog").is_some_and(|&n| n >= 11), "{held:?}");
    assert!(held.get("anon_inode:bpf_link").or(held.get("anon_inode:bpf-link")).is_some(), "{held:?}");
    assert_eq!(leftovers(), before, "start() left a mount or a directory");
    drop(capture);
    assert!(bpf_fds().is_empty(), "left after drop: {:?}", bpf_fds());
    assert_eq!(leftovers(), before);
}
