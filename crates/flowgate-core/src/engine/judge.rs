//! Judging a new flow: which end is local, who opened it, and its first verdict from the rules
//! and the product's filter (or the verdict a previous instance left on it); and judging live
//! flows again when the rules change.
//!
//! This room creates entries and arms their first timer; it emits `flow.new` and `flow.verdict`.

use std::net::{IpAddr, SocketAddr};

use super::entry::{Entry, Mode, bits};
use super::table::Slot;
use super::{Engine, Origin, PacketMeta};
use crate::event::{Event, EventKind, Peek, RuleName, UpdateSource};
use crate::flow::{Direction, Flow, FlowId, Protocol};
use crate::packet::ParsedPacket;
use crate::rules::Action;
use crate::time::Instant;
use crate::verdict::{DataVerdict, FlowVerdict, NewFlowVerdict, PacketAction};

/// A flow about to be judged: everything but its id.
pub(super) struct NewFlow<'a> {
    pub(super) protocol: Protocol,
    pub(super) local: SocketAddr,
    pub(super) remote: SocketAddr,
    pub(super) direction: Direction,
    pub(super) interface: Option<&'a str>,
    pub(super) existing: bool,
    pub(super) forwarded: bool,
    /// ICMP type and code of the opener's message (see [`Flow::icmp`]).
    pub(super) icmp: Option<(u8, u8)>,
}

/// A new flow's first verdict and where it came from.
pub(super) struct First {
    pub(super) verdict: NewFlowVerdict,
    pub(super) rule: RuleName,
    pub(super) silent: bool,
    pub(super) filter_inspects: bool,
}

/// A new flow's first verdict as the modes of its directions, and whether the rules wait for
/// its host name (the window of the opener's bytes they read for it).
pub(super) struct FirstModes {
    pub(super) first: First,
    pub(super) out: Mode,
    pub(super) inn: Mode,
    pub(super) peek: Option<Peek>,
    pub(super) sniff: Option<u64>,
}

/// The modes of both directions (and the inspect window) a first verdict sets.
pub(super) fn modes_of(verdict: NewFlowVerdict) -> (Mode, Mode, Option<Peek>) {
    match verdict {
        NewFlowVerdict::Allow => (Mode::Allow, Mode::Allow, None),
        NewFlowVerdict::Drop => (Mode::Drop, Mode::Drop, None),
        NewFlowVerdict::Pause => (Mode::Pause, Mode::Pause, None),
        NewFlowVerdict::Inspect { peek_outbound, peek_inbound } => {
            let m = |n: u32| if n == 0 { Mode::Allow } else { Mode::Inspect { pass_end: 0, peek_end: u64::from(n) } };
            (m(peek_outbound), m(peek_inbound), Some(Peek { outbound: peek_outbound, inbound: peek_inbound }))
        }
    }
}

pub(super) fn severity(v: NewFlowVerdict) -> u8 {
    match v {
        NewFlowVerdict::Allow => 0,
        NewFlowVerdict::Inspect { .. } => 1,
        NewFlowVerdict::Pause => 2,
        NewFlowVerdict::Drop => 3,
    }
}

/// The most restrictive of two verdicts.
fn combine(a: NewFlowVerdict, b: NewFlowVerdict) -> NewFlowVerdict {
    if severity(a) >= severity(b) { a } else { b }
}

impl Engine {
    /// Which end is local and who opened the flow, from the hook, the config and the packet.
    fn orient(&self, meta: PacketMeta<'_>, p: &ParsedPacket<'_>) -> (bool, Direction) {
        let src_opened = match p.tcp {
            Some(f) if f.syn => !f.ack,
            // Picked up mid-stream: the side on the lower port is taken as the server.
            Some(_) => p.src_port >= p.dst_port,
            None => !(p.protocol == Protocol::Icmp && p.icmp_echo_reply),
        };
        let is_local = |a: &IpAddr| self.config.local_networks.iter().any(|n| n.contains(a));
        let src_local = match meta.origin {
            Origin::Output => true,
            Origin::Input => false,
            Origin::Forward => src_opened,
            Origin::Unknown => match (is_local(&p.src), is_local(&p.dst)) {
                (true, false) => true,
                (false, true) => false,
                _ => src_opened,
            },
        };
        let dir = if src_local == src_opened { Direction::Outbound } else { Direction::Inbound };
        (src_local, dir)
    }

    /// Opens a flow for a packet no flow claims.
    pub(super) fn open(
        &mut self,
        now: Instant,
        meta: PacketMeta<'_>,
        p: &ParsedPacket<'_>,
    ) -> Result<Slot, PacketAction> {
        let (src_local, direction) = self.orient(meta, p);
        let (src, dst) = (SocketAddr::new(p.src, p.src_port), SocketAddr::new(p.dst, p.dst_port));
        let (local, remote) = if src_local { (src, dst) } else { (dst, src) };
        let new = NewFlow {
            protocol: p.protocol,
            local,
            remote,
            direction,
            interface: meta.interface,
            existing: false,
            forwarded: meta.origin == Origin::Forward,
            // An echo exchange first seen at its reply was opened by the request.
            icmp: match p.icmp {
                Some((0, code)) if p.icmp_echo_reply => Some((8, code)),
                Some((129, code)) if p.icmp_echo_reply => Some((128, code)),
                other => other,
            },
        };
        self.start_flow(now, &new, None)
    }

    /// Judges a new flow (rules and the product filter, or a verdict kept from before) and puts
    /// it in the table, emitting its `flow.new` and `flow.verdict` events. `Err` carries the
    /// rules' verdict for a flow the full table could not take.
    pub(super) fn start_flow(
        &mut self,
        now: Instant,
        new: &NewFlow<'_>,
        kept: Option<FlowVerdict>,
    ) -> Result<Slot, PacketAction> {
        let mut flow = Flow {
            id: FlowId(0),
            protocol: new.protocol,
            direction: new.direction,
            local: new.local,
            remote: new.remote,
            interface: new.interface.map(Into::into),
            existing: new.existing,
            forwarded: new.forwarded,
            started: now,
            icmp: new.icmp,
            owner: None,
            host: None,
        };
        if self.rules.has_host_rules() && kept.is_none() {
            flow.host = self.dns_host(flow.remote.ip(), now);
        }
        let class = self.rules.classify(&flow);
        if self.table.is_full() {
            // A flood of new flows (spoofed sources, say) must not grow memory or push out the
            // flows already judged. What can be judged without state still is (a rule that drops
            // drops, so a flood cannot open a way past it); the rest gets the fail mode's
            // verdict: untracked, it could neither be inspected nor changed later.
            self.stats.untracked += 1;
            return Err(match class.action {
                Action::Drop => PacketAction::Drop,
                _ if self.config.fail_open => PacketAction::Accept,
                _ => PacketAction::Drop,
            });
        }
        flow.id = FlowId(self.next_flow_id);
        self.next_flow_id += self.config.flow_id_step.max(1);
        self.stats.flows_opened += 1;

        // Who owns the flow? Asked of every new flow when the driver can tell. A product's filter
        // judges a flow knowing its owner: with one, every new flow waits for the answer.
        let ask = self.config.owner_wait.is_some() && flow.owner.is_none();
        let filter_waits = ask && kept.is_none() && self.filter.is_some();
        let fail = if self.config.fail_open { NewFlowVerdict::Allow } else { NewFlowVerdict::Drop };
        let filter_verdict = match kept {
            Some(_) => None,
            None if filter_waits => None,
            None => self.call_filter("new_flow", flow.id, |f| f.new_flow(&flow)).map(|r| r.unwrap_or(fail)),
        };
        let fm = match kept {
            // A previous instance decided this flow for good: keep its word, ask no one.
            Some(v) => {
                let verdict = if v == FlowVerdict::Drop { NewFlowVerdict::Drop } else { NewFlowVerdict::Allow };
                let (out, inn, peek) = modes_of(verdict);
                let first = First { verdict, rule: self.names.kept.clone(), silent: false, filter_inspects: false };
                FirstModes { first, out, inn, peek, sniff: None }
            }
            None => self.first_modes(&flow, class, filter_verdict),
        };
        // A flow whose verdict the answer could change waits for it (paused, its packets held).
        let hold = ask && kept.is_none() && (filter_waits || self.rules.owner_decides(&flow));
        let (out, inn, peek) = if hold { (Mode::Pause, Mode::Pause, None) } else { (fm.out, fm.inn, fm.peek) };
        let sniff = if hold { None } else { fm.sniff };
        let first = fm.first;
        let interface = self.interfaces.acquire(new.interface);
        let mut entry = Entry::new(&flow, interface, now);
        entry.set_mode(Direction::Outbound, out);
        entry.set_mode(Direction::Inbound, inn);
        entry.set(bits::FILTER_INSPECTS, first.filter_inspects);
        entry.set(bits::SILENT, first.silent);
        // A DNS flow this host opened: its answers name hosts for the host rules.
        let dns = self.rules.has_host_rules()
            && matches!(flow.protocol, Protocol::Tcp | Protocol::Udp)
            && flow.direction == Direction::Outbound
            && flow.remote.port() == 53;
        entry.set(bits::WATCH, dns);
        entry.rule = Some(first.rule.clone());
        entry.timer_at = now + self.config.timeouts.idle(flow.protocol);
        let verdict = entry.verdict();
        let timer_at = entry.timer_at;
        let slot = match self.table.insert(entry) {
            Ok(s) => s,
            Err(_) => {
                self.interfaces.release(interface);
                return Err(PacketAction::Accept);
            }
        };
        self.timers.set(slot, timer_at);
        if let Some(w) = sniff {
            self.start_sniffing(slot, w);
        }
        let events = [
            Event { time: now, kind: EventKind::FlowNew { flow: flow.clone() } },
            Event {
                time: now,
                kind: EventKind::FlowVerdict { flow: flow.clone(), verdict, rule: Some(first.rule), peek },
            },
        ];
        if ask {
            let held = match (hold, filter_waits) {
                (false, _) => None,
                (true, true) => Some(super::owners::Held::AskFilter),
                (true, false) => Some(super::owners::Held::Filtered(filter_verdict)),
            };
            self.ask_owner(now, slot, &flow, held, events);
        } else {
            self.events.extend(events);
        }
        Ok(slot)
    }

    /// A new flow's first verdict and modes (see [`FirstModes`]): from its rule (`class`) and the
    /// product filter's answer, or, when the host name its first bytes may carry could change
    /// the rules' verdict (or an inspect rule matched), the rules' wait for it.
    pub(super) fn first_modes(
        &self,
        flow: &Flow,
        mut class: crate::rules::matcher::Classification,
        filter_verdict: Option<NewFlowVerdict>,
    ) -> FirstModes {
        let sniffable = matches!(flow.protocol, Protocol::Tcp | Protocol::Udp);
        let pending = if sniffable { self.rules.host_rule_pending(flow) } else { None };
        let opener_peek = match class.action {
            Action::Inspect { peek_outbound, peek_inbound } => Some(match flow.direction {
                Direction::Outbound => peek_outbound,
                Direction::Inbound => peek_inbound,
            }),
            _ => None,
        };
        let window = match (pending, opener_peek) {
            (Some(_), p) => Some(u64::from(p.unwrap_or(0)).max(u64::from(self.config.sniff_window))),
            (None, Some(p)) if sniffable => Some(u64::from(p)),
            // An inspect rule on a flow without a byte stream has nothing to look at.
            (None, Some(_)) => Some(0),
            (None, None) => None,
        };
        if window == Some(0) {
            class = self.rules.classify_inspected(flow);
        }
        let first = self.first_verdict(class, filter_verdict);
        let (out, inn, peek) = modes_of(first.verdict);
        // The rules wait even when a DNS name already gives a verdict: the flow's own name, if
        // its bytes carry one, is trusted first. A product's filter that drops or pauses it
        // has the last word.
        let blocked = match filter_verdict {
            Some(v) => matches!(v, NewFlowVerdict::Drop | NewFlowVerdict::Pause),
            None => pending.is_none() && matches!(first.verdict, NewFlowVerdict::Drop | NewFlowVerdict::Pause),
        };
        let waits = window.filter(|&w| w > 0 && !blocked);
        let Some(w) = waits else { return FirstModes { first, out, inn, peek, sniff: None } };
        if first.filter_inspects {
            // The filter's windows stand; a direction it does not look at is read by the rules.
            let (out, inn) = match flow.direction {
                Direction::Outbound if out == Mode::Allow => (super::stream::RULES_READ, inn),
                Direction::Inbound if inn == Mode::Allow => (out, super::stream::RULES_READ),
                _ => (out, inn),
            };
            return FirstModes { first, out, inn, peek, sniff: Some(w) };
        }
        // The rules read the opener's bytes; the other way passes meanwhile (its bytes answer
        // a request not let through yet).
        let reading = Mode::Inspect { pass_end: 0, peek_end: w };
        let (out, inn) = match flow.direction {
            Direction::Outbound => (reading, Mode::Allow),
            Direction::Inbound => (Mode::Allow, reading),
        };
        let mut first = first;
        if let Some(name) = pending.and_then(|i| self.rules.name(i)) {
            first.rule = name.clone();
            first.verdict = NewFlowVerdict::Inspect { peek_outbound: 0, peek_inbound: 0 };
        }
        FirstModes { first, out, inn, peek: if pending.is_some() { None } else { peek }, sniff: Some(w) }
    }

    /// A new flow's verdict from its rule (`class`) and the product filter's answer, the most
    /// restrictive winning, with the name of the rule that gave it.
    pub(super) fn first_verdict(
        &self,
        class: crate::rules::matcher::Classification,
        filter_verdict: Option<NewFlowVerdict>,
    ) -> First {
        let rule_verdict = match class.action {
            Action::Allow => NewFlowVerdict::Allow,
            Action::Drop => NewFlowVerdict::Drop,
            Action::Inspect { peek_outbound, peek_inbound } => NewFlowVerdict::Inspect { peek_outbound, peek_inbound },
        };
        let mut rule = class.rule.and_then(|i| self.rules.name(i)).unwrap_or(&self.names.default).clone();
        let silent = class.rule.is_some_and(|i| self.rules.rules()[i].silent);
        let (verdict, filter_inspects) = match filter_verdict {
            None => (rule_verdict, false),
            Some(fv) => {
                if severity(fv) > severity(rule_verdict) && !matches!(fv, NewFlowVerdict::Inspect { .. }) {
                    rule = self.names.provider.clone();
                }
                // A filter that inspects is shown exactly the window it asked for; a rule's own
                // inspect window has no one to show its bytes to (yet) and adds nothing.
                match (rule_verdict, fv) {
                    (NewFlowVerdict::Allow | NewFlowVerdict::Inspect { .. }, NewFlowVerdict::Inspect { .. }) => {
                        (fv, true)
                    }
                    _ => (combine(rule_verdict, fv), false),
                }
            }
        };
        First { verdict, rule, silent, filter_inspects }
    }

    /// Judges a live flow again with the current rules: a flow they drop is dropped now; one
    /// they still allow, or one already dropped, is left alone.
    pub(super) fn rejudge(&mut self, slot: Slot, now: Instant) {
        let Some(e) = self.table.get(slot) else { return };
        if e.verdict() == FlowVerdict::Drop {
            return;
        }
        let flow = e.flow(&self.interfaces);
        let class = self.rules.classify(&flow);
        if class.action != Action::Drop {
            return;
        }
        let (rule, silent) = match class.rule {
            Some(i) => (self.rules.name(i).cloned(), self.rules.rules()[i].silent),
            None => (Some(self.names.default.clone()), false),
        };
        if let Some(e) = self.table.get_mut(slot) {
            e.rule = rule;
            e.set(bits::SILENT, silent);
        }
        self.apply(slot, now, DataVerdict::Drop, None, UpdateSource::Rules);
    }
}
