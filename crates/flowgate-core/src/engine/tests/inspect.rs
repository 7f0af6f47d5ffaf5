//! Inspection: held bytes, their order, overlaps, cut packets, the hold timeout.

use super::*;

/// Client data at stream offset `offset` (the connection's first byte is offset 0).
fn at(c: &Conn, offset: u32, data: &[u8]) -> Vec<u8> {
    // `Conn::new` starts the client at 1000; its SYN takes one.
    tcp(c.c, c.s, 1_001 + offset, c.sseq, "PA", data)
}

fn hold_id(d: Decision) -> PacketId {
    match d.action {
        PacketAction::Hold(id) => id,
        other => panic!("expected the packet held, got {other:?}"),
    }
}

fn inspecting(peek: u32, data: impl IntoIterator<Item = DataVerdict>) -> (Engine, Arc<Mutex<Log>>) {
    let mut e = engine();
    let (f, log) = scripted(NewFlowVerdict::Inspect { peek_outbound: peek, peek_inbound: 0 }, data);
    e.set_flow_filter(f);
    (e, log)
}

#[test]
fn bytes_the_filter_has_not_judged_are_held_until_it_does() {
    let (mut e, log) = inspecting(5, [DataVerdict::Pause]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let p = hold_id(e.handle_packet(ms(3), OUT, &c.send(b"hello world")));
    assert_eq!(log.lock().expect("log").data, [(id, Direction::Outbound, 0, b"hello".to_vec())]);
    assert!(releases(&mut e).is_empty());
    // A pause holds everything, acknowledgements too.
    assert!(matches!(e.handle_packet(ms(4), IN, &c.server_ack()).action, PacketAction::Hold(_)));
    e.update(ms(5), id, DataVerdict::Allow, None);
    let r = releases(&mut e);
    assert!(r.contains(&Release { packet: p, accept: true }), "{r:?}");
    assert_eq!(e.footprint().held_packets, 0);
}

#[test]
fn a_drop_after_pass_100_and_peek_100_lets_exactly_100_bytes_through() {
    let body: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 26) as u8).collect();
    // One segment of 300 bytes: the packet is cut.
    let (mut e, log) = inspecting(100, [DataVerdict::Pass { pass: 0, peek: 100 }, DataVerdict::Drop]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let p = hold_id(e.handle_packet(ms(3), OUT, &c.send(&body)));
    let shown = log.lock().expect("log").data.clone();
    assert_eq!(
        shown,
        [(id, Direction::Outbound, 0, body[..100].to_vec()), (id, Direction::Outbound, 100, body[100..200].to_vec())]
    );
    assert_eq!(releases(&mut e), [Release { packet: p, accept: true }]);
    let cut = e.take_rewrite(p).expect("the packet goes out cut");
    let parsed = crate::packet::parse(&cut).expect("a packet");
    assert_eq!(parsed.payload, &body[..100]);
    assert_eq!(e.flows()[0].verdict, FlowVerdict::Drop);
    assert_eq!(e.footprint().rewrites, 0);

    // Three segments of 100: the first passes at once, the second is dropped.
    let (mut e, _) = inspecting(100, [DataVerdict::Pass { pass: 0, peek: 100 }, DataVerdict::Drop]);
    let mut c = Conn::new("198.51.100.1:40001", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    assert_eq!(e.handle_packet(ms(3), OUT, &c.send(&body[..100])), accepted(id, false));
    assert_eq!(e.handle_packet(ms(4), OUT, &c.send(&body[100..200])), dropped(id, false));
    assert_eq!(e.handle_packet(ms(5), OUT, &c.send(&body[200..])), dropped(id, true));
}

#[test]
fn segments_out_of_order_are_shown_in_order_and_released_together() {
    let (mut e, log) = inspecting(10, []);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let late = hold_id(e.handle_packet(ms(3), OUT, &at(&c, 5, b"fghij")));
    assert!(log.lock().expect("log").data.is_empty(), "a gap: nothing to show yet");
    assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, 0, b"abcde")), accepted(id, false));
    assert_eq!(log.lock().expect("log").data, [(id, Direction::Outbound, 0, b"abcdefghij".to_vec())]);
    assert_eq!(releases(&mut e), [Release { packet: late, accept: true }]);
}

#[test]
fn overlapping_segments_with_different_bytes_drop_the_flow() {
    let (mut e, _) = inspecting(10, [DataVerdict::Pause]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let first = hold_id(e.handle_packet(ms(3), OUT, &at(&c, 0, b"GET /a HTTP/1.1\r\n")));
    // The same bytes again (a retransmission) are no news.
    assert!(matches!(
        e.handle_packet(ms(4), OUT, &at(&c, 0, b"GET /a")).action,
        PacketAction::Drop | PacketAction::Hold(_)
    ));
    assert_eq!(e.flows()[0].verdict, FlowVerdict::Pause);
    assert_eq!(e.handle_packet(ms(5), OUT, &at(&c, 4, b"/admin")), dropped(id, false));
    assert_eq!(e.stats().overlap_conflicts, 1);
    let ev = events(&mut e);
    assert!(
        ev.iter().any(|v| matches!(
            &v.kind,
            EventKind::FlowUpdate { verdict: FlowVerdict::Drop, source: UpdateSource::Overlap, .. }
        )),
        "{ev:?}"
    );
    assert!(releases(&mut e).contains(&Release { packet: first, accept: false }));

    // Told to ignore them, the flow goes on with the bytes first seen; the other copy is dropped.
    let mut e = engine_with_config(EngineConfig { overlap_drop: false, ..EngineConfig::default() });
    let (f, _) = scripted(NewFlowVerdict::Inspect { peek_outbound: 10, peek_inbound: 0 }, [DataVerdict::Pause]);
    e.set_flow_filter(f);
    let mut c = Conn::new("198.51.100.1:40001", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let _ = hold_id(e.handle_packet(ms(3), OUT, &at(&c, 0, b"GET /a HTTP/1.1\r\n")));
    assert_eq!(
        e.handle_packet(ms(5), OUT, &at(&c, 4, b"/admin")),
        Expect { action: PacketAction::Drop, flow: Some(id), settled: false }
    );
    assert_eq!(e.flows()[0].verdict, FlowVerdict::Pause);
}

#[test]
fn held_bytes_without_a_verdict_get_the_timeout_verdict() {
    let (mut e, _) = inspecting(10, [DataVerdict::Pause]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let p = hold_id(e.handle_packet(ms(3), OUT, &c.send(b"0123456789")));
    let due = e.poll_timeout().expect("a deadline");
    assert!(due <= ms(3) + Duration::from_secs(10), "{due:?}");
    e.handle_timeout(ms(3) + Duration::from_secs(10));
    assert_eq!(e.stats().hold_timeouts, 1);
    assert_eq!(releases(&mut e), [Release { packet: p, accept: false }]);
    let ev = events(&mut e);
    assert!(ev.iter().any(|v| matches!(&v.kind, EventKind::FlowUpdate { flow, verdict: FlowVerdict::Drop, source: UpdateSource::Timeout, .. } if flow.id == id)), "{ev:?}");
}

#[test]
fn a_segment_far_past_what_is_kept_is_dropped() {
    let (mut e, _) = inspecting(10, []);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    assert_eq!(
        e.handle_packet(ms(3), OUT, &at(&c, 200_000, b"late")),
        Expect { action: PacketAction::Drop, flow: Some(id), settled: false }
    );
    assert_eq!(e.stats().out_of_window, 1);
    assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, 0, b"0123456789")), accepted(id, false));
}

#[test]
fn a_window_far_into_the_stream_is_shown_and_what_passes_before_it_is_not_kept() {
    let (mut e, log) = inspecting(10, [DataVerdict::Pass { pass: 200_000, peek: 10 }, DataVerdict::Allow]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    assert_eq!(e.handle_packet(ms(3), OUT, &c.send(b"0123456789")), accepted(id, false));
    let chunk = vec![b'x'; 1000];
    for k in 0..200 {
        assert_eq!(e.handle_packet(ms(4 + k), OUT, &c.send(&chunk)), accepted(id, false), "chunk {k}");
    }
    assert_eq!(e.handle_packet(ms(300), OUT, &c.send(b"ABCDEFGHIJKL")), accepted(id, false));
    let shown = log.lock().expect("log").data.clone();
    assert_eq!(shown[1], (id, Direction::Outbound, 200_010, b"ABCDEFGHIJ".to_vec()));
}
