//! Creating entries under DST without ever following a symlink or leaving DST.
//!
//! Every operation is relative to a directory descriptor. Directories are entered one
//! component at a time with `O_NOFOLLOW`; multi-component paths (hard-link targets, the
//! final metadata pass) are resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from the DST root, so a symlink planted anywhere under DST cannot redirect a write.
//!
//! An entry that is checked and then changed is opened once: the check (its type, whether
//! it is a stub, its inode) and the change (owner, mode, times, a hard link to it) go
//! through that one descriptor, so a user who swaps names in a directory they can write
//! (`renameat2(RENAME_EXCHANGE)`) cannot have populate check one file and change another.

use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hsm_kernel::markers::MarkerPages;
use hsm_kernel::stat::{self, FileStat, Timestamp};
use hsm_kernel::xattr::{self, SetMode};
use hsm_stub::{
    MAP_XATTR, MARKER_LEN, MARKER_XATTR, META_XATTR, Marker, MarkerState, Meta, ResidentMap,
    XATTR_BUDGET, choose_granule_shift,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use crate::escape::escape_path;
use crate::source::Attrs;

/// Which inode an entry is: populate remembers what it checked or made, and acts on a name
/// again only if the same inode still stands there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(st: &FileStat) -> Self {
        FileId {
            dev: st.dev,
            ino: st.ino,
        }
    }
}

/// Why an operation under DST failed, naming the operation and the entry.
#[derive(Debug, thiserror::Error)]
pub enum DstError {
    /// A system call (or the check before it) on `name` failed.
    #[error("{op} {}: {source}", escape_path(.name))]
    Op {
        op: &'static str,
        /// The entry, relative to the directory it was worked on in.
        name: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A directory could not be read.
    #[error("{op}: {source}")]
    ReadDir {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The stub's metadata cannot be built for this key.
    #[error("stub metadata for {key}: {source}")]
    Meta {
        key: String,
        #[source]
        source: hsm_stub::FormatError,
    },
    /// The tree index could not take the stub's metadata.
    #[error("tree index: {0}")]
    Index(String),
    /// The stub's metadata would not fit the xattr budget.
    #[error(
        "stub metadata for {key} would not fit one xattr block ({meta} + {map} bytes; URL and key too long)"
    )]
    TooLarge {
        key: String,
        meta: usize,
        map: usize,
    },
    #[error("hard-link target {} is missing", escape_path(.0))]
    LinkTargetMissing(PathBuf),
    /// What stands at a name is not what populate checked or made there: a user swapped
    /// it. Nothing was changed through the name.
    #[error(
        "{} was replaced while populate worked on it (another {} stands there now); left alone",
        escape_path(.0),
        .1
    )]
    Swapped(PathBuf, &'static str),
    #[error("a directory is in the way of a hard link")]
    DirectoryInTheWay,
}

/// The result of an operation under DST.
pub type OpResult<T> = Result<T, DstError>;

/// `op` on `name` failed because of `e`.
pub fn op_error(
    op: &'static str,
    name: &OsStr,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DstError {
    DstError::Op {
        op,
        name: PathBuf::from(name),
        source: e.into(),
    }
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_RDONLY)
    .union(OFlag::O_CLOEXEC);

/// Open `rel` (relative to `root`) as a directory, refusing symlinks and `..` escapes.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &Path) -> OpResult<OwnedFd> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    hsm_kernel::beneath::open_beneath(root, rel, DIR_FLAGS)
        .map_err(|e| op_error("open", rel.as_os_str(), e))
}

/// Open the child directory `name` of `dir` without following a symlink.
pub fn open_child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// `statx` of `name` in `dir` (not following symlinks); `None` if absent.
pub fn lookup(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<Option<FileStat>> {
    let c = std::ffi::CString::new(name.as_bytes()).map_err(|e| op_error("name", name, e))?;
    match stat::statx_at(dir, &c) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(op_error("stat", name, e)),
    }
}

/// What an existing regular file in DST is.
#[derive(Debug)]
pub enum ExistingFile {
    /// A stub with this metadata. `modified`: it was written locally since populate (its
    /// map says so), so it holds local data and is treated like a local file.
    Stub { meta: Box<Meta>, modified: bool },
    /// A stub whose metadata does not decode (replace it).
    BrokenStub(String),
    /// An ordinary file.
    Plain,
}

/// Open the existing regular file `name` in `dir` once, for checks and changes alike: no
/// symlink followed, no FIFO or device waited on (`O_NONBLOCK | O_NOCTTY`), and anything
/// but a regular file refused as swapped in. Returns the descriptor and its `statx`.
pub fn open_file(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<(OwnedFd, FileStat)> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => DstError::Swapped(PathBuf::from(name), "symbolic link"),
        e => op_error("open", name, e),
    })?;
    let st = stat::fstatx(fd.as_fd()).map_err(|e| op_error("stat", name, e))?;
    if !st.is_file() {
        return Err(DstError::Swapped(
            PathBuf::from(name),
            hsm_kernel::beneath::kind_of(st.mode),
        ));
    }
    Ok((fd, st))
}

/// Classify the regular file `name` in `dir` by its xattrs (never reads data). Returns what
/// it is and its `statx`, both of the one descriptor opened.
pub fn classify_file(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<(ExistingFile, FileStat)> {
    let (fd, st) = open_file(dir, name)?;
    Ok((classify_fd(fd.as_fd(), name)?, st))
}

/// Classify the open regular file `fd` (named `name` in messages) by its xattrs.
pub fn classify_fd(fd: BorrowedFd<'_>, name: &OsStr) -> OpResult<ExistingFile> {
    let mut buf = Vec::new();
    let present =
        xattr::fget(fd, MARKER_XATTR, &mut buf).map_err(|e| op_error("read marker", name, e))?;
    if !present {
        return Ok(ExistingFile::Plain);
    }
    let own_meta =
        xattr::fget(fd, META_XATTR, &mut buf).map_err(|e| op_error("read meta", name, e))?;
    let own_meta = own_meta.then(|| Meta::decode(&buf));
    let map = if xattr::fget(fd, MAP_XATTR, &mut buf).map_err(|e| op_error("read map", name, e))? {
        hsm_stub::ResidentMap::decode(&buf).ok()
    } else {
        None
    };
    let meta = match (own_meta, &map) {
        (Some(Ok(m)), _) => m,
        (Some(Err(e)), _) => return Ok(ExistingFile::BrokenStub(e.to_string())),
        // Indexed (`--index`): the metadata is in the tree's index, found by the map.
        (None, Some(map)) => match hsm_core::index::reader().lookup(map.stub_id()) {
            Ok(m) => m,
            Err(e) => return Ok(ExistingFile::BrokenStub(e.to_string())),
        },
        (None, None) => {
            return Ok(ExistingFile::BrokenStub(
                "marker without metadata or map".into(),
            ));
        }
    };
    // A map that does not decode says nothing about local writes: assume there were some.
    let modified = map.as_ref().is_none_or(|m| m.locally_modified());
    Ok(ExistingFile::Stub {
        meta: Box::new(meta),
        modified,
    })
}

/// What a new stub (or empty file) should be.
#[derive(Debug, Clone)]
pub struct StubSpec {
    pub url: String,
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub attrs: Attrs,
    /// Byte ranges of the object that are holes: granules entirely inside them start
    /// resident (nothing to fetch).
    pub holes: Vec<Range<u64>>,
    pub min_granule_shift: u8,
    /// How the agent verifies fetched chunks (from a manifest with digests).
    pub integrity: Option<hsm_stub::Integrity>,
}

/// A stub's xattr values, and where its data markers go.
#[derive(Debug)]
pub struct EncodedStub {
    pub meta: Vec<u8>,
    pub map: Vec<u8>,
    /// Start offset of every granule that needs fetching (see [`create_stub`]).
    pub markers: Vec<u64>,
}

/// Build the stub's xattr values (meta and map), checking they fit one ext4 xattr block.
pub fn encode_stub(spec: &StubSpec, stub_id: u64) -> OpResult<EncodedStub> {
    let meta = Meta {
        stub_id,
        remote_size: spec.size,
        remote_url: spec.url.clone(),
        key: spec.key.clone(),
        etag: spec.etag.clone(),
        version: spec.version.clone(),
        integrity: spec.integrity.clone(),
        extra: Vec::new(),
    };
    let shift = choose_granule_shift(spec.size, spec.min_granule_shift);
    let mut map = ResidentMap::new(stub_id, spec.size, shift).map_err(|e| DstError::Meta {
        key: spec.key.clone(),
        source: e,
    })?;
    for hole in &spec.holes {
        // Only granules wholly inside the hole: partial ones are fetched (their zero pages
        // are skipped when written, so the hole survives).
        let first = hole.start.div_ceil(map.granule_size());
        let mut end = hole.end >> shift;
        if hole.end >= spec.size {
            end = map.granule_count();
        }
        if end > first {
            map.set_range_resident(first..end);
        }
    }
    let meta_bytes = meta.encode().map_err(|e| DstError::Meta {
        key: spec.key.clone(),
        source: e,
    })?;
    let worst_map = ResidentMap::max_encoded_len(map.granule_count());
    if meta_bytes.len() + worst_map + MARKER_LEN > XATTR_BUDGET {
        return Err(DstError::TooLarge {
            key: spec.key.clone(),
            meta: meta_bytes.len(),
            map: worst_map,
        });
    }
    let markers = map.marker_offsets().collect();
    Ok(EncodedStub {
        meta: meta_bytes,
        map: map.encode(),
        markers,
    })
}

/// The data markers of this process's stubs: one shared block per marker length and
/// mount where the filesystem can share blocks (docs/KERNEL.md, "Shared data markers").
fn marker_pages() -> &'static MarkerPages {
    static PAGES: std::sync::OnceLock<MarkerPages> = std::sync::OnceLock::new();
    PAGES.get_or_init(|| {
        // Each template is a descriptor: as many as root may hold (failing that, fewer
        // templates and more markers written).
        let _ = hsm_kernel::sys::raise_nofile_limit();
        MarkerPages::for_unnamed_files()
    })
}

/// Create a complete stub as an unnamed file in `dir`, then give it `name`. The stub only
/// appears under its name with marker, metadata, map, owner, mode and times all in place.
/// With `replace`, an existing `name` is atomically replaced (rename over it). Returns the
/// stub's inode.
///
/// With `index`, the metadata is appended to the tree's index (before the stub is linked)
/// instead of written to `trusted.hsm.meta`, and the stub id is the index's.
pub fn create_stub(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    spec: &StubSpec,
    replace: bool,
    index: Option<&hsm_core::index::IndexWriter>,
) -> OpResult<FileId> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| op_error("create (O_TMPFILE) for", name, e))?;
    if spec.size > 0 {
        // The agent allows (and never ignore-marks) events on unlinked files, so setting the
        // size before the marker exists is safe even while it runs.
        nix::unistd::ftruncate(&fd, spec.size as libc::off_t)
            .map_err(|e| op_error("set size of", name, e))?;
        let id = match index {
            Some(ix) => ix.new_id().map_err(|e| DstError::Index(e.to_string()))?,
            None => rand::random::<u64>() | 1,
        };
        let stub = encode_stub(spec, id)?;
        // Tools that skip holes (cp, tar --sparse, qemu-img: lseek SEEK_DATA/SEEK_HOLE,
        // which raises no event) would copy a stub's unfetched ranges as zeros. A page of
        // zeros at the start of each granule to fetch makes SEEK_DATA stop there; the read
        // that follows fills the whole granule before the tool looks for the next hole. The
        // zeros are never served as content: the granule is not resident.
        marker_pages()
            .write(dir, fd.as_fd(), spec.size, stub.markers.iter().copied())
            .map_err(|e| op_error("write data marker of", name, e))?;
        match index {
            Some(ix) => ix
                .append(id, &stub.meta)
                .map_err(|e| DstError::Index(e.to_string()))?,
            None => xattr::fset(fd.as_fd(), META_XATTR, &stub.meta, SetMode::Create)
                .map_err(|e| op_error("write metadata of", name, e))?,
        }
        xattr::fset(fd.as_fd(), MAP_XATTR, &stub.map, SetMode::Create)
            .map_err(|e| op_error("write map of", name, e))?;
        let marker = Marker {
            state: MarkerState::Ready,
        }
        .encode();
        xattr::fset(fd.as_fd(), MARKER_XATTR, &marker, SetMode::Create)
            .map_err(|e| op_error("write marker of", name, e))?;
    }
    apply_attrs_fd(fd.as_fd(), &spec.attrs).map_err(|e| op_error("set attributes of", name, e))?;
    let id = stat::fstatx(fd.as_fd())
        .map(|st| FileId::of(&st))
        .map_err(|e| op_error("stat", name, e))?;
    link_into_place(fd.as_fd(), dir, name, replace)?;
    Ok(id)
}

fn link_into_place(
    fd: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    replace: bool,
) -> OpResult<()> {
    if !replace {
        return nix::unistd::linkat(fd, "", dir, name, AtFlags::AT_EMPTY_PATH)
            .map_err(|e| op_error("link", name, e));
    }
    let tmp = temp_name(name);
    nix::unistd::linkat(fd, "", dir, tmp.as_os_str(), AtFlags::AT_EMPTY_PATH)
        .map_err(|e| op_error("link", &tmp, e))?;
    rename_over(dir, &tmp, name)
}

/// A hidden sibling name for building a replacement.
pub fn temp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".hsm-tmp-");
    t.push(format!("{:016x}-", rand::random::<u64>()));
    // Keep it within NAME_MAX: only a prefix of the original name is needed for humans.
    let keep = &name.as_bytes()[..name.len().min(200)];
    t.push(OsStr::from_bytes(keep));
    t
}

fn rename_over(dir: BorrowedFd<'_>, tmp: &OsStr, name: &OsStr) -> OpResult<()> {
    nix::fcntl::renameat(dir, tmp, dir, name).map_err(|e| {
        let _ = nix::unistd::unlinkat(dir, tmp, nix::unistd::UnlinkatFlags::NoRemoveDir);
        op_error("rename into place", name, e)
    })
}

/// Owner, then mode (chown clears setuid bits), then times, on an open descriptor.
pub fn apply_attrs_fd(fd: BorrowedFd<'_>, a: &Attrs) -> Result<(), Errno> {
    nix::unistd::fchown(fd, Some(Uid::from_raw(a.uid)), Some(Gid::from_raw(a.gid)))?;
    nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(a.mode))?;
    nix::sys::stat::futimens(fd, &a.atime.to_timespec(), &a.mtime.to_timespec())
}

/// Whether `st` already has these attributes (atime is not compared: reads change it).
pub fn attrs_match(st: &FileStat, a: &Attrs) -> bool {
    st.mode & 0o7777 == a.mode && st.uid == a.uid && st.gid == a.gid && st.mtime == a.mtime
}

/// Set the attributes of the directory `name` in `dir`, if it is still the directory
/// `expect` populate created or walked (never one swapped in for it since).
pub fn apply_dir_attrs(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    a: &Attrs,
    expect: FileId,
) -> OpResult<()> {
    let fd = open_child_dir(dir, name).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => DstError::Swapped(PathBuf::from(name), "non-directory"),
        e => op_error("open", name, e),
    })?;
    check_same(fd.as_fd(), name, expect, "directory")?;
    apply_attrs_fd(fd.as_fd(), a).map_err(|e| op_error("set attributes of", name, e))
}

/// Fails with [`DstError::Swapped`] unless `fd` is the inode `expect`.
pub fn check_same(
    fd: BorrowedFd<'_>,
    name: &OsStr,
    expect: FileId,
    kind: &'static str,
) -> OpResult<FileStat> {
    let st = stat::fstatx(fd).map_err(|e| op_error("stat", name, e))?;
    if FileId::of(&st) != expect {
        return Err(DstError::Swapped(PathBuf::from(name), kind));
    }
    Ok(st)
}

/// Create or update the symlink `name -> target`. Returns whether anything changed.
pub fn ensure_symlink(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    target: &OsStr,
    a: &Attrs,
    exists: bool,
) -> OpResult<bool> {
    if exists {
        // The link itself, opened once (O_PATH): its target is read and its owner and times
        // set through that descriptor, so a file swapped in for it is never chowned.
        let fd = open_symlink(dir, name)?;
        let current =
            nix::fcntl::readlinkat(fd.as_fd(), c"").map_err(|e| op_error("readlink", name, e))?;
        if current.as_os_str() == target {
            set_symlink_attrs(fd.as_fd(), name, a)?;
            return Ok(false);
        }
    }
    // A new link is made under a hidden name and renamed into place with its attributes.
    let tmp = temp_name(name);
    nix::unistd::symlinkat(target, dir, tmp.as_os_str())
        .map_err(|e| op_error("symlink", &tmp, e))?;
    let set = open_symlink(dir, &tmp).and_then(|fd| set_symlink_attrs(fd.as_fd(), name, a));
    if let Err(e) = set {
        let _ = nix::unistd::unlinkat(
            dir,
            tmp.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        return Err(e);
    }
    if exists {
        rename_over(dir, &tmp, name)?;
    } else {
        // Never over something that appeared meanwhile.
        nix::fcntl::renameat2(
            dir,
            tmp.as_os_str(),
            dir,
            name,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| {
            let _ = nix::unistd::unlinkat(
                dir,
                tmp.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            op_error("rename into place", name, e)
        })?;
    }
    Ok(true)
}

/// The symlink `name` in `dir` itself (`O_PATH | O_NOFOLLOW`); anything else is refused.
fn open_symlink(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<OwnedFd> {
    let fd = openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| op_error("open", name, e))?;
    let st = stat::fstatx(fd.as_fd()).map_err(|e| op_error("stat", name, e))?;
    if !st.is_symlink() {
        return Err(DstError::Swapped(
            PathBuf::from(name),
            hsm_kernel::beneath::kind_of(st.mode),
        ));
    }
    Ok(fd)
}

/// Owner and times of the symlink `fd` refers to (an `O_PATH` descriptor of the link).
fn set_symlink_attrs(fd: BorrowedFd<'_>, name: &OsStr, a: &Attrs) -> OpResult<()> {
    nix::unistd::fchownat(
        fd,
        c"",
        Some(Uid::from_raw(a.uid)),
        Some(Gid::from_raw(a.gid)),
        AtFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| op_error("chown", name, e))?;
    stat::set_times_fd(fd, a.atime, a.mtime).map_err(|e| op_error("set times of", name, e))
}

/// Create directory `name` in `dir` (or accept an existing one); returns whether created.
pub fn ensure_dir(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<bool> {
    match nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(op_error("mkdir", name, e)),
    }
}

/// The inode of the directory `name` in `dir` just made (`created`) or found there by
/// [`ensure_dir`]. One populate made must still be populate's (owned by its user): a user
/// who can write `dir` and swaps in a directory of their own (or a symlink) is refused.
pub fn new_dir_id(dir: BorrowedFd<'_>, name: &OsStr, created: bool) -> OpResult<FileId> {
    let fd = open_child_dir(dir, name).map_err(|e| match e {
        Errno::ELOOP | Errno::ENOTDIR => DstError::Swapped(PathBuf::from(name), "non-directory"),
        e => op_error("open", name, e),
    })?;
    let st = stat::fstatx(fd.as_fd()).map_err(|e| op_error("stat", name, e))?;
    if created && st.uid != nix::unistd::geteuid().as_raw() {
        return Err(DstError::Swapped(
            PathBuf::from(name),
            "directory, not the one populate made,",
        ));
    }
    Ok(FileId::of(&st))
}

/// Remove a non-directory entry.
pub fn unlink(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<()> {
    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
        .map_err(|e| op_error("remove", name, e))
}

/// Remove an empty directory; `Ok(false)` if it is not empty.
pub fn rmdir(dir: BorrowedFd<'_>, name: &OsStr) -> OpResult<bool> {
    match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(true),
        Err(Errno::ENOTEMPTY | Errno::EEXIST) => Ok(false),
        Err(e) => Err(op_error("remove directory", name, e)),
    }
}

/// Names in directory `dir` (excluding `.` and `..`).
pub fn read_names(dir: BorrowedFd<'_>) -> OpResult<Vec<OsString>> {
    let read_err = |op| move |e| DstError::ReadDir { op, source: e };
    let dup = dir.try_clone_to_owned().map_err(read_err("dup"))?;
    let mut d = nix::dir::Dir::from_fd(dup).map_err(|e| read_err("opendir")(e.into()))?;
    let mut names = Vec::new();
    for ent in d.iter() {
        let ent = ent.map_err(|e| read_err("readdir")(e.into()))?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

/// The modification time to compare sources against.
pub fn same_mtime(a: Timestamp, b: Timestamp) -> bool {
    a == b
}
