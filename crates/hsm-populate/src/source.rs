//! What populate copies from: a tree of directories, files, symlinks and their metadata.
//!
//! The local walker ([`LocalSource`]) and the object-store source ([`crate::remote::RemoteSource`],
//! from a manifest or a listing) produce the same [`SourceEntry`] model.

use std::ffi::OsString;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use hsm_kernel::stat::Timestamp;
use hsm_remote::{KeyError, RemoteError, RemoteUrl, key_from_relative_path, local_etag};

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
#[derive(Debug)]
pub struct LocalSource {
    root: PathBuf,
    url: String,
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
        Ok(LocalSource { root, url })
    }
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: nsec as u32,
    }
}

fn attrs_of(md: &std::fs::Metadata) -> Attrs {
    Attrs {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        atime: ts(md.atime(), md.atime_nsec()),
        mtime: ts(md.mtime(), md.mtime_nsec()),
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
        std::fs::symlink_metadata(&self.root)
            .map(|md| attrs_of(&md))
            .map_err(io_err(&self.root))
    }

    fn list(&self, rel: &Path) -> Result<Vec<SourceEntry>, SourceError> {
        let dir = self.root.join(rel);
        let rd = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(io_err(&dir))?;
            let path = ent.path();
            let md = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                let rel_path = rel.join(ent.file_name());
                Kind::File(FileInfo {
                    size: md.size(),
                    key: key_from_relative_path(&rel_path),
                    etag: Some(local_etag(
                        md.ino(),
                        md.size(),
                        md.mtime(),
                        md.mtime_nsec() as u32,
                    )),
                    version: None,
                    link_id: (md.nlink() > 1).then(|| (md.dev(), md.ino())),
                    maybe_sparse: md.blocks() * 512 < md.size(),
                    integrity: None,
                })
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err(&path))?;
                Kind::Symlink {
                    target: target.into_os_string(),
                }
            } else if ft.is_fifo() {
                Kind::Special("fifo")
            } else if ft.is_socket() {
                Kind::Special("socket")
            } else if ft.is_block_device() {
                Kind::Special("block device")
            } else {
                Kind::Special("character device")
            };
            out.push(SourceEntry {
                name: ent.file_name(),
                kind,
                attrs: attrs_of(&md),
            });
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    fn holes(&self, rel: &Path, size: u64) -> Vec<Range<u64>> {
        use nix::unistd::{Whence, lseek};
        let Ok(f) = std::fs::File::open(self.root.join(rel)) else {
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
        let md = std::fs::symlink_metadata(self.root.join(key)).ok()?;
        md.is_file()
            .then(|| local_etag(md.ino(), md.size(), md.mtime(), md.mtime_nsec() as u32))
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
}
