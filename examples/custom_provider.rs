//! A custom provider beside the rule set, driven by hand: what a product embedding flowgate does.
//!
//! Run it with `cargo run -p flowgate-core --example custom_provider`. It plays two TCP
//! connections from 198.51.100.1 to 203.0.113.10:80 through the engine with virtual time:
//!
//! - `RequestPolicy` (a [`FlowFilter`]) peeks at the first 64 bytes each connection sends and
//!   drops the one whose request asks for `/admin`; the other is allowed after the peek.
//! - A watcher thread holds a [`Handle`]. When the allowed connection has been idle for a while
//!   and then turns suspicious, the watcher drops it mid-stream with `Handle::update`, long after
//!   its first verdict, and the engine drops its next packets.
//!
//! Every event is printed as the JSON line `flowgate run` would log. The example checks its own
//! outcome and exits non-zero if the engine did not do what is described above.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use etherparse::PacketBuilder;
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::rules::{Action, RuleSet};
use flowgate_core::{
    DataVerdict, Direction, Engine, EngineConfig, Flow, FlowFilter, FlowId, FlowReport, Instant, NewFlowVerdict,
    Origin, PacketAction, PacketMeta,
};

/// Drops HTTP requests for `/admin`; lets everything else through after a look at the request.
struct RequestPolicy {
    closed: mpsc::Sender<(FlowId, FlowReport)>,
}

impl FlowFilter for RequestPolicy {
    fn new_flow(&mut self, flow: &Flow) -> NewFlowVerdict {
        if flow.remote.port() == 80 {
            NewFlowVerdict::Inspect { peek_outbound: 64, peek_inbound: 0 }
        } else {
            NewFlowVerdict::Allow
        }
    }

    fn data(&mut self, _flow: &Flow, direction: Direction, offset: u64, bytes: &[u8]) -> DataVerdict {
        if direction == Direction::Outbound && offset == 0 && bytes.starts_with(b"GET /admin") {
            return DataVerdict::Drop;
        }
        // Seen enough: let the rest of this direction pass without us.
        DataVerdict::Allow
    }

    fn closed(&mut self, flow: &Flow, report: &FlowReport) {
        let _ = self.closed.send((flow.id, report.clone()));
    }
}

/// A TCP segment between the client 198.51.100.1:port and the server 203.0.113.10:80.
fn segment(client_port: u16, to_server: bool, seq: u32, flags: &str, payload: &[u8]) -> Vec<u8> {
    let (c, s) = ([198, 51, 100, 1], [203, 0, 113, 10]);
    let b = if to_server {
        PacketBuilder::ipv4(c, s, 64).tcp(client_port, 80, seq, 64240)
    } else {
        PacketBuilder::ipv4(s, c, 64).tcp(80, client_port, seq, 64240)
    };
    let b = flags.chars().fold(b, |b, f| match f {
        'S' => b.syn(),
        'A' => b.ack(1),
        'F' => b.fin(),
        'P' => b.psh(),
        _ => b,
    });
    let mut out = Vec::with_capacity(64 + payload.len());
    // Writing into a Vec cannot fail.
    let _ = b.write(&mut out, payload);
    out
}

fn main() -> ExitCode {
    let rules = Arc::new(CompiledRules::compile(RuleSet { rules: vec![], default_action: Action::Allow }));
    let mut engine = Engine::new(EngineConfig::default(), rules);
    let (closed_tx, closed_rx) = mpsc::channel();
    engine.set_flow_filter(Box::new(RequestPolicy { closed: closed_tx }));
    let out = PacketMeta { interface: Some("eth0"), origin: Origin::Output };
    let inn = PacketMeta { interface: Some("eth0"), origin: Origin::Input };

    let mut now = Instant::from_unix(1_800_000_000, 0);
    let mut tick = |ms: u64| {
        now = now + Duration::from_millis(ms);
        now
    };
    let print_events = |engine: &mut Engine| {
        while let Some(e) = engine.poll_event() {
            match serde_json::to_string(&e) {
                Ok(line) => println!("{line}"),
                Err(err) => eprintln!("cannot print event: {err}"),
            }
        }
    };

    // Connection 1 asks for /admin: dropped on its first bytes.
    let _ = engine.handle_packet(tick(1), out, &segment(40001, true, 100, "S", b""));
    let _ = engine.handle_packet(tick(1), inn, &segment(40001, false, 500, "SA", b""));
    let admin =
        engine.handle_packet(tick(1), out, &segment(40001, true, 101, "AP", b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"));
    print_events(&mut engine);

    // Connection 2 asks for /: allowed after the peek.
    let _ = engine.handle_packet(tick(1), out, &segment(40002, true, 100, "S", b""));
    let _ = engine.handle_packet(tick(1), inn, &segment(40002, false, 500, "SA", b""));
    let index =
        engine.handle_packet(tick(1), out, &segment(40002, true, 101, "AP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    print_events(&mut engine);
    let Some(long_lived) = index.flow else {
        eprintln!("connection 2 was not tracked");
        return ExitCode::FAILURE;
    };

    // The connection goes quiet for ten minutes (virtual time), then turns suspicious. Another
    // thread, the product's analysis, decides to stop it: any thread can, at any time.
    let handle = engine.handle();
    let watcher = thread::spawn(move || handle.update(long_lived, DataVerdict::Drop, None));
    let watcher_ok = matches!(watcher.join(), Ok(Ok(())));
    tick(600_000);
    let after = engine.handle_packet(tick(1), inn, &segment(40002, false, 501, "AP", b"suspicious payload"));
    print_events(&mut engine);

    engine.close_all(tick(1));
    print_events(&mut engine);
    let reports: Vec<_> = closed_rx.try_iter().collect();

    let ok = admin.action == PacketAction::Drop
        && index.action == PacketAction::Accept
        && watcher_ok
        && after.action == PacketAction::Drop
        && reports.len() == 2;
    if ok {
        eprintln!(
            "ok: /admin dropped on its first bytes; the long-lived flow {long_lived} dropped mid-stream by the watcher"
        );
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "unexpected: admin={admin:?} index={index:?} watcher_ok={watcher_ok} after={after:?} closed={}",
            reports.len()
        );
        ExitCode::FAILURE
    }
}
