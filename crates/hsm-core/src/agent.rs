//! The agent core: what to do about one access to one file.
//!
//! The fanotify adapter turns each event into an [`AccessEvent`] and calls
//! [`AgentCore::handle`], which returns a [`Verdict`]. Everything in between is in this
//! crate and is testable on plain files, without fanotify: stub state per inode and the
//! fill plan (`stub`), serving one access (`serve`), one in-flight fetch per granule shared
//! by every waiter (`fill`), the truncate barrier (`truncate`), digests (`integrity`), and
//! batched persistence of the resident map and finalisation (`persist`). This module holds
//! the core itself: its entry points, loading stubs, and shutdown.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hsm_kernel::stat::{self, FileStat};
use tokio::sync::{Semaphore, mpsc};
use tracing::{Instrument, debug, info, warn};

use crate::api::{event_span, requested};
use crate::error::{ServeError, deny_errno};
use crate::fill::RateLimiter;
use crate::integrity::{ManifestDigests, ManifestId};
use crate::metrics::Metrics;
use crate::persist::persister;
use crate::stub::{InodeKey, Stub, sweeper};
use crate::stubio::{self, Loaded};

pub use crate::api::{
    Access, AccessEvent, CoreOptions, DenyErrno, FileRange, IntentProbe, IntentSource, Later,
    MarkSink, NoThreads, ProcReopener, RemoteOpener, Reopener, UrlRemotes, Verdict,
};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a stub lock is a bug; keep serving rather than poison everything.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The agent core. Create with [`AgentCore::new`] inside a tokio runtime.
#[derive(Debug)]
pub struct AgentCore {
    pub(crate) opts: CoreOptions,
    pub(crate) remotes: Arc<dyn RemoteOpener>,
    pub(crate) marks: Arc<dyn MarkSink>,
    pub(crate) reopener: Arc<dyn Reopener>,
    /// What a blocked thread is about to do (the adapter knows how to ask).
    pub(crate) intent: Arc<dyn IntentProbe>,
    pub(crate) stubs: Mutex<HashMap<InodeKey, Arc<Stub>>>,
    pub(crate) fetch_slots: Semaphore,
    /// Slots for requests that outlived SLOW_REQUEST (see `bounded_fetch`).
    pub(crate) slow_slots: Semaphore,
    /// Slots for readahead streams (see crate::stream): each holds a connection open.
    pub(crate) stream_slots: Arc<Semaphore>,
    pub(crate) bandwidth: Option<RateLimiter>,
    pub(crate) persist_tx: mpsc::UnboundedSender<Arc<Stub>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) fills_running: AtomicU64,
    pub(crate) fills_done: tokio::sync::Notify,
    /// Held by the persister while it works on a batch (whose snapshots are no longer
    /// marked dirty), so a final flush waits for it instead of skipping those stubs.
    pub(crate) persist_gate: tokio::sync::Mutex<()>,
    /// The latest manifest read per (remote URL, manifest key). The async lock makes
    /// concurrent first fills wait for one fetch instead of each fetching.
    pub(crate) manifests: tokio::sync::Mutex<HashMap<ManifestId, Arc<ManifestDigests>>>,
    epoch: Instant,
    /// The bounded cache, when `[cache] max_size` is set.
    pub(crate) budget: std::sync::OnceLock<Arc<crate::budget::Budget>>,
    /// The access trace being recorded (`hsm agent --record-trace`).
    pub(crate) trace: std::sync::OnceLock<Arc<crate::trace::TraceRecorder>>,
    /// For spawning from threads outside the runtime (the adapter's event threads).
    pub(crate) rt: tokio::runtime::Handle,
}

impl AgentCore {
    /// Create the core and start its persister task.
    pub fn new(
        opts: CoreOptions,
        remotes: Arc<dyn RemoteOpener>,
        marks: Arc<dyn MarkSink>,
        reopener: Arc<dyn Reopener>,
        intent: Arc<dyn IntentProbe>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let bandwidth = (opts.max_bandwidth > 0).then(|| RateLimiter::new(opts.max_bandwidth));
        let core = Arc::new(AgentCore {
            fetch_slots: Semaphore::new(opts.max_concurrent_fetches.max(1)),
            slow_slots: Semaphore::new(opts.max_concurrent_fetches.max(1)),
            stream_slots: Arc::new(Semaphore::new(opts.readahead_streams)),
            opts,
            remotes,
            marks,
            reopener,
            intent,
            stubs: Mutex::new(HashMap::new()),
            bandwidth,
            persist_tx: tx,
            metrics,
            shutting_down: AtomicBool::new(false),
            fills_running: AtomicU64::new(0),
            fills_done: tokio::sync::Notify::new(),
            persist_gate: tokio::sync::Mutex::new(()),
            manifests: tokio::sync::Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            budget: std::sync::OnceLock::new(),
            trace: std::sync::OnceLock::new(),
            rt: tokio::runtime::Handle::current(),
        });
        tokio::spawn(persister(Arc::downgrade(&core), rx));
        tokio::spawn(sweeper(Arc::downgrade(&core)));
        core
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Bound the bytes of remote data held locally (once, before serving).
    pub fn set_budget(&self, budget: Arc<crate::budget::Budget>) {
        let _ = self.budget.set(budget);
    }

    pub fn budget(&self) -> Option<&Arc<crate::budget::Budget>> {
        self.budget.get()
    }

    /// Record every reader's first touch of each stub granule from now on.
    pub fn record_trace(&self, recorder: Arc<crate::trace::TraceRecorder>) {
        let _ = self.trace.set(recorder);
    }

    /// Write out what the trace recorder holds back (at stop, and now and then).
    pub fn flush_trace(&self) {
        if let Some(t) = self.trace.get() {
            t.flush();
        }
    }

    /// A reader asked for `range` of `stub` (recorded when a trace is being recorded).
    pub(crate) fn traced(&self, stub: &Stub, range: &std::ops::Range<u64>) {
        if let Some(t) = self.trace.get() {
            t.touch(stub, range);
        }
    }

    /// A file that is not a stub was accessed: if it is counted by the bounded cache, that
    /// is a use of it, and its opens are watched from now on (its reads raise no events).
    fn cached_file_seen(&self, fd: BorrowedFd<'_>, st: &FileStat) {
        if self.budget().is_some_and(|b| b.touch(st)) {
            self.marks.watch_opens(fd);
        }
    }

    /// Serve one access. Never panics; every failure becomes a deny with a logged cause.
    pub async fn handle(self: &Arc<Self>, ev: AccessEvent<'_>) -> Verdict {
        Metrics::inc(&self.metrics.events);
        let st = match stat::fstatx(ev.fd) {
            Ok(st) => st,
            Err(e) => {
                warn!(error = %e, "cannot stat event file; denying");
                Metrics::inc(&self.metrics.denies);
                return Verdict::Deny(DenyErrno::Eio);
            }
        };
        let span = event_span(&ev, &st);
        self.handle_stat(ev, st).instrument(span).await
    }

    async fn handle_stat(self: &Arc<Self>, ev: AccessEvent<'_>, st: FileStat) -> Verdict {
        if !st.is_file() {
            return Verdict::Allow;
        }
        let stub = match self.lookup_or_load(ev.fd, &st).await {
            Ok(Lookup::Stub(s)) => s,
            other => return self.verdict_for_lookup(other, &ev, &st),
        };
        Metrics::inc(&self.metrics.events_stub);
        match stub.serve(self, &ev, &st).await {
            Ok(v) => v,
            Err(e) => {
                Metrics::inc(&self.metrics.denies);
                stub.read_failed(&requested(ev.range), &e)
            }
        }
    }

    async fn lookup_or_load(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        st: &FileStat,
    ) -> Result<Lookup, ServeError> {
        if let Some(s) = self.cached(st) {
            return Ok(Lookup::Stub(s));
        }
        let dup = crate::api::reopen_waiting_async(
            self.reopener.as_ref(),
            fd,
            st,
            libc::O_RDONLY | libc::O_LARGEFILE,
        )
        .await?;
        let core = self.clone();
        let st = *st;
        tokio::task::spawn_blocking(move || core.load_blocking(dup, &st))
            .await
            .map_err(|e| ServeError::TaskFailed(e.to_string()))?
    }

    pub(crate) fn cached(&self, st: &FileStat) -> Option<Arc<Stub>> {
        lock(&self.stubs).get(&InodeKey::of(st)).cloned()
    }

    /// Read the xattrs of a file not in the cache and, for a stub, cache its state. Blocking.
    fn load_blocking(self: &Arc<Self>, dup: OwnedFd, st: &FileStat) -> Result<Lookup, ServeError> {
        let key = InodeKey::of(st);
        let (meta, map) = match stubio::load(dup.as_fd())? {
            Loaded::NotStub => return Ok(Lookup::NotStub),
            Loaded::Building => return Ok(Lookup::Building),
            Loaded::Stub { meta, map } => (meta, map),
        };
        if map.is_complete() {
            // A crash between the last persist and finalisation; finish the job.
            stubio::finalize(dup.as_fd(), &meta, &map)?;
            self.marks.ignore(dup.as_fd());
            Metrics::inc(&self.metrics.hydrated);
            info!(path = %self.reopener.path_of(dup.as_fd()), "stub fully resident; now an ordinary file");
            return Ok(Lookup::Hydrated);
        }
        let remote = self.remotes.open(&meta.remote_url)?;
        let stub = Arc::new(Stub::new(
            key,
            dup,
            self.reopener.clone(),
            *meta,
            map,
            remote,
            st.mtime,
        ));
        let (stub, inserted, over) = {
            let mut stubs = lock(&self.stubs);
            let mut inserted = false;
            let s = stubs
                .entry(key)
                .or_insert_with(|| {
                    inserted = true;
                    stub
                })
                .clone();
            (s, inserted, stubs.len() > self.opts.cache_entries)
        };
        if inserted {
            Metrics::inc(&self.metrics.stub_loads);
            debug!(key = %stub.meta.key, "stub loaded");
        }
        if over {
            self.evict(self.opts.cache_entries * 9 / 10, Duration::ZERO);
        }
        Ok(Lookup::Stub(stub))
    }

    /// Serve an access on the calling thread, which must not be inside a tokio runtime,
    /// when that needs no waiting on other work: files that are not stubs, ranges already
    /// resident, and small reads from a remote whose I/O runs inline (local files). Anything
    /// else returns [`Later`] with what was learnt, for [`AgentCore::handle`] to finish.
    pub fn try_handle_now(self: &Arc<Self>, ev: &AccessEvent<'_>) -> Result<Verdict, Later> {
        let Ok(st) = stat::fstatx(ev.fd) else {
            return Err(Later(ev.intent));
        };
        let _span = event_span(ev, &st).entered();
        if !st.is_file() {
            Metrics::inc(&self.metrics.events);
            return Ok(Verdict::Allow);
        }
        let stub = match self.cached(&st) {
            Some(s) => s,
            None => {
                let Ok(dup) = self
                    .reopener
                    .reopen(ev.fd, &st, libc::O_RDONLY | libc::O_LARGEFILE)
                else {
                    return Err(Later(ev.intent));
                };
                match self.load_blocking(dup, &st) {
                    Ok(Lookup::Stub(s)) => s,
                    other => {
                        Metrics::inc(&self.metrics.events);
                        return Ok(self.verdict_for_lookup(other, ev, &st));
                    }
                }
            }
        };
        let verdict = stub.try_serve_now(self, ev, &st)?;
        Metrics::inc(&self.metrics.events);
        Metrics::inc(&self.metrics.events_stub);
        if let Verdict::Deny(_) = verdict {
            Metrics::inc(&self.metrics.denies);
        }
        Ok(verdict)
    }

    /// Serve an open (`FAN_OPEN_PERM` or `FAN_OPEN_EXEC_PERM`) on the calling thread when
    /// that needs no waiting, like [`AgentCore::try_handle_now`]. With `whole`, a stub must
    /// be entirely resident, and an ordinary file again, before the open may proceed: the
    /// adapter asks for that where later accesses may raise no event of their own (an open
    /// through overlayfs, whose mappings of lower files raise none). That work is
    /// [`AgentCore::handle_open`]'s;
    /// here a stub then returns [`Later`]. Without `whole` a stub's open is allowed at once
    /// and its reads are served range by range. A file that is not a stub is allowed and
    /// ignore-marked.
    pub fn try_open_now(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        tid: i32,
        whole: bool,
    ) -> Result<Verdict, Later> {
        Metrics::inc(&self.metrics.events_open);
        let intent = IntentSource::Seen {
            tid,
            access: Access::Read,
        };
        let Ok(st) = stat::fstatx(fd) else {
            return Err(Later(intent));
        };
        if !st.is_file() {
            return Ok(Verdict::Allow);
        }
        if !whole {
            // Only whether to ignore-mark it: its reads load and cache the state when they
            // need it, so opens hold no descriptor (10,000 opens must not fill the cache).
            if self.cached(&st).is_some() {
                return Ok(Verdict::Allow);
            }
            return Ok(match stubio::load(fd) {
                Ok(Loaded::NotStub) if st.nlink > 0 => {
                    Metrics::inc(&self.metrics.events_not_stub);
                    self.cached_file_seen(fd, &st);
                    Verdict::AllowAndIgnore
                }
                // A stub, one still being built, or unreadable metadata: its reads decide.
                _ => Verdict::Allow,
            });
        }
        let lookup = match self.cached(&st) {
            Some(s) => Ok(Lookup::Stub(s)),
            None => match self
                .reopener
                .reopen(fd, &st, libc::O_RDONLY | libc::O_LARGEFILE)
            {
                Ok(dup) => self.load_blocking(dup, &st),
                Err(_) => return Err(Later(intent)),
            },
        };
        match lookup {
            Ok(Lookup::Stub(_)) => Err(Later(intent)),
            other => {
                let ev = AccessEvent {
                    fd,
                    range: None,
                    intent,
                };
                Ok(self.verdict_for_lookup(other, &ev, &st))
            }
        }
    }

    /// Make the stub opened at `fd` entirely resident and an ordinary file (its map made
    /// durable, its stub xattrs removed), then allow the open. Removing the xattrs first
    /// matters for overlayfs: a copy-up copies the lower file's xattrs, and a copy that
    /// still carried them would look like a stub.
    pub async fn handle_open(self: &Arc<Self>, fd: BorrowedFd<'_>, tid: i32) -> Verdict {
        Metrics::inc(&self.metrics.open_hydrations);
        self.make_whole(fd, tid).await
    }

    /// Make the file at `fd` (opened on the agent's own mount, so it raises no event)
    /// entirely resident and an ordinary file: `hsm hydrate` and `hsm pin`. A file that is
    /// not a stub is left as it is. A deny carries the errno a reader would have seen.
    pub async fn hydrate(self: &Arc<Self>, fd: BorrowedFd<'_>) -> Verdict {
        self.make_whole(fd, hsm_kernel::sys::gettid()).await
    }

    async fn make_whole(self: &Arc<Self>, fd: BorrowedFd<'_>, tid: i32) -> Verdict {
        let verdict = self
            .handle(AccessEvent {
                fd,
                range: None,
                intent: IntentSource::Seen {
                    tid,
                    access: Access::Read,
                },
            })
            .await;
        if let Verdict::Deny(_) = verdict {
            return verdict;
        }
        let Ok(st) = stat::fstatx(fd) else {
            return verdict;
        };
        if let Some(stub) = self.cached(&st) {
            if let Err(e) = stub.persist(self, false).await {
                Metrics::inc(&self.metrics.denies);
                let errno = deny_errno(&e);
                warn!(path = %stub.path(), errno = errno.name(), error = %e,
                      "could not make a stub opened through overlayfs an ordinary file");
                return Verdict::Deny(errno);
            }
        }
        verdict
    }

    /// Fetch the missing granules of `range` of the stub open at `fd` (opened on the
    /// agent's own mount, so it raises no event) ahead of any reader: the prefetch of a
    /// trace entry. Nothing is done unless the stub still names `url` and `key` (a file
    /// renamed or replaced since the trace was made is left alone). Waits until the fetch
    /// is written; readers that arrive meanwhile join it. Returns the bytes made resident.
    pub async fn prefetch(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        url: &str,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Prefetched, ServeError> {
        let stub = match self.prefetch_target(fd, url, key).await? {
            Ok(stub) => stub,
            Err(not) => return Ok(not),
        };
        let todo: Vec<u64> = {
            let s = lock(&stub.state);
            if s.finalized {
                return Ok(Prefetched::Fetched(0));
            }
            let end = range.end.min(s.resident.floor());
            let granules = s.resident.granules_for(range.start.min(end)..end);
            s.resident
                .missing(granules)
                .filter(|g| !s.inflight.contains_key(g))
                .collect()
        };
        if todo.is_empty() {
            return Ok(Prefetched::Fetched(0));
        }
        // Started like readahead (never waiting for room in the bounded cache, never making
        // any), then waited for, so the caller can pace what it asks.
        stub.fill_in(self, &todo, true, self.opts.max_request_size)
            .await?;
        let waits: Vec<crate::stub::SharedFill> = {
            let s = lock(&stub.state);
            let mut w: Vec<crate::stub::SharedFill> = Vec::new();
            for g in &todo {
                if let Some(f) = s.inflight.get(g) {
                    if !w.iter().any(|x| x.ptr_eq(f)) {
                        w.push(f.clone());
                    }
                }
            }
            w
        };
        for r in futures::future::join_all(waits).await {
            r.map_err(|e| (*e).clone())?;
        }
        let bytes = {
            let s = lock(&stub.state);
            todo.iter()
                .filter(|&&g| s.finalized || s.resident.is_resident(g))
                .map(|&g| s.run_bytes(&(g..g + 1)))
                .sum()
        };
        self.finalise_if_complete(&stub).await?;
        Ok(Prefetched::Fetched(bytes))
    }

    /// The stub open at `fd` if it names `url` and `key`, or what a prefetch of it
    /// reports instead.
    pub(crate) async fn prefetch_target(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        url: &str,
        key: &str,
    ) -> Result<Result<Arc<Stub>, Prefetched>, ServeError> {
        let st =
            stat::fstatx(fd).map_err(|e| crate::error::LocalError::from_kernel("statx", &e))?;
        let Lookup::Stub(stub) = self.lookup_or_load(fd, &st).await? else {
            return Ok(Err(Prefetched::NotStub));
        };
        if stub.meta.remote_url.trim_end_matches('/') != url.trim_end_matches('/')
            || stub.meta.key != key
        {
            return Ok(Err(Prefetched::Elsewhere));
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ServeError::ShuttingDown);
        }
        Ok(Ok(stub))
    }

    /// A file a prefetch completed becomes an ordinary file now, not at the persister's
    /// next batch: an open through overlayfs that arrived meanwhile would otherwise sync
    /// and finalise it on the reader's time.
    pub(crate) async fn finalise_if_complete(
        self: &Arc<Self>,
        stub: &Arc<Stub>,
    ) -> Result<(), ServeError> {
        let complete = {
            let s = lock(&stub.state);
            !s.finalized && s.resident.is_complete()
        };
        if complete {
            // In a task of its own: the sync is the slow part (a btrfs log commit), and the
            // next entry's fetch need not wait for it. A reader's open that arrives meanwhile
            // waits on the stub's persist lock and finds it done.
            let (core, stub) = (self.clone(), stub.clone());
            self.rt.spawn(async move {
                if let Err(e) = stub.persist(&core, false).await {
                    warn!(path = %stub.path(), error = %e, "could not finalise a prefetched file; the persister retries");
                    let mut s = lock(&stub.state);
                    core.queue_persist(&stub, &mut s);
                }
            });
        }
        Ok(())
    }

    /// The verdict for a lookup that did not produce a stub to serve.
    fn verdict_for_lookup(
        &self,
        lookup: Result<Lookup, ServeError>,
        ev: &AccessEvent<'_>,
        st: &FileStat,
    ) -> Verdict {
        match lookup {
            Ok(Lookup::Stub(_)) => Verdict::Allow,
            Ok(Lookup::NotStub) => {
                Metrics::inc(&self.metrics.events_not_stub);
                self.cached_file_seen(ev.fd, st);
                // An unlinked file may be a stub populate is still building (it sets the
                // size before the marker): never cache "not a stub" for it.
                if st.nlink == 0 {
                    Verdict::Allow
                } else {
                    Verdict::AllowAndIgnore
                }
            }
            Ok(Lookup::Building) => {
                Metrics::inc(&self.metrics.events_building);
                Verdict::Allow
            }
            Ok(Lookup::Hydrated) => Verdict::AllowAndIgnore,
            Err(e) => {
                Metrics::inc(&self.metrics.bad_stubs);
                Metrics::inc(&self.metrics.denies);
                let errno = deny_errno(&e);
                warn!(path = %self.reopener.path_of(ev.fd), errno = errno.name(), error = %e,
                      "cannot serve stub");
                Verdict::Deny(errno)
            }
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Stop starting fetches: accesses that need one are denied with EIO from now on.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Wait until no fill is running (or the timeout passes); returns whether it drained.
    pub async fn wait_fills(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let done = self.fills_done.notified();
            if self.fills_running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return self.fills_running.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Persist every dirty resident map now (at shutdown). Returns how many failed.
    pub async fn flush_all(self: &Arc<Self>) -> usize {
        let _batch_done = self.persist_gate.lock().await;
        let stubs: Vec<Arc<Stub>> = lock(&self.stubs).values().cloned().collect();
        let mut failed = 0;
        for s in stubs {
            if let Err(e) = s.persist(self, false).await {
                warn!(path = %s.path(), error = %e, "could not persist resident map at shutdown");
                failed += 1;
            }
        }
        failed
    }

    /// Stub states held in memory.
    pub fn cached_stubs(&self) -> usize {
        lock(&self.stubs).len()
    }

    /// Descriptors held by stub states, the cached ones and those dropped from the cache
    /// that a task still holds (what the adapter's descriptor budget must count).
    pub fn stub_descriptors(&self) -> usize {
        crate::stub::LIVE.load(Ordering::Relaxed)
    }
}

/// What [`AgentCore::prefetch`] did with one trace entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetched {
    /// These bytes were fetched and written (0: all of it was already there or on its way).
    Fetched(u64),
    /// The file is not a stub (fetched whole, written locally, or never one).
    NotStub,
    /// The stub names another object now.
    Elsewhere,
    /// Supplied bytes were not used: the stub has no digests to check them against, they
    /// do not cover whole chunks, or they are not the object's (nothing was written; the
    /// caller fetches the range instead).
    Unverified,
}

enum Lookup {
    Stub(Arc<Stub>),
    NotStub,
    Building,
    Hydrated,
}
