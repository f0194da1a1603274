//! `statx` on descriptors and directory entries.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{KernelError, Result};

/// A timestamp as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

impl Timestamp {
    fn from_statx(t: &libc::statx_timestamp) -> Self {
        Timestamp {
            sec: t.tv_sec,
            nsec: t.tv_nsec,
        }
    }

    /// As a `timespec` for `utimensat`/`futimens`.
    pub fn to_timespec(self) -> nix::sys::time::TimeSpec {
        nix::sys::time::TimeSpec::new(self.sec, self.nsec as _)
    }
}

/// What the project needs from `statx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Device number of the filesystem (`makedev(dev_major, dev_minor)`).
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Birth time, where the filesystem records it: together with `dev` and `ino` it tells a
    /// reused inode number from the inode we knew.
    pub btime: Option<Timestamp>,
    /// Whether the path is the root of a mount (`STATX_ATTR_MOUNT_ROOT`), if known.
    pub mount_root: Option<bool>,
}

impl FileStat {
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
}

const MASK: u32 = libc::STATX_BASIC_STATS | libc::STATX_BTIME;

fn convert(sx: &libc::statx) -> FileStat {
    let btime =
        (sx.stx_mask & libc::STATX_BTIME != 0).then(|| Timestamp::from_statx(&sx.stx_btime));
    let mount_root = (sx.stx_attributes_mask & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0)
        .then_some(sx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64 != 0);
    FileStat {
        dev: libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
        ino: sx.stx_ino,
        mode: u32::from(sx.stx_mode),
        nlink: sx.stx_nlink,
        uid: sx.stx_uid,
        gid: sx.stx_gid,
        size: sx.stx_size,
        blocks: sx.stx_blocks,
        atime: Timestamp::from_statx(&sx.stx_atime),
        mtime: Timestamp::from_statx(&sx.stx_mtime),
        ctime: Timestamp::from_statx(&sx.stx_ctime),
        btime,
        mount_root,
    }
}

fn statx_raw(
    dirfd: i32,
    name: &CStr,
    flags: i32,
    what: impl FnOnce() -> String,
) -> Result<FileStat> {
    let mut sx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: sx points to writable memory of the right size; name is NUL-terminated.
    let rc = unsafe { libc::statx(dirfd, name.as_ptr(), flags, MASK, sx.as_mut_ptr()) };
    if rc < 0 {
        return Err(KernelError::last(what()));
    }
    // SAFETY: statx succeeded and filled the struct (it was zeroed before, so any field the
    // kernel skipped is a valid zero).
    let sx = unsafe { sx.assume_init() };
    Ok(convert(&sx))
}

/// `statx` of an open descriptor.
pub fn fstatx(fd: BorrowedFd<'_>) -> Result<FileStat> {
    statx_raw(
        fd.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_STATX_SYNC_AS_STAT,
        || format!("statx fd {}", fd.as_raw_fd()),
    )
}

/// `statx` of `name` relative to `dir`, not following a final symlink.
pub fn statx_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<FileStat> {
    statx_raw(
        dir.as_raw_fd(),
        name,
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT,
        || format!("statx {}", name.to_string_lossy()),
    )
}

/// Set the access and modification times of whatever `fd` refers to, `O_PATH`
/// descriptors of symbolic links included (`utimensat(fd, "", AT_EMPTY_PATH)`; `futimens`
/// refuses `O_PATH`). Acting on a descriptor, it cannot be redirected by a rename.
pub fn set_times_fd(fd: BorrowedFd<'_>, atime: Timestamp, mtime: Timestamp) -> Result<()> {
    let times: [libc::timespec; 2] = [*atime.to_timespec().as_ref(), *mtime.to_timespec().as_ref()];
    // SAFETY: an empty NUL-terminated path and an array of two timespecs, as utimensat
    // expects; with AT_EMPTY_PATH it acts on `fd` itself.
    let rc = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(KernelError::last(format!(
            "utimensat fd {}",
            fd.as_raw_fd()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn fstatx_reports_size_and_type() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(b"hello").expect("write");
        let st = fstatx(f.as_fd()).expect("statx");
        assert_eq!(st.size, 5);
        assert!(st.is_file());
        let dir = std::fs::File::open("/").expect("open /");
        let st = statx_at(dir.as_fd(), c".").expect("statx /");
        assert!(st.is_dir());
    }
}
