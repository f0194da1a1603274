//! What the core exposes to adapters: its options, the event and verdict types, how an
//! access's kind is learnt, and the traits through which it opens remotes, places marks and
//! reopens files.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsm_kernel::stat::FileStat;
use hsm_remote::{Remote, RemoteError};
use tracing::warn;

use crate::agent::lock;
use crate::error::LocalError;
use crate::stubio::{self};

/// Tunables of the core (the `[agent]` section of the configuration).
#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub max_concurrent_fetches: usize,
    pub max_request_size: u64,
    /// The first readahead window; it doubles while the reader stays sequential.
    pub readahead: u64,
    /// The largest readahead window.
    pub readahead_max: u64,
    /// Readahead streams (one streamed request per sequential reader of a network store)
    /// that may run at once; 0: readahead from network stores makes ranged requests only.
    pub readahead_streams: usize,
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
            readahead_max: 128 << 20,
            readahead_streams: 8,
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
    /// Report the opens of the (ignored) file behind `fd` to the bounded cache, which
    /// otherwise would never see it used again. Best effort; nothing without a cache limit.
    fn watch_opens(&self, _fd: BorrowedFd<'_>) {}
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

/// How long a reopen waits for descriptors to come back before the access fails.
const DESCRIPTORS_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const DESCRIPTORS_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// [`Reopener::reopen`], waiting out EMFILE/ENFILE (descriptors come back as events are
/// answered) for up to 30 s. Blocking: for blocking threads only.
pub(crate) fn reopen_waiting(
    r: &dyn Reopener,
    file: BorrowedFd<'_>,
    st: &FileStat,
    flags: i32,
) -> Result<OwnedFd, LocalError> {
    let deadline = std::time::Instant::now() + DESCRIPTORS_WAIT;
    loop {
        match r.reopen(file, st, flags) {
            Err(LocalError::TooManyFiles { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(DESCRIPTORS_RETRY)
            }
            other => return other,
        }
    }
}

/// [`reopen_waiting`] for async code.
pub(crate) async fn reopen_waiting_async(
    r: &dyn Reopener,
    file: BorrowedFd<'_>,
    st: &FileStat,
    flags: i32,
) -> Result<OwnedFd, LocalError> {
    let deadline = tokio::time::Instant::now() + DESCRIPTORS_WAIT;
    loop {
        match r.reopen(file, st, flags) {
            Err(LocalError::TooManyFiles { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(DESCRIPTORS_RETRY).await
            }
            other => return other,
        }
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

/// The kind of access that raised an event (read, write, truncate, tail shift): the
/// vocabulary the intent module of hsm-kernel already defines.
pub use hsm_kernel::intent::Access;

/// How the adapter learns what a blocked thread is doing (the kernel's event says only
/// "data access to this range"). The fanotify adapter reads `/proc/TID/syscall`.
pub trait IntentProbe: Send + Sync + std::fmt::Debug {
    /// What thread `tid` is about to do, or `None` if it is still running (not yet blocked
    /// in its syscall: ask again).
    fn classify_now(&self, tid: i32) -> Option<Access>;
}

/// A probe for cores whose events always carry their intent ([`IntentSource::Known`]):
/// any thread it is asked about is treated as a writer.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoThreads;

impl IntentProbe for NoThreads {
    fn classify_now(&self, _tid: i32) -> Option<Access> {
        Some(Access::Write)
    }
}

/// How to learn what the accessing thread is doing.
#[derive(Debug, Clone, Copy)]
pub enum IntentSource {
    /// Ask the core's [`IntentProbe`] about this thread, only if the answer matters.
    Tid(i32),
    /// Already classified on an event thread; the thread id is kept for truncate tracking.
    Seen { tid: i32, access: Access },
    /// Known without a thread (tests, tools).
    Known(Access),
}

/// How long the async path waits for an accessing thread still on its way to sleep before
/// giving up on classifying it ([`Access::Unknown`]: guarded like a write, but the file's
/// times are kept). It cannot leave before it is answered, so this only matters for threads
/// preempted at that point under heavy load. `HSM_INTENT_PATIENCE_MS` overrides it (tests
/// set 0 to make every such access unclassified).
const RUNNING_PATIENCE: Duration = Duration::from_millis(200);

fn running_patience() -> Duration {
    static PATIENCE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *PATIENCE.get_or_init(|| {
        std::env::var("HSM_INTENT_PATIENCE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(RUNNING_PATIENCE)
    })
}

impl IntentSource {
    /// Without waiting: `None` if the thread is still running (try again later).
    pub(crate) fn classify_now(&self, probe: &dyn IntentProbe) -> Option<Access> {
        match *self {
            IntentSource::Tid(tid) => {
                for _ in 0..8 {
                    if let Some(access) = probe.classify_now(tid) {
                        return Some(access);
                    }
                    std::thread::yield_now();
                }
                None
            }
            IntentSource::Seen { access, .. } | IntentSource::Known(access) => Some(access),
        }
    }

    /// Waiting (asynchronously) for a running thread to block.
    pub(crate) async fn classify(&self, probe: &dyn IntentProbe) -> Access {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(a) = self.classify_now(probe) {
                return a;
            }
            if start.elapsed() >= running_patience() {
                if let IntentSource::Tid(tid) = self {
                    warn!(
                        tid,
                        patience_ms = running_patience().as_millis() as u64,
                        "accessing thread still running; guarding the access as a possible write (the file's times are kept)"
                    );
                }
                return Access::Unknown;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Whether the access is already classified (classifying is free).
    pub(crate) fn is_classified(&self) -> bool {
        !matches!(self, IntentSource::Tid(_))
    }

    /// The same source, with the classification attached.
    pub(crate) fn seen(&self, access: Access) -> IntentSource {
        match *self {
            IntentSource::Tid(tid) | IntentSource::Seen { tid, .. } => {
                IntentSource::Seen { tid, access }
            }
            IntentSource::Known(_) => IntentSource::Known(access),
        }
    }

    pub(crate) fn tid(&self) -> Option<i32> {
        match *self {
            IntentSource::Tid(t) | IntentSource::Seen { tid: t, .. } => Some(t),
            IntentSource::Known(_) => None,
        }
    }
}

/// The byte range an access reports, as the adapter received it (unclamped). A zero count
/// means "to the end of the file" (see [`requested`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange {
    pub offset: u64,
    pub count: u64,
}

impl FileRange {
    /// The end of the range, saturating.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.count)
    }
}

/// The errors a denied access can report to the reader (docs/SEMANTICS.md has the table of
/// causes). The adapter turns each into its own errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyErrno {
    Eio,
    Enospc,
    Edquot,
}

impl DenyErrno {
    /// The errno value.
    pub fn errno(self) -> i32 {
        match self {
            DenyErrno::Eio => libc::EIO,
            DenyErrno::Enospc => libc::ENOSPC,
            DenyErrno::Edquot => libc::EDQUOT,
        }
    }

    /// Its conventional name, for logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            DenyErrno::Eio => "EIO",
            DenyErrno::Enospc => "ENOSPC",
            DenyErrno::Edquot => "EDQUOT",
        }
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
pub(crate) fn needed_range(raw: Option<FileRange>, access: Option<Access>) -> Range<u64> {
    match (raw, access) {
        (Some(r), Some(Access::Truncate { .. })) if r.count == 0 => r.offset..r.offset,
        (Some(r), Some(Access::Shift)) => r.offset..u64::MAX,
        _ => requested(raw),
    }
}

/// Whether an event's range alone cannot say what it needs (see [`needed_range`]).
pub(crate) fn ambiguous(raw: Option<FileRange>) -> bool {
    raw.is_some_and(|r| r.count == 0)
}

/// The span every event is handled in: who, which inode, which range.
pub(crate) fn event_span(ev: &AccessEvent<'_>, st: &FileStat) -> tracing::Span {
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

/// The bytes an event asks for. A zero count means "to the end of the file": FICLONE (and
/// other remaps of a whole file) report their range that way, and treating it as empty
/// let a reflink copy of a stub share its holes.
pub(crate) fn requested(range: Option<FileRange>) -> Range<u64> {
    match range {
        Some(r) if r.count == 0 => r.offset..u64::MAX,
        Some(r) => r.offset..r.end(),
        None => 0..u64::MAX,
    }
}
