//! `hsm populate SRC DST`: mirror a source tree as a stub tree.
//!
//! Directories, symlinks and metadata are recreated; every non-empty regular file becomes a
//! sparse stub carrying where its bytes live. A re-run brings DST up to date: unchanged stubs
//! (and files already hydrated from them) are left alone, changed ones are replaced
//! atomically, entries gone from SRC are removed. Entries populate does not manage (ordinary
//! files that are not stubs) are never overwritten or removed without `force`.

pub mod dst;
mod finish;
mod place;
pub mod publish;
pub mod remote;
pub mod source;
mod sync;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tracing::warn;

use crate::finish::{finish_dirs, finish_links};
use crate::source::{Attrs, Source, SourceEntry};
use crate::sync::sync_dir;

pub use indicatif::ProgressBar;
pub use publish::{
    PublishOptions, PublishSummary, UploadError, publish, publish_to, publish_with_objects,
};
pub use remote::RemoteSource;
pub use source::{LocalSource, SourceError};

/// The progress bar every command draws on stderr, when `enabled` and stderr is a
/// terminal (hidden otherwise): a bar towards `total`, or a ticking spinner without one.
/// `template` is indicatif's.
pub fn progress_bar(enabled: bool, total: Option<u64>, template: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let fallback = match total {
        Some(_) => ProgressStyle::default_bar(),
        None => ProgressStyle::default_spinner(),
    };
    pb.set_style(ProgressStyle::with_template(template).unwrap_or(fallback));
    if total.is_none() {
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
    }
    pb
}

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

/// Bytes for people: "512 B", "3.0 MiB".
pub fn human_bytes(b: u64) -> String {
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
    let progress = progress_bar(
        opts.progress,
        None,
        "{spinner} populate [{elapsed_precise}] {pos} entries, {msg}",
    );
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
