//! Opening paths below a directory descriptor without following any symlink.
//!
//! One place for the `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` resolution that DST
//! (populate), local sources (populate) and local stores (the agent) all rely on: a path
//! given relative to a root descriptor may neither leave the root (`..`, absolute paths)
//! nor pass through a symlink in any component, so a user who can write somewhere under
//! the root cannot redirect an open to a file outside it by swapping a directory for a
//! symlink.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2};
use nix::sys::stat::Mode;

use crate::stat::{FileStat, fstatx};

/// The resolution every open below a root uses: stay beneath it, follow no symlink.
pub const RESOLVE: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

/// `openat2(root, rel, flags | O_CLOEXEC)` with [`RESOLVE`]; an empty `rel` opens `root`
/// itself ("."). A symlink in any component fails with `ELOOP` (a final one: unless `flags`
/// has `O_NOFOLLOW`, which opens it with `O_PATH` and makes other opens fail), an escape
/// with `EXDEV`.
pub fn open_beneath(root: BorrowedFd<'_>, rel: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let rel: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(RESOLVE);
    openat2(root, rel, how)
}

/// The directory `rel` below `root`, read-only, with no symlink in any component (`ELOOP`).
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Errno> {
    open_beneath(root, rel, OFlag::O_DIRECTORY | OFlag::O_RDONLY)
}

/// Why [`open_regular_beneath`] refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenFileError {
    /// A component of the path is a symbolic link (or the path would leave the root).
    #[error("a component of the path is a symbolic link or leaves the root ({0})")]
    Symlink(Errno),
    /// The open itself failed (`ENOENT`, `EACCES`, ...).
    #[error("{0}")]
    Open(Errno),
    /// The path names something other than a regular file.
    #[error("not a regular file (a {0})")]
    NotRegular(&'static str),
    /// `statx` or `fcntl` on the open descriptor failed.
    #[error("{0}")]
    Stat(#[source] crate::KernelError),
}

impl OpenFileError {
    /// The errno behind the failure, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            OpenFileError::Symlink(e) | OpenFileError::Open(e) => Some(*e),
            OpenFileError::NotRegular(_) => None,
            OpenFileError::Stat(k) => k.errno().map(Errno::from_raw),
        }
    }
}

/// What kind of file `mode` describes, in words (for messages).
pub fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symbolic link",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFBLK => "block device",
        libc::S_IFCHR => "character device",
        _ => "file of unknown type",
    }
}

/// Open the regular file `rel` below `root` for reading, safely against a hostile tree:
/// no symlink in any component (`RESOLVE_NO_SYMLINKS`, `O_NOFOLLOW`), never outside the
/// root, and `O_NONBLOCK | O_NOCTTY` so that a FIFO or device swapped in for the file cannot
/// park the caller in `open()`. Anything but a regular file is refused after `statx` of the
/// descriptor; for a regular file `O_NONBLOCK` is cleared again before it is returned, so
/// reads, `splice` and `copy_file_range` behave as on any file.
pub fn open_regular_beneath(
    root: BorrowedFd<'_>,
    rel: &Path,
) -> Result<(File, FileStat), OpenFileError> {
    let fd = open_beneath(
        root,
        rel,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_NOFOLLOW,
    )
    .map_err(|e| match e {
        Errno::ELOOP | Errno::EXDEV => OpenFileError::Symlink(e),
        e => OpenFileError::Open(e),
    })?;
    let st = fstatx(fd.as_fd()).map_err(OpenFileError::Stat)?;
    if !st.is_file() {
        return Err(OpenFileError::NotRegular(kind_of(st.mode)));
    }
    fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_RDONLY))
        .map_err(|e| OpenFileError::Stat(crate::KernelError::from_errno("fcntl F_SETFL", e)))?;
    Ok((File::from(fd), st))
}

/// `statx` of `rel` below `root` without following a symlink in any component: a final
/// symlink is reported as itself (like `lstat`), one in an earlier component is refused. An
/// `O_PATH` open: nothing is opened for reading, so no FIFO or device can block or notice it.
pub fn stat_beneath(root: BorrowedFd<'_>, rel: &Path) -> Result<FileStat, OpenFileError> {
    let fd = open_beneath(root, rel, OFlag::O_PATH | OFlag::O_NOFOLLOW).map_err(|e| match e {
        Errno::ELOOP | Errno::EXDEV => OpenFileError::Symlink(e),
        e => OpenFileError::Open(e),
    })?;
    fstatx(fd.as_fd()).map_err(OpenFileError::Stat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::{Duration, Instant};

    fn root(d: &Path) -> OwnedFd {
        File::open(d).expect("open root").into()
    }

    #[test]
    fn opens_regular_files_and_refuses_the_rest_without_blocking() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path();
        std::fs::create_dir(p.join("dir")).expect("mkdir");
        std::fs::write(p.join("dir/f"), b"hello").expect("write");
        std::os::unix::fs::symlink("dir", p.join("dirlink")).expect("symlink");
        std::os::unix::fs::symlink("dir/f", p.join("filelink")).expect("symlink");
        nix::unistd::mkfifo(&p.join("fifo"), Mode::S_IRWXU).expect("fifo");
        let r = root(p);

        let (mut f, st) = open_regular_beneath(r.as_fd(), Path::new("dir/f")).expect("open");
        assert_eq!(st.size, 5);
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello");
        let fl = fcntl(&f, FcntlArg::F_GETFL).expect("getfl");
        assert_eq!(
            OFlag::from_bits_truncate(fl) & OFlag::O_NONBLOCK,
            OFlag::empty()
        );

        for rel in ["dirlink/f", "filelink"] {
            let e = open_regular_beneath(r.as_fd(), Path::new(rel)).expect_err(rel);
            assert!(
                matches!(e, OpenFileError::Symlink(Errno::ELOOP)),
                "{rel}: {e:?}"
            );
        }
        let e = stat_beneath(r.as_fd(), Path::new("dirlink/f")).expect_err("through a link");
        assert!(matches!(e, OpenFileError::Symlink(_)), "{e:?}");
        // A final symlink is reported as itself, as lstat would.
        let st = stat_beneath(r.as_fd(), Path::new("filelink")).expect("stat link");
        assert!(st.is_symlink());
        let e = open_regular_beneath(r.as_fd(), Path::new("../x")).expect_err("escape");
        assert!(matches!(e, OpenFileError::Symlink(Errno::EXDEV)), "{e:?}");
        let e = open_regular_beneath(r.as_fd(), Path::new("dir")).expect_err("dir");
        assert!(matches!(e, OpenFileError::NotRegular("directory")), "{e:?}");

        // A FIFO nobody writes to: refused at once, never waited on.
        let start = Instant::now();
        let e = open_regular_beneath(r.as_fd(), Path::new("fifo")).expect_err("fifo");
        assert!(matches!(e, OpenFileError::NotRegular("fifo")), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(
            !stat_beneath(r.as_fd(), Path::new("fifo"))
                .expect("stat")
                .is_file()
        );
        assert_eq!(
            open_dir_beneath(r.as_fd(), Path::new("dirlink")).err(),
            Some(Errno::ELOOP)
        );
        assert!(open_dir_beneath(r.as_fd(), Path::new("")).is_ok());
    }
}
