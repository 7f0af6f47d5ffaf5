//! Calling the product's providers so that their faults stay theirs.
//!
//! Every call of a [`FlowFilter`] goes through here (the packet stage guards its
//! [`crate::PacketFilter`] the same way). A call that panics is
//! caught (the engine's state is not touched by the provider, so it stays whole); a call that
//! takes longer than [`super::EngineConfig::provider_budget`] (timed with the driver's stopwatch,
//! if one is set: the engine reads no clock of its own) has its answer thrown away. Either way
//! the flow or packet being judged gets the fail mode's verdict ([`super::EngineConfig::fail_open`]),
//! the fault is counted (`provider_faults`) and queued for [`Engine::poll_fault`] with the
//! provider's name, and the provider keeps judging other flows.
//!
//! This room owns the fault queue; it decides nothing but "answer or fault".

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use super::Engine;
use crate::flow::FlowId;
use crate::provider::FlowFilter;

/// Most faults kept for [`Engine::poll_fault`]; older ones are only counted.
const MAX_FAULTS: usize = 64;

/// What went wrong with a provider call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// It panicked, with this message.
    Panic(String),
    /// It returned, but after this long.
    Slow(Duration),
}

/// A provider call that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderFault {
    /// The provider's name.
    pub provider: String,
    /// The call: `new_flow`, `data`, `data_complete`, `closed` or `packet`.
    pub call: &'static str,
    pub flow: Option<FlowId>,
    pub kind: FaultKind,
}

/// A monotonic stopwatch the driver gives the engine to time provider calls.
pub type Stopwatch = Box<dyn Fn() -> Duration + Send>;

/// A panic's message, as fault reports give it.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Engine {
    /// Times provider calls with `stopwatch` (monotonic); calls over the budget count as faults.
    pub fn set_stopwatch(&mut self, stopwatch: impl Fn() -> Duration + Send + 'static) {
        self.stopwatch = Some(Box::new(stopwatch));
    }

    /// The next provider fault, oldest first.
    pub fn poll_fault(&mut self) -> Option<ProviderFault> {
        self.faults.pop_front()
    }

    fn fault(&mut self, provider: String, call: &'static str, flow: Option<FlowId>, kind: FaultKind) {
        self.stats.provider_faults += 1;
        if self.faults.len() < MAX_FAULTS {
            self.faults.push_back(ProviderFault { provider, call, flow, kind });
        }
    }

    /// Calls the flow filter: `None` without one, `Some(Err(()))` when the call faulted.
    pub(super) fn call_filter<T>(
        &mut self,
        call: &'static str,
        flow: FlowId,
        f: impl FnOnce(&mut dyn FlowFilter) -> T,
    ) -> Option<Result<T, ()>> {
        let mut filter = self.filter.take()?;
        let started = self.stopwatch.as_ref().map(|s| s());
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut *filter)));
        let took = started.and_then(|t0| self.stopwatch.as_ref().map(|s| s().saturating_sub(t0)));
        let name = filter.name().to_string();
        self.filter = Some(filter);
        Some(self.judge_call(name, call, Some(flow), result, took))
    }

    fn judge_call<T>(
        &mut self,
        name: String,
        call: &'static str,
        flow: Option<FlowId>,
        result: std::thread::Result<T>,
        took: Option<Duration>,
    ) -> Result<T, ()> {
        match (result, took) {
            (Err(payload), _) => {
                self.fault(name, call, flow, FaultKind::Panic(panic_message(&*payload)));
                Err(())
            }
            (Ok(_), Some(t)) if t > self.config.provider_budget => {
                self.fault(name, call, flow, FaultKind::Slow(t));
                Err(())
            }
            (Ok(v), _) => Ok(v),
        }
    }
}
