//! `hsm populate SRC DST`: mirror a source tree as a stub tree.
//!
//! Directories, symlinks and metadata are recreated; every non-empty regular file becomes a
//! sparse stub carrying where its bytes live. A re-run brings DST up to date: unchanged stubs
//! (and files already hydrated from them) are left alone, changed ones are replaced
//! atomically, entries gone from SRC are removed. Entries populate does not manage (ordinary
//! files that are not stubs) are never overwritten or removed without `force`.

pub mod dst;
pub mod publish;
pub mod remote;
pub mod source;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use tracing::warn;

use crate::dst::{DstError, ExistingFile, StubSpec};
use crate::source::{Attrs, FileInfo, Kind, Source, SourceEntry};

pub use publish::{
    PublishOptions, PublishSummary, UploadError, publish, publish_to, publish_with_objects,
};
pub use remote::RemoteSource;
pub use source::{LocalSource, SourceError};

/// The source for `input`: a local directory is walked unless it holds a published manifest;
/// an object-store URL is read through its manifest, or its listing when it has none.
pub fn open_source(
    input: &str,
    cfg: &hsm_config::RemoteConfig,
) -> Result<Box<dyn Source>, PopulateError> {
    let parsed = hsm_remote::RemoteUrl::parse(input).map_err(SourceError::from)?;
    if let Some(root) = parsed.local_root() {
        if !root.join(hsm_manifest::MANIFEST_KEY).exists() {
            return Ok(Box::new(LocalSource::open(input)?));
        }
        // Canonical, so stubs name the same URL whichever path reached the tree.
        let real = std::fs::canonicalize(root)
            .map_err(|e| PopulateError::Setup(format!("{}: {e}", root.display())))?;
        let real = real.to_str().ok_or_else(|| {
            PopulateError::Setup(format!(
                "{}: the source path must be valid UTF-8",
                real.display()
            ))
        })?;
        return Ok(Box::new(RemoteSource::open(real, cfg)?));
    }
    Ok(Box::new(RemoteSource::open(input, cfg)?))
}

/// How to populate.
#[derive(Debug, Clone)]
pub struct Options {
    /// log2 of the smallest granule.
    pub min_granule_shift: u8,
    /// Worker threads (0 = one per CPU).
    pub jobs: usize,
    /// Replace or remove local files that are not stubs.
    pub force: bool,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
    /// Refuse filesystems the agent cannot serve (ext4, xfs and btrfs only).
    pub require_served_fs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_granule_shift: hsm_stub::DEFAULT_MIN_GRANULE_SHIFT,
            jobs: 0,
            force: false,
            progress: true,
            require_served_fs: true,
        }
    }
}

/// A failure that stops populate before it starts.
#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error("{0}")]
    Setup(String),
    /// The source cannot be opened or read (the error names the path or URL).
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// One entry that could not be processed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EntryError {
    pub path: String,
    pub error: String,
}

/// The counters of populate, named once: the atomics the workers bump ([`Stats`]) and the
/// fields of the [`Summary`] they end up in.
macro_rules! counters {
    ($( $(#[$doc:meta])* $field:ident, )*) => {
        /// What populate did.
        #[derive(Debug, Clone, Default, Serialize)]
        pub struct Summary {
            pub source: String,
            pub destination: String,
            $( $(#[$doc])* pub $field: u64, )*
            pub elapsed_secs: f64,
            pub errors: Vec<EntryError>,
        }

        #[derive(Debug, Default)]
        struct Stats {
            $( $field: AtomicU64, )*
        }

        impl Stats {
            /// A summary with the counts so far.
            fn summary(&self) -> Summary {
                Summary {
                    $( $field: self.$field.load(Ordering::Relaxed), )*
                    ..Summary::default()
                }
            }
        }
    };
}

counters! {
    entries,
    dirs_created,
    stubs_created,
    stubs_replaced,
    stubs_unchanged,
    /// Ordinary files matching the source (typically hydrated stubs), left alone.
    files_unchanged,
    empty_files,
    symlinks,
    hard_links,
    removed,
    /// Local files (not stubs) that were neither overwritten nor removed.
    kept_local,
    skipped_special,
    /// Logical bytes represented by the files of SRC.
    bytes,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "populate: {} entries, {} of files: {} stubs created, {} replaced, {} unchanged, {} hydrated unchanged, \
             {} empty files, {} dirs created, {} symlinks, {} hard links, {} removed, {} local kept, {} special skipped, \
             {} errors in {:.2} s",
            self.entries,
            human_bytes(self.bytes),
            self.stubs_created,
            self.stubs_replaced,
            self.stubs_unchanged,
            self.files_unchanged,
            self.empty_files,
            self.dirs_created,
            self.symlinks,
            self.hard_links,
            self.removed,
            self.kept_local,
            self.skipped_special,
            self.errors.len(),
            self.elapsed_secs
        )
    }
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A second (or later) name of a hard-linked source file, linked once all stubs exist.
struct DeferredLink {
    rel: PathBuf,
    id: (u64, u64),
    entry: SourceEntry,
}

struct Ctx<'a> {
    source: &'a dyn Source,
    root: OwnedFd,
    /// DST's filesystem: populate never descends into another one mounted below it.
    root_dev: u64,
    opts: &'a Options,
    stats: Stats,
    dirs: Mutex<Vec<(PathBuf, Attrs)>>,
    link_primary: Mutex<HashMap<(u64, u64), PathBuf>>,
    deferred_links: Mutex<Vec<DeferredLink>>,
    errors: Mutex<Vec<EntryError>>,
    progress: ProgressBar,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx<'_> {
    fn error(&self, rel: &Path, error: impl std::fmt::Display) {
        let path = rel.display().to_string();
        let error = error.to_string();
        self.progress
            .suspend(|| warn!(%path, %error, "populate error"));
        lock(&self.errors).push(EntryError { path, error });
    }

    fn warn(&self, rel: &Path, what: &str) {
        self.progress
            .suspend(|| warn!(path = %rel.display(), "{what}"));
    }

    fn tick(&self) {
        inc(&self.stats.entries);
        self.progress.inc(1);
    }
}

/// Mirror `source` into `dst` (created if missing).
pub fn populate(source: &dyn Source, dst: &Path, opts: &Options) -> Result<Summary, PopulateError> {
    let start = Instant::now();
    std::fs::create_dir_all(dst)
        .map_err(|e| PopulateError::Setup(format!("{}: cannot create: {e}", dst.display())))?;
    let dst_real = std::fs::canonicalize(dst)
        .map_err(|e| PopulateError::Setup(format!("{}: {e}", dst.display())))?;
    if let Some(src) = source.local_root() {
        if dst_real.starts_with(src) || src.starts_with(&dst_real) {
            return Err(PopulateError::Setup(format!(
                "{} and {} overlap: DST must not be inside SRC or contain it",
                src.display(),
                dst_real.display()
            )));
        }
    }
    let root = nix::fcntl::open(
        &dst_real,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| PopulateError::Setup(format!("{}: {e}", dst_real.display())))?;
    if opts.require_served_fs {
        check_filesystem(root.as_fd(), &dst_real)?;
    }
    let root_attrs = source
        .root_attrs()
        .map_err(|e| PopulateError::Setup(format!("source {e}")))?;
    let progress = if opts.progress && std::io::stderr().is_terminal() {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} populate [{elapsed_precise}] {pos} entries, {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    } else {
        ProgressBar::hidden()
    };
    let root_dev = hsm_kernel::stat::fstatx(root.as_fd())
        .map_err(|e| PopulateError::Setup(format!("{}: {e}", dst_real.display())))?
        .dev;
    let ctx = Ctx {
        source,
        root,
        root_dev,
        opts,
        stats: Stats::default(),
        dirs: Mutex::new(Vec::new()),
        link_primary: Mutex::new(HashMap::new()),
        deferred_links: Mutex::new(Vec::new()),
        errors: Mutex::new(Vec::new()),
        progress,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs)
        .build()
        .map_err(|e| PopulateError::Setup(format!("thread pool: {e}")))?;
    pool.scope(|s| sync_dir(&ctx, s, PathBuf::new()));
    pool.install(|| finish_links(&ctx));
    finish_dirs(&ctx, &root_attrs);
    ctx.progress.finish_and_clear();

    for (key, why) in source.refused() {
        ctx.error(Path::new(&key), why);
    }
    let mut errors = std::mem::take(&mut *lock(&ctx.errors));
    errors.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Summary {
        source: source.describe(),
        destination: dst_real.display().to_string(),
        elapsed_secs: start.elapsed().as_secs_f64(),
        errors,
        ..ctx.stats.summary()
    })
}

fn check_filesystem(root: BorrowedFd<'_>, path: &Path) -> Result<(), PopulateError> {
    use nix::sys::statfs::{BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, XFS_SUPER_MAGIC, fstatfs};
    let fs = fstatfs(root)
        .map_err(|e| PopulateError::Setup(format!("{}: statfs: {e}", path.display())))?;
    let t = fs.filesystem_type();
    if t == EXT4_SUPER_MAGIC || t == XFS_SUPER_MAGIC || t == BTRFS_SUPER_MAGIC {
        return Ok(());
    }
    Err(PopulateError::Setup(format!(
        "{} is on a filesystem (type {:#x}) that cannot raise pre-content events; \
         the agent could not serve its stubs. Use ext4, xfs or btrfs",
        path.display(),
        t.0
    )))
}

/// The slot a source entry wants in DST.
enum Slot {
    Free,
    Existing(hsm_kernel::stat::FileStat),
    Blocked,
}

fn sync_dir<'s>(ctx: &'s Ctx<'s>, scope: &rayon::Scope<'s>, rel: PathBuf) {
    let dir = match dst::open_beneath(ctx.root.as_fd(), &rel) {
        Ok(d) => d,
        Err(e) => return ctx.error(&rel, e),
    };
    let entries = match ctx.source.list(&rel) {
        Ok(e) => e,
        Err(e) => return ctx.error(&rel, e),
    };
    let existing: HashSet<OsString> = match dst::read_names(dir.as_fd()) {
        Ok(n) => n.into_iter().collect(),
        Err(e) => return ctx.error(&rel, e),
    };
    let wanted: HashSet<&OsStr> = entries.iter().map(|e| e.name.as_os_str()).collect();
    for name in &existing {
        if !wanted.contains(name.as_os_str()) {
            remove_entry(ctx, dir.as_fd(), &rel.join(name), name);
        }
    }
    let mut leaves = Vec::new();
    for e in entries {
        if e.kind == Kind::Dir {
            let child = rel.join(&e.name);
            ctx.tick();
            match prepare_slot(
                ctx,
                dir.as_fd(),
                &child,
                &e.name,
                libc::S_IFDIR,
                existing.contains(&e.name),
            ) {
                Slot::Blocked => continue,
                Slot::Existing(_) => {}
                Slot::Free => match dst::ensure_dir(dir.as_fd(), &e.name) {
                    Ok(true) => inc(&ctx.stats.dirs_created),
                    Ok(false) => {}
                    Err(err) => {
                        ctx.error(&child, err);
                        continue;
                    }
                },
            }
            lock(&ctx.dirs).push((child.clone(), e.attrs));
            scope.spawn(move |s| sync_dir(ctx, s, child));
        } else {
            leaves.push(e);
        }
    }
    leaves.par_iter().for_each(|e| {
        ctx.tick();
        let present = existing.contains(&e.name);
        sync_leaf(ctx, dir.as_fd(), &rel.join(&e.name), e, present);
    });
    if ctx.stats.entries.load(Ordering::Relaxed) % 64 == 0 {
        ctx.progress
            .set_message(human_bytes(ctx.stats.bytes.load(Ordering::Relaxed)));
    }
}

fn sync_leaf(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &Path, e: &SourceEntry, present: bool) {
    match &e.kind {
        Kind::Dir => {}
        Kind::Special(what) => {
            inc(&ctx.stats.skipped_special);
            ctx.warn(
                rel,
                &format!("skipping {what}: special files are not populated"),
            );
        }
        Kind::Symlink { target } => {
            match prepare_slot(ctx, dir, rel, &e.name, libc::S_IFLNK, present) {
                Slot::Blocked => {}
                slot => match dst::ensure_symlink(
                    dir,
                    &e.name,
                    target,
                    &e.attrs,
                    matches!(slot, Slot::Existing(_)),
                ) {
                    Ok(_) => inc(&ctx.stats.symlinks),
                    Err(err) => ctx.error(rel, err),
                },
            }
        }
        Kind::File(info) => sync_file(ctx, dir, rel, e, info, present),
    }
}

fn sync_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    e: &SourceEntry,
    info: &FileInfo,
    present: bool,
) {
    ctx.stats.bytes.fetch_add(info.size, Ordering::Relaxed);
    let Some(id) = info.link_id else {
        place_file(ctx, dir, rel, e, info, present);
        return;
    };
    {
        let mut primaries = lock(&ctx.link_primary);
        if primaries.contains_key(&id) {
            drop(primaries);
            lock(&ctx.deferred_links).push(DeferredLink {
                rel: rel.to_path_buf(),
                id,
                entry: e.clone(),
            });
            return;
        }
        primaries.insert(id, rel.to_path_buf());
    }
    if !place_file(ctx, dir, rel, e, info, present) {
        // Nothing of SRC's stands here (kept local, refused, failed): other names of this
        // file must not be linked to it; one of them becomes the stub instead.
        lock(&ctx.link_primary).remove(&id);
    }
}

/// Put the stub for `e` at `rel`. Returns whether a stub (or a file already matching SRC)
/// stands there afterwards.
fn place_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    e: &SourceEntry,
    info: &FileInfo,
    present: bool,
) -> bool {
    let key = match &info.key {
        Ok(k) => k.clone(),
        Err(why) => {
            ctx.error(rel, why);
            return false;
        }
    };
    let spec = StubSpec {
        url: ctx.source.url().to_string(),
        key,
        size: info.size,
        etag: info.etag.clone(),
        version: info.version.clone(),
        attrs: e.attrs,
        holes: if info.maybe_sparse {
            ctx.source.holes(rel, info.size)
        } else {
            Vec::new()
        },
        min_granule_shift: ctx
            .opts
            .min_granule_shift
            .max(ctx.source.min_granule_shift()),
        integrity: info.integrity.clone(),
    };
    let replace = match prepare_slot(ctx, dir, rel, &e.name, libc::S_IFREG, present) {
        Slot::Blocked => return false,
        Slot::Free => false,
        Slot::Existing(st) => match dst::classify_file(dir, &e.name) {
            Err(err) => {
                ctx.error(rel, err);
                return false;
            }
            Ok(ExistingFile::Stub { meta, .. })
                if meta.remote_url == spec.url
                    && meta.etag == spec.etag
                    && meta.version == spec.version
                    && meta.remote_size == spec.size
                    && (meta.key == spec.key
                        || (info.link_id.is_some()
                            && ctx.source.current_etag(&meta.key) == spec.etag)) =>
            {
                if !dst::attrs_match(&st, &spec.attrs) {
                    if let Err(err) = dst::apply_attrs_at(dir, &e.name, &spec.attrs, false) {
                        ctx.error(rel, err);
                        return false;
                    }
                }
                inc(&ctx.stats.stubs_unchanged);
                return true;
            }
            Ok(
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_),
            ) => true,
            Ok(ExistingFile::Stub { modified: true, .. }) if !ctx.opts.force => {
                inc(&ctx.stats.kept_local);
                ctx.warn(
                    rel,
                    "stub was written locally and SRC changed; kept (use --force to replace)",
                );
                return false;
            }
            Ok(ExistingFile::Stub { modified: true, .. }) => true,
            Ok(ExistingFile::Plain) => {
                if st.size == spec.size && dst::same_mtime(st.mtime, spec.attrs.mtime) {
                    inc(&ctx.stats.files_unchanged);
                    return true;
                }
                if !ctx.opts.force {
                    inc(&ctx.stats.kept_local);
                    ctx.warn(rel, "local file differs from SRC and is not a stub; kept (use --force to replace)");
                    return false;
                }
                true
            }
        },
    };
    match dst::create_stub(dir, &e.name, &spec, replace) {
        Ok(()) if spec.size == 0 => inc(&ctx.stats.empty_files),
        Ok(()) if replace => inc(&ctx.stats.stubs_replaced),
        Ok(()) => inc(&ctx.stats.stubs_created),
        Err(err) => {
            ctx.error(rel, err);
            return false;
        }
    }
    true
}

/// Make room for an entry of type `want` at `name`, removing what populate manages and
/// refusing (without `force`) to remove what it does not.
fn prepare_slot(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    name: &OsStr,
    want: u32,
    present: bool,
) -> Slot {
    if !present {
        return Slot::Free;
    }
    let st = match dst::lookup(dir, name) {
        Ok(Some(st)) => st,
        Ok(None) => return Slot::Free,
        Err(err) => {
            ctx.error(rel, err);
            return Slot::Blocked;
        }
    };
    if st.file_type() == want {
        return Slot::Existing(st);
    }
    // A different kind is in the way.
    if remove_entry(ctx, dir, rel, name) {
        Slot::Free
    } else {
        ctx.warn(
            rel,
            "exists with another type and holds local files; not replaced (use --force)",
        );
        Slot::Blocked
    }
}

/// Remove `name` if populate manages it (stubs, symlinks, directories of such), or always
/// with `force`. Returns whether it is gone.
fn remove_entry(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &Path, name: &OsStr) -> bool {
    let st = match dst::lookup(dir, name) {
        Ok(Some(st)) => st,
        Ok(None) => return true,
        Err(err) => {
            ctx.error(rel, err);
            return false;
        }
    };
    let removable = if st.is_dir() {
        if st.dev != ctx.root_dev {
            inc(&ctx.stats.kept_local);
            ctx.warn(
                rel,
                "another filesystem is mounted here; not descending into it",
            );
            return false;
        }
        let child = match dst::open_child_dir(dir, name) {
            Ok(c) => c,
            Err(e) => {
                ctx.error(rel, dst::op_error("open", rel.as_os_str(), e));
                return false;
            }
        };
        let names = match dst::read_names(child.as_fd()) {
            Ok(n) => n,
            Err(err) => {
                ctx.error(rel, err);
                return false;
            }
        };
        let mut all = true;
        for n in names {
            all &= remove_entry(ctx, child.as_fd(), &rel.join(&n), &n);
        }
        return all
            && match dst::rmdir(dir, name) {
                Ok(true) => {
                    inc(&ctx.stats.removed);
                    true
                }
                Ok(false) => false,
                Err(err) => {
                    ctx.error(rel, err);
                    false
                }
            };
    } else if st.is_symlink() {
        true
    } else if st.is_file() {
        match dst::classify_file(dir, name) {
            Ok(
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_),
            ) => true,
            Ok(ExistingFile::Stub { modified: true, .. } | ExistingFile::Plain) => ctx.opts.force,
            Err(err) => {
                ctx.error(rel, err);
                false
            }
        }
    } else {
        ctx.opts.force
    };
    if !removable {
        inc(&ctx.stats.kept_local);
        ctx.warn(
            rel,
            "not in SRC and not a stub; kept (use --force to remove)",
        );
        return false;
    }
    match dst::unlink(dir, name) {
        Ok(()) => {
            inc(&ctx.stats.removed);
            true
        }
        Err(err) => {
            ctx.error(rel, err);
            false
        }
    }
}

fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or(OsStr::new(".")),
    )
}

/// Second and later names of hard-linked source files become hard links to the first; if
/// no stub stands for the first (a local file was kept there, say), one of them becomes it.
fn finish_links(ctx: &Ctx<'_>) {
    let links = std::mem::take(&mut *lock(&ctx.deferred_links));
    let mut groups: HashMap<(u64, u64), Vec<DeferredLink>> = HashMap::new();
    for l in links {
        groups.entry(l.id).or_default().push(l);
    }
    let groups: Vec<((u64, u64), Vec<DeferredLink>)> = groups.into_iter().collect();
    groups.par_iter().for_each(|(id, names)| {
        let mut primary = lock(&ctx.link_primary).get(id).cloned();
        for DeferredLink { rel, entry, .. } in names {
            match &primary {
                Some(p) => match link_to(ctx, p, rel) {
                    Ok(()) => inc(&ctx.stats.hard_links),
                    Err(e) => ctx.error(rel, e),
                },
                None => {
                    let Kind::File(info) = &entry.kind else {
                        continue;
                    };
                    let (parent, _) = split(rel);
                    let placed = match dst::open_beneath(ctx.root.as_fd(), parent) {
                        Ok(dir) => {
                            let present = dst::lookup(dir.as_fd(), &entry.name)
                                .ok()
                                .flatten()
                                .is_some();
                            place_file(ctx, dir.as_fd(), rel, entry, info, present)
                        }
                        Err(e) => {
                            ctx.error(rel, e);
                            false
                        }
                    };
                    if placed {
                        primary = Some(rel.clone());
                    }
                }
            }
        }
    });
}

/// Make `rel` a hard link to `primary` (both relative to DST).
fn link_to(ctx: &Ctx<'_>, primary: &Path, rel: &Path) -> Result<(), DstError> {
    let (pdir, pname) = split(primary);
    let (ndir, nname) = split(rel);
    let pfd = dst::open_beneath(ctx.root.as_fd(), pdir)?;
    let nfd = dst::open_beneath(ctx.root.as_fd(), ndir)?;
    let target = dst::lookup(pfd.as_fd(), pname)?
        .ok_or_else(|| DstError::LinkTargetMissing(primary.to_path_buf()))?;
    if let Some(existing) = dst::lookup(nfd.as_fd(), nname)? {
        if existing.ino == target.ino && existing.dev == target.dev {
            return Ok(()); // already linked
        }
        let managed = existing.is_symlink()
            || (existing.is_file()
                && matches!(
                    dst::classify_file(nfd.as_fd(), nname)?,
                    ExistingFile::Stub {
                        modified: false,
                        ..
                    } | ExistingFile::BrokenStub(_)
                ));
        if !managed && !ctx.opts.force {
            inc(&ctx.stats.kept_local);
            ctx.warn(
                rel,
                "local file is in the way of a hard link; kept (use --force)",
            );
            return Ok(());
        }
        if existing.is_dir() {
            return Err(DstError::DirectoryInTheWay);
        }
        let tmp = dst::temp_name(nname);
        nix::unistd::linkat(
            pfd.as_fd(),
            pname,
            nfd.as_fd(),
            tmp.as_os_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(|e| dst::op_error("link", &tmp, e))?;
        return nix::fcntl::renameat(nfd.as_fd(), tmp.as_os_str(), nfd.as_fd(), nname)
            .map_err(|e| dst::op_error("rename", nname, e));
    }
    nix::unistd::linkat(
        pfd.as_fd(),
        pname,
        nfd.as_fd(),
        nname,
        nix::fcntl::AtFlags::empty(),
    )
    .map_err(|e| dst::op_error("link to", primary.as_os_str(), e))
}

/// Directory owners, modes and times last, deepest first: creating children changes a
/// directory's mtime, and a read-only mode must not stop us creating them.
fn finish_dirs(ctx: &Ctx<'_>, root_attrs: &Attrs) {
    let mut dirs = std::mem::take(&mut *lock(&ctx.dirs));
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, attrs) in &dirs {
        let (parent, name) = split(rel);
        let result = dst::open_beneath(ctx.root.as_fd(), parent)
            .and_then(|p| dst::apply_attrs_at(p.as_fd(), name, attrs, true));
        if let Err(e) = result {
            ctx.error(rel, e);
        }
    }
    if let Err(e) = dst::apply_attrs_fd(ctx.root.as_fd(), root_attrs) {
        ctx.error(Path::new("."), format!("set attributes of DST: {e}"));
    }
}
