//! Mounts: the agent's private writable mount of each served filesystem, and whether the
//! mount an event's descriptor was opened through is one the accessing process can see.
//!
//! Why (docs/KERNEL.md, "Paths to a file"): event descriptors are opened on the mount the
//! reader used, which may be read-only (a read-only bind mount) or a private clone that
//! overlayfs made of a lower layer. Fills therefore go through the agent's own clone of
//! the tree's mount, made writable here and excluded from events by a mount ignore mark
//! (`Group::ignore_mount`). And overlayfs maps lower files without raising a pre-content
//! event, so an open through a mount no process can see (overlayfs's private clone) is
//! the signal to fetch the whole file before the open proceeds.

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{KernelError, Result};

/// `OPEN_TREE_CLONE` (include/uapi/linux/mount.h): a detached copy of the mount.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `MOUNT_ATTR_RDONLY` (include/uapi/linux/mount.h).
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
/// `STATX_MNT_ID` (include/uapi/linux/stat.h, Linux 5.8): the mount id of /proc/PID/mountinfo.
pub(crate) const STATX_MNT_ID: u32 = 0x0000_1000;
/// `STATX_MNT_ID_UNIQUE` (Linux 6.8): a mount id that is never reused.
pub(crate) const STATX_MNT_ID_UNIQUE: u32 = 0x0000_4000;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached, writable clone of the mount holding a served tree, rooted at the tree.
///
/// Files reopened by handle through [`PrivateMount::dir`] are written without depending on
/// the mount the reader used. The clone lives as long as this value (closing the
/// `open_tree` descriptor dissolves it).
#[derive(Debug)]
pub struct PrivateMount {
    /// The `open_tree` descriptor (O_PATH): owns the detached mount.
    _tree: OwnedFd,
    /// A directory descriptor on the clone: `open_by_handle_at` and `fanotify_mark` refuse
    /// O_PATH descriptors with EBADF.
    dir: OwnedFd,
    /// The tree's path as the agent was given it (for log lines).
    path: PathBuf,
    /// The clone's unique mount id.
    unique_id: u64,
}

impl PrivateMount {
    /// Clone the mount at `path` (needs CAP_SYS_ADMIN) and make the clone writable, so a
    /// read-only bind mount or remount of the visible tree does not stop fills. A read-only
    /// superblock stays read-only: [`PrivateMount::writable`] says so.
    pub fn clone_of(path: &Path) -> Result<Self> {
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| KernelError::Sys {
            op: format!("open_tree {}", path.display()),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: open_tree takes a dirfd, a NUL-terminated path that outlives the call and
        // integer flags; it returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                cpath.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(KernelError::last(format!("open_tree {}", path.display())));
        }
        // SAFETY: open_tree returned a fresh descriptor that nothing else owns.
        let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let attr = MountAttr {
            attr_set: 0,
            attr_clr: MOUNT_ATTR_RDONLY,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: tree is a valid descriptor; the empty path with AT_EMPTY_PATH names it;
        // attr is a live repr(C) struct of the size passed, read by the kernel only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &raw const attr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last(format!(
                "mount_setattr (read-write) on the clone of {}",
                path.display()
            )));
        }
        let dir = nix::fcntl::openat(
            tree.as_fd(),
            c".",
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| KernelError::from_errno(format!("open clone of {}", path.display()), e))?;
        let (unique_id, _) = mount_ids(dir.as_fd())?;
        Ok(PrivateMount {
            _tree: tree,
            dir,
            path: path.to_path_buf(),
            unique_id,
        })
    }

    /// A directory descriptor on the clone (for `open_by_handle_at` and mount marks).
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The tree this clone was made of.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The clone's unique mount id.
    pub fn unique_id(&self) -> u64 {
        self.unique_id
    }

    /// Whether the superblock takes writes (a read-only superblock cannot be filled).
    pub fn writable(&self) -> bool {
        nix::sys::statvfs::fstatvfs(self.dir.as_fd())
            .map(|s| !s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
            .unwrap_or(false)
    }
}

pub(crate) fn statx_mnt(fd: BorrowedFd<'_>, mask: u32) -> Result<(u64, bool)> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: fd is valid; the empty path with AT_EMPTY_PATH names it; sx is a live
    // out-struct for the whole call.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            mask,
            &raw mut sx,
        )
    };
    if rc < 0 {
        return Err(KernelError::last("statx (mount id)"));
    }
    Ok((sx.stx_mnt_id, sx.stx_mask & mask != 0))
}

/// The mount an open descriptor was reached through: its unique id (never reused; 0 on a
/// kernel older than 6.8) and its id as /proc/PID/mountinfo lists it.
pub fn mount_ids(fd: BorrowedFd<'_>) -> Result<(u64, i32)> {
    let (legacy, _) = statx_mnt(fd, STATX_MNT_ID)?;
    let unique = match statx_mnt(fd, STATX_MNT_ID_UNIQUE)? {
        (id, true) => id,
        (_, false) => 0,
    };
    Ok((unique, legacy as i32))
}

/// Whether mount `mnt_id` is in the mount namespace of thread `tid` (its
/// /proc/TID/mountinfo lists it). Overlayfs reaches its layers through private clones that
/// no namespace lists. `Err` when the thread is gone.
pub fn visible_to(tid: i32, mnt_id: i32) -> Result<bool> {
    let path = format!("/proc/{tid}/mountinfo");
    let f = std::fs::File::open(&path).map_err(|e| KernelError::Sys {
        op: format!("open {path}"),
        source: e,
    })?;
    let mut line = Vec::with_capacity(256);
    let mut r = BufReader::new(f);
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(|e| KernelError::Sys {
                op: format!("read {path}"),
                source: e,
            })?;
        if n == 0 {
            return Ok(false);
        }
        let id = line
            .split(|&b| b == b' ')
            .next()
            .and_then(|f| std::str::from_utf8(f).ok())
            .and_then(|f| f.parse::<i32>().ok());
        if id == Some(mnt_id) {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_root_mount_is_visible() {
        let root = std::fs::File::open("/").expect("open /");
        let (_, id) = mount_ids(root.as_fd()).expect("mount ids");
        assert!(visible_to(crate::sys::gettid(), id).expect("mountinfo"));
        assert!(!visible_to(crate::sys::gettid(), -7).expect("mountinfo"));
    }

    #[test]
    fn clone_is_not_visible_and_is_writable() {
        if !nix::unistd::geteuid().is_root() {
            panic!("this test needs root (open_tree(OPEN_TREE_CLONE) needs CAP_SYS_ADMIN)");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let m = PrivateMount::clone_of(dir.path()).expect("clone");
        let (unique, id) = mount_ids(m.dir()).expect("ids");
        assert_eq!(unique, m.unique_id());
        assert!(!visible_to(crate::sys::gettid(), id).expect("mountinfo"));
        assert!(m.writable());
        let f = nix::fcntl::openat(
            m.dir(),
            c"x",
            nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("create through the clone");
        drop(f);
        assert!(dir.path().join("x").exists());
    }
}
