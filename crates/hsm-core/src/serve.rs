//! Serving one access on a known stub: the synchronous fast path ([`Stub::try_serve_now`])
//! and the async path ([`Stub::serve`]) that classifies, fills and guards writes.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::api::DenyErrno;
use hsm_kernel::stat::FileStat;
use hsm_remote::Remote;
use tracing::warn;

use crate::agent::{AgentCore, lock};
use crate::api::{Access, AccessEvent, IntentSource, Later, Verdict, ambiguous, needed_range};
use crate::error::{ServeError, deny_errno};
use crate::fill::InlineClaim;
use crate::metrics::Metrics;
use crate::stub::Stub;

thread_local! {
    static FILLED_INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread filled a stub inline ([`AgentCore::try_handle_now`]) since the last
/// call, and clear that. An event thread polls for more events after a burst; after a fill
/// it should sleep instead: the fill left work for the other threads (persisting the map,
/// finalising the file) that needs the CPU its polling would hold, and on a 2-CPU machine a
/// thread that yields while polling is woken later than one that sleeps in `epoll_wait`.
pub fn take_filled_inline() -> bool {
    FILLED_INLINE.with(|f| f.replace(false))
}

impl Stub {
    /// The synchronous half of [`Stub::serve`]: reads whose granules are resident, or
    /// missing, not in flight, small, and fetchable inline. Everything else goes `Later`.
    pub(crate) fn try_serve_now(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        ev: &AccessEvent<'_>,
        st: &FileStat,
    ) -> Result<Verdict, Later> {
        self.last_used.store(core.now_ms(), Ordering::Relaxed);
        if let Some(b) = core.budget() {
            b.touch_key(self.key);
        }
        let early = if ambiguous(ev.range) {
            match ev.intent.classify_now(&*core.intent) {
                Some(a) => Some(a),
                None => return Err(Later(ev.intent)), // still on its way to sleep
            }
        } else {
            None
        };
        if let Some(a) = early.filter(|a| *a != Access::Read) {
            return Err(Later(ev.intent.seen(a)));
        }
        let range = needed_range(ev.range, early);
        let (run, needs_intent) = {
            let s = lock(&self.state);
            if s.finalized {
                return Ok(Verdict::AllowAndIgnore);
            }
            if st.size < s.resident.floor() || self.barrier.borrow().is_some() {
                return Err(Later(ev.intent)); // truncation bookkeeping lives on the async path
            }
            // Under the one lock held for the checks above and the run chosen below.
            let (missing, unsettled) = s.plan(&range, st.size);
            let needs_intent = early.is_none() && unsettled;
            let run = match (missing.first(), missing.last()) {
                (Some(&a), Some(&b)) => {
                    let contiguous = b - a + 1 == missing.len() as u64;
                    let bytes = s.resident.granule_range(b).end - s.resident.granule_range(a).start;
                    let free = missing.iter().all(|g| !s.inflight.contains_key(g));
                    if !contiguous
                        || !free
                        || bytes > core.opts.max_request_size
                        || !self.remote.runs_inline()
                        || core.bandwidth.is_some()
                        || self.meta.integrity.is_some()
                    {
                        return Err(Later(ev.intent));
                    }
                    Some(a..b + 1)
                }
                _ => None,
            };
            (run, needs_intent)
        };
        let access = match early {
            Some(a) => a,
            None if needs_intent => match ev.intent.classify_now(&*core.intent) {
                Some(a) => a,
                None => return Err(Later(ev.intent)), // still on its way to sleep
            },
            None => Access::Read,
        };
        if access != Access::Read {
            // Writes need a flush (and truncates a barrier) before they are allowed.
            return Err(Later(ev.intent.seen(access)));
        }
        core.traced(self, &range);
        let Some(run) = run else {
            Metrics::inc(&core.metrics.events_resident);
            self.readahead(core, range);
            return Ok(Verdict::Allow);
        };
        self.serve_inline(core, run, range)
    }

    /// Fill the missing granules `run` of a read of `range` on this thread, then answer it.
    fn serve_inline(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        run: Range<u64>,
        range: Range<u64>,
    ) -> Result<Verdict, Later> {
        if core.shutting_down.load(Ordering::SeqCst) {
            return Ok(Verdict::Deny(DenyErrno::Eio));
        }
        // Room in the bounded cache, if there is one, without waiting (waiting is the async
        // path's).
        let charged = match core.budget() {
            Some(b) => {
                let bytes = lock(&self.state).run_bytes(&run);
                if !b.try_charge(self.fd.as_fd(), self.key, bytes) {
                    return Err(Later(IntentSource::Known(Access::Read)));
                }
                Some((b.clone(), bytes))
            }
            None => None,
        };
        // Claim the granules so concurrent events wait on this fill instead of repeating it.
        let (tx, shared) = crate::stub::completed_by_sender("inline fill abandoned");
        let mut claim = {
            let mut s = lock(&self.state);
            if run
                .clone()
                .any(|g| s.inflight.contains_key(&g) || s.resident.is_resident(g))
            {
                if let Some((b, bytes)) = &charged {
                    b.refund(self.key, *bytes);
                }
                return Err(Later(IntentSource::Known(Access::Read))); // lost a race; wait there
            }
            for g in run.clone() {
                s.inflight.insert(g, shared.clone());
            }
            InlineClaim {
                stub: self,
                run: run.clone(),
                tx: Some(tx),
            }
        };
        Metrics::inc(&core.metrics.fills);
        FILLED_INLINE.with(|f| f.set(true));
        let started = std::time::Instant::now();
        let result = self.fill_inline(core, run.clone());
        core.metrics.fill_duration.observe(started.elapsed());
        {
            let mut s = lock(&self.state);
            if result.is_ok() {
                self.mark_filled(core, &mut s, run);
            } else {
                Metrics::inc(&core.metrics.fill_errors);
                if let Some((b, bytes)) = &charged {
                    b.refund(self.key, *bytes);
                }
            }
        }
        claim.release(result.as_ref().map(|_| ()).map_err(|e| Arc::new(e.clone())));
        let verdict = match &result {
            Ok(()) => {
                self.readahead(core, range.clone());
                Verdict::Allow
            }
            Err(e) => self.read_failed(&range, e),
        };
        Ok(verdict)
    }

    /// Log why a read of `range` failed, and the deny that answers it.
    pub(crate) fn read_failed(&self, range: &Range<u64>, e: &ServeError) -> Verdict {
        let errno = deny_errno(e);
        warn!(path = %self.path(), ?range, errno = errno.name(), error = %e, "read failed");
        Verdict::Deny(errno)
    }

    pub(crate) async fn serve(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        ev: &AccessEvent<'_>,
        st: &FileStat,
    ) -> Result<Verdict, ServeError> {
        self.last_used.store(core.now_ms(), Ordering::Relaxed);
        if let Some(b) = core.budget() {
            b.touch_key(self.key);
        }
        {
            let mut s = lock(&self.state);
            if s.finalized {
                return Ok(Verdict::AllowAndIgnore);
            }
            // The file is smaller than any size we knew: it was truncated (open(O_TRUNC)
            // raises no event). Bytes at or beyond its size are local from now on.
            if s.lower_floor(st.size) {
                Metrics::inc(&core.metrics.truncates);
                core.queue_persist(self, &mut s);
            }
        }
        // Classify first when the range alone cannot say what is needed, or when it is free.
        let early = if ambiguous(ev.range) || ev.intent.is_classified() {
            Some(ev.intent.classify(&*core.intent).await)
        } else {
            None
        };
        let mut range = needed_range(ev.range, early);
        let (mut missing, needs_intent) = self.plan(&range, st);
        // Reading /proc costs a few microseconds; skip it when no answer could change what
        // we do (everything in range durable, nothing in flight, writes already guarded).
        let access = match early {
            Some(a) => a,
            None if needs_intent => ev.intent.classify(&*core.intent).await,
            None => Access::Read,
        };
        if early.is_none() && access == Access::Shift {
            range = needed_range(ev.range, Some(access));
            missing = self.plan(&range, st).0;
        }
        if access == Access::Read {
            core.traced(self, &range);
        }
        if !missing.is_empty() {
            if core.shutting_down.load(Ordering::SeqCst) {
                return Err(ServeError::ShuttingDown);
            }
            if access == Access::Read && range.start == 0 {
                // A read from the start may be the first of a sequential reader: from a
                // network store its granules come from a stream that readahead then
                // extends, so a whole-file read costs one request (see crate::stream).
                self.stream_from_start(core, &missing);
            }
            self.fill(core, &missing, false).await?;
        }
        match access {
            Access::Read => {
                if missing.is_empty() {
                    Metrics::inc(&core.metrics.events_resident);
                }
                self.readahead(core, range);
            }
            Access::Write | Access::Truncate { .. } | Access::Shift | Access::Unknown => {
                {
                    let mut s = lock(&self.state);
                    // The flag keeps eviction and re-populate off a file that may hold local
                    // bytes; for an access that may be a write, that is the safe side.
                    if !s.resident.locally_modified() {
                        s.resident.set_locally_modified();
                        s.dirty = true;
                        // No longer a copy of the remote: not cache, never evicted.
                        if let Some(b) = core.budget() {
                            b.forget_key(self.key);
                        }
                    }
                    // A known write moves the mtime itself, and later fills leave it be. An
                    // unclassified access is not taken for one: reads must keep the file's
                    // times, and a write among them is noticed by the fill that follows it
                    // (the mtime is no longer the one put back; see `write_blocking`).
                    if access != Access::Unknown {
                        s.restore_mtime = None;
                    }
                }
                if let Access::Truncate { length } = access {
                    self.install_barrier(core, length, ev.intent.tid()).await;
                }
                // Before the write lands, everything it may overwrite must be durable in
                // the map: otherwise a crash could let a later fill overwrite it.
                let needs_flush = {
                    let s = lock(&self.state);
                    s.dirty || !s.meta_synced
                };
                if needs_flush {
                    Metrics::inc(&core.metrics.write_flushes);
                    self.persist(core, true).await?;
                }
            }
        }
        Ok(Verdict::Allow)
    }
}
