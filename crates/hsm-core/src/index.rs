//! Tree indexes on disk: where the metadata of stubs made with `hsm populate --index` lives
//! (docs/STUB_FORMAT.md, "Tree index"; the byte format is `hsm_stub::index`).
//!
//! One append-only file per tree, `DIR/<tag>.hsmi`, in a directory only root may change
//! (`[index] dir`, default `/var/lib/hsm/index`). Populate appends a stub's record before
//! the stub gets its name, so a stub anyone can open always has its record in the page
//! cache, and syncs the file before it exits. Records are never rewritten or removed, so a
//! reader that has seen a record can rely on it for as long as the file exists.
//!
//! The reader keeps, per tree, the offset of every record it has seen (16 bytes a stub
//! plus the hash table's overhead) and reads one record with `pread` when a stub is first
//! loaded. A stub id it does not know makes it read what was appended since. It reads with
//! `pread` rather than a mapping: a file cut short under a mapping would kill the agent
//! with SIGBUS, where `pread` only returns less.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use hsm_kernel::sys::read_at_most;
use hsm_kernel::xattr::{self, SetMode};
use hsm_stub::index::{
    INDEX_HEADER_LEN, RECORD_HEADER_LEN, decode_header, decode_record, encode_header,
    encode_record, index_file_name, indexed_stub_id, scan_records, tag_of,
};
use hsm_stub::{INDEX_XATTR, MAX_META_LEN, Meta};

/// Where indexes live unless configured otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/hsm/index";

/// Why a stub's metadata could not be read from its tree's index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("stub {id:016x} has no record in {path}; re-populate the tree")]
    NoRecord { id: u64, path: PathBuf },
    #[error(
        "{path} does not exist; re-populate the tree, or set [index] dir (HSM_INDEX_DIR) to \
         where its index is"
    )]
    NoDir { path: PathBuf },
    #[error("{path}: {why}")]
    Unusable { path: PathBuf, why: String },
}

fn unusable(path: &Path, why: impl std::fmt::Display) -> IndexError {
    IndexError::Unusable {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Set the index directory of this process (before the first [`reader`] call; later calls
/// have no effect and return false).
pub fn set_dir(dir: PathBuf) -> bool {
    DIR.set(dir).is_ok()
}

/// The index directory of this process.
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| PathBuf::from(DEFAULT_DIR))
}

/// The process's reader of the index directory.
pub fn reader() -> &'static IndexReader {
    static READER: OnceLock<IndexReader> = OnceLock::new();
    READER.get_or_init(|| IndexReader::new(dir().to_path_buf()))
}

/// Refuse a file or directory that someone other than root (or this process's user) owns
/// or may write: whoever could write an index could steer where a stub's bytes come from.
fn check_owner(path: &Path, md: &std::fs::Metadata) -> Result<(), IndexError> {
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != 0 && md.uid() != me {
        return Err(unusable(
            path,
            format!("owned by uid {}, not root", md.uid()),
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(unusable(
            path,
            format!("mode {:o} lets others write it", md.mode() & 0o7777),
        ));
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<(), IndexError> {
    let md = std::fs::symlink_metadata(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => IndexError::NoDir {
            path: dir.to_path_buf(),
        },
        _ => unusable(dir, e),
    })?;
    if !md.is_dir() {
        return Err(unusable(dir, "not a directory"));
    }
    check_owner(dir, &md)
}

fn open_index(path: &Path, write: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// What is known of one tree's index file.
#[derive(Debug)]
struct Tree {
    /// Shared so a record is read after the readers' lock is released.
    file: Arc<File>,
    ident: (u64, u64),
    /// The file's length up to the end of its last complete record.
    parsed: u64,
    /// Stub id to record offset.
    at: HashMap<u64, u64>,
}

impl Tree {
    fn open(path: &Path, tag: u32) -> Result<Tree, IndexError> {
        let file = open_index(path, false).map_err(|e| unusable(path, e))?;
        let md = file.metadata().map_err(|e| unusable(path, e))?;
        if !md.is_file() {
            return Err(unusable(path, "not a regular file"));
        }
        check_owner(path, &md)?;
        let head =
            read_at_most(&file, 0..INDEX_HEADER_LEN as u64).map_err(|e| unusable(path, e))?;
        let have = decode_header(&head).map_err(|e| unusable(path, e))?;
        if have != tag {
            return Err(unusable(
                path,
                format!("its header names tree {have:08x}, not {tag:08x}"),
            ));
        }
        Ok(Tree {
            file: Arc::new(file),
            ident: (md.dev(), md.ino()),
            parsed: INDEX_HEADER_LEN as u64,
            at: HashMap::new(),
        })
    }

    /// Take in the records appended since the last call.
    fn catch_up(&mut self, path: &Path) -> Result<(), IndexError> {
        let len = self.file.metadata().map_err(|e| unusable(path, e))?.len();
        if len <= self.parsed {
            return Ok(());
        }
        let tail = read_at_most(&self.file, self.parsed..len).map_err(|e| unusable(path, e))?;
        let (records, done) = scan_records(&tail).map_err(|e| {
            unusable(
                path,
                format!("record after byte {}: {e}", self.parsed + tail.len() as u64),
            )
        })?;
        self.at.reserve(records.len());
        for (id, off) in records {
            self.at.insert(id, self.parsed + off as u64);
        }
        self.parsed += done as u64;
        Ok(())
    }
}

/// The tag a tree's root names (`trusted.hsm.index`), if it names one; errors blame `blame`.
fn tree_tag(root: BorrowedFd<'_>, blame: &Path) -> Result<Option<u32>, IndexError> {
    let mut buf = Vec::new();
    match xattr::fget(root, INDEX_XATTR, &mut buf) {
        Ok(true) if buf.len() == 4 => {
            let tag = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            Ok((tag != 0).then_some(tag))
        }
        Ok(_) => Ok(None),
        Err(e) => Err(unusable(blame, format!("reading {INDEX_XATTR}: {e}"))),
    }
}

/// Read and check stub `id`'s record at `off` of an index file.
fn read_record(file: &File, path: &Path, id: u64, off: u64) -> Result<Meta, IndexError> {
    let bytes = read_at_most(file, off..off + (RECORD_HEADER_LEN + MAX_META_LEN) as u64)
        .map_err(|e| unusable(path, e))?;
    decode_record(&bytes, id).map_err(|e| unusable(path, format!("stub {id:016x}: {e}")))
}

/// Reads stubs' metadata from the indexes of one directory.
#[derive(Debug)]
pub struct IndexReader {
    dir: PathBuf,
    trees: Mutex<HashMap<u32, Tree>>,
}

impl IndexReader {
    pub fn new(dir: PathBuf) -> IndexReader {
        IndexReader {
            dir,
            trees: Mutex::new(HashMap::new()),
        }
    }

    /// The directory read.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The metadata of the indexed stub `id` (its map's `stub_id`).
    pub fn lookup(&self, id: u64) -> Result<Meta, IndexError> {
        let tag = tag_of(id);
        let path = self.dir.join(index_file_name(tag));
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tree) = trees.get(&tag) {
            if let Some(&off) = tree.at.get(&id) {
                // The read goes to the file, not the map: other lookups need not wait.
                let file = tree.file.clone();
                drop(trees);
                return read_record(&file, &path, id, off);
            }
        }
        // Not seen yet: the file may have grown, or been replaced (another tree's
        // re-creation under the same tag after the directory was wiped).
        check_dir(&self.dir)?;
        let md = std::fs::symlink_metadata(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => IndexError::NoRecord {
                id,
                path: path.clone(),
            },
            _ => unusable(&path, e),
        })?;
        let same = trees
            .get(&tag)
            .is_some_and(|t| t.ident == (md.dev(), md.ino()));
        if !same {
            trees.insert(tag, Tree::open(&path, tag)?);
        }
        let tree = trees
            .get_mut(&tag)
            .ok_or_else(|| unusable(&path, "vanished"))?;
        tree.catch_up(&path)?;
        match tree.at.get(&id) {
            Some(&off) => {
                let file = tree.file.clone();
                drop(trees);
                read_record(&file, &path, id, off)
            }
            None => Err(IndexError::NoRecord { id, path }),
        }
    }

    /// Read the index of the tree rooted at `root` ahead of its first lookup, without
    /// holding up lookups meanwhile: the first lookup of a tree otherwise scans the whole
    /// file (8 MB for a tree of 80,000 stubs) while every other lookup waits. Returns the
    /// tree's tag and its records, or `None` for a tree without an index.
    pub fn preload(&self, root: &Path) -> Result<Option<(u32, usize)>, IndexError> {
        let dir = std::fs::File::open(root).map_err(|e| unusable(root, e))?;
        let Some(tag) = tree_tag(dir.as_fd(), root)? else {
            return Ok(None);
        };
        check_dir(&self.dir)?;
        let path = self.dir.join(index_file_name(tag));
        let mut tree = Tree::open(&path, tag)?;
        tree.catch_up(&path)?;
        let records = tree.at.len();
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        // A lookup may have read the same file meanwhile, perhaps further.
        let newer = trees
            .get(&tag)
            .is_some_and(|t| t.ident == tree.ident && t.parsed >= tree.parsed);
        if !newer {
            trees.insert(tag, tree);
        }
        Ok(Some((tag, records)))
    }
}

/// Appends the records of one populate run to its tree's index.
#[derive(Debug)]
pub struct IndexWriter {
    tag: u32,
    path: PathBuf,
    file: Mutex<nix::fcntl::Flock<File>>,
    next: AtomicU32,
}

impl IndexWriter {
    /// Open the index of the tree whose root directory is `root` (opened for reading),
    /// creating the directory, the file and the tree's tag (`trusted.hsm.index` on the
    /// root) if missing. Holds an exclusive lock on the file until dropped: two populate
    /// runs never append to one tree at once.
    pub fn open(dir: &Path, root: BorrowedFd<'_>) -> Result<IndexWriter, IndexError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| unusable(dir, e))?;
        check_dir(dir)?;
        let tag = tree_tag(root, dir)?;
        let (tag, path, file) = match tag {
            Some(tag) => {
                let path = dir.join(index_file_name(tag));
                match open_index(&path, true) {
                    Ok(f) => (tag, path, f),
                    // The directory lost it: start it again under the same tag (stubs
                    // whose records were in it cannot be served and are replaced).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        let f = create(dir, &path, tag).map_err(|e| unusable(&path, e))?;
                        (tag, path, f)
                    }
                    Err(e) => return Err(unusable(&path, e)),
                }
            }
            None => {
                let (tag, path, f) = create_new(dir)?;
                xattr::fset(root, INDEX_XATTR, &tag.to_le_bytes(), SetMode::Any)
                    .map_err(|e| unusable(&path, format!("writing {INDEX_XATTR}: {e}")))?;
                (tag, path, f)
            }
        };
        let file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                unusable(
                    &path,
                    format!("another hsm populate of this tree holds it ({e})"),
                )
            })?;
        let mut tree = Tree::open(&path, tag)?;
        tree.catch_up(&path)?;
        let last = tree
            .at
            .keys()
            .filter(|&&id| tag_of(id) == tag)
            .map(|&id| id as u32)
            .max()
            .unwrap_or(0);
        // A cut-short record at the end (a crash while appending) would hide every record
        // after it: drop it first.
        let len = file.metadata().map_err(|e| unusable(&path, e))?.len();
        if len > tree.parsed {
            file.set_len(tree.parsed).map_err(|e| unusable(&path, e))?;
        }
        Ok(IndexWriter {
            tag,
            path,
            file: Mutex::new(file),
            next: AtomicU32::new(last.saturating_add(1)),
        })
    }

    /// The tree's tag.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The index file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A stub id no stub of this tree has had.
    pub fn new_id(&self) -> Result<u64, IndexError> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if seq == u32::MAX || seq == 0 {
            return Err(unusable(
                &self.path,
                "the tree has used all its stub ids; populate into a new directory",
            ));
        }
        Ok(indexed_stub_id(self.tag, seq))
    }

    /// Append the record of stub `id` (one `write`, before the stub is linked).
    pub fn append(&self, id: u64, meta: &[u8]) -> Result<(), IndexError> {
        let rec = encode_record(id, meta).map_err(|e| unusable(&self.path, e))?;
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&rec).map_err(|e| unusable(&self.path, e))
    }

    /// Make every appended record durable.
    pub fn sync(&self) -> Result<(), IndexError> {
        let f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.sync_data().map_err(|e| unusable(&self.path, e))
    }
}

/// Create `path` with its header, durably (the file and its name) before any stub names it.
fn create(dir: &Path, path: &Path, tag: u32) -> io::Result<File> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(&encode_header(tag))?;
    f.sync_all()?;
    File::open(dir)?.sync_all()?;
    Ok(f)
}

/// A new index under a tag no file in `dir` has.
fn create_new(dir: &Path) -> Result<(u32, PathBuf, File), IndexError> {
    loop {
        let tag = rand::random::<u32>();
        if tag == 0 {
            continue;
        }
        let path = dir.join(index_file_name(tag));
        match create(dir, &path, tag) {
            Ok(f) => return Ok((tag, path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(unusable(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64, key: &str) -> Vec<u8> {
        Meta {
            stub_id: id,
            remote_size: 5,
            remote_url: "file:///srv".into(),
            key: key.into(),
            etag: None,
            version: None,
            integrity: None,
            extra: Vec::new(),
        }
        .encode()
        .expect("encode")
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("hsm-index-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&d).expect("mkdir");
        d
    }

    #[test]
    fn reader_sees_appends_and_refuses_strangers() {
        let base = tmp();
        let dir = base.join("index");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        // No trusted xattrs without root: use a file's own tag via create() instead.
        let tag = 0x1234_5678;
        let path = dir.join(index_file_name(tag));
        let mut f = create(&dir, &path, tag).expect("create");
        let id1 = indexed_stub_id(tag, 1);
        let id2 = indexed_stub_id(tag, 2);
        f.write_all(&encode_record(id1, &meta(id1, "a")).expect("rec"))
            .expect("append");
        let r = IndexReader::new(dir.clone());
        assert_eq!(r.lookup(id1).expect("lookup").key, "a");
        assert!(matches!(r.lookup(id2), Err(IndexError::NoRecord { .. })));
        // Appended after the reader looked: found on the next miss.
        f.write_all(&encode_record(id2, &meta(id2, "b")).expect("rec"))
            .expect("append");
        assert_eq!(r.lookup(id2).expect("lookup").key, "b");
        // Another tree's tag: no file.
        assert!(matches!(
            r.lookup(indexed_stub_id(7, 1)),
            Err(IndexError::NoRecord { .. })
        ));
        // A directory others may write is refused.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let r = IndexReader::new(dir.clone());
        assert!(matches!(r.lookup(id1), Err(IndexError::Unusable { .. })));
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    /// A scratch directory holding `index/` (not created) and a tree root `tree/`, opened.
    /// Needs root: the tree's tag is a trusted xattr.
    fn tree_and_index() -> (PathBuf, PathBuf, PathBuf, File) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: the tree's tag is a trusted xattr"
        );
        let base = tmp();
        let tree = base.join("tree");
        std::fs::create_dir(&tree).expect("mkdir");
        let root = File::open(&tree).expect("open tree");
        (base.clone(), base.join("index"), tree, root)
    }

    #[test]
    fn writer_keeps_tag_and_ids_across_runs() {
        let (base, dir, _, root) = tree_and_index();
        let w = IndexWriter::open(&dir, root.as_fd()).expect("writer");
        let a = w.new_id().expect("id");
        w.append(a, &meta(a, "a")).expect("append");
        // A second run while the first holds the file is refused.
        assert!(IndexWriter::open(&dir, root.as_fd()).is_err());
        w.sync().expect("sync");
        let tag = w.tag();
        drop(w);
        let w = IndexWriter::open(&dir, root.as_fd()).expect("writer again");
        assert_eq!(w.tag(), tag);
        let b = w.new_id().expect("id");
        assert!(b > a);
        w.append(b, &meta(b, "b")).expect("append");
        let r = IndexReader::new(dir.clone());
        assert_eq!(r.lookup(a).expect("a").key, "a");
        assert_eq!(r.lookup(b).expect("b").key, "b");
        drop(w);
        // A record cut short by a crash is dropped by the next writer; later ones are found.
        let path = dir.join(index_file_name(tag));
        let mut f = open_index(&path, true).expect("open");
        f.write_all(&encode_record(b + 1, &meta(b + 1, "c")).expect("rec")[..20])
            .expect("partial");
        drop(f);
        let w = IndexWriter::open(&dir, root.as_fd()).expect("writer after crash");
        let c = w.new_id().expect("id");
        w.append(c, &meta(c, "c")).expect("append");
        let r = IndexReader::new(dir.clone());
        assert_eq!(r.lookup(c).expect("c").key, "c");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn preload_reads_a_trees_index_before_its_first_lookup() {
        let (base, dir, tree, root) = tree_and_index();
        let plain = base.join("plain");
        std::fs::create_dir(&plain).expect("mkdir");
        let w = IndexWriter::open(&dir, root.as_fd()).expect("writer");
        let ids: Vec<u64> = (0..3).map(|_| w.new_id().expect("id")).collect();
        for (i, &id) in ids.iter().enumerate() {
            w.append(id, &meta(id, &format!("k{i}"))).expect("append");
        }
        w.sync().expect("sync");
        let r = IndexReader::new(dir.clone());
        assert_eq!(r.preload(&tree).expect("preload"), Some((w.tag(), 3)));
        // Found from what the preload read, even with the file gone from the directory
        // (a lookup that missed would look for it there).
        std::fs::rename(dir.join(index_file_name(w.tag())), base.join("moved")).expect("mv");
        assert_eq!(r.lookup(ids[2]).expect("lookup").key, "k2");
        // A tree without an index, and a missing tree.
        assert_eq!(r.preload(&plain).expect("plain"), None);
        assert!(r.preload(&base.join("nothing")).is_err());
        drop(w);
        std::fs::remove_dir_all(&base).expect("cleanup");
    }
}
