//! The daemon's engines seen as one flow registry: every live flow is in exactly one engine (its
//! owner), and whoever asks about a flow is sent to that engine.
//!
//! A flow's owner is the worker that judged it first (the kernel's queue balancing chose it) or
//! that adopted it; its conntrack mark names it (so the chains and conntrack's reports reach it),
//! and so does its id (engine `k` of `n` hands out `k + 1, k + 1 + n, ...`). Commands by id go to
//! the owner alone; commands by address or port go to every engine, each answering for its own
//! flows, so no flow is listed or changed twice. Listings stream from the engines a chunk at a
//! time (see [`flowgate_core::Handle::list`]); a listing that wants current counters first asks
//! the kernel watcher for a sync. This room holds the handles and talks only through them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{DataVerdict, FlowId, FlowStatus, Handle, HandleError, Listing, Selector};

use super::enforce::owner_of;
use super::kernel::Syncer;

/// How long a command waits for room in an engine's full channel.
const SEND_WAIT: Duration = Duration::from_secs(5);
/// How long a listing waits for an engine's next chunk.
const CHUNK_WAIT: Duration = Duration::from_secs(10);
/// How long a listing waits for the kernel sync that freshens counters.
const SYNC_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(crate) struct Registry {
    handles: Vec<Handle>,
    syncer: Option<Syncer>,
}

/// Retries `f` while the engine's channel is full, up to [`SEND_WAIT`].
fn retry<T>(mut f: impl FnMut() -> Result<T, HandleError>) -> Result<T, String> {
    let deadline = Instant::now() + SEND_WAIT;
    loop {
        match f() {
            Err(HandleError::Busy) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            other => return other.map_err(|e| e.to_string()),
        }
    }
}

impl Registry {
    pub(crate) fn new(handles: Vec<Handle>, syncer: Option<Syncer>) -> Registry {
        Registry { handles, syncer }
    }

    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The engine that owns flow `id`.
    pub(crate) fn owner(&self, id: FlowId) -> &Handle {
        &self.handles[owner_of(id, self.handles.len())]
    }

    /// The engines a selector can concern: the owners of its ids, or all.
    fn targets(&self, selector: &Selector) -> Vec<(&Handle, Selector)> {
        if selector.ids.is_empty() {
            return self.handles.iter().map(|h| (h, selector.clone())).collect();
        }
        let n = self.handles.len();
        (0..n)
            .filter_map(|k| {
                let ids: Vec<FlowId> = selector.ids.iter().copied().filter(|&id| owner_of(id, n) == k).collect();
                (!ids.is_empty()).then(|| (&self.handles[k], Selector { ids, ..selector.clone() }))
            })
            .collect()
    }

    /// Streams the flows `selector` matches, engine after engine, to `each` (a chunk at a time).
    /// `fresh`: bring kernel-handled flows' counters up to date first.
    pub(crate) fn list(
        &self,
        selector: &Selector,
        fresh: bool,
        mut each: impl FnMut(&[FlowStatus]) -> Result<(), String>,
    ) -> Result<(), String> {
        if fresh && let Some(s) = &self.syncer {
            // Stale counters are better than no listing: a sync that does not finish in time
            // only makes them older.
            let _ = s.sync(SYNC_WAIT);
        }
        for (h, sel) in self.targets(selector) {
            let listing = retry(|| h.list(sel.clone()))?;
            drain(listing, &mut each)?;
        }
        Ok(())
    }

    /// Gives `verdict` to every flow `selector` matches; returns them as they are now.
    pub(crate) fn apply(&self, selector: &Selector, verdict: DataVerdict) -> Result<Vec<FlowStatus>, String> {
        let mut out = Vec::new();
        for (h, sel) in self.targets(selector) {
            let listing = retry(|| h.apply(sel.clone(), verdict))?;
            drain(listing, &mut |c: &[FlowStatus]| {
                out.extend_from_slice(c);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Gives every engine the new rules (each judges its live flows again).
    pub(crate) fn reload(&self, rules: &Arc<CompiledRules>) -> Result<(), String> {
        for h in &self.handles {
            retry(|| h.reload(rules.clone()))?;
        }
        Ok(())
    }
}

fn drain(mut listing: Listing, each: &mut impl FnMut(&[FlowStatus]) -> Result<(), String>) -> Result<(), String> {
    loop {
        match listing.next_before(Instant::now() + CHUNK_WAIT) {
            None => return Ok(()),
            Some(Ok(chunk)) => {
                each(&chunk)?;
                listing.give_back(chunk);
            }
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}
