//! Per-stub state: the inode key, the mutable state behind the stub lock, the stub itself,
//! the fill plan, and the cache of stubs with its eviction sweeper.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use hsm_kernel::stat::{FileStat, Timestamp};
use hsm_remote::{Expect, Remote};
use hsm_stub::{Meta, ResidentMap};
use tokio::sync::watch;

use crate::agent::{AgentCore, lock};
use crate::api::Reopener;
use crate::error::ServeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct InodeKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    // With dev and ino, tells a reused inode number from the one we cached.
    pub(crate) btime: Option<Timestamp>,
}

impl InodeKey {
    pub(crate) fn of(st: &FileStat) -> Self {
        InodeKey {
            dev: st.dev,
            ino: st.ino,
            btime: st.btime,
        }
    }
}

pub(crate) type FillResult = Result<(), Arc<ServeError>>;

pub(crate) type SharedFill = Shared<BoxFuture<'static, FillResult>>;

/// A fill others can join that ends when the returned sender sends its result; if the
/// sender is dropped unsent, it fails with `abandoned`.
pub(crate) fn completed_by_sender(
    abandoned: &'static str,
) -> (tokio::sync::oneshot::Sender<FillResult>, SharedFill) {
    use futures::FutureExt;
    let (tx, rx) = tokio::sync::oneshot::channel::<FillResult>();
    let fill = async move {
        rx.await
            .unwrap_or_else(|_| Err(Arc::new(ServeError::TaskFailed(abandoned.into()))))
    }
    .boxed()
    .shared();
    (tx, fill)
}

/// Per-stub mutable state.
#[derive(Debug)]
pub(crate) struct StubState {
    /// Granules readable now (written through an event fd), with the floor and flags.
    pub(crate) resident: ResidentMap,
    /// What the map xattr says (or will, once the running persist finishes).
    pub(crate) durable: ResidentMap,
    /// `resident` differs from `durable`.
    pub(crate) dirty: bool,
    /// The durable xattr has been fsynced since it last changed.
    pub(crate) meta_synced: bool,
    /// Already waiting in the persister's queue.
    pub(crate) queued: bool,
    pub(crate) inflight: HashMap<u64, SharedFill>,
    /// The mtime to put back after fills; `None` once the file was written locally.
    pub(crate) restore_mtime: Option<Timestamp>,
    /// Fills writing now (between their check of the mtime and putting it back).
    pub(crate) writers: usize,
    /// End of the last read, to detect sequential access.
    pub(crate) seq_next: u64,
    /// Readahead has been started up to here.
    pub(crate) readahead_until: u64,
    /// The current readahead window (0: the reader is not sequential yet).
    pub(crate) readahead_window: u64,
    /// The readahead stream filling this stub, if one runs (see crate::stream).
    pub(crate) stream: Option<crate::stream::StreamTx>,
    pub(crate) finalized: bool,
    /// Dropped from the cache for an eviction: its map on disk is the eviction's to
    /// change, so nothing persists it any more (a later access loads a fresh state).
    pub(crate) retired: bool,
}

impl StubState {
    /// A sync failed: what it was to make durable may never reach the disk, and the kernel
    /// reports a writeback error only once, so a retry could "succeed" over lost data.
    /// Forget residency that is not durable; those granules are fetched and written again.
    pub(crate) fn forget_unsynced(&mut self) {
        let floor = self.resident.floor();
        let modified = self.resident.locally_modified();
        self.resident = self.durable.clone();
        self.resident.lower_floor(floor);
        if modified {
            self.resident.set_locally_modified();
        }
        self.dirty = true;
    }

    /// The file is now `size` bytes long: bytes at or beyond it are local from now on.
    /// Returns whether that lowered the floor (and so dirtied the map).
    pub(crate) fn lower_floor(&mut self, size: u64) -> bool {
        if size < self.resident.floor() {
            self.resident.lower_floor(size);
            self.dirty = true;
            return true;
        }
        false
    }

    /// The fill of granules `run` is over, however it ended: it is no longer in flight.
    pub(crate) fn clear_inflight(&mut self, run: Range<u64>) {
        for g in run {
            self.inflight.remove(&g);
        }
    }

    /// [`Stub::plan`] under a held lock, for a file of `size` bytes: the granules of `range`
    /// to fetch, and whether any of it is not durable or in flight, or writes are not yet
    /// guarded (the truncate barrier is the caller's to check).
    pub(crate) fn plan(&self, range: &Range<u64>, size: u64) -> (Vec<u64>, bool) {
        // Nothing beyond the current size can be read, so nothing there is fetched.
        let end = range.end.min(size);
        let granules = self.resident.granules_for(range.start.min(end)..end);
        let missing: Vec<u64> = self.resident.missing(granules.clone()).collect();
        let not_durable = granules
            .clone()
            .any(|g| self.resident.is_resident(g) && !self.durable.is_resident(g));
        let unsettled = !missing.is_empty()
            || not_durable
            || self.dirty
            || !self.inflight.is_empty()
            || !self.write_guarded();
        (missing, unsettled)
    }

    /// Bytes a fill of granules `run` fetches (what the bounded cache is charged).
    pub(crate) fn run_bytes(&self, run: &Range<u64>) -> u64 {
        if run.is_empty() {
            return 0;
        }
        let start = self.resident.granule_range(run.start).start;
        let end = self.resident.fetch_range(run.end - 1).end;
        end.saturating_sub(start)
    }

    /// A local write was seen (so mtimes are no longer put back) and the map, flag
    /// included, is fsynced: a further write to durable granules needs nothing from us.
    pub(crate) fn write_guarded(&self) -> bool {
        self.restore_mtime.is_none() && self.meta_synced && !self.dirty
    }
}

/// A stub the agent is serving.
#[derive(Debug)]
pub(crate) struct Stub {
    pub(crate) key: InodeKey,
    /// The agent's own read-only descriptor (see [`Reopener`]): xattrs, sync, times. Not
    /// a writer, so exec of the stub still works while it is cached.
    pub(crate) fd: OwnedFd,
    /// Opens the writable descriptor each fill writes through (closed after the fill).
    pub(crate) reopener: Arc<dyn Reopener>,
    pub(crate) meta: Meta,
    pub(crate) expect: Expect,
    pub(crate) remote: Arc<dyn Remote>,
    /// Resolved only when a log line needs it (a readlink per stub is not free).
    pub(crate) path: std::sync::OnceLock<String>,
    pub(crate) state: Mutex<StubState>,
    /// Fills hold it shared while they check the size and write; installing a truncate
    /// barrier takes it exclusively, so no write is half-way when a truncate is allowed.
    pub(crate) gate: tokio::sync::RwLock<()>,
    /// A truncate to this length has been allowed and not yet seen done: no fill may write
    /// at or beyond it until then, or it could extend the file back.
    pub(crate) barrier: watch::Sender<Option<u64>>,
    pub(crate) persist_lock: tokio::sync::Mutex<()>,
    pub(crate) last_used: AtomicU64,
    /// This object's chunk digests, when its metadata names a manifest (loaded on first fill).
    pub(crate) digests: tokio::sync::OnceCell<Arc<Vec<hsm_manifest::Digest>>>,
}

/// Stub states alive in this process, cached or not: each holds a descriptor until its
/// last holder lets go (a persister batch or a serving task can outlive the cache entry).
pub(crate) static LIVE: AtomicUsize = AtomicUsize::new(0);

impl Drop for Stub {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stub {
    pub(crate) fn path(&self) -> &str {
        self.path
            .get_or_init(|| self.reopener.path_of(self.fd.as_fd()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
        // The mtime the file has now is put back after each fill, whatever happened before:
        // fetching bytes is never a modification. A write since is seen by the fill (the
        // mtime moved) or by its event, and ends it.
        let restore_mtime = Some(mtime);
        LIVE.fetch_add(1, Ordering::Relaxed);
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
                writers: 0,
                seq_next: 0,
                readahead_until: 0,
                readahead_window: 0,
                stream: None,
                finalized: false,
                retired: false,
            }),
            meta,
            gate: tokio::sync::RwLock::new(()),
            barrier: watch::channel(None).0,
            persist_lock: tokio::sync::Mutex::new(()),
            last_used: AtomicU64::new(0),
            digests: tokio::sync::OnceCell::new(),
        }
    }

    /// Clamp `range` to the file and the floor: the granules to fetch, and whether the
    /// access's kind matters (anything not durable or in flight, or writes not yet guarded).
    pub(crate) fn plan(&self, range: &Range<u64>, st: &FileStat) -> (Vec<u64>, bool) {
        let s = lock(&self.state);
        let (missing, unsettled) = s.plan(range, st.size);
        (missing, unsettled || self.barrier.borrow().is_some())
    }
}

impl AgentCore {
    /// Drop clean, idle stub states until at most `target` remain (or none idle longer than
    /// `min_idle` is left). Their durable state is on disk, so reloading is always correct.
    pub(crate) fn evict(&self, target: usize, min_idle: Duration) {
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
}

impl AgentCore {
    /// Before an eviction changes a stub's map and punches its data: make the cached
    /// state durable and drop it, so the next access loads what the eviction leaves.
    /// Returns `false`, leaving it cached, when it is busy (fills in flight, a truncate
    /// barrier, changes not yet durable). The caller must then hold a lease that proves
    /// nobody has the file open (so no access can be using the dropped state).
    pub async fn release_for_evict(self: &Arc<Self>, st: &FileStat) -> Result<bool, ServeError> {
        let Some(stub) = self.cached(st) else {
            return Ok(true);
        };
        stub.persist(self, false).await?;
        // Held by an access being served (say, a fill waiting for room in the cache), it
        // would go on with a state nobody persists. Other holders (the persister finishing
        // a batch) let go within moments: wait for them a little.
        for _ in 0..25 {
            if Arc::strong_count(&stub) <= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut stubs = lock(&self.stubs);
        if Arc::strong_count(&stub) > 2 {
            return Ok(false);
        }
        let mut s = lock(&stub.state);
        if s.dirty || !s.inflight.is_empty() || stub.barrier.borrow().is_some() {
            return Ok(false);
        }
        s.retired = true;
        drop(s);
        if stubs.get(&stub.key).is_some_and(|c| Arc::ptr_eq(c, &stub)) {
            stubs.remove(&stub.key);
        }
        Ok(true)
    }
}

/// Closes descriptors of stubs nobody has touched for a while, so deleted stubs free space.
pub(crate) async fn sweeper(core: Weak<AgentCore>) {
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let Some(core) = core.upgrade() else { return };
        core.evict(0, Duration::from_secs(60));
    }
}
