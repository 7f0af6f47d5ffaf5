//! The daemon's control protocol, client side: the answers `flowgate flows`, `block`, `allow`,
//! `reload` and `stats` read from the control socket (`flowgate::daemon::control::request` and
//! `request_stream`, with their private `parse_reply`, on `flowgate::protocol::Reply`). A fake
//! daemon, a Unix socket in a temporary directory, answers each request with the input.
//!
//! Checks: no panic; a request succeeds only on an answer whose first line says `"ok": true`; a
//! streamed listing succeeds only when it ends with an end line, and hands over only lines that
//! start as flow lines.
#![no_main]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, OnceLock};

use flowgate::daemon::control;
use flowgate::protocol::{Command, Request, Select};
use libfuzzer_sys::fuzz_target;

struct Fake {
    dir: PathBuf,
    answers: SyncSender<Vec<u8>>,
}

fn fake() -> &'static Mutex<Fake> {
    static FAKE: OnceLock<Mutex<Fake>> = OnceLock::new();
    FAKE.get_or_init(|| {
        // libFuzzer's main, not Rust's, runs this process: ignore SIGPIPE as the flowgate binary
        // does, so a client that went away does not kill the fake daemon.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let dir = std::env::temp_dir().join(format!("flowgate-fuzz-reply-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let listener = UnixListener::bind(dir.join(control::SOCKET)).expect("bind the fake control socket");
        let (tx, rx): (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) = sync_channel(0);
        std::thread::spawn(move || {
            for answer in rx {
                let Ok((conn, _)) = listener.accept() else { continue };
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                let _ = (&conn).write_all(&answer);
            }
        });
        Mutex::new(Fake { dir, answers: tx })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, answer)) = data.split_first() else { return };
    let fake = fake().lock().unwrap();
    fake.answers.send(answer.to_vec()).expect("the fake daemon runs");
    let first_line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
    let first_ok = serde_json::from_slice::<serde_json::Value>(first_line).is_ok_and(|v| v["ok"] == true);
    if mode & 1 == 0 {
        let select = Select { ids: vec![1], ..Select::default() };
        let command = match (mode >> 1) % 4 {
            0 => Command::Stats,
            1 => Command::Reload,
            2 => Command::Block(select),
            _ => Command::Allow(select),
        };
        if let Ok(r) = control::request(&fake.dir, &Request::new(command)) {
            assert!(r.ok, "accepted an answer that is not ok: {r:?}");
            assert!(first_ok);
        }
    } else {
        let mut flows = 0;
        let r = control::request_stream(&fake.dir, &Request::new(Command::Flows(Select::default())), |line| {
            assert!(line.starts_with("{\"flow\":"), "handed over a line that is not a flow line: {line}");
            flows += 1;
            if mode & 2 != 0 && flows > 2 { Err("enough".into()) } else { Ok(()) }
        });
        if let Ok(end) = r {
            assert!(end.end, "a listing accepted without its end line: {end:?}");
            assert!(first_ok);
        }
    }
});
