//! The cache lifecycle commands the control socket runs: hydrate, evict, pin and unpin
//! paths inside the served trees. Each walks the paths it is given (never following
//! symlinks, never leaving the tree's filesystem) and reports one [`FileOutcome`] per
//! regular file. docs/SEMANTICS.md ("Eviction and pins") says what each guarantees.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hsm_core::{AgentCore, Reopener, Verdict};
use hsm_kernel::fanotify::{AGENT_EVENTS, Group};
use hsm_kernel::markers::{MARKER_LEN, MarkerPages};
use hsm_kernel::stat::{self, FileStat};
use hsm_kernel::xattr::{self, SetMode};
use hsm_stub::{
    MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, ORIGIN_XATTR, Origin, PIN_XATTR, ResidentMap,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::mounts::PrivateMounts;

mod error;
pub(crate) use error::served_tree;
pub use error::{CacheError, Cause, SkipReason};

/// A lifecycle command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Hydrate,
    Evict,
    Pin,
    Unpin,
    /// Hydrate what pins cover under the paths (after `hsm populate` added files below a
    /// pinned directory).
    Repin,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FileOutcome {
    /// Hydrate/pin: every byte is now local (`fetched` of them fetched by this command).
    Hydrated { fetched: u64 },
    /// Evict: the file is a stub again and `freed` bytes of data were given back.
    Evicted { freed: u64 },
    /// Evict: nothing was resident.
    AlreadyStub,
    /// Unpin: the pin was removed (also reported for a file that had none).
    Unpinned,
    /// Left alone, and why.
    Skipped { reason: SkipReason },
    /// The operation failed on this file (the error's text: it names the file).
    Failed { error: String },
}

impl FileOutcome {
    fn skipped(reason: SkipReason) -> Self {
        FileOutcome::Skipped { reason }
    }

    fn failed(e: CacheError) -> Self {
        FileOutcome::Failed {
            error: e.to_string(),
        }
    }
}

/// Where the commands act: what `serve` builds at start-up.
pub struct CacheOps {
    pub(crate) trees: Vec<PathBuf>,
    core: Arc<AgentCore>,
    group: Arc<Group>,
    private: Arc<PrivateMounts>,
    /// The data markers evicted files get back (shared blocks where the filesystem can).
    markers: MarkerPages,
}

impl std::fmt::Debug for CacheOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheOps")
            .field("trees", &self.trees)
            .finish()
    }
}

/// Templates the agent keeps for the data markers of evicted files: the full-page one and
/// a few tail lengths (each holds a descriptor, and a block until a stub shares it, for the
/// agent's whole life).
const EVICT_TEMPLATES: usize = 16;

/// How often, and how long apart, an eviction retries a file the agent itself still holds
/// (a state the persister has not let go of yet) before calling it in use.
const LEASE_TRIES: u32 = 5;
const LEASE_RETRY: Duration = Duration::from_millis(100);

impl CacheOps {
    pub(crate) fn new(
        trees: Vec<PathBuf>,
        core: Arc<AgentCore>,
        group: Arc<Group>,
        private: Arc<PrivateMounts>,
    ) -> Result<Self, hsm_kernel::KernelError> {
        // Evictions hold leases; a lease break signals SIGIO, whose default kills.
        hsm_kernel::sys::ignore_sigio()?;
        Ok(CacheOps {
            trees,
            core,
            group,
            private,
            markers: MarkerPages::for_visible_files(EVICT_TEMPLATES),
        })
    }

    /// Run `op` on every regular file under `paths`, calling `each` once per file as it is
    /// done (for progress). Paths outside every served tree fail with a message naming
    /// them, as [`FileOutcome::Failed`] for the path itself.
    pub async fn run(
        self: &Arc<Self>,
        op: Op,
        paths: Vec<PathBuf>,
        each: &mut (dyn FnMut(&Path, FileOutcome) + Send),
    ) {
        for p in paths {
            let files = match self.walk_blocking(op, &p).await {
                Ok(f) => f,
                Err(e) => {
                    each(&p, FileOutcome::failed(e));
                    continue;
                }
            };
            for f in files {
                let outcome = self.one(op, &f).await;
                if op == Op::Evict {
                    self.tell_budget(&f.path, &outcome);
                }
                each(&f.path, outcome);
            }
        }
        if op == Op::Unpin {
            if let Some(b) = self.core.budget() {
                b.pins_changed();
            }
        }
    }

    /// [`Self::walk`] off the async threads.
    async fn walk_blocking(
        self: &Arc<Self>,
        op: Op,
        path: &Path,
    ) -> Result<Vec<Found>, CacheError> {
        let (this, p) = (self.clone(), path.to_path_buf());
        tokio::task::spawn_blocking(move || this.walk(op, &p))
            .await
            .map_err(|e| CacheError::new(path, e))?
    }

    /// The regular files under `path` (itself, if it is one) with whether a pin covers
    /// each. Pin and unpin change the pin xattrs on the way.
    fn walk(&self, op: Op, path: &Path) -> Result<Vec<Found>, CacheError> {
        let (tree, real) = served_tree(&self.trees, path)?;
        let top = open_path(&real).map_err(|e| CacheError::io(path, "open", e))?;
        let top_st = stat::fstatx(top.as_fd()).map_err(|e| CacheError::kernel(path, "statx", e))?;
        let dev = top_st.dev;
        if !top_st.is_file() && !top_st.is_dir() {
            return Err(CacheError::new(path, Cause::NotFileOrDir));
        }
        match op {
            Op::Pin => set_pin(&real, true).map_err(|e| CacheError::new(path, e))?,
            Op::Unpin => set_pin(&real, false).map_err(|e| CacheError::new(path, e))?,
            _ => {}
        }
        // Pins on the directories above it, up to the tree's root.
        let mut pinned = false;
        let mut up = real.parent();
        while let Some(d) = up.filter(|d| d.starts_with(tree)) {
            pinned |= has_pin(d);
            up = d.parent();
        }
        let mut out = Vec::new();
        let mut stack = vec![(real, top_st, pinned)];
        while let Some((p, st, above)) = stack.pop() {
            let here = above || has_pin(&p);
            if st.is_file() {
                out.push(Found {
                    path: p,
                    pinned: here,
                });
            } else if st.is_dir() && st.dev == dev {
                let entries =
                    std::fs::read_dir(&p).map_err(|e| CacheError::io(&p, "read_dir", e))?;
                for e in entries {
                    let e = e.map_err(|e| CacheError::io(&p, "read_dir", e))?;
                    let child = e.path();
                    let Ok(fd) = open_path(&child) else { continue };
                    let Ok(cst) = stat::fstatx(fd.as_fd()) else {
                        continue;
                    };
                    if op == Op::Unpin && (cst.is_dir() || cst.is_file()) {
                        let _ = set_pin(&child, false);
                    }
                    if cst.is_dir() || cst.is_file() {
                        stack.push((child, cst, here));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    async fn one(self: &Arc<Self>, op: Op, f: &Found) -> FileOutcome {
        match op {
            Op::Hydrate | Op::Pin => self.hydrate(&f.path).await,
            Op::Repin if f.pinned => self.hydrate(&f.path).await,
            Op::Repin => FileOutcome::skipped(SkipReason::NotPinned),
            Op::Unpin => FileOutcome::Unpinned,
            Op::Evict if f.pinned => FileOutcome::skipped(SkipReason::Pinned),
            Op::Evict => self.evict(&f.path).await,
        }
    }

    /// An `hsm evict` changed what the bounded cache counts.
    fn tell_budget(&self, path: &Path, outcome: &FileOutcome) {
        let Some(b) = self.core.budget() else { return };
        let evicted = matches!(outcome, FileOutcome::Evicted { .. });
        let not_cache = matches!(
            outcome,
            FileOutcome::Skipped {
                reason: SkipReason::Modified | SkipReason::NotRemote
            }
        );
        if !evicted && !not_cache {
            return;
        }
        if let Ok(fd) = open_path(path) {
            if let Ok(st) = stat::fstatx(fd.as_fd()) {
                b.forget(&st, evicted);
            }
        }
    }

    pub(crate) fn private(&self) -> &Arc<PrivateMounts> {
        &self.private
    }

    /// Evict one file for the bounded cache: the same checks and steps as `hsm evict`
    /// (pins included).
    pub(crate) async fn evict_one(self: &Arc<Self>, path: &Path) -> FileOutcome {
        match self.walk_blocking(Op::Evict, path).await {
            Ok(files) => match files.as_slice() {
                [f] => self.one(Op::Evict, f).await,
                _ => FileOutcome::failed(CacheError::new(path, Cause::NoLongerFile)),
            },
            Err(e) => FileOutcome::failed(e),
        }
    }

    /// Open `path`'s file on the agent's private mount (no events; see mounts.rs).
    pub(crate) fn reopen(
        &self,
        path: &Path,
        flags: i32,
    ) -> Result<(OwnedFd, FileStat), CacheError> {
        let o = open_path(path).map_err(|e| CacheError::io(path, "open", e))?;
        let st = stat::fstatx(o.as_fd()).map_err(|e| CacheError::kernel(path, "statx", e))?;
        if !st.is_file() {
            return Err(CacheError::new(path, Cause::NotFile));
        }
        let fd = self
            .private
            .reopen(o.as_fd(), &st, flags | libc::O_LARGEFILE | libc::O_NOFOLLOW)
            .map_err(|e| CacheError::new(path, e))?;
        Ok((fd, st))
    }

    async fn hydrate(&self, path: &Path) -> FileOutcome {
        let (fd, before) = match self.reopen(path, libc::O_RDONLY) {
            Ok(x) => x,
            Err(e) => return FileOutcome::failed(e),
        };
        match self.core.hydrate(fd.as_fd()).await {
            Verdict::Deny(errno) => {
                FileOutcome::failed(CacheError::new(path, Cause::Denied(errno)))
            }
            _ => {
                let after = stat::fstatx(fd.as_fd()).map(|s| s.blocks).unwrap_or(0);
                FileOutcome::Hydrated {
                    fetched: after.saturating_sub(before.blocks) * 512,
                }
            }
        }
    }

    async fn evict(self: &Arc<Self>, path: &Path) -> FileOutcome {
        // A stub that became whole between the look and the lease is evicted as what it
        // became.
        let first = self.evict_once(path).await;
        if first == FileOutcome::skipped(SkipReason::NoLongerStub) {
            return self.evict_once(path).await;
        }
        first
    }

    async fn evict_once(self: &Arc<Self>, path: &Path) -> FileOutcome {
        let (probe, st) = match self.reopen(path, libc::O_RDONLY) {
            Ok(x) => x,
            Err(e) => return FileOutcome::failed(e),
        };
        let kind = match classify(path, probe.as_fd()) {
            Ok(k) => k,
            Err(e) => return FileOutcome::failed(e),
        };
        drop(probe);
        let outcome = match kind {
            Kind::Local => return FileOutcome::skipped(SkipReason::NotRemote),
            Kind::Building => return FileOutcome::skipped(SkipReason::Building),
            // What is on disk says so already: no need to touch the agent's state.
            Kind::ModifiedStub => return FileOutcome::skipped(SkipReason::Modified),
            Kind::Stub => {
                match self.core.release_for_evict(&st).await {
                    Ok(true) => {}
                    Ok(false) => return FileOutcome::skipped(SkipReason::FillsInFlight),
                    Err(e) => return FileOutcome::failed(CacheError::new(path, e)),
                }
                let (this, p) = (self.clone(), path.to_path_buf());
                tokio::task::spawn_blocking(move || this.evict_stub(&p)).await
            }
            Kind::Hydrated(origin) => {
                let (this, p) = (self.clone(), path.to_path_buf());
                tokio::task::spawn_blocking(move || this.evict_hydrated(&p, &origin)).await
            }
        };
        outcome.unwrap_or_else(|e| FileOutcome::failed(CacheError::new(path, e)))
    }

    /// Open for writing and take a write lease: proof that nobody else has the file open,
    /// mapped or executing, and that nobody opens it until the lease is given back.
    fn lease(&self, path: &Path) -> Result<Option<(OwnedFd, FileStat)>, CacheError> {
        for _ in 0..LEASE_TRIES {
            let (w, st) = match self.reopen(path, libc::O_RDWR) {
                Ok(x) => x,
                // Being executed.
                Err(CacheError {
                    cause: Cause::Local(hsm_core::LocalError::Busy { .. }),
                    ..
                }) => return Ok(None),
                Err(e) => return Err(e),
            };
            match hsm_kernel::sys::write_lease(w.as_fd()) {
                Ok(true) => return Ok(Some((w, st))),
                Ok(false) => std::thread::sleep(LEASE_RETRY),
                Err(e) => return Err(CacheError::kernel(path, "F_SETLEASE", e)),
            }
        }
        Ok(None)
    }

    /// A partly fetched stub: forget what is resident, then give the blocks back.
    fn evict_stub(&self, path: &Path) -> FileOutcome {
        let (w, st) = match self.lease(path) {
            Ok(Some(x)) => x,
            Ok(None) => return FileOutcome::skipped(SkipReason::InUse),
            Err(e) => return FileOutcome::failed(e),
        };
        let (meta, map) = match hsm_core::stubio::load(w.as_fd()) {
            Ok(hsm_core::stubio::Loaded::Stub { meta, map }) => (meta, map),
            Ok(_) => return FileOutcome::skipped(SkipReason::NoLongerStub),
            Err(e) => return FileOutcome::failed(CacheError::new(path, e)),
        };
        if map.locally_modified() || map.floor() < meta.remote_size {
            return FileOutcome::skipped(SkipReason::Modified);
        }
        // Blocks would count an external xattr block: ask for data instead.
        if map.resident_count() == 0 && !data_past_markers(w.as_fd(), &map) {
            return FileOutcome::AlreadyStub;
        }
        let fresh = match ResidentMap::new(meta.stub_id, meta.remote_size, map.granule_shift()) {
            Ok(m) => m,
            Err(e) => return FileOutcome::failed(CacheError::format(path, "resident map", e)),
        };
        let r = (|| -> Result<(), CacheError> {
            // The map first, durably: a crash after the punch must not leave a map
            // claiming bytes that are gone.
            xattr::fset(w.as_fd(), MAP_XATTR, &fresh.encode(), SetMode::Replace)
                .map_err(|e| CacheError::kernel(path, "writing the map", e))?;
            nix::unistd::fsync(&w).map_err(|e| CacheError::io(path, "fsync", e.into()))?;
            self.give_back(path, w.as_fd(), &st, &fresh)
        })();
        finish(path, w, &st, r)
    }

    /// A fully fetched file with an origin record: check it is still that copy, make it a
    /// stub again (metadata, an empty map, then the marker), then give the blocks back.
    fn evict_hydrated(&self, path: &Path, origin: &Origin) -> FileOutcome {
        // Digest before the lease (a big file takes a while; openers wait on a lease), then
        // prove under the lease that nothing changed since: any write moves the ctime.
        let (probe, before) = match self.reopen(path, libc::O_RDONLY) {
            Ok(x) => x,
            Err(e) => return FileOutcome::failed(e),
        };
        if before.size != origin.meta.remote_size {
            return FileOutcome::skipped(SkipReason::Modified);
        }
        match hsm_core::stubio::content_digest(
            probe.as_fd(),
            origin.meta.remote_size,
            origin.chunk_shift,
        ) {
            Ok(d) if d == origin.digest => {}
            Ok(_) => return FileOutcome::skipped(SkipReason::Modified),
            Err(e) => return FileOutcome::failed(CacheError::new(path, e)),
        }
        drop(probe);
        let (w, st) = match self.lease(path) {
            Ok(Some(x)) => x,
            Ok(None) => return FileOutcome::skipped(SkipReason::InUse),
            Err(e) => return FileOutcome::failed(e),
        };
        if st.ctime != before.ctime || st.size != before.size || st.ino != before.ino {
            return FileOutcome::skipped(SkipReason::Modified);
        }
        let r = (|| -> Result<(), CacheError> {
            let set = |name, value: &[u8], what| {
                xattr::fset(w.as_fd(), name, value, SetMode::Any)
                    .map_err(|e| CacheError::kernel(path, what, e))
            };
            let meta = origin
                .meta
                .encode()
                .map_err(|e| CacheError::format(path, "stub metadata", e))?;
            let map = ResidentMap::new(
                origin.meta.stub_id,
                origin.meta.remote_size,
                origin.granule_shift,
            )
            .map_err(|e| CacheError::format(path, "resident map", e))?;
            set(META_XATTR, &meta, "writing the metadata")?;
            set(MAP_XATTR, &map.encode(), "writing the map")?;
            let fresh = map;
            // The marker last: from here on it is a stub (with every byte still present).
            set(
                MARKER_XATTR,
                &Marker::ready().encode(),
                "writing the marker",
            )?;
            // Durable before the data goes: a crash must never leave an ordinary file with
            // holes where its bytes were.
            nix::unistd::fsync(&w).map_err(|e| CacheError::io(path, "fsync", e.into()))?;
            // Its accesses must reach the agent again.
            let fd = w.as_fd();
            self.group
                .remove_ignore_mark(fd, AGENT_EVENTS)
                .map_err(|e| CacheError::kernel(path, "removing the ignore mark", e))?;
            self.give_back(path, fd, &st, &fresh)?;
            // While the marker is there the origin record means nothing; at the next
            // finalisation it is written afresh.
            xattr::fremove(fd, ORIGIN_XATTR)
                .map_err(|e| CacheError::kernel(path, "removing the origin record", e))?;
            Ok(())
        })();
        finish(path, w, &st, r)
    }

    /// Give the blocks back: a data marker at the start of every granule of `fresh` (an
    /// empty map), every other byte punched out, then the times put back (none of it is a
    /// modification). The markers first: they replace the bytes they cover with zeros, so a
    /// crash before the punch leaves a stub that only holds bytes it does not claim, never
    /// one that a hole-skipping copier would copy as zeros.
    fn give_back(
        &self,
        path: &Path,
        fd: BorrowedFd<'_>,
        st: &FileStat,
        fresh: &ResidentMap,
    ) -> Result<(), CacheError> {
        if st.size > 0 {
            let markers: Vec<u64> = fresh.marker_offsets().collect();
            let dir = self.private.dir_for(st.dev).ok_or_else(|| {
                let e = std::io::Error::from_raw_os_error(libc::ENODEV);
                CacheError::io(path, "finding the agent's mount of its filesystem", e)
            })?;
            self.markers
                .write(dir, fd, st.size, markers.iter().copied())
                .map_err(|e| CacheError::io(path, "writing the data markers", e.into()))?;
            for (i, &at) in markers.iter().enumerate() {
                let end = markers.get(i + 1).copied().unwrap_or(st.size);
                let from = at + MARKER_LEN;
                if from < end {
                    hsm_kernel::sys::punch_hole(fd, from, end - from)
                        .map_err(|e| CacheError::kernel(path, "punching out the data", e))?;
                }
            }
        }
        hsm_core::stubio::restore_mtime(fd, st.mtime).map_err(|e| CacheError::new(path, e))
    }
}

/// Check the lease held to the end, give it back, report.
fn finish(path: &Path, w: OwnedFd, st: &FileStat, r: Result<(), CacheError>) -> FileOutcome {
    let held = hsm_kernel::sys::lease_held(w.as_fd()).unwrap_or(false);
    let after = stat::fstatx(w.as_fd())
        .map(|s| s.blocks)
        .unwrap_or(st.blocks);
    let _ = hsm_kernel::sys::release_lease(w.as_fd());
    drop(w);
    match r {
        Ok(()) => {
            if !held {
                // Another open waited longer than the lease-break time; it found a stub
                // (every step it could see was a valid state), but say so.
                warn!(path = %path.display(), "lease broken during eviction");
            }
            info!(path = %path.display(), "evicted");
            FileOutcome::Evicted {
                freed: st.blocks.saturating_sub(after) * 512,
            }
        }
        Err(e) => FileOutcome::failed(e),
    }
}

/// Does the file hold data other than the data markers of `map`'s granules to fetch
/// (`SEEK_DATA` finds some that is not one)? Blocks would count an external xattr block
/// and shared markers, so ask for the data itself.
fn data_past_markers(fd: BorrowedFd<'_>, map: &ResidentMap) -> bool {
    use nix::unistd::{Whence, lseek};
    let size = map.remote_size();
    let mut pos = 0u64;
    while pos < size {
        let off = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(nix::errno::Errno::ENXIO) => return false,
            Err(_) => return true,
        };
        if off >= size {
            return false;
        }
        let g = off >> map.granule_shift();
        if off != g << map.granule_shift() || map.missing(g..g + 1).next().is_none() {
            return true;
        }
        let end = match lseek(fd, off as i64, Whence::SeekHole) {
            Ok(end) => end as u64,
            Err(_) => return true,
        };
        if end.min(size) > off + MARKER_LEN {
            return true;
        }
        pos = end;
    }
    false
}

struct Found {
    path: PathBuf,
    pinned: bool,
}

enum Kind {
    /// A stub (some bytes may be resident).
    Stub,
    /// A stub whose durable map says it was written or truncated locally.
    ModifiedStub,
    /// Populate is still building it.
    Building,
    /// Fully fetched, with its origin record.
    Hydrated(Box<Origin>),
    /// Anything else: never evicted.
    Local,
}

fn classify(path: &Path, fd: BorrowedFd<'_>) -> Result<Kind, CacheError> {
    let mut buf = Vec::new();
    if xattr::fget(fd, MARKER_XATTR, &mut buf)
        .map_err(|e| CacheError::kernel(path, "reading the marker", e))?
    {
        let m = Marker::decode(&buf).map_err(|e| CacheError::format(path, "marker", e))?;
        return Ok(match m.state {
            hsm_stub::MarkerState::Building => Kind::Building,
            _ => match hsm_core::stubio::load(fd) {
                Ok(hsm_core::stubio::Loaded::Stub { meta, map })
                    if map.locally_modified() || map.floor() < meta.remote_size =>
                {
                    Kind::ModifiedStub
                }
                _ => Kind::Stub,
            },
        });
    }
    if xattr::fget(fd, ORIGIN_XATTR, &mut buf)
        .map_err(|e| CacheError::kernel(path, "reading the origin record", e))?
    {
        return Origin::decode(&buf)
            .map(|o| Kind::Hydrated(Box::new(o)))
            .map_err(|e| CacheError::format(path, "origin record", e));
    }
    Ok(Kind::Local)
}

/// `O_PATH | O_NOFOLLOW`: the entry itself, never what a symlink points at.
fn open_path(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = nix::fcntl::open(
        c.as_c_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok(fd)
}

/// Read by path without following a symlink and without opening the file.
fn has_pin(path: &Path) -> bool {
    let mut buf = Vec::new();
    xattr::lget(path, PIN_XATTR, &mut buf).unwrap_or(false)
}

/// xattrs cannot be set through an `O_PATH` descriptor: a read-only open of a file or
/// directory (the caller checked which), never following a symlink.
fn open_for_xattr(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = nix::fcntl::open(
        c.as_c_str(),
        nix::fcntl::OFlag::O_RDONLY
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC
            | nix::fcntl::OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )?;
    Ok(fd)
}

fn set_pin(path: &Path, on: bool) -> Result<(), Cause> {
    let fd = open_for_xattr(path).map_err(|source| Cause::Io {
        op: "open for the pin",
        source,
    })?;
    let (op, r) = if on {
        ("pin", xattr::fset(fd.as_fd(), PIN_XATTR, b"", SetMode::Any))
    } else {
        ("unpin", xattr::fremove(fd.as_fd(), PIN_XATTR).map(|_| ()))
    };
    r.map_err(|source| Cause::Kernel { op, source })
}
