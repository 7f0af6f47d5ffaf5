//! # flowgate-core
//!
//! The sans-IO heart of flowgate, a network content filter: packets and time go in, verdicts
//! and flow events come out. Nothing here reads a clock, opens a socket or touches a file, so
//! the same engine runs behind NFQUEUE on a live host, over a capture file in `flowgate replay`,
//! and in unit tests with virtual time.
//!
//! ## Rooms
//!
//! - [`packet`]: IP packet → 5-tuple, TCP flags, payload (via `etherparse`).
//! - [`defrag`]: IP fragments → whole datagrams, bounded, refusing conflicting overlaps.
//! - [`reassembly`]: one direction's stream bytes in order within a bounded span, conflicts reported.
//! - [`flow`]: flow identity and what providers see of a flow; [`owner`]: the process that
//!   owns it, and the matching of rules on it.
//! - [`rules`]: rules and their text forms, the compiled matcher, lints.
//! - [`verdict`], [`provider`]: the content-filter model a product implements.
//! - [`sniff`]: protocol sniffers (TLS ClientHello, QUIC Initial, HTTP request head, DNS) that
//!   name a flow's host from its first bytes; public, for products' own providers too.
//! - [`engine`]: the state machine that ties them together (flow table, timers, kernel-handled
//!   flows, sweeps); [`handle`]: its remote control from other threads (verdicts, kernel
//!   reports, streamed listings).
//! - [`packet_stage`]: every packet of chosen interfaces before any flow state: stateless packet
//!   rules and a product's [`PacketFilter`], delayed packets, per-interface counters.
//! - [`event`]: the JSON-lines event format; [`formats`]: events as flowgate JSON lines,
//!   Suricata EVE or OCSF records; [`community_id`]: the Community ID flow hash;
//!   [`time`]: the core's clock type.
//! - [`hosts`]: host-name patterns (`*.example.com`), compact sets of many names, blocklist files.
//! - [`dns_names`]: names learned from DNS answers (address → name until the TTL), shared by engines.
//!
//! ## Driving the engine
//!
//! ```
//! use std::sync::Arc;
//! use flowgate_core::{Engine, EngineConfig, Instant, Origin, PacketMeta, PacketAction};
//! use flowgate_core::rules::{RuleSet, matcher::CompiledRules};
//!
//! let rules = Arc::new(CompiledRules::compile(RuleSet::default()));
//! let mut engine = Engine::new(EngineConfig::default(), rules);
//! # let packet: Vec<u8> = vec![];
//! let meta = PacketMeta { interface: Some("eth0"), origin: Origin::Output };
//! let decision = engine.handle_packet(Instant::from_micros(1), meta, &packet);
//! assert_eq!(decision.action, PacketAction::Accept);
//! while let Some(event) = engine.poll_event() {
//!     println!("{}", event.kind.name());
//! }
//! ```
//!
//! A product adds its own judgement with [`Engine::set_flow_filter`] (a [`FlowFilter`]) and
//! [`PacketStage::set_filter`] (a [`PacketFilter`]), and changes verdicts later, from any
//! thread, through a [`Handle`] or a [`PacketHandle`].

pub mod community_id;
pub mod defrag;
pub mod dns_names;
pub mod engine;
pub mod event;
pub mod flow;
pub mod formats;
pub mod handle;
pub mod hosts;
pub mod owner;
pub mod packet;
pub mod packet_stage;
pub mod provider;
pub mod reassembly;
pub mod rules;
pub mod sniff;
pub mod time;
pub mod verdict;

pub use engine::{
    COMMAND_BUDGET, Enforce, Engine, EngineConfig, Existing, FaultKind, Footprint, KERNEL_BATCH, KernelAction, Origin,
    PacketMeta, ProviderFault, Release, Stats, TIMER_BUDGET, Timeouts,
};
pub use event::{CloseReason, Event, EventKind, FlowReport, UpdateSource};
pub use flow::{Counters, Direction, Flow, FlowId, Protocol};
pub use formats::EventFormat;
pub use handle::{
    FlowStatus, Handle, HandleError, KernelDecided, KernelDrop, KernelReport, KernelState, KernelSync, Listing,
    Selector,
};
pub use packet_stage::{PacketDirection, PacketHandle, PacketStage, PacketStageConfig};
pub use provider::{FlowFilter, PacketContext, PacketFilter};
pub use time::Instant;
pub use verdict::{DataVerdict, Decision, FlowVerdict, NewFlowVerdict, PacketAction, PacketId, PacketVerdict};
