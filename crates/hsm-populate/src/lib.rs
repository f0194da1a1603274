//! `hsm populate SRC DST`: mirror a source tree as a stub tree.
//!
//! Directories, symlinks and metadata are recreated; every non-empty regular file becomes a
//! sparse stub carrying where its bytes live. A re-run brings DST up to date: unchanged stubs
//! (and files already hydrated from them) are left alone, changed ones are replaced
//! atomically, entries gone from SRC are removed. Entries populate does not manage (ordinary
//! files that are not stubs) are never overwritten or removed without `force`.

pub mod dst;
pub mod escape;
mod finish;
mod place;
pub mod publish;
pub mod remote;
pub mod source;
mod sync;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tracing::warn;

use crate::dst::FileId;
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
    /// Keep new stubs' metadata in the tree's index (in `hsm_core::index::dir()`) instead
    /// of an xattr on each stub: on ext4 with 256-byte inodes the stub then needs no xattr
    /// block (docs/STUB_FORMAT.md, "Tree index").
    pub index: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            min_granule_shift: hsm_stub::DEFAULT_MIN_GRANULE_SHIFT,
            jobs: 0,
            force: false,
            progress: true,
            require_served_fs: true,
            index: false,
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
    /// The entry's path below DST, escaped for printing ([`escape::escape_bytes`]: control
    /// characters, backslashes and bytes that are not UTF-8 appear as `\n`, `\\`, `\xff`).
    pub path: String,
    /// Why, with control characters escaped the same way.
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

/// The name a hard-linked source file was placed at first, and the inode placed there: its
/// other names become links to that inode.
type Primary = (PathBuf, FileId);

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
    /// Directories to give SRC's attributes at the end, with the inode each must still be.
    dirs: Mutex<Vec<(PathBuf, Attrs, FileId)>>,
    /// By source file: the first name placed and its inode (`None` while it is placed).
    link_primary: Mutex<HashMap<(u64, u64), Option<Primary>>>,
    deferred_links: Mutex<Vec<DeferredLink>>,
    errors: Mutex<Vec<EntryError>>,
    progress: ProgressBar,
    /// The tree's index, with `--index`.
    index: Option<hsm_core::index::IndexWriter>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ctx<'_> {
    /// Record (and log) an error about `rel`. Names are escaped: a file name holding a
    /// newline or an escape sequence can neither forge lines nor drive the terminal.
    fn error(&self, rel: &Path, error: impl std::fmt::Display) {
        let path = escape::escape_path(rel);
        let error = escape::escape_text(&error.to_string());
        self.progress
            .suspend(|| warn!(%path, %error, "populate error"));
        lock(&self.errors).push(EntryError { path, error });
    }

    fn warn(&self, rel: &Path, what: &str) {
        let path = escape::escape_path(rel);
        self.progress.suspend(|| warn!(%path, "{what}"));
    }

    fn tick(&self) {
        inc(&self.stats.entries);
        self.progress.inc(1);
    }
}

/// Mirror `source` into `dst` (created if missing).
pub fn populate(source: &dyn Source, dst: &Path, opts: &Options) -> Result<Summary, PopulateError> {
    let start = Instant::now();
    let (root, dst_real) = open_dst(dst)?;
    if let Some(src) = source.local_root() {
        if dst_real.starts_with(src) || src.starts_with(&dst_real) {
            return Err(PopulateError::Setup(format!(
                "{} and {} overlap: DST must not be inside SRC or contain it",
                src.display(),
                dst_real.display()
            )));
        }
    }
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
    let root_st = hsm_kernel::stat::fstatx(root.as_fd())
        .map_err(|e| PopulateError::Setup(format!("{}: {e}", dst_real.display())))?;
    let root_dev = root_st.dev;
    let index = if opts.index {
        let dir = hsm_core::index::dir();
        let w = open_root_dir(root.as_fd())
            .map_err(|e| setup_err(&dst_real, e))
            .and_then(|d| {
                hsm_core::index::IndexWriter::open(dir, d.as_fd())
                    .map_err(|e| PopulateError::Setup(format!("tree index: {e}")))
            })?;
        Some(w)
    } else {
        None
    };
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
        index,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs)
        .build()
        .map_err(|e| PopulateError::Setup(format!("thread pool: {e}")))?;
    pool.scope(|s| sync_dir(&ctx, s, PathBuf::new(), FileId::of(&root_st)));
    pool.install(|| finish_links(&ctx));
    finish_dirs(&ctx, &root_attrs);
    ctx.progress.finish_and_clear();
    // The stubs' records durable before populate says it is done.
    if let Some(Err(e)) = ctx.index.as_ref().map(|ix| ix.sync()) {
        ctx.error(Path::new(""), format!("syncing the tree index: {e}"));
    }
    // Where the agent finds this tree's published access traces (prefetch).
    if let Err(e) = record_tree_url(ctx.root.as_fd(), source.url()) {
        ctx.error(
            Path::new(""),
            format!("recording the remote on the root: {e}"),
        );
    }

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

/// Write `trusted.hsm.tree` (the remote URL) on the tree's root, `root` an `O_PATH`
/// descriptor of it.
fn record_tree_url(root: BorrowedFd<'_>, url: &str) -> Result<(), String> {
    let dir = open_root_dir(root).map_err(|e| e.to_string())?;
    let mut have = Vec::new();
    if hsm_kernel::xattr::fget(dir.as_fd(), hsm_stub::TREE_XATTR, &mut have).unwrap_or(false)
        && have == url.as_bytes()
    {
        return Ok(());
    }
    hsm_kernel::xattr::fset(
        dir.as_fd(),
        hsm_stub::TREE_XATTR,
        url.as_bytes(),
        hsm_kernel::xattr::SetMode::Any,
    )
    .map_err(|e| e.to_string())
}

/// The tree's root directory opened for reading (xattrs need more than `O_PATH`).
fn open_root_dir(root: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    use nix::fcntl::{OFlag, openat};
    openat(
        root,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

fn setup_err(path: &Path, why: impl std::fmt::Display) -> PopulateError {
    PopulateError::Setup(format!("{}: {why}", escape::escape_path(path)))
}

/// Open DST, creating what is missing of it, and return its descriptor (everything after
/// works from it) and the path it resolved to.
///
/// DST itself is never a symbolic link: a user who can write the directory DST is named
/// in could otherwise point it at a directory only root may change, and have populate
/// remove entries there and give it SRC's mode. A missing component is made with `mkdirat`
/// and opened with `O_NOFOLLOW`; it must then be a directory owned by populate's user (a
/// symlink or a user's directory swapped in at that moment is refused). A symbolic link
/// in an existing component before the last is followed once, and said so, only if neither
/// it nor the directory holding it can be changed by anyone but root and populate's user
/// (like /var/run -> /run); otherwise DST is refused, naming the link.
///
/// (About 130 lines: one walk, component by component, whose every check is on the
/// descriptor the previous step opened; read in one piece, the order of the checks is the
/// security argument.)
fn open_dst(dst: &Path) -> Result<(OwnedFd, PathBuf), PopulateError> {
    use nix::errno::Errno;
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::Mode;
    use std::path::Component;

    let me = nix::unistd::geteuid().as_raw();
    let trusted = |st: &hsm_kernel::stat::FileStat| st.uid == 0 || st.uid == me;
    let path_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let start = if dst.is_absolute() { "/" } else { "." };
    let mut fd = nix::fcntl::open(start, path_flags, Mode::empty())
        .map_err(|e| setup_err(Path::new(start), e))?;
    let comps: Vec<Component<'_>> = dst.components().collect();
    let last = comps.len().saturating_sub(1);
    if !matches!(comps.last(), Some(Component::Normal(_))) {
        return Err(setup_err(
            dst,
            "DST must end in a directory's name (not /, . or ..)",
        ));
    }
    let mut walked = PathBuf::new();
    let mut followed: Vec<String> = Vec::new();
    for (i, comp) in comps.iter().enumerate() {
        let name = match comp {
            Component::RootDir => {
                walked.push("/");
                continue;
            }
            Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => std::ffi::OsStr::new(".."),
            Component::Normal(n) => n,
        };
        walked.push(name);
        let final_one = i == last;
        let flags = if final_one {
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
        } else {
            path_flags | OFlag::O_NOFOLLOW
        };
        let cname = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| setup_err(&walked, "a NUL byte in the path"))?;
        let existing = match hsm_kernel::stat::statx_at(fd.as_fd(), &cname) {
            Ok(st) => Some(st),
            Err(e) if e.errno() == Some(libc::ENOENT) => None,
            Err(e) => return Err(setup_err(&walked, e)),
        };
        let next = match existing {
            None => {
                match nix::sys::stat::mkdirat(fd.as_fd(), name, Mode::from_bits_truncate(0o777)) {
                    Ok(()) => {}
                    Err(Errno::EEXIST) => {
                        return Err(setup_err(
                            &walked,
                            "appeared while populate was creating it; refused (run again)",
                        ));
                    }
                    Err(e) => return Err(setup_err(&walked, format!("cannot create: {e}"))),
                }
                let next = openat(fd.as_fd(), name, flags, Mode::empty()).map_err(|e| {
                    setup_err(
                        &walked,
                        format!(
                            "replaced (by a symbolic link?) right after populate created it; \
                             refused ({e})"
                        ),
                    )
                })?;
                let st =
                    hsm_kernel::stat::fstatx(next.as_fd()).map_err(|e| setup_err(&walked, e))?;
                if st.uid != me {
                    return Err(setup_err(
                        &walked,
                        "replaced by another user's directory right after populate created it; refused",
                    ));
                }
                next
            }
            Some(st) if st.is_symlink() => {
                let target = nix::fcntl::readlinkat(fd.as_fd(), name)
                    .map(|t| escape::escape_path(Path::new(&t)))
                    .unwrap_or_else(|_| "?".into());
                if final_one {
                    return Err(setup_err(
                        &walked,
                        format!(
                            "DST is a symbolic link (to {target}); refused: populate never \
                             works through a link someone could repoint. Give the directory \
                             itself"
                        ),
                    ));
                }
                let parent =
                    hsm_kernel::stat::fstatx(fd.as_fd()).map_err(|e| setup_err(&walked, e))?;
                let parent_safe = trusted(&parent) && parent.mode & 0o022 == 0;
                if !(trusted(&st) && parent_safe) {
                    return Err(setup_err(
                        &walked,
                        format!(
                            "a component of DST is a symbolic link (to {target}) that another \
                             user could change; refused. Give the real path"
                        ),
                    ));
                }
                let next = openat(fd.as_fd(), name, path_flags, Mode::empty())
                    .map_err(|e| setup_err(&walked, e))?;
                followed.push(format!("{} -> {target}", escape::escape_path(&walked)));
                next
            }
            Some(st) if st.is_dir() => openat(fd.as_fd(), name, flags, Mode::empty())
                .map_err(|e| setup_err(&walked, format!("{e} (replaced while being opened?)")))?,
            Some(st) => {
                return Err(setup_err(
                    &walked,
                    format!(
                        "not a directory but a {}",
                        hsm_kernel::beneath::kind_of(st.mode)
                    ),
                ));
            }
        };
        fd = next;
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| setup_err(dst, format!("cannot tell where it is: {e}")))?;
    if !followed.is_empty() {
        tracing::info!(
            "DST {} is reached through symbolic links ({}); resolved once, populating {}",
            escape::escape_path(dst),
            followed.join(", "),
            escape::escape_path(&real)
        );
    }
    Ok((fd, real))
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
