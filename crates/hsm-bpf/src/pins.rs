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
/// An install pins into `hsm-installing-PID-N` in [`BPFFS`] and renames it to [`NAME`].
pub(crate) const STAGING_PREFIX: &str = "hsm-installing-";

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

/// Why something in the pin directory is not the guard's own: what `hsm guard status`
/// and `hsm doctor` report, and why an install replaces it. `what` names it (`/sys/fs/bpf/hsm`,
/// `links/NAME`, ...).
#[derive(Debug, thiserror::Error)]
pub enum PinProblem {
    #[error("{what} is {kind} owned by uid {uid} (mode {mode:04o}), not by root")]
    NotRoots {
        what: String,
        kind: &'static str,
        uid: u32,
        mode: u32,
    },
    #[error("{what} is {kind} that users other than root may write to (mode {mode:04o})")]
    OthersMayWrite {
        what: String,
        kind: &'static str,
        mode: u32,
    },
    /// Where a directory belongs.
    #[error("{what} is {kind}, not a directory")]
    NotDirectory { what: String, kind: &'static str },
    /// Where a pinned object belongs (bpffs shows one as a regular file).
    #[error("{what} is {kind}, not a pinned object")]
    NotPinnedObject { what: String, kind: &'static str },
    #[error("{what}: {source}")]
    Stat {
        what: String,
        #[source]
        source: Errno,
    },
    #[error("{what} cannot be opened as a BPF {expected}: {source}")]
    NotOpenable {
        what: String,
        expected: &'static str,
        #[source]
        source: libbpf_rs::Error,
    },
    /// `link_type` is what fdinfo says (none: not a link at all).
    #[error("{what} is not a BPF LSM link ({})", match link_type {
        Some(t) => format!("a link of type {t}"),
        None => "not a link at all".to_string(),
    })]
    NotLsmLink {
        what: String,
        link_type: Option<String>,
    },
    #[error("{what} names no program")]
    NoProgram { what: String },
    #[error("{what} attaches program {prog:?} of type {ty}, not the guard's LSM program {name}")]
    WrongProgram {
        what: String,
        prog: String,
        ty: String,
        name: String,
    },
    #[error("{what} attaches program {id}, which cannot be read")]
    UnreadableProgram { what: String, id: u32 },
    #[error("{what} is not a BPF map")]
    NotMap { what: String },
    #[error("{what} is the map {got:?}, not the guard's {name}")]
    WrongMap {
        what: String,
        got: String,
        name: String,
    },
}

/// Why `st` (of `what`) cannot be trusted as root's, if it cannot: someone else owns it, or
/// someone else may write to it.
pub(crate) fn distrust(what: &str, st: &FileStat) -> Option<PinProblem> {
    let mode = st.st_mode & 0o7777;
    if st.st_uid != 0 {
        Some(PinProblem::NotRoots {
            what: what.to_string(),
            kind: kind(st),
            uid: st.st_uid,
            mode,
        })
    } else if st.st_mode & 0o022 != 0 {
        Some(PinProblem::OthersMayWrite {
            what: what.to_string(),
            kind: kind(st),
            mode,
        })
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
    Untrusted(PinProblem),
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
/// file (what bpffs shows a pinned object as) that no one else may write. `what` names it
/// in the problem.
pub(crate) fn pin_entry_ok(dir: BorrowedFd<'_>, name: &str, what: &str) -> Result<(), PinProblem> {
    let st =
        nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|source| {
            PinProblem::Stat {
                what: what.to_string(),
                source,
            }
        })?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(PinProblem::NotPinnedObject {
            what: what.to_string(),
            kind: kind(&st),
        });
    }
    match distrust(what, &st) {
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
                Ok(st) => Found::Untrusted(distrust(&shown, &st).unwrap_or_else(|| {
                    PinProblem::NotDirectory {
                        what: shown.clone(),
                        kind: kind(&st),
                    }
                })),
                Err(Errno::ENOENT) => Found::Absent,
                Err(source) => Found::Untrusted(PinProblem::Stat {
                    what: shown,
                    source,
                }),
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
        Err(source) => {
            return Found::Untrusted(PinProblem::Stat {
                what: shown,
                source,
            });
        }
    }
    for (slot, sub) in dirs.iter_mut().zip(["links", "maps"]) {
        let what = format!("{shown}/{sub}");
        match open_dir_at(top.as_fd(), sub) {
            Ok(fd) => match nix::sys::stat::fstat(&fd) {
                Ok(st) => match distrust(&what, &st) {
                    Some(why) => return Found::Untrusted(why),
                    None => *slot = Some(fd),
                },
                Err(source) => return Found::Untrusted(PinProblem::Stat { what, source }),
            },
            Err(Errno::ENOENT) => {}
            Err(_) => {
                // Only root can have made anything in a directory that is root's and
                // closed to others; still, a non-directory here is not a guard's.
                let kind = nix::sys::stat::fstatat(top.as_fd(), sub, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map(|st| kind(&st))
                    .unwrap_or("something else");
                return Found::Untrusted(PinProblem::NotDirectory { what, kind });
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

/// Remove the staging directories of installs whose process is gone: one that crashed
/// between pinning and the rename left its directory, whose link pins keep the guard's
/// programs attached with nothing to find them by. Only directories root made and no one
/// else may write (another user's are not ours to judge), never following a link; a
/// directory whose pid is alive (an install running now, or a reused pid) stays. Returns
/// the paths removed.
pub(crate) fn sweep_stale_staging(root: BorrowedFd<'_>) -> Result<Vec<String>, BpfError> {
    let mut removed = Vec::new();
    for name in names(root) {
        let Some(pid) = name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 0
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) != Err(Errno::ESRCH)
        {
            continue;
        }
        let Ok(st) = nix::sys::stat::fstatat(root, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        let is_dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
        if !is_dir || distrust(&name, &st).is_some() {
            continue;
        }
        remove_all_at(root, &name, Path::new(BPFFS))?;
        removed.push(format!("{BPFFS}/{name}"));
    }
    Ok(removed)
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
