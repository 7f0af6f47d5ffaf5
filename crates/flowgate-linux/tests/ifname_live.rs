//! Interface names in a namespace of the test's own: a link change is seen, and a cache that
//! follows the changes never gives the old name of a reused or renamed interface.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Netns, root};
use flowgate_linux::ifname::{IfNames, LinkWatch};

fn index_of(ns: &Netns, name: &str) -> u32 {
    let out = ns.exec(&["cat", &format!("/sys/class/net/{name}/ifindex")]);
    out.trim().parse().expect("ifindex")
}

#[test]
fn a_renamed_interface_is_seen_under_its_new_name() {
    if !root() {
        return;
    }
    let ns = Netns::new("fgif");
    ns.exec(&["ip", "link", "add", "fgveth0", "type", "veth", "peer", "name", "fgpeer0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let (watch, mut names) = ns.run(|| {
        let w = LinkWatch::start(stop.clone()).expect("link watch");
        let names = IfNames::following(w.changes());
        (w, names)
    });
    let changes = watch.changes();
    let index = index_of(&ns, "fgveth0");
    let first = ns.run(|| names.name(index).map(|n| n.to_string()));
    assert_eq!(first.as_deref(), Some("fgveth0"));
    ns.exec(&["ip", "link", "set", "fgveth0", "name", "fgtun7"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while changes.load(Ordering::Acquire) == 0 {
        assert!(Instant::now() < deadline, "no link change seen within 5 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let renamed = ns.run(|| names.name(index).map(|n| n.to_string()));
    assert_eq!(renamed.as_deref(), Some("fgtun7"), "the cache followed the change");
    stop.store(true, Ordering::Release);
    watch.join();
}
