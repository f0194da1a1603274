//! The agent core: what to do about one access to one file.
//!
//! The fanotify adapter turns each event into an [`AccessEvent`] and calls
//! [`AgentCore::handle`], which returns a [`Verdict`]. Everything in between is here and is
//! testable on plain files, without fanotify: stub state per inode, the fill plan, one
//! in-flight fetch per granule shared by every waiter, writes through the event descriptor,
//! the truncate barrier, batched persistence of the resident map, and finalisation.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use hsm_kernel::fanotify::{DenyErrno, FileRange};
use hsm_kernel::intent::{self, Access};
use hsm_kernel::stat::{self, FileStat, Timestamp};
use hsm_remote::{Body, Expect, Remote, RemoteError};
use hsm_stub::{Meta, ResidentMap};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument, debug, info, warn};

use crate::error::{LocalError, ServeError, deny_errno};
use crate::metrics::Metrics;
use crate::stubio::{self, Loaded};

/// Tunables of the core (the `[agent]` section of the configuration).
#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub max_concurrent_fetches: usize,
    pub max_request_size: u64,
    pub readahead: u64,
    pub persist_interval: Duration,
    pub cache_entries: usize,
    /// Bytes per second; 0 = unlimited.
    pub max_bandwidth: u64,
    /// A reader waiting on fetches gets EIO after this long (zero: no limit).
    pub read_timeout: Duration,
}

impl Default for CoreOptions {
    fn default() -> Self {
        CoreOptions {
            max_concurrent_fetches: 16,
            max_request_size: 8 << 20,
            readahead: 32 << 20,
            persist_interval: Duration::from_millis(200),
            cache_entries: 8192,
            max_bandwidth: 0,
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// Opens the remote a stub names. The agent's implementation caches one per URL.
pub trait RemoteOpener: Send + Sync + std::fmt::Debug {
    fn open(&self, url: &str) -> Result<Arc<dyn Remote>, RemoteError>;
}

/// Opens remotes with [`hsm_remote::open_remote`], one per base URL.
#[derive(Debug, Default)]
pub struct UrlRemotes {
    config: hsm_config::RemoteConfig,
    cache: Mutex<HashMap<String, Arc<dyn Remote>>>,
}

impl UrlRemotes {
    pub fn new(config: hsm_config::RemoteConfig) -> Self {
        UrlRemotes {
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl RemoteOpener for UrlRemotes {
    fn open(&self, url: &str) -> Result<Arc<dyn Remote>, RemoteError> {
        let mut cache = lock(&self.cache);
        if let Some(r) = cache.get(url) {
            return Ok(r.clone());
        }
        let r = hsm_remote::open_remote(url, &self.config)?;
        cache.insert(url.to_string(), r.clone());
        Ok(r)
    }
}

/// Places ignore marks (the fanotify group lives in the adapter).
pub trait MarkSink: Send + Sync + std::fmt::Debug {
    /// Stop events for the inode behind `fd`. Best effort: failures are logged.
    fn ignore(&self, fd: BorrowedFd<'_>);
}

/// Opens the agent's own descriptors for the files events name (the adapter provides it).
///
/// An event's descriptor is read-only and opened on the mount the reader used, which may be
/// read-only or overlayfs's private clone of a layer. The core keeps a descriptor of its own
/// for each stub (xattrs, sync, times) and opens a writable one for each fill, both on a
/// mount that raises no events and takes writes whatever mount the reader used.
pub trait Reopener: Send + Sync + std::fmt::Debug {
    /// A descriptor for the same inode as `file` (whose stat is `st`), opened with `flags`.
    fn reopen(
        &self,
        file: BorrowedFd<'_>,
        st: &FileStat,
        flags: i32,
    ) -> Result<OwnedFd, LocalError>;
    /// Its path for log lines.
    fn path_of(&self, file: BorrowedFd<'_>) -> String {
        stubio::path_of(file)
    }
}

/// Reopens through `/proc/self/fd`: for tests and tools that serve plain files without
/// fanotify (such opens raise events where a group watches the file).
#[derive(Debug, Default)]
pub struct ProcReopener;

impl Reopener for ProcReopener {
    fn reopen(
        &self,
        file: BorrowedFd<'_>,
        _st: &FileStat,
        flags: i32,
    ) -> Result<OwnedFd, LocalError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let write = flags & libc::O_ACCMODE == libc::O_RDWR;
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(flags & !libc::O_ACCMODE)
            .open(path)
            .map(OwnedFd::from)
            .map_err(|e| LocalError::from_io("reopen", &e))
    }
}

/// How to learn what the accessing thread is doing.
#[derive(Debug, Clone, Copy)]
pub enum IntentSource {
    /// Read `/proc/TID/syscall` of the blocked thread, only if the answer matters.
    Tid(i32),
    /// Already classified on an event thread; the thread id is kept for truncate tracking.
    Seen { tid: i32, access: Access },
    /// Known without a thread (tests, tools).
    Known(Access),
}

/// How long the async path waits for an accessing thread still on its way to sleep before
/// assuming the worst (a write). It cannot leave before it is answered, so this only
/// matters for threads preempted at that point under heavy load.
const RUNNING_PATIENCE: Duration = Duration::from_millis(200);

impl IntentSource {
    /// Without waiting: `None` if the thread is still running (try again later).
    fn classify_now(&self) -> Option<Access> {
        match *self {
            IntentSource::Tid(tid) => {
                for _ in 0..8 {
                    if let Some(seen) = intent::classify_now(tid) {
                        log_non_read(tid, &seen);
                        return Some(seen.access);
                    }
                    std::thread::yield_now();
                }
                None
            }
            IntentSource::Seen { access, .. } | IntentSource::Known(access) => Some(access),
        }
    }

    /// Waiting (asynchronously) for a running thread to block.
    async fn classify(&self) -> Access {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(a) = self.classify_now() {
                return a;
            }
            if start.elapsed() >= RUNNING_PATIENCE {
                if let IntentSource::Tid(tid) = self {
                    warn!(
                        tid,
                        "accessing thread still running after 200 ms; treating the access as a write"
                    );
                }
                return Access::Write;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Whether the access is already classified (classifying is free).
    fn is_classified(&self) -> bool {
        !matches!(self, IntentSource::Tid(_))
    }

    /// The same source, with the classification attached.
    fn seen(&self, access: Access) -> IntentSource {
        match *self {
            IntentSource::Tid(tid) | IntentSource::Seen { tid, .. } => {
                IntentSource::Seen { tid, access }
            }
            IntentSource::Known(_) => IntentSource::Known(access),
        }
    }

    fn tid(&self) -> Option<i32> {
        match *self {
            IntentSource::Tid(t) | IntentSource::Seen { tid: t, .. } => Some(t),
            IntentSource::Known(_) => None,
        }
    }
}

fn log_non_read(tid: i32, seen: &intent::Observed) {
    if seen.access != Access::Read {
        debug!(tid, syscall = ?seen.syscall, access = ?seen.access, "access is not a read");
    }
}

/// One access to serve.
#[derive(Debug)]
pub struct AccessEvent<'a> {
    /// The event's descriptor (read-write, raises no events).
    pub fd: BorrowedFd<'a>,
    /// The range as reported (unclamped); `None` means the whole file.
    pub range: Option<FileRange>,
    pub intent: IntentSource,
}

/// The bytes an access needs local before it may proceed, once its kind is known. A
/// zero-length range is a truncate to a page boundary (nothing to fill) or a whole-file
/// remap (everything from there on); an fallocate that moves the file's tail needs
/// everything from its start to the end.
fn needed_range(raw: Option<FileRange>, access: Option<Access>) -> Range<u64> {
    match (raw, access) {
        (Some(r), Some(Access::Truncate { .. })) if r.count == 0 => r.offset..r.offset,
        (Some(r), Some(Access::Shift)) => r.offset..u64::MAX,
        _ => requested(raw),
    }
}

/// Whether an event's range alone cannot say what it needs (see [`needed_range`]).
fn ambiguous(raw: Option<FileRange>) -> bool {
    raw.is_some_and(|r| r.count == 0)
}

/// The span every event is handled in: who, which inode, which range.
fn event_span(ev: &AccessEvent<'_>, st: &FileStat) -> tracing::Span {
    let r = requested(ev.range);
    tracing::debug_span!(
        "event",
        tid = ev.intent.tid(),
        ino = st.ino,
        offset = r.start,
        len = r.end.saturating_sub(r.start)
    )
}

/// [`AgentCore::try_handle_now`] could not decide without waiting: finish with
/// [`AgentCore::handle`], passing this intent (already classified, if it was needed).
#[derive(Debug, Clone, Copy)]
pub struct Later(pub IntentSource);

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allow, and place an ignore mark: nothing will ever need fetching for this inode.
    AllowAndIgnore,
    Deny(DenyErrno),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct InodeKey {
    dev: u64,
    ino: u64,
    // With dev and ino, tells a reused inode number from the one we cached.
    btime: Option<Timestamp>,
}

impl InodeKey {
    fn of(st: &FileStat) -> Self {
        InodeKey {
            dev: st.dev,
            ino: st.ino,
            btime: st.btime,
        }
    }
}

type FillResult = Result<(), Arc<ServeError>>;

/// The bytes an event asks for. A zero count means "to the end of the file": FICLONE (and
/// other remaps of a whole file) report their range that way, and treating it as empty
/// let a reflink copy of a stub share its holes.
fn requested(range: Option<FileRange>) -> Range<u64> {
    match range {
        Some(r) if r.count == 0 => r.offset..u64::MAX,
        Some(r) => r.offset..r.end(),
        None => 0..u64::MAX,
    }
}

/// Fills at least this large start their writeback at once (see `write_blocking`).
const WRITEBACK_MIN: usize = 1 << 20;
type SharedFill = Shared<BoxFuture<'static, FillResult>>;

/// A ranged request running longer than this no longer counts against
/// `max_concurrent_fetches` (see `bounded_fetch`).
const SLOW_REQUEST: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a stub lock is a bug; keep serving rather than poison everything.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// (remote URL, manifest key).
type ManifestId = (String, String);

/// The digests a manifest lists, by object key.
#[derive(Debug)]
struct ManifestDigests {
    chunk_size: u64,
    by_key: HashMap<String, Arc<Vec<hsm_manifest::Digest>>>,
    /// The manifest object's ETag and size when it was read.
    etag: Option<String>,
    size: u64,
}

/// Granules an inline fill has claimed. Released exactly once: by `release`, or, if the
/// fill panicked, by `Drop` (so waiters get an error instead of waiting forever and the
/// granules can be fetched again).
struct InlineClaim<'a> {
    stub: &'a Stub,
    run: Range<u64>,
    tx: Option<tokio::sync::oneshot::Sender<FillResult>>,
}

impl InlineClaim<'_> {
    fn release(&mut self, result: FillResult) {
        if let Some(tx) = self.tx.take() {
            let mut s = lock(&self.stub.state);
            for g in self.run.clone() {
                s.inflight.remove(&g);
            }
            drop(s);
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

/// Per-stub mutable state.
#[derive(Debug)]
struct StubState {
    /// Granules readable now (written through an event fd), with the floor and flags.
    resident: ResidentMap,
    /// What the map xattr says (or will, once the running persist finishes).
    durable: ResidentMap,
    /// `resident` differs from `durable`.
    dirty: bool,
    /// The durable xattr has been fsynced since it last changed.
    meta_synced: bool,
    /// Already waiting in the persister's queue.
    queued: bool,
    inflight: HashMap<u64, SharedFill>,
    /// The mtime to put back after fills; `None` once the file was written locally.
    restore_mtime: Option<Timestamp>,
    /// End of the last read, to detect sequential access.
    seq_next: u64,
    /// Readahead has been started up to here.
    readahead_until: u64,
    finalized: bool,
}

impl StubState {
    /// A sync failed: what it was to make durable may never reach the disk, and the kernel
    /// reports a writeback error only once, so a retry could "succeed" over lost data.
    /// Forget residency that is not durable; those granules are fetched and written again.
    fn forget_unsynced(&mut self) {
        let floor = self.resident.floor();
        let modified = self.resident.locally_modified();
        self.resident = self.durable.clone();
        self.resident.lower_floor(floor);
        if modified {
            self.resident.set_locally_modified();
        }
        self.dirty = true;
    }

    /// A local write was seen (so mtimes are no longer put back) and the map, flag
    /// included, is fsynced: a further write to durable granules needs nothing from us.
    fn write_guarded(&self) -> bool {
        self.restore_mtime.is_none() && self.meta_synced && !self.dirty
    }
}

/// A stub the agent is serving.
#[derive(Debug)]
struct Stub {
    key: InodeKey,
    /// The agent's own read-only descriptor (see [`Reopener`]): xattrs, sync, times. Not
    /// a writer, so exec of the stub still works while it is cached.
    fd: OwnedFd,
    /// Opens the writable descriptor each fill writes through (closed after the fill).
    reopener: Arc<dyn Reopener>,
    meta: Meta,
    expect: Expect,
    remote: Arc<dyn Remote>,
    /// Resolved only when a log line needs it (a readlink per stub is not free).
    path: std::sync::OnceLock<String>,
    state: Mutex<StubState>,
    /// Fills hold it shared while they check the size and write; installing a truncate
    /// barrier takes it exclusively, so no write is half-way when a truncate is allowed.
    gate: tokio::sync::RwLock<()>,
    /// A truncate to this length has been allowed and not yet seen done: no fill may write
    /// at or beyond it until then, or it could extend the file back.
    barrier: watch::Sender<Option<u64>>,
    persist_lock: tokio::sync::Mutex<()>,
    last_used: AtomicU64,
    /// This object's chunk digests, when its metadata names a manifest (loaded on first fill).
    digests: tokio::sync::OnceCell<Arc<Vec<hsm_manifest::Digest>>>,
}

/// The agent core. Create with [`AgentCore::new`] inside a tokio runtime.
#[derive(Debug)]
pub struct AgentCore {
    opts: CoreOptions,
    remotes: Arc<dyn RemoteOpener>,
    marks: Arc<dyn MarkSink>,
    reopener: Arc<dyn Reopener>,
    stubs: Mutex<HashMap<InodeKey, Arc<Stub>>>,
    fetch_slots: Semaphore,
    /// Slots for requests that outlived SLOW_REQUEST (see `bounded_fetch`).
    slow_slots: Semaphore,
    bandwidth: Option<RateLimiter>,
    persist_tx: mpsc::UnboundedSender<Arc<Stub>>,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    fills_running: AtomicU64,
    fills_done: tokio::sync::Notify,
    /// Held by the persister while it works on a batch (whose snapshots are no longer
    /// marked dirty), so a final flush waits for it instead of skipping those stubs.
    persist_gate: tokio::sync::Mutex<()>,
    /// The latest manifest read per (remote URL, manifest key). The async lock makes
    /// concurrent first fills wait for one fetch instead of each fetching.
    manifests: tokio::sync::Mutex<HashMap<ManifestId, Arc<ManifestDigests>>>,
    epoch: Instant,
    /// For spawning from threads outside the runtime (the adapter's event threads).
    rt: tokio::runtime::Handle,
}

impl AgentCore {
    /// Create the core and start its persister task.
    pub fn new(
        opts: CoreOptions,
        remotes: Arc<dyn RemoteOpener>,
        marks: Arc<dyn MarkSink>,
        reopener: Arc<dyn Reopener>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let bandwidth = (opts.max_bandwidth > 0).then(|| RateLimiter::new(opts.max_bandwidth));
        let core = Arc::new(AgentCore {
            fetch_slots: Semaphore::new(opts.max_concurrent_fetches.max(1)),
            slow_slots: Semaphore::new(opts.max_concurrent_fetches.max(1)),
            opts,
            remotes,
            marks,
            reopener,
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
            rt: tokio::runtime::Handle::current(),
        });
        tokio::spawn(persister(Arc::downgrade(&core), rx));
        tokio::spawn(sweeper(Arc::downgrade(&core)));
        core
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
                let errno = deny_errno(&e);
                let range = requested(ev.range);
                warn!(path = %stub.path(), ?range, errno = errno.name(), error = %e,
                      "read failed");
                Verdict::Deny(errno)
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
        let dup = self
            .reopener
            .reopen(fd, st, libc::O_RDONLY | libc::O_LARGEFILE)?;
        let core = self.clone();
        let st = *st;
        tokio::task::spawn_blocking(move || core.load_blocking(dup, &st))
            .await
            .map_err(|e| ServeError::TaskFailed(e.to_string()))?
    }

    fn cached(&self, st: &FileStat) -> Option<Arc<Stub>> {
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
            stubio::finalize(dup.as_fd())?;
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

    /// Drop clean, idle stub states until at most `target` remain (or none idle longer than
    /// `min_idle` is left). Their durable state is on disk, so reloading is always correct.
    fn evict(&self, target: usize, min_idle: Duration) {
        let now = self.now_ms();
        let mut stubs = lock(&self.stubs);
        if stubs.len() <= target && min_idle.is_zero() {
            return;
        }
        let mut idle: Vec<(u64, InodeKey)> = stubs
            .values()
            .filter(|s| {
                // Only states nobody else holds: a second state for one inode would have its
                // own in-flight set, gate and barrier.
                if Arc::strong_count(s) > 1 {
                    return false;
                }
                let st = lock(&s.state);
                !st.dirty && !st.queued && st.inflight.is_empty() && s.barrier.borrow().is_none()
            })
            .map(|s| (s.last_used.load(Ordering::Relaxed), s.key))
            .filter(|(used, _)| now.saturating_sub(*used) >= min_idle.as_millis() as u64)
            .collect();
        idle.sort_unstable_by_key(|(used, _)| *used);
        let excess = if min_idle.is_zero() {
            stubs.len().saturating_sub(target)
        } else {
            idle.len()
        };
        for (_, key) in idle.into_iter().take(excess) {
            stubs.remove(&key);
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn queue_persist(&self, stub: &Arc<Stub>, state: &mut StubState) {
        if !state.queued {
            state.queued = true;
            // The receiver lives as long as the core; a send error means we are dropping.
            let _ = self.persist_tx.send(stub.clone());
        }
    }

    /// The manifest `integrity` names: the one read last, or with `refresh` the current
    /// one (a HEAD tells whether the cached one still is). The body is read with the ETag
    /// its HEAD gave as a precondition, so a manifest replaced mid-read is an error, never
    /// a mix.
    async fn manifest(
        &self,
        remote: &Arc<dyn Remote>,
        integrity: &hsm_stub::Integrity,
        refresh: bool,
    ) -> Result<Arc<ManifestDigests>, ServeError> {
        let id = (remote.url().to_string(), integrity.manifest_key.clone());
        let mut cache = self.manifests.lock().await;
        if let Some(m) = cache.get(&id) {
            if !refresh {
                return Ok(m.clone());
            }
        }
        let key = &integrity.manifest_key;
        let info = remote.head(key).await?;
        if let Some(m) = cache.get(&id) {
            if info.etag.is_some() && m.etag == info.etag && m.size == info.size {
                return Ok(m.clone());
            }
        }
        let expect = Expect {
            etag: info.etag.clone(),
            version: info.version.clone(),
            size: info.size,
        };
        let bytes = remote.get_range(key, 0..info.size, &expect).await?;
        let manifest = hsm_manifest::Manifest::decode(&bytes)
            .map_err(|e| ServeError::Inconsistent(format!("manifest {key}: {e}")))?;
        let by_key = manifest
            .entries
            .into_iter()
            .filter_map(|e| match e.kind {
                hsm_manifest::Kind::File(f) => Some((f.key, Arc::new(f.digests))),
                _ => None,
            })
            .collect();
        let m = Arc::new(ManifestDigests {
            chunk_size: manifest.chunk_size,
            by_key,
            etag: info.etag.clone(),
            size: info.size,
        });
        cache.insert(id, m.clone());
        Ok(m)
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
}

enum Lookup {
    Stub(Arc<Stub>),
    NotStub,
    Building,
    Hydrated,
}

impl Stub {
    fn path(&self) -> &str {
        self.path
            .get_or_init(|| self.reopener.path_of(self.fd.as_fd()))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        key: InodeKey,
        fd: OwnedFd,
        reopener: Arc<dyn Reopener>,
        meta: Meta,
        map: ResidentMap,
        remote: Arc<dyn Remote>,
        mtime: Timestamp,
    ) -> Self {
        let expect = Expect {
            etag: meta.etag.clone(),
            version: meta.version.clone(),
            size: meta.remote_size,
        };
        let restore_mtime = (!map.locally_modified()).then_some(mtime);
        Stub {
            key,
            fd,
            reopener,
            expect,
            remote,
            path: std::sync::OnceLock::new(),
            state: Mutex::new(StubState {
                durable: map.clone(),
                resident: map,
                dirty: false,
                meta_synced: false,
                queued: false,
                inflight: HashMap::new(),
                restore_mtime,
                seq_next: 0,
                readahead_until: 0,
                finalized: false,
            }),
            meta,
            gate: tokio::sync::RwLock::new(()),
            barrier: watch::channel(None).0,
            persist_lock: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
            digests: tokio::sync::OnceCell::new(),
        }
    }

    /// The synchronous half of [`Stub::serve`]: reads whose granules are resident, or
    /// missing, not in flight, small, and fetchable inline. Everything else goes `Later`.
    fn try_serve_now(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        ev: &AccessEvent<'_>,
        st: &FileStat,
    ) -> Result<Verdict, Later> {
        self.last_used.store(core.now_ms(), Ordering::Relaxed);
        let early = if ambiguous(ev.range) {
            match ev.intent.classify_now() {
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
            let end = range.end.min(st.size);
            let granules = s.resident.granules_for(range.start.min(end)..end);
            let missing: Vec<u64> = s.resident.missing(granules.clone()).collect();
            let not_durable = granules
                .clone()
                .any(|g| s.resident.is_resident(g) && !s.durable.is_resident(g));
            let needs_intent = early.is_none()
                && (!missing.is_empty()
                    || not_durable
                    || s.dirty
                    || !s.inflight.is_empty()
                    || !s.write_guarded());
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
            None if needs_intent => match ev.intent.classify_now() {
                Some(a) => a,
                None => return Err(Later(ev.intent)), // still on its way to sleep
            },
            None => Access::Read,
        };
        if access != Access::Read {
            // Writes need a flush (and truncates a barrier) before they are allowed.
            return Err(Later(ev.intent.seen(access)));
        }
        let Some(run) = run else {
            Metrics::inc(&core.metrics.events_resident);
            self.readahead(core, range);
            return Ok(Verdict::Allow);
        };
        if core.shutting_down.load(Ordering::SeqCst) {
            return Ok(Verdict::Deny(DenyErrno::Eio));
        }
        // Claim the granules so concurrent events wait on this fill instead of repeating it.
        let (tx, rx) = tokio::sync::oneshot::channel::<FillResult>();
        let shared: SharedFill = async move {
            rx.await.unwrap_or_else(|_| {
                Err(Arc::new(ServeError::TaskFailed(
                    "inline fill abandoned".into(),
                )))
            })
        }
        .boxed()
        .shared();
        let mut claim = {
            let mut s = lock(&self.state);
            if run
                .clone()
                .any(|g| s.inflight.contains_key(&g) || s.resident.is_resident(g))
            {
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
        let result = self.fill_inline(core, run.clone());
        {
            let mut s = lock(&self.state);
            if result.is_ok() {
                s.resident.set_range_resident(run);
                s.dirty = true;
                core.queue_persist(self, &mut s);
            } else {
                Metrics::inc(&core.metrics.fill_errors);
            }
        }
        claim.release(result.as_ref().map(|_| ()).map_err(|e| Arc::new(e.clone())));
        let verdict = match &result {
            Ok(()) => {
                self.readahead(core, range.clone());
                Verdict::Allow
            }
            Err(e) => {
                let errno = deny_errno(e);
                warn!(path = %self.path(), ?range, errno = errno.name(), error = %e, "read failed");
                Verdict::Deny(errno)
            }
        };
        Ok(verdict)
    }

    /// Check every chunk of `bytes` (starting at object offset `start`, chunk aligned)
    /// against the manifest's digests. A mismatch is never written or marked resident.
    fn verify(
        &self,
        bytes: &[u8],
        start: u64,
        list: &[hsm_manifest::Digest],
        chunk: u64,
    ) -> Result<(), ServeError> {
        for (i, piece) in bytes.chunks(chunk as usize).enumerate() {
            let index = start / chunk + i as u64;
            let want = list.get(index as usize);
            if want != Some(&hsm_manifest::digest(piece)) {
                warn!(path = %self.path(), key = %self.meta.key, chunk = index, "fetched chunk does not match its digest");
                return Err(RemoteError::Corrupt {
                    url: self.remote.url().to_string(),
                    key: self.meta.key.clone(),
                    chunk: index,
                    offset: index * chunk,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Count a ranged read's body and check its length: whatever the remote promises, a
    /// short or long body never becomes resident.
    fn accept_body(
        &self,
        core: &AgentCore,
        part: &Range<u64>,
        body: Body,
    ) -> Result<Body, ServeError> {
        Metrics::add(&core.metrics.bytes_fetched, body.len());
        let want = part.end - part.start;
        let aligned = match &body {
            Body::File { range, .. } => range.start == part.start,
            Body::Bytes(_) => true,
        };
        if body.len() != want || !aligned {
            return Err(RemoteError::Truncated {
                url: self.remote.url().to_string(),
                key: self.meta.key.clone(),
                offset: part.start,
                expected: want,
                got: body.len(),
            }
            .into());
        }
        Ok(body)
    }

    /// Fetch and write one run of granules on this thread (remote I/O runs inline).
    fn fill_inline(&self, core: &AgentCore, run: Range<u64>) -> Result<(), ServeError> {
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
            std::thread::sleep(Duration::from_millis(1));
        };
        let written = self.write_blocking(part.start, &data)?;
        Metrics::add(&core.metrics.bytes_written, written);
        Ok(())
    }

    /// Clamp `range` to the file and the floor: the granules to fetch, and whether the
    /// access's kind matters (anything not durable or in flight, or writes not yet guarded).
    fn plan(&self, range: Range<u64>, st: &FileStat) -> (Range<u64>, Vec<u64>, bool) {
        let s = lock(&self.state);
        // Nothing beyond the current size can be read, so nothing there is fetched.
        let end = range.end.min(st.size);
        let granules = s.resident.granules_for(range.start.min(end)..end);
        let missing: Vec<u64> = s.resident.missing(granules.clone()).collect();
        let not_durable = granules
            .clone()
            .any(|g| s.resident.is_resident(g) && !s.durable.is_resident(g));
        let needs_intent = !missing.is_empty()
            || not_durable
            || s.dirty
            || !s.inflight.is_empty()
            || self.barrier.borrow().is_some()
            || !s.write_guarded();
        (range, missing, needs_intent)
    }

    async fn serve(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        ev: &AccessEvent<'_>,
        st: &FileStat,
    ) -> Result<Verdict, ServeError> {
        self.last_used.store(core.now_ms(), Ordering::Relaxed);
        {
            let mut s = lock(&self.state);
            if s.finalized {
                return Ok(Verdict::AllowAndIgnore);
            }
            // The file is smaller than any size we knew: it was truncated (open(O_TRUNC)
            // raises no event). Bytes at or beyond its size are local from now on.
            if st.size < s.resident.floor() {
                s.resident.lower_floor(st.size);
                s.dirty = true;
                Metrics::inc(&core.metrics.truncates);
                core.queue_persist(self, &mut s);
            }
        }
        // Classify first when the range alone cannot say what is needed, or when it is free.
        let early = if ambiguous(ev.range) || ev.intent.is_classified() {
            Some(ev.intent.classify().await)
        } else {
            None
        };
        let (mut range, mut missing, needs_intent) = self.plan(needed_range(ev.range, early), st);
        // Reading /proc costs a few microseconds; skip it when no answer could change what
        // we do (everything in range durable, nothing in flight, writes already guarded).
        let access = match early {
            Some(a) => a,
            None if needs_intent => ev.intent.classify().await,
            None => Access::Read,
        };
        if early.is_none() && access == Access::Shift {
            let planned = self.plan(needed_range(ev.range, Some(access)), st);
            (range, missing) = (planned.0, planned.1);
        }
        if !missing.is_empty() {
            if core.shutting_down.load(Ordering::SeqCst) {
                return Err(ServeError::ShuttingDown);
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
            Access::Write | Access::Truncate { .. } | Access::Shift => {
                {
                    let mut s = lock(&self.state);
                    if !s.resident.locally_modified() {
                        s.resident.set_locally_modified();
                        s.dirty = true;
                    }
                    s.restore_mtime = None;
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

    /// A truncate to `length` is about to be allowed. Wait for writes in progress, then keep
    /// fills away from `length..` until the truncate is seen done.
    async fn install_barrier(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        length: u64,
        tid: Option<i32>,
    ) {
        if length >= lock(&self.state).resident.floor() {
            return; // growing, or within bytes that are already local
        }
        Metrics::inc(&core.metrics.truncates);
        {
            let _quiet = self.gate.write().await;
            self.barrier.send_modify(|b| {
                *b = Some(b.map_or(length, |old| old.min(length)));
            });
        }
        let stub = self.clone();
        let core = core.clone();
        tokio::spawn(async move {
            stub.resolve_truncate(&core, length, tid).await;
        });
    }

    /// Watch for the allowed truncate to happen (or to fail), then lift the barrier.
    async fn resolve_truncate(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        length: u64,
        tid: Option<i32>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut confirmed = None;
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let size = stat::fstatx(self.fd.as_fd()).map(|s| s.size).ok();
            if let Some(size) = size.filter(|&s| s <= length) {
                confirmed = Some(size);
                break;
            }
            let still_truncating = tid.is_some_and(|t| match intent::classify_now(t) {
                None => true, // running: not done yet
                Some(o) => matches!(o.access, Access::Truncate { length: l } if l == length),
            });
            if !still_truncating {
                // The syscall is over: one last look decides.
                confirmed = stat::fstatx(self.fd.as_fd())
                    .ok()
                    .map(|s| s.size)
                    .filter(|&s| s <= length);
                break;
            }
            if Instant::now() > deadline {
                warn!(path = %self.path(), length, "truncate not seen completing after 10 s; lifting the fill barrier");
                break;
            }
        }
        {
            let mut s = lock(&self.state);
            if let Some(size) = confirmed {
                if size < s.resident.floor() {
                    s.resident.lower_floor(size);
                    s.dirty = true;
                    core.queue_persist(self, &mut s);
                }
            }
        }
        self.barrier.send_modify(|b| {
            if *b == Some(length) {
                *b = None;
            }
        });
    }

    /// Fetch the given missing granules (sorted), sharing fills already in flight. With
    /// `background`, start the fills and return at once (readahead).
    async fn fill(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        granules: &[u64],
        background: bool,
    ) -> Result<(), ServeError> {
        let waits: Vec<SharedFill> = {
            let mut s = lock(&self.state);
            let per_request = (core.opts.max_request_size >> s.resident.granule_shift()).max(1);
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
                            waits.push(self.start_fill(core, &mut s, r, background));
                        }
                        run = Some(g..g + 1);
                    }
                }
            }
            if let Some(r) = run {
                waits.push(self.start_fill(core, &mut s, r, background));
            }
            waits
        };
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
            let result = stub.run_fill(&core2, r.clone()).await;
            {
                let mut s = lock(&stub.state);
                for g in r.clone() {
                    s.inflight.remove(&g);
                }
                match &result {
                    Ok(()) => {
                        s.resident.set_range_resident(r);
                        s.dirty = true;
                        core2.queue_persist(&stub, &mut s);
                    }
                    Err(e) => {
                        Metrics::inc(&core2.metrics.fill_errors);
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

    /// Fetch granules `run` in parts of at most `max_request_size`, in parallel, and write
    /// them. All or nothing: the caller marks the run resident only on success.
    async fn run_fill(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        run: Range<u64>,
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
        let mut step = core.opts.max_request_size.max(4096);
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

    /// The digests of this object and their chunk size, when its metadata names a manifest:
    /// the ones whose hash the metadata pins, from the manifest read last or, if that one
    /// lists others (the package was republished since), from a fresh read. A manifest
    /// that no longer lists these digests means the object was replaced: the stub is stale.
    async fn digests(
        &self,
        core: &Arc<AgentCore>,
    ) -> Result<Option<(Arc<Vec<hsm_manifest::Digest>>, u64)>, ServeError> {
        let Some(integrity) = &self.meta.integrity else {
            return Ok(None);
        };
        let chunk = 1u64 << integrity.chunk_shift;
        let pick = |m: &ManifestDigests| {
            m.by_key
                .get(&self.meta.key)
                .filter(|list| {
                    m.chunk_size == chunk
                        && list.len() as u64
                            == hsm_manifest::chunk_count(self.meta.remote_size, chunk)
                        && hsm_manifest::list_hash(list) == integrity.list_hash
                })
                .cloned()
        };
        let list = self
            .digests
            .get_or_try_init(|| async {
                let m = core.manifest(&self.remote, integrity, false).await?;
                if let Some(list) = pick(&m) {
                    return Ok::<_, ServeError>(list);
                }
                let m = core.manifest(&self.remote, integrity, true).await?;
                pick(&m).ok_or_else(|| {
                    RemoteError::Changed {
                        url: self.remote.url().to_string(),
                        key: self.meta.key.clone(),
                        detail: format!(
                            "{} no longer lists the digests it had at populate time",
                            integrity.manifest_key
                        ),
                    }
                    .into()
                })
            })
            .await?;
        Ok(Some((list.clone(), chunk)))
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
    ///   of slots for slow requests, if one is free, and gives its own slot back: a
    ///   stalled server can then hold at most half of all requests;
    /// - a request running longer than the read timeout (plus a second) is abandoned: no
    ///   reader waits that long, and a later reader starts a fresh fill.
    async fn bounded_fetch<T>(
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
    async fn write_part(
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
            if size < s.resident.floor() {
                s.resident.lower_floor(size);
                s.dirty = true;
            }
            s.resident.floor()
        };
        let end = (offset + body.len()).min(limit);
        if end <= offset {
            return Ok(0);
        }
        let n = end - offset;
        // Opened per fill and closed after it: a cached writer would make exec of the file
        // fail with ETXTBSY.
        let writer =
            self.reopener
                .reopen(self.fd.as_fd(), &st, libc::O_RDWR | libc::O_LARGEFILE)?;
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

    /// After a read, fetch ahead of a sequential reader.
    fn readahead(self: &Arc<Self>, core: &Arc<AgentCore>, range: Range<u64>) {
        let window = core.opts.readahead;
        if window == 0 || core.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        let todo: Vec<u64> = {
            let mut s = lock(&self.state);
            let sequential = range.start <= s.seq_next && range.end > s.seq_next;
            s.seq_next = range.end;
            if !sequential || range.end.saturating_add(window / 2) < s.readahead_until {
                return;
            }
            let start = range.end.max(s.readahead_until);
            let end = range.end.saturating_add(window).min(s.resident.floor());
            if end <= start {
                return;
            }
            s.readahead_until = end;
            let granules = s.resident.granules_for(start..end);
            s.resident
                .missing(granules)
                .filter(|g| !s.inflight.contains_key(g))
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let stub = self.clone();
        let core2 = core.clone();
        core.rt.spawn(async move {
            // Background: errors surface to whoever reads those bytes.
            let _ = stub.fill(&core2, &todo, true).await;
        });
    }

    /// Make the resident map durable: fdatasync the data, then write the xattr (and fsync it
    /// when a local write is about to happen). Finalises the stub when complete.
    async fn persist(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        sync_meta: bool,
    ) -> Result<(), ServeError> {
        let _serial = self.persist_lock.lock().await;
        let Some(snapshot) = self.persist_begin(sync_meta) else {
            return Ok(());
        };
        let stub = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            stubio::persist_map(stub.fd.as_fd(), &snapshot, sync_meta).map(|done| (snapshot, done))
        })
        .await
        .map_err(|e| ServeError::TaskFailed(e.to_string()))?;
        self.persist_end(core, result, sync_meta)
    }

    /// What to persist: a snapshot of the resident map taken before the data is synced (so it
    /// never claims bytes written after the sync), or `None` if nothing changed.
    fn persist_begin(&self, sync_meta: bool) -> Option<ResidentMap> {
        let mut s = lock(&self.state);
        if s.finalized || (!s.dirty && (!sync_meta || s.meta_synced)) {
            return None;
        }
        s.dirty = false;
        // Until this persist ends, the xattr on disk is not the fsynced one any more.
        s.meta_synced = false;
        Some(s.resident.clone())
    }

    /// Record the outcome of a persist: the map now durable, or the stub finalised (its map
    /// was complete: the xattrs are gone and it is an ordinary file).
    fn persist_end(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        result: Result<(ResidentMap, bool), LocalError>,
        sync_meta: bool,
    ) -> Result<(), ServeError> {
        let mut s = lock(&self.state);
        match result {
            Ok((snapshot, finalized)) => {
                Metrics::inc(&core.metrics.persists);
                s.durable = snapshot;
                s.meta_synced = sync_meta;
                if finalized {
                    s.finalized = true;
                    drop(s);
                    self.finalized(core);
                }
                Ok(())
            }
            Err(e) => {
                s.forget_unsynced();
                Err(e.into())
            }
        }
    }

    /// The stub became an ordinary file: stop its events and forget it.
    fn finalized(self: &Arc<Self>, core: &Arc<AgentCore>) {
        core.marks.ignore(self.fd.as_fd());
        {
            let mut stubs = lock(&core.stubs);
            if stubs.get(&self.key).is_some_and(|s| Arc::ptr_eq(s, self)) {
                stubs.remove(&self.key);
            }
        }
        Metrics::inc(&core.metrics.hydrated);
        info!(path = %self.path(), "stub fully resident; now an ordinary file");
    }
}

/// Persists dirty maps in batches: one wake-up per `persist_interval`, however many fills.
async fn persister(core: Weak<AgentCore>, mut rx: mpsc::UnboundedReceiver<Arc<Stub>>) {
    while let Some(first) = rx.recv().await {
        let Some(interval) = core.upgrade().map(|c| c.opts.persist_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let mut batch = vec![first];
        while let Ok(s) = rx.try_recv() {
            if !batch.iter().any(|b| Arc::ptr_eq(b, &s)) {
                batch.push(s);
            }
        }
        let Some(core) = core.upgrade() else { return };
        let _gate = core.persist_gate.lock().await;
        for s in &batch {
            lock(&s.state).queued = false;
        }
        let mut by_fs: HashMap<u64, Vec<Arc<Stub>>> = HashMap::new();
        for s in batch {
            by_fs.entry(s.key.dev).or_default().push(s);
        }
        for (_, group) in by_fs {
            let failed = if group.len() >= SYNCFS_BATCH {
                persist_group(&core, &group).await
            } else {
                let jobs = group.iter().map(|s| {
                    let core = core.clone();
                    async move { s.persist(&core, false).await.err().map(|e| (s.clone(), e)) }
                });
                futures::future::join_all(jobs)
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            };
            for (s, e) in failed {
                warn!(path = %s.path(), error = %e, "could not persist resident map; will retry");
                let mut st = lock(&s.state);
                core.queue_persist(&s, &mut st);
            }
        }
    }
}

/// From this many dirty stubs on one filesystem, one syncfs (one journal commit) replaces
/// an fdatasync per stub.
const SYNCFS_BATCH: usize = 4;

/// Persist many stubs of one filesystem: snapshot all, one syncfs, then every xattr.
async fn persist_group(core: &Arc<AgentCore>, group: &[Arc<Stub>]) -> Vec<(Arc<Stub>, ServeError)> {
    let mut guards = Vec::with_capacity(group.len());
    for s in group {
        guards.push(s.persist_lock.lock().await);
    }
    let snaps: Vec<(Arc<Stub>, ResidentMap)> = group
        .iter()
        .filter_map(|s| s.persist_begin(false).map(|m| (s.clone(), m)))
        .collect();
    let Some((first, _)) = snaps.first() else {
        return Vec::new();
    };
    let first = first.clone();
    let results = tokio::task::spawn_blocking(move || {
        let synced = hsm_kernel::sys::syncfs(first.fd.as_fd())
            .map_err(|e| LocalError::from_kernel("syncfs", &e));
        snaps
            .into_iter()
            .map(|(s, m)| {
                let r = synced.clone().and_then(|()| {
                    stubio::commit_map(s.fd.as_fd(), &m, false).map(|done| (m, done))
                });
                (s, r)
            })
            .collect::<Vec<_>>()
    })
    .await;
    drop(guards);
    let mut failed = Vec::new();
    match results {
        Ok(results) => {
            for (s, r) in results {
                if let Err(e) = s.persist_end(core, r, false) {
                    failed.push((s, e));
                }
            }
        }
        Err(e) => {
            for s in group {
                lock(&s.state).forget_unsynced();
                failed.push((s.clone(), ServeError::TaskFailed(e.to_string())));
            }
        }
    }
    failed
}

/// Closes descriptors of stubs nobody has touched for a while, so deleted stubs free space.
async fn sweeper(core: Weak<AgentCore>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(core) = core.upgrade() else { return };
        core.evict(0, Duration::from_secs(60));
    }
}

/// Paces fetches to a byte rate: each request is held until its bytes "have arrived".
#[derive(Debug)]
struct RateLimiter {
    bytes_per_sec: u64,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn acquire(&self, bytes: u64) {
        let until = {
            let mut next = self.next.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            *next
        };
        tokio::time::sleep_until(until).await;
    }
}
