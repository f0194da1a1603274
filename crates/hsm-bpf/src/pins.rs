//! The guard's pin directory, trusted only when no one but root could have made it.
//!
//! bpffs is mounted with mode 1777 by default (`/sys/fs/bpf` included), so any user may
//! create `/sys/fs/bpf/hsm` and directories or files below it before the guard is installed.
//! Nothing here is therefore reached by a path alone: every directory is opened relative to
//! its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY` and checked with `fstat` (owned
//! by root, writable by no one else), every entry is checked with `fstatat(...,
//! AT_SYMLINK_NOFOLLOW)`, and pinned objects are opened through `/proc/self/fd/N/NAME` of
//! the checked directory, so a rename elsewhere cannot substitute another one. Whether a
//! pin is the object it should be (a BPF link of an LSM program of that name, a map of that
//! name) is the caller's to check with the object itself.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use crate::BpfError;

/// The bpffs root the pin directory lives in.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// The pin directory's name in [`BPFFS`].
pub(crate) const NAME: &str = "hsm";

fn io(path: impl AsRef<Path>, e: Errno) -> BpfError {
    BpfError::pin(path.as_ref(), std::io::Error::from(e))
}

/// Open a directory `name` in `dir` without following a symlink there.
fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn kind(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFREG => "a file",
        SFlag::S_IFLNK => "a symlink",
        _ => "a special file",
    }
}

/// Why `st` (of `what`) cannot be trusted as root's, if it cannot: someone else owns it, or
/// someone else may write to it.
pub(crate) fn distrust(what: &str, st: &FileStat) -> Option<String> {
    let mode = st.st_mode & 0o7777;
    if st.st_uid != 0 {
        Some(format!(
            "{what} is {} owned by uid {} (mode {mode:04o}), not by root",
            kind(st),
            st.st_uid
        ))
    } else if st.st_mode & 0o022 != 0 {
        Some(format!(
            "{what} is {} that users other than root may write to (mode {mode:04o})",
            kind(st)
        ))
    } else {
        None
    }
}

/// The bpffs root, checked to be one.
pub(crate) fn bpffs() -> Result<OwnedFd, BpfError> {
    let fd = nix::fcntl::open(
        BPFFS,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(BPFFS, e))?;
    let fs = nix::sys::statfs::fstatfs(&fd).map_err(|e| io(BPFFS, e))?;
    if fs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        return Err(BpfError::Unsupported(format!(
            "{BPFFS} is not a bpffs mount"
        )));
    }
    Ok(fd)
}

/// A path that reaches `name` inside the directory open as `dir`, whatever happens to the
/// directory's own path meanwhile (the kernel resolves `/proc/self/fd/N` to the open
/// directory itself).
pub(crate) fn via_fd(dir: BorrowedFd<'_>, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

/// The names in an open directory (sorted).
pub(crate) fn names(dir: BorrowedFd<'_>) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .map(|n: OsString| n.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The pin directory, as found.
#[derive(Debug)]
pub(crate) enum Found {
    /// Nothing named [`NAME`] in bpffs.
    Absent,
    /// Something is there that root did not make (or others could have changed): why.
    Untrusted(String),
    /// Root's: the directory and its `links` and `maps` subdirectories (each open, if
    /// present), all owned by root and writable by no one else.
    Trusted(TrustedDir),
}

/// A checked pin directory.
#[derive(Debug)]
pub(crate) struct TrustedDir {
    pub(crate) links: Option<OwnedFd>,
    pub(crate) maps: Option<OwnedFd>,
}

/// A pin inside a trusted subdirectory: the entry's stat says it is a root-owned regular
/// file (what bpffs shows a pinned object as) that no one else may write.
pub(crate) fn pin_entry_ok(dir: BorrowedFd<'_>, name: &str) -> Result<(), String> {
    let st = nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| format!("{name}: {e}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(format!("{name} is {}, not a pinned object", kind(&st)));
    }
    match distrust(name, &st) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Look at what is at `/sys/fs/bpf/hsm` without trusting any of it.
pub(crate) fn inspect(root: BorrowedFd<'_>) -> Found {
    let shown = format!("{BPFFS}/{NAME}");
    let top = match open_dir_at(root, NAME) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Found::Absent,
        Err(_) => {
            // A symlink, a file, a special file: never ours.
            return match nix::sys::stat::fstatat(root, NAME, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => Found::Untrusted(
                    distrust(&shown, &st)
                        .unwrap_or_else(|| format!("{shown} is {}, not a directory", kind(&st))),
                ),
                Err(Errno::ENOENT) => Found::Absent,
                Err(e) => Found::Untrusted(format!("{shown}: {e}")),
            };
        }
    };
    let mut dirs = [None, None];
    match nix::sys::stat::fstat(&top) {
        Ok(st) => {
            if let Some(why) = distrust(&shown, &st) {
                return Found::Untrusted(why);
            }
        }
        Err(e) => return Found::Untrusted(format!("{shown}: {e}")),
    }
    for (slot, sub) in dirs.iter_mut().zip(["links", "maps"]) {
        let what = format!("{shown}/{sub}");
        match open_dir_at(top.as_fd(), sub) {
            Ok(fd) => match nix::sys::stat::fstat(&fd) {
                Ok(st) => match distrust(&what, &st) {
                    Some(why) => return Found::Untrusted(why),
                    None => *slot = Some(fd),
                },
                Err(e) => return Found::Untrusted(format!("{what}: {e}")),
            },
            Err(Errno::ENOENT) => {}
            Err(_) => {
                // Only root can have made anything in a directory that is root's and
                // closed to others; still, a non-directory here is not a guard's.
                return Found::Untrusted(format!("{what} is not a directory"));
            }
        }
    }
    let [links, maps] = dirs;
    Found::Trusted(TrustedDir { links, maps })
}

/// Remove everything at `name` in `dir`, the directory tree included, without following a
/// symlink anywhere (each directory is opened `O_NOFOLLOW` from its parent's descriptor and
/// entries are unlinked relative to it). Returns how many entries went. Entries that keep
/// coming back (a user writing into their own directory meanwhile) make it fail after a
/// few rounds.
pub(crate) fn remove_all_at(
    dir: BorrowedFd<'_>,
    name: &str,
    shown: &Path,
) -> Result<usize, BpfError> {
    fn inner(dir: BorrowedFd<'_>, name: &str, shown: &Path, depth: u32) -> Result<usize, BpfError> {
        let path = shown.join(name);
        match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => return Ok(1),
            Err(Errno::ENOENT) => return Ok(0),
            Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
            Err(e) => return Err(io(&path, e)),
        }
        if depth > 32 {
            return Err(io(&path, Errno::ELOOP));
        }
        let mut removed = 0;
        for _round in 0..8 {
            let sub = match open_dir_at(dir, name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => return Ok(removed),
                Err(e) => return Err(io(&path, e)),
            };
            for entry in names(sub.as_fd()) {
                removed += inner(sub.as_fd(), &entry, &path, depth + 1)?;
            }
            match nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
                Ok(()) => return Ok(removed + 1),
                Err(Errno::ENOENT) => return Ok(removed),
                Err(Errno::ENOTEMPTY) => continue,
                Err(e) => return Err(io(&path, e)),
            }
        }
        Err(io(&path, Errno::ENOTEMPTY))
    }
    inner(dir, name, shown, 0)
}

/// Make a fresh directory `name` in `dir` with mode 0755 whatever the umask, and open it.
/// `EEXIST` is returned as is (the caller picks another name or gives up).
pub(crate) fn make_dir_at(dir: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700))?;
    let fd = open_dir_at(dir, name)?;
    let st = nix::sys::stat::fstat(&fd)?;
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        return Err(Errno::EEXIST);
    }
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o755))?;
    Ok(fd)
}

/// Rename `from` to `to` (both in `dir`) unless `to` exists.
pub(crate) fn rename_noreplace(dir: BorrowedFd<'_>, from: &str, to: &str) -> Result<(), Errno> {
    nix::fcntl::renameat2(dir, from, dir, to, RenameFlags::RENAME_NOREPLACE)
}
