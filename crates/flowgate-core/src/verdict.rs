//! Verdicts: what providers answer, and what the engine tells its driver to do with a packet.
//!
//! Provider verdicts follow the content-filter model of DESIGN.md ([`NewFlowVerdict`],
//! [`DataVerdict`], [`PacketVerdict`]). [`Decision`] is the engine's answer for one packet; it is
//! `#[must_use]` because a queued packet that never gets a verdict stalls the kernel queue.

use serde::Serialize;

use crate::flow::FlowId;

/// A provider's first word on a new flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NewFlowVerdict {
    /// Let the whole flow pass.
    Allow,
    /// Stop the flow.
    Drop,
    /// Let it pass while handing the provider up to this many payload bytes of each direction
    /// (through [`crate::FlowFilter::data`]); 0 means that direction is not inspected.
    Inspect { peek_outbound: u32, peek_inbound: u32 },
    /// Hold the flow's packets until a verdict arrives through the handle ([`crate::Handle::resume`]).
    Pause,
}

/// A provider's word on a flow after seeing some of its data, or a later update.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DataVerdict {
    /// The rest of the flow passes (in this direction) without more inspection.
    Allow,
    /// Stop the flow.
    Drop,
    /// Let `pass` more bytes through unseen, then show the next `peek` bytes. `peek: 0` means
    /// nothing more to see: after `pass` bytes the direction is allowed.
    Pass { pass: u32, peek: u32 },
    /// Hold the flow's packets until a verdict arrives through the handle.
    Pause,
}

/// A packet filter's verdict on one packet.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PacketVerdict {
    Allow,
    Drop,
    /// Keep the packet; release or drop it later with [`crate::PacketHandle::release`].
    Delay,
}

/// Where a flow stands, as events and flow listings show it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    Allow,
    Drop,
    /// Passing while a provider or rule looks at its first bytes.
    Inspect,
    /// Held until a provider decides.
    Pause,
}

impl FlowVerdict {
    pub fn name(self) -> &'static str {
        match self {
            FlowVerdict::Allow => "allow",
            FlowVerdict::Drop => "drop",
            FlowVerdict::Inspect => "inspect",
            FlowVerdict::Pause => "pause",
        }
    }

    /// How restrictive: providers side by side combine to the most restrictive verdict.
    pub(crate) fn severity(self) -> u8 {
        match self {
            FlowVerdict::Allow => 0,
            FlowVerdict::Inspect => 1,
            FlowVerdict::Pause => 2,
            FlowVerdict::Drop => 3,
        }
    }
}

/// Identifies a packet the engine told its driver to hold.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId(pub u64);

/// What to do with one packet now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PacketAction {
    Accept,
    Drop,
    /// Keep the packet (do not answer the kernel yet); the engine will later emit a
    /// [`crate::Release`] for this id through [`crate::Engine::poll_release`].
    Hold(PacketId),
}

/// The engine's answer for one packet.
#[must_use = "a queued packet must get a verdict, or the kernel queue stalls"]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: PacketAction,
    /// The flow the packet belongs to, if it could be tracked.
    pub flow: Option<FlowId>,
    /// The flow is decided for good in both directions (allowed or dropped): the driver may let
    /// the kernel handle the rest of it (conntrack mark) without asking again.
    pub settled: bool,
    /// A drop should not tell the sender (the rule said `silent`).
    pub silent: bool,
}
