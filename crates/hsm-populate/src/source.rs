//! What populate copies from: a tree of directories, files, symlinks and their metadata.
//!
//! The local walker ([`LocalSource`]) and the object-store source ([`crate::remote::RemoteSource`],
//! from a manifest or a listing) produce the same [`SourceEntry`] model.

use std::ffi::{OsStr, OsString};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use hsm_kernel::beneath::{self, OpenFileError};
use hsm_kernel::stat::{FileStat, Timestamp};
use hsm_remote::{KeyError, RemoteError, RemoteUrl, key_from_relative_path, local_etag};
use nix::errno::Errno;

/// Why a source (or part of it) cannot be read. Every variant names the path, URL or key.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A local file or directory could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A local path has a symlink where a directory was (swapped in since it was listed,
    /// or given as a path through one): populate never follows a symlink inside SRC.
    #[error(
        "{}: refused: a component is a symbolic link (populate never follows one inside SRC)",
        .0.display()
    )]
    SymlinkInPath(PathBuf),
    /// A local path is not the regular file it must be (a FIFO, a device, a directory).
    #[error("{}: refused: not a regular file but a {kind}", .path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{0}: not a local directory")]
    NotLocal(String),
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("{}: the source path must be valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// The store could not be opened or read.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The manifest at `url` does not decode (or names a path that would escape).
    #[error("{url}/{key}: {source}")]
    Manifest {
        url: String,
        key: String,
        #[source]
        source: hsm_manifest::ManifestError,
    },
    /// The store refuses a whole listing page over one key it cannot parse, so nothing of
    /// the listing can be used.
    #[error(
        "{url}: the store holds a key that cannot be a path below DST ({detail}); \
         refused, nothing was created. Remove the key, or publish the tree with \
         `hsm publish` so populate reads its manifest instead of a listing"
    )]
    UnusableListing { url: String, detail: String },
    #[error("runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
    move |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Ownership, permissions and times of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    /// Permission bits including setuid/setgid/sticky (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
}

/// A regular file's remote identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub size: u64,
    /// Object key, or why the file cannot be addressed as an object.
    pub key: Result<String, KeyError>,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// (dev, ino) when the source file has other hard links.
    pub link_id: Option<(u64, u64)>,
    /// The source may have holes (allocated blocks < size).
    pub maybe_sparse: bool,
    /// How the agent can verify the object's bytes (a manifest with digests).
    pub integrity: Option<hsm_stub::Integrity>,
}

/// The kind of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(FileInfo),
    Symlink {
        target: OsString,
    },
    /// FIFOs, sockets, devices: skipped with a warning.
    Special(&'static str),
}

/// One entry of a source directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub name: OsString,
    pub kind: Kind,
    pub attrs: Attrs,
}

/// A tree populate can mirror.
pub trait Source: Sync {
    /// The remote URL stubs will name.
    fn url(&self) -> &str;
    /// A human-readable description of the source root (for messages).
    fn describe(&self) -> String;
    /// Attributes of the root directory.
    fn root_attrs(&self) -> Result<Attrs, SourceError>;
    /// Entries of directory `rel` ("" for the root), sorted by name.
    fn list(&self, rel: &Path) -> Result<Vec<SourceEntry>, SourceError>;
    /// Byte ranges of file `rel` known to be holes (nothing to fetch there).
    fn holes(&self, rel: &Path, size: u64) -> Vec<Range<u64>>;
    /// The local root, when the source is a local directory (for overlap checks).
    fn local_root(&self) -> Option<&Path> {
        None
    }
    /// The ETag `key` has now, if it exists (used for hard-linked files, whose stubs name
    /// whichever of their paths was seen first).
    fn current_etag(&self, key: &str) -> Option<String>;
    /// log2 of the smallest granule the source needs (a manifest's chunk size, so every
    /// fetch covers whole verifiable chunks).
    fn min_granule_shift(&self) -> u8 {
        hsm_stub::MIN_GRANULE_SHIFT
    }
    /// Entries of the source that cannot be created (keys that would escape DST, names
    /// that clash): (key, why). Reported as errors; never created.
    fn refused(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// A local directory, served to the agent through hsm-remote's local backend.
///
/// Everything below the root is reached from a descriptor of it with
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` ([`hsm_kernel::beneath`]): a symlink is
/// listed as a symlink (and recreated as one in DST), never descended through, even when
/// a user swaps a directory for one while populate walks; files are opened non-blocking
/// and only when they are regular files, so a FIFO cannot hang populate.
#[derive(Debug)]
pub struct LocalSource {
    root: PathBuf,
    root_fd: OwnedFd,
    url: String,
}

/// The [`SourceError`] for a failed open of `path` (below a local source's root).
fn open_err(path: &Path, e: OpenFileError) -> SourceError {
    match e {
        OpenFileError::Symlink(_) => SourceError::SymlinkInPath(path.to_path_buf()),
        OpenFileError::NotRegular(kind) => SourceError::NotRegular {
            path: path.to_path_buf(),
            kind,
        },
        OpenFileError::Open(e) => SourceError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        },
        OpenFileError::Stat(e) => SourceError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        },
    }
}

/// The [`SourceError`] for a failed directory open of `path`.
fn dir_err(path: &Path, e: Errno) -> SourceError {
    match e {
        Errno::ELOOP | Errno::EXDEV => SourceError::SymlinkInPath(path.to_path_buf()),
        e => SourceError::Io {
            path: path.to_path_buf(),
            source: e.into(),
        },
    }
}

impl LocalSource {
    /// `input` is a path or a `file://` URL naming an existing directory.
    pub fn open(input: &str) -> Result<Self, SourceError> {
        let parsed = RemoteUrl::parse(input)?;
        let root = parsed
            .local_root()
            .ok_or_else(|| SourceError::NotLocal(input.to_string()))?;
        // Canonical, so re-runs through another path to the same tree keep the same URL.
        let root = std::fs::canonicalize(root).map_err(io_err(root))?;
        if !root.is_dir() {
            return Err(SourceError::NotADirectory(root));
        }
        let url = RemoteUrl::parse(
            root.to_str()
                .ok_or_else(|| SourceError::NotUtf8(root.clone()))?,
        )?
        .as_str()
        .to_string();
        // The root itself was resolved once above; from here on nothing is resolved by name.
        let root_fd = nix::fcntl::open(
            &root,
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| dir_err(&root, e))?;
        Ok(LocalSource { root, root_fd, url })
    }

    /// Open the regular file `rel` (relative to the root) for reading: no symlink in any
    /// component, not blocking on a FIFO, refused unless it is a regular file.
    pub fn open_file(&self, rel: &Path) -> Result<(std::fs::File, FileStat), SourceError> {
        beneath::open_regular_beneath(self.root_fd.as_fd(), rel)
            .map_err(|e| open_err(&self.root.join(rel), e))
    }
}

fn attrs_of(st: &FileStat) -> Attrs {
    Attrs {
        mode: st.mode & 0o7777,
        uid: st.uid,
        gid: st.gid,
        atime: st.atime,
        mtime: st.mtime,
    }
}

impl Source for LocalSource {
    fn url(&self) -> &str {
        &self.url
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn root_attrs(&self) -> Result<Attrs, SourceError> {
        hsm_kernel::stat::fstatx(self.root_fd.as_fd())
            .map(|st| attrs_of(&st))
            .map_err(|e| SourceError::Io {
                path: self.root.clone(),
                source: std::io::Error::other(e),
            })
    }

    fn list(&self, rel: &Path) -> Result<Vec<SourceEntry>, SourceError> {
        let dir = self.root.join(rel);
        // Entered beneath the root with no symlink in any component: a directory swapped
        // for a symlink since its parent was listed is refused here, never followed.
        let fd =
            beneath::open_dir_beneath(self.root_fd.as_fd(), rel).map_err(|e| dir_err(&dir, e))?;
        let mut rd = nix::dir::Dir::from_fd(fd).map_err(|e| dir_err(&dir, e))?;
        let mut names = Vec::new();
        for ent in rd.iter() {
            let ent = ent.map_err(|e| dir_err(&dir, e))?;
            let name = ent.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            names.push(name.to_owned());
        }
        let mut out = Vec::new();
        for cname in names {
            let name = OsStr::from_bytes(cname.to_bytes()).to_os_string();
            let path = dir.join(&name);
            let st = match hsm_kernel::stat::statx_at(rd.as_fd(), &cname) {
                Ok(st) => st,
                // Removed since the directory was read: it is simply not there any more.
                Err(e) if e.errno() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    return Err(SourceError::Io {
                        path,
                        source: std::io::Error::other(e),
                    });
                }
            };
            let kind = match st.file_type() {
                libc::S_IFDIR => Kind::Dir,
                libc::S_IFREG => {
                    let rel_path = rel.join(&name);
                    Kind::File(FileInfo {
                        size: st.size,
                        key: key_from_relative_path(&rel_path),
                        etag: Some(local_etag(st.ino, st.size, st.mtime.sec, st.mtime.nsec)),
                        version: None,
                        link_id: (st.nlink > 1).then_some((st.dev, st.ino)),
                        maybe_sparse: st.blocks * 512 < st.size,
                        integrity: None,
                    })
                }
                libc::S_IFLNK => {
                    let target = nix::fcntl::readlinkat(rd.as_fd(), cname.as_c_str())
                        .map_err(|e| dir_err(&path, e))?;
                    Kind::Symlink { target }
                }
                libc::S_IFIFO => Kind::Special("fifo"),
                libc::S_IFSOCK => Kind::Special("socket"),
                libc::S_IFBLK => Kind::Special("block device"),
                _ => Kind::Special("character device"),
            };
            out.push(SourceEntry {
                name,
                kind,
                attrs: attrs_of(&st),
            });
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    fn holes(&self, rel: &Path, size: u64) -> Vec<Range<u64>> {
        use nix::unistd::{Whence, lseek};
        // Not a regular file any more (a FIFO swapped in), or through a symlink: no holes
        // to report, and never a blocking open. The agent refuses such an object anyway.
        let Ok((f, _)) = self.open_file(rel) else {
            return Vec::new();
        };
        let mut holes = Vec::new();
        let mut pos: u64 = 0;
        while pos < size {
            // Next data at or after pos; ENXIO means the rest is a hole.
            let data = match lseek(&f, pos as libc::off_t, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => size,
                Err(_) => return holes, // no SEEK_DATA support: treat as dense
            };
            if data > pos {
                holes.push(pos..data.min(size));
            }
            if data >= size {
                break;
            }
            pos = match lseek(&f, data as libc::off_t, Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(_) => return holes,
            };
        }
        holes
    }

    fn local_root(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn current_etag(&self, key: &str) -> Option<String> {
        let st = beneath::stat_beneath(self.root_fd.as_fd(), Path::new(key)).ok()?;
        st.is_file()
            .then(|| local_etag(st.ino, st.size, st.mtime.sec, st.mtime.nsec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_kinds_and_holes() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        std::fs::write(d.path().join("a"), b"abc").expect("write");
        std::os::unix::fs::symlink("a", d.path().join("link")).expect("symlink");
        nix::unistd::mkfifo(&d.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let sparse = std::fs::File::create(d.path().join("sparse")).expect("create");
        sparse.set_len(8 << 20).expect("len");
        use std::os::unix::fs::FileExt;
        sparse.write_at(b"x", 4 << 20).expect("write");
        sparse.sync_all().expect("sync");
        let s = LocalSource::open(d.path().to_str().expect("utf8")).expect("open");
        assert!(s.url().starts_with("file:///"));
        let list = s.list(Path::new("")).expect("list");
        let names: Vec<_> = list
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a", "fifo", "link", "sparse", "sub"]);
        assert!(
            matches!(list[0].kind, Kind::File(ref f) if f.size == 3 && f.key.as_deref() == Ok("a"))
        );
        assert_eq!(list[1].kind, Kind::Special("fifo"));
        assert_eq!(list[2].kind, Kind::Symlink { target: "a".into() });
        assert_eq!(list[4].kind, Kind::Dir);
        let holes = s.holes(Path::new("sparse"), 8 << 20);
        assert!(
            holes
                .first()
                .is_some_and(|h| h.start == 0 && h.end <= 4 << 20),
            "{holes:?}"
        );
        assert!(holes.last().is_some_and(|h| h.end == 8 << 20), "{holes:?}");
    }

    /// A directory swapped for a symlink (to a directory populate's user may not read) is
    /// listed as a symlink and never entered; a FIFO swapped in for a file is refused
    /// without blocking, also by `holes`, which opens the file.
    #[test]
    fn never_follows_symlinks_nor_blocks_on_fifos() {
        let d = tempfile::tempdir().expect("tmp");
        let src = d.path().join("src");
        let secret = d.path().join("secret");
        std::fs::create_dir_all(src.join("user/sub")).expect("mkdir");
        std::fs::create_dir(&secret).expect("mkdir");
        std::fs::write(secret.join("key"), b"root only").expect("write");
        std::fs::write(src.join("user/sub/f"), b"x").expect("write");
        let s = LocalSource::open(src.to_str().expect("utf8")).expect("open");
        assert!(matches!(
            s.list(Path::new("user")).expect("list")[0].kind,
            Kind::Dir
        ));

        // The swap, between the listing of user/ and the walk into user/sub.
        std::fs::rename(src.join("user/sub"), src.join("user/old")).expect("rename");
        std::os::unix::fs::symlink(&secret, src.join("user/sub")).expect("symlink");
        let e = s
            .list(Path::new("user/sub"))
            .expect_err("entered a symlink");
        assert!(matches!(e, SourceError::SymlinkInPath(_)), "{e:?}");
        assert!(e.to_string().contains("user/sub"), "{e}");
        let listed = s.list(Path::new("user")).expect("list");
        let sub = listed.iter().find(|e| e.name == "sub").expect("sub");
        assert_eq!(
            sub.kind,
            Kind::Symlink {
                target: secret.clone().into_os_string()
            }
        );
        assert_eq!(s.current_etag("user/sub/key"), None);
        assert!(matches!(
            s.open_file(Path::new("user/sub/key")),
            Err(SourceError::SymlinkInPath(_))
        ));
        assert!(s.holes(Path::new("user/sub/key"), 8 << 20).is_empty());

        // A FIFO where a (sparse) file was: refused at once, never waited on.
        nix::unistd::mkfifo(&src.join("user/fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let holes = s.holes(Path::new("user/fifo"), 8 << 20);
            let opened = s.open_file(Path::new("user/fifo")).map(|_| ());
            tx.send((holes, opened)).expect("send");
        });
        let (holes, opened) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("blocked on a FIFO");
        assert!(holes.is_empty());
        let e = opened.expect_err("a FIFO is not a file");
        assert!(
            matches!(e, SourceError::NotRegular { kind: "fifo", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("user/fifo"), "{e}");
    }
}
