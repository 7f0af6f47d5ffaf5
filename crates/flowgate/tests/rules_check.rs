//! `flowgate rules check`: the real binary on good, bad and suspicious rule files.

use std::path::PathBuf;
use std::process::{Command, Output};

struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, contents: &str) -> Self {
        let p = std::env::temp_dir().join(format!("flowgate-check-{tag}-{}.toml", std::process::id()));
        std::fs::write(&p, contents).expect("write temp config");
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check(file: &TempFile, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["rules", "check"])
        .arg(&file.0)
        .args(extra)
        .output()
        .expect("run flowgate")
}

#[test]
fn valid_file_passes() {
    let f = TempFile::new(
        "ok",
        "default_action = \"drop\"\n[[rule]]\nname = \"web\"\nremote_ports = \"80,443\"\naction = \"allow\"\n",
    );
    let out = check(&f, &[]);
    assert!(out.status.success());
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(so.contains("1 rule, default action drop, 0 warnings"), "{so}");
}

#[test]
fn invalid_file_names_file_line_and_field() {
    let f = TempFile::new(
        "bad",
        "default_action = \"allow\"\n\n[[rule]]\nname = \"x\"\nremote_ports = \"80,99999\"\naction = \"drop\"\n",
    );
    let out = check(&f, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:", f.0.display())), "{err}");
    assert!(err.contains("`remote_ports`") && err.contains("99999"), "{err}");

    let out = check(&f, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["line"], 5);
    assert_eq!(v["error"]["field"], "remote_ports");
}

#[test]
fn warnings_for_slash_zero_and_shadowed_rules() {
    let f = TempFile::new(
        "warn",
        "[[rule]]\nname = \"oops\"\nremote = \"203.0.113.7/0\"\nprotocol = \"tcp\"\naction = \"drop\"\n\n\
         [[rule]]\nname = \"never\"\nremote = \"203.0.113.7\"\nprotocol = \"tcp\"\nremote_ports = \"443\"\naction = \"allow\"\n",
    );
    let out = check(&f, &[]);
    assert!(out.status.success(), "warnings alone do not fail the check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(":1: warning: rule `oops`") && err.contains("matches every IPv4 address"), "{err}");
    assert!(err.contains(":7: warning: rule `never` can never match: earlier rule `oops`"), "{err}");
    let strict = check(&f, &["--strict"]);
    assert_eq!(strict.status.code(), Some(1), "--strict turns warnings into failure");
}

#[test]
fn missing_file_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["rules", "check", "/nonexistent/flowgate.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/flowgate.toml: cannot read config"));
}

#[test]
fn says_which_rules_the_kernel_decides_and_why_the_others_need_user_space() {
    let f = TempFile::new(
        "kernel",
        "[[rule]]\nname = \"peek\"\nremote_ports = \"443\"\nprotocol = \"tcp\"\naction = \"inspect\"\npeek = { outbound = 100 }\n\
         [[rule]]\nname = \"dns\"\nprotocol = \"udp\"\nremote_ports = \"53\"\naction = \"allow\"\n\
         [[rule]]\nname = \"docs\"\nremote = \"192.0.2.0/24\"\naction = \"drop\"\n",
    );
    let out = check(&f, &[]);
    assert!(out.status.success());
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(so.contains("decided in the kernel: 1 rule\n"), "{so}");
    assert!(so.contains(":1: rule `peek` is judged in user space: it inspects"), "{so}");
    assert!(so.contains(":12: rule `docs` is judged in user space: rule 1 before it is judged in user space"), "{so}");
    let out = check(&f, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["kernel"]["rules"], serde_json::json!(["dns"]));
    assert_eq!(v["kernel"]["default"], false);
    assert_eq!(v["kernel"]["user_space"][1]["rule"], "docs");
    // Turned off: every rule is judged in user space.
    let off = TempFile::new(
        "kernel-off",
        "kernel_rules = false\n[[rule]]\nname = \"dns\"\nprotocol = \"udp\"\naction = \"allow\"\n",
    );
    let so = String::from_utf8_lossy(&check(&off, &[]).stdout).into_owned();
    assert!(so.contains("decided in the kernel: 0 rules\n") && so.contains("kernel rules are off"), "{so}");
}
