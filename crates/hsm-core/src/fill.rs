//! Filling missing granules: one in-flight fill per granule shared by every waiter,
//! bounded and rate-limited fetches, writes through a per-fill descriptor, inline fills, and
//! readahead.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use hsm_kernel::stat::{self};
use hsm_remote::{Body, Remote, RemoteError};
use tracing::debug;

use crate::agent::{AgentCore, lock};
use crate::error::{LocalError, ServeError};
use crate::metrics::Metrics;
use crate::stub::{FillResult, SharedFill, Stub, StubState};
use crate::stubio::{self};

/// Fills at least this large start their writeback at once (see `write_blocking`).
const WRITEBACK_MIN: usize = 1 << 20;

/// A ranged request running longer than this no longer counts against
/// `max_concurrent_fetches` (see `bounded_fetch`).
pub(crate) const SLOW_REQUEST: Duration = Duration::from_millis(500);

/// How often a slow request that found every slow slot taken tries again.
const SLOW_RETRY: Duration = Duration::from_millis(100);

/// Granules an inline fill has claimed. Released exactly once: by `release`, or, if the
/// fill panicked, by `Drop` (so waiters get an error instead of waiting forever and the
/// granules can be fetched again).
pub(crate) struct InlineClaim<'a> {
    pub(crate) stub: &'a Stub,
    pub(crate) run: Range<u64>,
    pub(crate) tx: Option<tokio::sync::oneshot::Sender<FillResult>>,
}

impl InlineClaim<'_> {
    pub(crate) fn release(&mut self, result: FillResult) {
        if let Some(tx) = self.tx.take() {
            lock(&self.stub.state).clear_inflight(self.run.clone());
            let _ = tx.send(result);
        }
    }
}

impl Drop for InlineClaim<'_> {
    fn drop(&mut self) {
        self.release(Err(Arc::new(ServeError::TaskFailed(
            "inline fill panicked".into(),
        ))));
    }
}

impl Stub {
    /// Granules `run` were fetched and written: they are readable now, and the map that says
    /// so is queued for persisting.
    pub(crate) fn mark_filled(
        self: &Arc<Self>,
        core: &AgentCore,
        s: &mut StubState,
        run: Range<u64>,
    ) {
        s.resident.set_range_resident(run);
        s.dirty = true;
        core.queue_persist(self, s);
    }

    /// Fetch and write one run of granules on this thread (remote I/O runs inline).
    pub(crate) fn fill_inline(&self, core: &AgentCore, run: Range<u64>) -> Result<(), ServeError> {
        let part = {
            let s = lock(&self.state);
            let start = s.resident.granule_range(run.start).start;
            start..s.resident.fetch_range(run.end - 1).end.max(start)
        };
        Metrics::inc(&core.metrics.remote_requests);
        let data = futures::executor::block_on(self.remote.get_body(
            &self.meta.key,
            part.clone(),
            &self.expect,
        ))?;
        let data = self.accept_body(core, &part, data)?;
        // A truncate handled on another thread may have installed a barrier since we looked:
        // check again under the gate, and wait for it to resolve like the async path does.
        let _gate = loop {
            let gate = self.gate.blocking_read();
            if !self.barrier.borrow().is_some_and(|b| b < part.end) {
                break gate;
            }
            drop(gate);
            // The barrier is lifted by the async side once the truncate is seen completing.
            let mut barrier = self.barrier.subscribe();
            let _ =
                futures::executor::block_on(barrier.wait_for(|b| !b.is_some_and(|b| b < part.end)));
        };
        let written = self.write_blocking(part.start, &data)?;
        Metrics::add(&core.metrics.bytes_written, written);
        Ok(())
    }

    /// Fetch the given missing granules (sorted), sharing fills already in flight, in
    /// requests of at most `max_request_size`. With `background`, start the fills and
    /// return at once (readahead).
    pub(crate) async fn fill(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        granules: &[u64],
        background: bool,
    ) -> Result<(), ServeError> {
        self.fill_in(core, granules, background, core.opts.max_request_size)
            .await
    }

    /// [`Self::fill`] with requests of at most `request_size` (readahead's grow with its
    /// window).
    pub(crate) async fn fill_in(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        granules: &[u64],
        background: bool,
        request_size: u64,
    ) -> Result<(), ServeError> {
        // Room in the bounded cache first: a fill that cannot fit fails before any of it is
        // fetched. Readahead never waits for room (nor makes any).
        let budget = core.budget().cloned();
        let mut charged = 0;
        if let Some(b) = &budget {
            let bytes: u64 = {
                let s = lock(&self.state);
                granules
                    .iter()
                    .filter(|g| !s.resident.is_resident(**g) && !s.inflight.contains_key(*g))
                    .map(|&g| s.run_bytes(&(g..g + 1)))
                    .sum()
            };
            if bytes > 0 {
                if background {
                    if !b.try_charge(self.fd.as_fd(), self.key, bytes) {
                        return Ok(());
                    }
                } else {
                    b.charge(self.fd.as_fd(), self.key, bytes).await?;
                }
                charged = bytes;
            }
        }
        let mut started = 0;
        let waits: Vec<SharedFill> = {
            let mut s = lock(&self.state);
            let per_request = (request_size >> s.resident.granule_shift()).max(1);
            let mut waits: Vec<SharedFill> = Vec::new();
            let mut run: Option<Range<u64>> = None;
            for &g in granules {
                if s.resident.is_resident(g) {
                    continue;
                }
                if let Some(f) = s.inflight.get(&g) {
                    if !background {
                        Metrics::inc(&core.metrics.fill_joins);
                    }
                    if !waits.iter().any(|w| w.ptr_eq(f)) {
                        waits.push(f.clone());
                    }
                    continue;
                }
                match &mut run {
                    Some(r) if r.end == g && r.end - r.start < per_request => r.end += 1,
                    _ => {
                        if let Some(r) = run.take() {
                            started += s.run_bytes(&r);
                            waits.push(self.start_fill(core, &mut s, r, background, request_size));
                        }
                        run = Some(g..g + 1);
                    }
                }
            }
            if let Some(r) = run {
                started += s.run_bytes(&r);
                waits.push(self.start_fill(core, &mut s, r, background, request_size));
            }
            waits
        };
        // Others may have started or finished some of these granules since the charge.
        if let Some(b) = &budget {
            if charged > started {
                b.refund(self.key, charged - started);
            } else if started > charged {
                b.add(self.fd.as_fd(), self.key, started - charged);
            }
        }
        if background {
            return Ok(());
        }
        let all = futures::future::join_all(waits);
        let results = if core.opts.read_timeout.is_zero() {
            all.await
        } else {
            tokio::time::timeout(core.opts.read_timeout, all)
                .await
                .map_err(|_| RemoteError::Timeout {
                    url: self.remote.url().to_string(),
                    key: self.meta.key.clone(),
                    after_ms: core.opts.read_timeout.as_millis() as u64,
                })?
        };
        for r in results {
            r.map_err(|e| (*e).clone())?;
        }
        Ok(())
    }

    fn start_fill(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        s: &mut StubState,
        run: Range<u64>,
        background: bool,
        request_size: u64,
    ) -> SharedFill {
        Metrics::inc(&core.metrics.fills);
        if background {
            Metrics::inc(&core.metrics.readahead_fills);
        }
        core.fills_running.fetch_add(1, Ordering::SeqCst);
        let stub = self.clone();
        let core2 = core.clone();
        let r = run.clone();
        let handle = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = stub.run_fill(&core2, r.clone(), request_size).await;
            core2.metrics.fill_duration.observe(started.elapsed());
            {
                let mut s = lock(&stub.state);
                s.clear_inflight(r.clone());
                match &result {
                    Ok(()) => stub.mark_filled(&core2, &mut s, r),
                    Err(e) => {
                        Metrics::inc(&core2.metrics.fill_errors);
                        if let Some(b) = core2.budget() {
                            b.refund(stub.key, s.run_bytes(&r));
                        }
                        if background {
                            debug!(path = %stub.path(), error = %e, "readahead failed");
                        }
                    }
                }
            }
            if core2.fills_running.fetch_sub(1, Ordering::SeqCst) == 1 {
                core2.fills_done.notify_waiters();
            }
            result
        });
        let fut: SharedFill = async move {
            match handle.await {
                Ok(r) => r.map_err(Arc::new),
                Err(e) => Err(Arc::new(ServeError::TaskFailed(e.to_string()))),
            }
        }
        .boxed()
        .shared();
        for g in run {
            s.inflight.insert(g, fut.clone());
        }
        fut
    }

    /// Fetch granules `run` in parts of at most `request_size`, in parallel, and write
    /// them. All or nothing: the caller marks the run resident only on success.
    pub(crate) async fn run_fill(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        run: Range<u64>,
        request_size: u64,
    ) -> Result<(), ServeError> {
        let digests = self.digests(core).await?;
        let chunk = digests.as_ref().map(|(_, c)| *c);
        let bytes = {
            let s = lock(&self.state);
            let start = s.resident.granule_range(run.start).start;
            let mut end = s.resident.fetch_range(run.end - 1).end;
            if let Some(chunk) = chunk {
                // Verification needs whole chunks: fetch up to a chunk boundary (writes are
                // still cut at the floor).
                end = end.next_multiple_of(chunk).min(self.meta.remote_size);
            }
            start..end.max(start)
        };
        let mut step = request_size.max(4096);
        if let Some(chunk) = chunk {
            step = (step / chunk).max(1) * chunk;
        }
        let parts: Vec<Range<u64>> = (bytes.start..bytes.end)
            .step_by(step as usize)
            .map(|p| p..(p + step).min(bytes.end))
            .collect();
        let results = futures::future::join_all(
            parts
                .into_iter()
                .map(|p| self.fetch_and_write(core, p, digests.clone())),
        )
        .await;
        results.into_iter().collect()
    }

    async fn fetch_and_write(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        part: Range<u64>,
        digests: Option<(Arc<Vec<hsm_manifest::Digest>>, u64)>,
    ) -> Result<(), ServeError> {
        let data = {
            let slot = core
                .fetch_slots
                .acquire()
                .await
                .map_err(|_| ServeError::ShuttingDown)?;
            if let Some(bw) = &core.bandwidth {
                bw.acquire(part.end - part.start).await;
            }
            Metrics::inc(&core.metrics.remote_requests);
            let fetch = async {
                Ok::<_, ServeError>(match &digests {
                    // Verifying needs the bytes themselves.
                    Some(_) => Body::Bytes(
                        self.remote
                            .get_range(&self.meta.key, part.clone(), &self.expect)
                            .await?,
                    ),
                    None => {
                        self.remote
                            .get_body(&self.meta.key, part.clone(), &self.expect)
                            .await?
                    }
                })
            };
            let data = self.bounded_fetch(core, slot, fetch).await?;
            let data = self.accept_body(core, &part, data)?;
            if let (Some((list, chunk)), Body::Bytes(bytes)) = (&digests, &data) {
                self.verify(bytes, part.start, list, *chunk)?;
            }
            data
        };
        self.write_part(core, part.start, data).await
    }

    /// Run one ranged request holding a fetch slot, with two bounds so that a stalled
    /// server cannot starve the others (docs/RELIABILITY.md):
    /// - a request still running after [`SLOW_REQUEST`] moves to one of an equal number
    ///   of slots for slow requests, if one is free (else it tries again every
    ///   [`SLOW_RETRY`]), and gives its own slot back: a stalled server can then hold at
    ///   most half of all requests;
    /// - a request running longer than the read timeout (plus a second) is abandoned: no
    ///   reader waits that long, and a later reader starts a fresh fill.
    pub(crate) async fn bounded_fetch<T>(
        &self,
        core: &AgentCore,
        slot: tokio::sync::SemaphorePermit<'_>,
        fetch: impl std::future::Future<Output = Result<T, ServeError>>,
    ) -> Result<T, ServeError> {
        tokio::pin!(fetch);
        let mut slot = Some(slot);
        let mut slow: Option<tokio::sync::SemaphorePermit<'_>> = None;
        let release = tokio::time::sleep(SLOW_REQUEST);
        tokio::pin!(release);
        let limit = core.opts.read_timeout;
        let give_up = tokio::time::sleep(if limit.is_zero() {
            Duration::from_secs(86_400 * 365)
        } else {
            limit + Duration::from_secs(1)
        });
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                r = &mut fetch => return r,
                _ = &mut release, if slot.is_some() && slow.is_none() => {
                    // Trade the slot for one of the (as many) slots for slow requests, if
                    // one is free: at most twice max_concurrent_fetches requests ever run,
                    // and a stalled server holds at most half of them.
                    if let Ok(p) = core.slow_slots.try_acquire() {
                        slow = Some(p);
                        slot = None;
                        Metrics::inc(&core.metrics.slow_requests);
                        debug!(path = %self.path(), "request still running after {SLOW_REQUEST:?}; its fetch slot goes to others");
                    } else {
                        // An elapsed sleep stays ready: without a new deadline this
                        // branch would fire again at once, spinning a runtime thread for
                        // as long as the request stalls (the threads every other fill
                        // needs).
                        release
                            .as_mut()
                            .reset(tokio::time::Instant::now() + SLOW_RETRY);
                    }
                }
                _ = &mut give_up => {
                    return Err(RemoteError::Timeout {
                        url: self.remote.url().to_string(),
                        key: self.meta.key.clone(),
                        after_ms: limit.as_millis() as u64,
                    }
                    .into());
                }
            }
        }
    }

    /// Write fetched bytes, never beyond the floor or the file's current size, and never
    /// across a pending truncate.
    pub(crate) async fn write_part(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        offset: u64,
        body: Body,
    ) -> Result<(), ServeError> {
        let end = offset + body.len();
        let mut barrier = self.barrier.subscribe();
        let guard = loop {
            let guard = self.gate.read().await;
            if barrier.borrow_and_update().is_some_and(|b| b < end) {
                drop(guard);
                // Resolves when the truncate is seen done (bounded by resolve_truncate).
                let _ = barrier.wait_for(|b| b.is_none_or(|b| b >= end)).await;
                continue;
            }
            break guard;
        };
        let stub = self.clone();
        let written = tokio::task::spawn_blocking(move || stub.write_blocking(offset, &body))
            .await
            .map_err(|e| ServeError::TaskFailed(e.to_string()))??;
        drop(guard);
        Metrics::add(&core.metrics.bytes_written, written);
        Ok(())
    }

    fn write_blocking(&self, offset: u64, body: &Body) -> Result<u64, ServeError> {
        let st = stat::fstatx(self.fd.as_fd()).map_err(|e| LocalError::from_kernel("statx", &e))?;
        let size = st.size;
        let limit = {
            let mut s = lock(&self.state);
            s.lower_floor(size);
            s.resident.floor()
        };
        let end = (offset + body.len()).min(limit);
        if end <= offset {
            return Ok(0);
        }
        let n = end - offset;
        // Is the mtime still the one put back after the last fill? If not, someone wrote (an
        // access that could not be classified was a write after all) or set it: it is theirs
        // from now on. Checked only while no other fill of this file is between its write and
        // putting the mtime back, whose own write would look like someone else's.
        {
            let mut s = lock(&self.state);
            if s.writers == 0 {
                if let Some(kept) = s.restore_mtime {
                    if let Ok(now) = stat::fstatx(self.fd.as_fd()) {
                        if now.mtime != kept {
                            tracing::debug!(path = %self.path(), "mtime moved since the last fill: a local write; times are no longer put back");
                            s.restore_mtime = None;
                        }
                    }
                }
            }
            s.writers += 1;
        }
        let result = self.write_and_keep_mtime(offset, body, n, &st);
        lock(&self.state).writers -= 1;
        result
    }

    /// Write `n` bytes of `body` at `offset` through a fresh writable descriptor, then put
    /// the mtime back (unless a local write was seen).
    fn write_and_keep_mtime(
        &self,
        offset: u64,
        body: &Body,
        n: u64,
        st: &hsm_kernel::stat::FileStat,
    ) -> Result<u64, ServeError> {
        // Opened per fill and closed after it: a cached writer would make exec of the file
        // fail with ETXTBSY.
        let writer = crate::api::reopen_waiting(
            self.reopener.as_ref(),
            self.fd.as_fd(),
            st,
            libc::O_RDWR | libc::O_LARGEFILE,
        )?;
        let fd = writer.as_fd();
        let written = match body {
            Body::Bytes(data) => stubio::write_data(fd, offset, &data[..n as usize])?,
            Body::File { file, range } => {
                stubio::copy_range(file, range.start..range.start + n, fd, offset)?
            }
        };
        // For big fills, start writeback now so the later fdatasync has little left and the
        // disk works while the next part is fetched. Small fills skip it: on ext4 it forces
        // block allocation and I/O submission on the reader's critical path. Only an
        // optimisation either way: errors surface at fdatasync.
        if n >= WRITEBACK_MIN as u64 {
            let _ = hsm_kernel::sys::start_writeback(fd, offset, n);
        }
        let restore = lock(&self.state).restore_mtime;
        if let Some(mtime) = restore {
            if written > 0 {
                stubio::restore_mtime(fd, mtime)?;
            }
        }
        Ok(written)
    }

    /// After a read, fetch ahead of a sequential reader. The window starts at
    /// `readahead` and doubles each time the reader gets within half a window of its end,
    /// up to `readahead_max`; a read elsewhere starts it over. From a network store its
    /// requests are half a window each (never smaller than `max_request_size`): a
    /// streaming reader makes few, large requests, which a store that charges per request
    /// (or, like moto, by the object's size per request) rewards. From local files they
    /// stay at `max_request_size`: a request costs nothing there, and a reader waits for
    /// the whole request its next granule is in.
    pub(crate) fn readahead(self: &Arc<Self>, core: &Arc<AgentCore>, range: Range<u64>) {
        let base = core.opts.readahead;
        if base == 0 || core.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let (todo, window): (Vec<u64>, u64) = {
            let mut s = lock(&self.state);
            let sequential = range.start <= s.seq_next && range.end > s.seq_next;
            s.seq_next = range.end;
            if !sequential {
                s.readahead_window = 0;
                return;
            }
            let current = s.readahead_window.max(base);
            if range.end.saturating_add(current / 2) < s.readahead_until {
                return;
            }
            let window = if s.readahead_window == 0 {
                base
            } else {
                (s.readahead_window.saturating_mul(2)).min(core.opts.readahead_max.max(base))
            };
            s.readahead_window = window;
            let start = range.end.max(s.readahead_until);
            let end = range.end.saturating_add(window).min(s.resident.floor());
            if end <= start {
                return;
            }
            s.readahead_until = end;
            let granules = s.resident.granules_for(start..end);
            let todo = s
                .resident
                .missing(granules)
                .filter(|g| !s.inflight.contains_key(g))
                .collect();
            (todo, window)
        };
        if todo.is_empty() {
            return;
        }
        // From a network store: one streamed request (see crate::stream), or, when every
        // stream slot is taken, ranged requests of half a window.
        if !self.remote.runs_inline() && self.stream_ahead(core, &todo) {
            return;
        }
        let request_size = if self.remote.runs_inline() {
            core.opts.max_request_size
        } else {
            (window / 2).max(core.opts.max_request_size)
        };
        let stub = self.clone();
        let core2 = core.clone();
        core.rt.spawn(async move {
            // Background: errors surface to whoever reads those bytes.
            let _ = stub.fill_in(&core2, &todo, true, request_size).await;
        });
    }
}

/// Paces fetches to a byte rate: each request is held until its bytes "have arrived".
#[derive(Debug)]
pub(crate) struct RateLimiter {
    bytes_per_sec: u64,
    pub(crate) next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    pub(crate) fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    pub(crate) async fn acquire(&self, bytes: u64) {
        let until = {
            let mut next = self.next.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            *next
        };
        tokio::time::sleep_until(until).await;
    }
}
