//! The bounded cache (`[cache] max_size`): how many bytes of remote data the trees may hold
//! locally, which files give theirs back first, and waiting for room before a fill.
//!
//! Every fill is charged to its file before it starts. Below the high watermark a charge
//! is granted at once; above it the fill waits for one eviction round, which gives back
//! the least recently used files until use (plus what waiters ask for) is under the low
//! watermark. A fill that still does not fit under `max_size` after such a round fails
//! with ENOSPC, before anything of it is fetched or written: a file never ends up with
//! part of a fill. docs/SEMANTICS.md ("The bounded cache") is the user-facing account.
//!
//! Order: a segmented LRU. A file enters on probation; a second reference (an access
//! coming at least [`REREFERENCE`] after the previous one, or a fetch of a file evicted
//! not long ago) promotes it to the protected segment, which holds at most three quarters
//! of the high watermark. Probation is evicted first, so a scan that reads cold files once
//! passes through probation and leaves the protected working set resident.
//!
//! The eviction itself (a lease, checks, the punch) is the adapter's ([`Evictor`]): the
//! budget only picks, and learns the outcome.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hsm_kernel::fdio::FileHandle;
use hsm_kernel::stat::FileStat;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::agent::lock;
use crate::error::ServeError;
use crate::stub::InodeKey;

/// Accesses closer together than this are one reference (a sequential read raises an
/// event per read; one pass over a file must not promote it).
pub const REREFERENCE: Duration = Duration::from_secs(1);

/// The longest a fill waits for an eviction round before it is decided without one.
const ROUND_PATIENCE: Duration = Duration::from_secs(10);

/// Evicted files remembered (keys only) so that fetching one again counts as a second
/// reference.
const GHOSTS: usize = 65_536;

/// The limits, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Never exceeded: a fill that cannot fit under it fails with ENOSPC.
    pub max: u64,
    /// Use stays at or below this while anything can be evicted.
    pub high: u64,
    /// An eviction round stops here.
    pub low: u64,
}

/// What an eviction attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictOutcome {
    /// The file is a stub again; its bytes were given back.
    Freed,
    /// Open, mapped, executing or being filled: tried again later.
    InUse,
    /// A pin covers it: never evicted while pinned.
    Pinned,
    /// Written locally (or never from a remote): not cache, no longer counted.
    NotCache,
    /// Deleted or replaced: no longer counted.
    Gone,
    /// Could not be evicted this time (logged).
    Failed(String),
}

/// Turns a file back into a stub (the adapter: it holds the mounts and the leases).
pub trait Evictor: Send + Sync + std::fmt::Debug {
    /// Evict the file `handle` names, if it is still the inode `key` (device, inode, birth
    /// time).
    fn evict(&self, handle: FileHandle, key: FileKey) -> BoxFuture<'_, EvictOutcome>;
}

/// Which inode an [`Evictor`] is asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKey {
    pub dev: u64,
    pub ino: u64,
    pub btime: Option<hsm_kernel::stat::Timestamp>,
}

impl FileKey {
    /// Whether `st` is this inode.
    pub fn is(&self, st: &FileStat) -> bool {
        st.ino == self.ino && st.btime == self.btime
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg {
    Probation,
    Protected,
    /// Pinned: counted, never a candidate (until pins change).
    Held,
}

/// Position in a segment: files adopted at start-up sort by their change time, before
/// anything touched since.
type Tick = (u64, u64);

#[derive(Debug)]
struct Entry {
    bytes: u64,
    tick: Tick,
    seg: Seg,
    last_ms: u64,
    handle: FileHandle,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<InodeKey, Entry>,
    probation: BTreeMap<Tick, InodeKey>,
    protected: BTreeMap<Tick, InodeKey>,
    protected_bytes: u64,
    used: u64,
    /// Bytes fills are waiting to charge.
    pending: u64,
    seq: u64,
    ghosts: VecDeque<InodeKey>,
    ghost_set: HashSet<InodeKey>,
    in_round: bool,
    evictions: u64,
    evicted_bytes: u64,
    full_denies: u64,
}

impl Lru {
    fn next_tick(&mut self) -> Tick {
        self.seq += 1;
        (u64::MAX, self.seq)
    }

    fn unlink(&mut self, key: &InodeKey) {
        if let Some(e) = self.entries.get(key) {
            match e.seg {
                Seg::Probation => {
                    self.probation.remove(&e.tick);
                }
                Seg::Protected => {
                    self.protected.remove(&e.tick);
                    self.protected_bytes = self.protected_bytes.saturating_sub(e.bytes);
                }
                Seg::Held => {}
            }
        }
    }

    fn link(&mut self, key: InodeKey, seg: Seg, tick: Tick) {
        let Some(e) = self.entries.get_mut(&key) else {
            return;
        };
        e.seg = seg;
        e.tick = tick;
        match seg {
            Seg::Probation => {
                self.probation.insert(tick, key);
            }
            Seg::Protected => {
                self.protected.insert(tick, key);
                self.protected_bytes += e.bytes;
            }
            Seg::Held => {}
        }
    }

    fn remove(&mut self, key: &InodeKey) -> u64 {
        self.unlink(key);
        let bytes = self.entries.remove(key).map(|e| e.bytes).unwrap_or(0);
        self.used = self.used.saturating_sub(bytes);
        bytes
    }

    fn remember(&mut self, key: InodeKey) {
        if self.ghost_set.insert(key) {
            self.ghosts.push_back(key);
            if self.ghosts.len() > GHOSTS {
                if let Some(old) = self.ghosts.pop_front() {
                    self.ghost_set.remove(&old);
                }
            }
        }
    }

    /// An access at `now_ms`: most recently used in its segment, promoted on a second
    /// reference.
    fn touch(&mut self, key: &InodeKey, now_ms: u64, protected_cap: u64) {
        let Some(e) = self.entries.get(key) else {
            return;
        };
        if e.seg == Seg::Held {
            return;
        }
        let again = now_ms.saturating_sub(e.last_ms) >= REREFERENCE.as_millis() as u64;
        let seg = if again { Seg::Protected } else { e.seg };
        self.unlink(key);
        let tick = self.next_tick();
        self.link(*key, seg, tick);
        if let Some(e) = self.entries.get_mut(key) {
            e.last_ms = now_ms;
        }
        self.balance(protected_cap);
    }

    /// Keep the protected segment within its share: its least recently used files go back
    /// to probation (as its most recently used).
    fn balance(&mut self, cap: u64) {
        while self.protected_bytes > cap {
            let Some((&tick, &key)) = self.protected.iter().next() else {
                break;
            };
            let _ = tick;
            self.unlink(&key);
            let t = self.next_tick();
            self.link(key, Seg::Probation, t);
        }
    }

    fn charge(&mut self, key: InodeKey, handle: Option<&FileHandle>, bytes: u64, now_ms: u64) {
        self.used += bytes;
        if let Some(e) = self.entries.get_mut(&key) {
            e.bytes += bytes;
            if e.seg == Seg::Protected {
                self.protected_bytes += bytes;
            }
            return;
        }
        let Some(handle) = handle else {
            return;
        };
        let seg = if self.ghost_set.remove(&key) {
            Seg::Protected
        } else {
            Seg::Probation
        };
        self.entries.insert(
            key,
            Entry {
                bytes,
                tick: (0, 0),
                seg: Seg::Held,
                last_ms: now_ms,
                handle: handle.clone(),
            },
        );
        let tick = self.next_tick();
        self.link(key, seg, tick);
    }

    /// Candidates in eviction order: probation oldest first, then protected.
    fn candidates(&self) -> Vec<InodeKey> {
        self.probation
            .values()
            .chain(self.protected.values())
            .copied()
            .collect()
    }
}

/// A snapshot for `hsm status` and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BudgetStatus {
    pub max_bytes: u64,
    pub high_bytes: u64,
    pub low_bytes: u64,
    pub used_bytes: u64,
    pub files: u64,
    pub protected_bytes: u64,
    pub pinned_bytes: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub full_denies: u64,
}

/// The bounded cache's accounting and its eviction task.
#[derive(Debug)]
pub struct Budget {
    limits: CacheLimits,
    lru: Mutex<Lru>,
    wake: Notify,
    /// Completed eviction rounds.
    rounds: watch::Sender<u64>,
    evictor: OnceLock<Arc<dyn Evictor>>,
    epoch: Instant,
}

impl Budget {
    pub fn new(limits: CacheLimits) -> Arc<Self> {
        Arc::new(Budget {
            limits,
            lru: Mutex::new(Lru::default()),
            wake: Notify::new(),
            rounds: watch::channel(0).0,
            evictor: OnceLock::new(),
            epoch: Instant::now(),
        })
    }

    pub fn limits(&self) -> CacheLimits {
        self.limits
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn protected_cap(&self) -> u64 {
        self.limits.high / 4 * 3
    }

    /// Start evicting through `evictor` (once; inside a tokio runtime).
    pub fn start(self: &Arc<Self>, evictor: Arc<dyn Evictor>) {
        if self.evictor.set(evictor).is_ok() {
            tokio::spawn(evict_task(Arc::downgrade(self)));
        }
    }

    /// An access to the file `st`: recency, and a second reference promotes it. Returns
    /// whether the file is counted (a fully fetched one then needs its opens watched).
    pub fn touch(&self, st: &FileStat) -> bool {
        let key = InodeKey::of(st);
        let now = self.now_ms();
        let mut l = lock(&self.lru);
        l.touch(&key, now, self.protected_cap());
        l.entries.contains_key(&key)
    }

    /// Charge `bytes` for the file at `fd` if that keeps use under the high watermark.
    pub(crate) fn try_charge(&self, fd: BorrowedFd<'_>, key: InodeKey, bytes: u64) -> bool {
        let handle = self.handle_if_new(fd, &key);
        let now = self.now_ms();
        let mut l = lock(&self.lru);
        if l.used + bytes > self.limits.high {
            drop(l);
            self.wake.notify_one();
            return false;
        }
        l.charge(key, handle.as_ref(), bytes, now);
        l.touch(&key, now, self.protected_cap());
        true
    }

    /// Charge `bytes` for the file at `fd`, waiting for an eviction round when use would
    /// pass the high watermark. Fails (ENOSPC) when even after one it would pass `max`.
    pub(crate) async fn charge(
        &self,
        fd: BorrowedFd<'_>,
        key: InodeKey,
        bytes: u64,
    ) -> Result<(), ServeError> {
        let full = || ServeError::CacheFull {
            needed: bytes,
            limit: self.limits.max,
        };
        if bytes > self.limits.max {
            lock(&self.lru).full_denies += 1;
            return Err(full());
        }
        let handle = self.handle_if_new(fd, &key);
        let mut rounds = self.rounds.subscribe();
        let mut wait_for: Option<u64> = None;
        let asked = Instant::now();
        loop {
            let now = self.now_ms();
            {
                let mut l = lock(&self.lru);
                // Without an evictor (tests) there is no round to wait for, and a reader
                // never waits on one for long: past ROUND_PATIENCE it is decided as if the
                // round had run (a round normally takes milliseconds per file).
                let no_rounds = self.evictor.get().is_none() || asked.elapsed() > ROUND_PATIENCE;
                if wait_for.is_some() {
                    l.pending = l.pending.saturating_sub(bytes);
                }
                let round_ran = wait_for.is_some_and(|w| *rounds.borrow() >= w);
                if round_ran || no_rounds {
                    // A whole round ran since we asked: over high is allowed now (what is
                    // left is in use or pinned), over max is not.
                    if l.used + bytes <= self.limits.max {
                        l.charge(key, handle.as_ref(), bytes, now);
                        l.touch(&key, now, self.protected_cap());
                        return Ok(());
                    }
                    l.full_denies += 1;
                    return Err(full());
                }
                if l.used + bytes <= self.limits.high {
                    l.charge(key, handle.as_ref(), bytes, now);
                    l.touch(&key, now, self.protected_cap());
                    return Ok(());
                }
                l.pending += bytes;
                if wait_for.is_none() {
                    // A round already running may have picked its target without us.
                    let done = *rounds.borrow_and_update();
                    wait_for = Some(done + if l.in_round { 2 } else { 1 });
                }
            }
            self.wake.notify_one();
            let target = wait_for.unwrap_or(0);
            // Bounded, so that a lost wake-up costs a second, not a reader.
            let _ = tokio::time::timeout(Duration::from_secs(1), rounds.wait_for(|r| *r >= target))
                .await;
        }
    }

    /// Charge `bytes` without waiting (a fill found more to fetch than it was charged for).
    pub(crate) fn add(&self, fd: BorrowedFd<'_>, key: InodeKey, bytes: u64) {
        let handle = self.handle_if_new(fd, &key);
        let now = self.now_ms();
        lock(&self.lru).charge(key, handle.as_ref(), bytes, now);
    }

    /// An access to a stub the core holds.
    pub(crate) fn touch_key(&self, key: InodeKey) {
        let now = self.now_ms();
        lock(&self.lru).touch(&key, now, self.protected_cap());
    }

    /// The stub was written locally: what it holds is no longer a copy of the remote.
    pub(crate) fn forget_key(&self, key: InodeKey) {
        lock(&self.lru).remove(&key);
    }

    /// Give back a charge whose fill failed.
    pub(crate) fn refund(&self, key: InodeKey, bytes: u64) {
        let mut guard = lock(&self.lru);
        let l = &mut *guard;
        l.used = l.used.saturating_sub(bytes);
        let empty = match l.entries.get_mut(&key) {
            Some(e) => {
                let gone = bytes.min(e.bytes);
                e.bytes -= gone;
                if e.seg == Seg::Protected {
                    l.protected_bytes = l.protected_bytes.saturating_sub(gone);
                }
                e.bytes == 0
            }
            None => false,
        };
        if empty {
            l.remove(&key);
        }
    }

    /// The file is no longer cache (evicted by command, written locally, deleted).
    pub fn forget(&self, st: &FileStat, evicted: bool) {
        let key = InodeKey::of(st);
        let mut l = lock(&self.lru);
        let bytes = l.remove(&key);
        if evicted && bytes > 0 {
            l.evictions += 1;
            l.evicted_bytes += bytes;
            l.remember(key);
        }
    }

    /// Pins changed: every held file is a candidate again (the next round re-learns which
    /// are still pinned).
    pub fn pins_changed(&self) {
        let mut l = lock(&self.lru);
        let held: Vec<InodeKey> = l
            .entries
            .iter()
            .filter(|(_, e)| e.seg == Seg::Held)
            .map(|(k, _)| *k)
            .collect();
        for k in held {
            let t = l.next_tick();
            l.link(k, Seg::Probation, t);
        }
    }

    /// A file found at start-up holding `bytes` of remote data, last changed at `ctime`
    /// (seconds): counted, and ordered before everything accessed since.
    pub fn adopt(&self, st: &FileStat, handle: FileHandle, bytes: u64, ctime: u64) {
        let key = InodeKey::of(st);
        let mut l = lock(&self.lru);
        if l.entries.contains_key(&key) || bytes == 0 {
            return;
        }
        l.seq += 1;
        let tick = (ctime, l.seq);
        l.used += bytes;
        l.entries.insert(
            key,
            Entry {
                bytes,
                tick,
                seg: Seg::Held,
                last_ms: 0,
                handle,
            },
        );
        l.link(key, Seg::Probation, tick);
        drop(l);
        self.wake.notify_one();
    }

    pub fn status(&self) -> BudgetStatus {
        let l = lock(&self.lru);
        BudgetStatus {
            max_bytes: self.limits.max,
            high_bytes: self.limits.high,
            low_bytes: self.limits.low,
            used_bytes: l.used,
            files: l.entries.len() as u64,
            protected_bytes: l.protected_bytes,
            pinned_bytes: l
                .entries
                .values()
                .filter(|e| e.seg == Seg::Held)
                .map(|e| e.bytes)
                .sum(),
            evictions: l.evictions,
            evicted_bytes: l.evicted_bytes,
            full_denies: l.full_denies,
        }
    }

    fn handle_if_new(&self, fd: BorrowedFd<'_>, key: &InodeKey) -> Option<FileHandle> {
        if lock(&self.lru).entries.contains_key(key) {
            return None;
        }
        match hsm_kernel::fdio::handle_of(fd) {
            Ok((h, _)) => Some(h),
            Err(e) => {
                // Counted without an entry would make use drift; count it anyway (the
                // limit matters more than the order) under a handle that opens nothing.
                warn!(error = %e, "no file handle for a cached file; it cannot be evicted");
                Some(FileHandle {
                    handle_type: 0,
                    bytes: Vec::new(),
                })
            }
        }
    }

    /// Evict until use plus what fills wait for is under the low watermark, or nothing is
    /// left to try. Returns whether anything was given back.
    async fn round(&self, evictor: &dyn Evictor) -> bool {
        let candidates = {
            let mut l = lock(&self.lru);
            l.in_round = true;
            l.candidates()
        };
        let mut freed_any = false;
        for key in candidates {
            let (handle, bytes) = {
                let l = lock(&self.lru);
                if l.used + l.pending <= self.limits.low {
                    break;
                }
                match l.entries.get(&key) {
                    Some(e) if e.seg != Seg::Held => (e.handle.clone(), e.bytes),
                    _ => continue,
                }
            };
            let fk = FileKey {
                dev: key.dev,
                ino: key.ino,
                btime: key.btime,
            };
            let outcome = if handle.bytes.is_empty() {
                EvictOutcome::Failed("no file handle".into())
            } else {
                evictor.evict(handle, fk).await
            };
            let now = self.now_ms();
            let mut l = lock(&self.lru);
            match outcome {
                EvictOutcome::Freed => {
                    let b = l.remove(&key);
                    l.evictions += 1;
                    l.evicted_bytes += b;
                    l.remember(key);
                    freed_any = true;
                }
                EvictOutcome::InUse => {
                    // In use is recently used; and not tried again this round.
                    if let Some(e) = l.entries.get_mut(&key) {
                        e.last_ms = now;
                    }
                    let seg = l.entries.get(&key).map(|e| e.seg);
                    if let Some(seg) = seg {
                        l.unlink(&key);
                        let t = l.next_tick();
                        l.link(key, seg, t);
                    }
                }
                EvictOutcome::Pinned => {
                    l.unlink(&key);
                    if let Some(e) = l.entries.get_mut(&key) {
                        e.seg = Seg::Held;
                    }
                }
                EvictOutcome::NotCache | EvictOutcome::Gone => {
                    l.remove(&key);
                    freed_any = true;
                }
                EvictOutcome::Failed(why) => {
                    debug!(bytes, error = %why, "could not evict a cached file");
                }
            }
        }
        lock(&self.lru).in_round = false;
        freed_any
    }
}

async fn evict_task(budget: std::sync::Weak<Budget>) {
    let mut announced = false;
    loop {
        let wake = {
            let Some(b) = budget.upgrade() else { return };
            let needed = {
                let l = lock(&b.lru);
                l.used > b.limits.high || l.pending > 0
            };
            if needed {
                let Some(ev) = b.evictor.get().cloned() else {
                    return;
                };
                let before = b.status();
                let freed = b.round(ev.as_ref()).await;
                b.rounds.send_modify(|r| *r += 1);
                let after = b.status();
                if after.evictions > before.evictions {
                    debug!(
                        evicted = after.evictions - before.evictions,
                        used = after.used_bytes,
                        "eviction round"
                    );
                }
                if after.used_bytes > b.limits.high && !announced {
                    info!(
                        used = after.used_bytes,
                        high = b.limits.high,
                        "cache over its high watermark with nothing left to evict (files in use or pinned)"
                    );
                    announced = true;
                } else if after.used_bytes <= b.limits.high {
                    announced = false;
                }
                // Let the waiters this round decided run (a round that awaited nothing would
                // otherwise keep this worker to itself), and after a round that could give
                // nothing back, wait for news rather than try the same files again at once.
                tokio::task::yield_now().await;
                if !freed {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(100), b.wake.notified()).await;
                }
                continue;
            }
            // Not holding the budget while idle: its owner may drop it.
            let b2 = b.clone();
            drop(b);
            b2
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), wake.wake.notified()).await;
    }
}

#[cfg(test)]
mod tests;
