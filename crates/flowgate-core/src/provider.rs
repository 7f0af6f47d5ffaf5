//! The provider traits: how a product plugs its own judgement into the engine.
//!
//! A [`FlowFilter`] judges flows (at their start, on their first bytes, when a direction ends)
//! and hears when they close; it is called on the engine's thread, from inside
//! `Engine::handle_*`. A [`PacketFilter`] judges single packets of chosen interfaces, before any
//! flow state; it is called on a packet stage's thread, from inside
//! [`crate::PacketStage::handle_packet`]. Neither may block. To decide later, return `Pause` (or
//! allow and change your mind) and use a [`crate::Handle`], or return `Delay` and use a
//! [`crate::PacketHandle`], from any thread. The built-in rule set judges beside them; the most restrictive answer wins.
//!
//! A provider that panics, or takes longer than the engine's budget for one call, does not take
//! the engine down: the flow or packet it was judging gets the fail mode's verdict, the fault is
//! counted and reported with the provider's [`FlowFilter::name`], and other flows go on being
//! judged by it (see `engine/providers.rs`).

use crate::event::FlowReport;
use crate::flow::{Direction, Flow};
use crate::packet_stage::PacketDirection;
use crate::verdict::{DataVerdict, NewFlowVerdict, PacketId, PacketVerdict};

/// Judges flows. Only `new_flow` is required.
pub trait FlowFilter: Send {
    /// The name reports of this provider's faults give.
    fn name(&self) -> &str {
        "flow filter"
    }

    /// A flow was seen for the first time (its full 5-tuple, interface and direction are known).
    /// Where the driver tells owners ([`crate::EngineConfig::owner_wait`]), this is called once
    /// the owner is known (or the wait ran out): `flow.owner` names the process; meanwhile the
    /// flow's packets are held.
    fn new_flow(&mut self, flow: &Flow) -> NewFlowVerdict;

    /// Payload bytes of `direction`, starting at byte `offset` of that direction's stream. Called
    /// only for flows this filter asked to inspect, only within the peek window it asked for.
    fn data(&mut self, _flow: &Flow, _direction: Direction, _offset: u64, _bytes: &[u8]) -> DataVerdict {
        DataVerdict::Allow
    }

    /// `direction` ended (TCP FIN) while the flow was being inspected.
    fn data_complete(&mut self, _flow: &Flow, _direction: Direction) -> DataVerdict {
        DataVerdict::Allow
    }

    /// The flow closed; `report` has its counts and last verdict.
    fn closed(&mut self, _flow: &Flow, _report: &FlowReport) {}
}

/// One packet, as a [`PacketFilter`] sees it.
#[derive(Debug)]
pub struct PacketContext<'a> {
    /// The packet's id: what [`crate::PacketHandle::release`] takes if the filter delays it.
    pub id: PacketId,
    /// Interface the packet came in on (inbound), goes out on (outbound), or came in on
    /// (forwarded), where known.
    pub interface: Option<&'a str>,
    pub direction: PacketDirection,
    /// The IP packet, from its IP header on, as the kernel has it (also when it cannot be
    /// parsed).
    pub bytes: &'a [u8],
}

/// Judges single packets: every packet of the interfaces and directions it was turned on for
/// (see [`crate::packet_stage`]), flows the kernel handles included.
pub trait PacketFilter: Send {
    fn packet(&mut self, ctx: &PacketContext<'_>) -> PacketVerdict;

    /// The name reports of this provider's faults give.
    fn name(&self) -> &str {
        "packet filter"
    }
}
