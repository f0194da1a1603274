//! Data markers: the page of zeros at the start of every granule a stub still has to fetch.
//!
//! `lseek(SEEK_DATA)` raises no pre-content event, so copiers that skip holes (coreutils
//! `cp`, `tar --sparse`, `qemu-img`) would copy a stub's unfetched ranges as zeros. A
//! written block at the start of each such granule makes `SEEK_DATA` stop there; the read
//! that follows fetches the granule (docs/SEMANTICS.md, "Copying stubs").
//!
//! Written naively every marker is a 4 KiB block of its own. Where the filesystem can share
//! blocks between files (`FICLONERANGE`: xfs with reflink, btrfs) every marker of one
//! length is instead a clone of one block, held by a private unnamed *template* file, so a
//! tree of many small stubs costs little more than its inodes (docs/KERNEL.md, "Shared
//! data markers"). Where it cannot (ext4, a template on another mount, an old xfs without
//! reflink), the marker is written as before. Either way the file ends up with the same
//! bytes (zeros) and the same `SEEK_DATA` answers.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// The length of one data marker: a page (and a block on every filesystem we serve).
pub const MARKER_LEN: u64 = 4096;

const ZEROS: [u8; MARKER_LEN as usize] = [0u8; MARKER_LEN as usize];

/// `FICLONERANGE`, `_IOW(0x94, 13, struct file_clone_range)` (include/uapi/linux/fs.h);
/// `libc` does not define it.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

/// `struct file_clone_range` (include/uapi/linux/fs.h).
#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// Share `len` bytes of `src` at `src_offset` into `dst` at `dst_offset` (`FICLONERANGE`).
/// Both descriptors must be on the same mount; offsets block-aligned, and `len` too unless
/// the range ends at `src`'s end of file.
pub fn clone_range(
    src: BorrowedFd<'_>,
    src_offset: u64,
    len: u64,
    dst: BorrowedFd<'_>,
    dst_offset: u64,
) -> Result<(), Errno> {
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: dst is a live descriptor; arg is a repr(C) struct of the layout the ioctl
    // number encodes, alive for the call and only read by the kernel.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONERANGE as _, &raw const arg) };
    Errno::result(rc).map(drop)
}

/// How a call to [`MarkerPages::write`] placed its markers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Markers that share a template's block.
    pub shared: u64,
    /// Markers written as blocks of their own.
    pub written: u64,
}

/// Where the template for markers of one length lives.
#[derive(Debug)]
enum Template {
    /// An unnamed file of exactly that length, all zeros on disk.
    File(OwnedFd),
    /// This filesystem (or mount) cannot share blocks: write.
    Unsupported,
}

/// Writes data markers, sharing one block per marker length and mount where it can.
///
/// A template holds its block only while it is open: the stubs that share the block keep
/// it after the template is closed, and a template no stub shares frees it. So the blocks
/// a whole populate run adds for its markers are at most one per distinct marker length,
/// never more than writing each marker would.
#[derive(Debug)]
pub struct MarkerPages {
    state: Mutex<State>,
    /// At most this many templates are kept (each one descriptor, and one block while no
    /// stub shares it); a marker of a length past them is written.
    limit: usize,
    /// The files are not visible to anyone yet (populate's unnamed files): their size may
    /// change for a moment.
    unnamed: bool,
}

#[derive(Debug, Default)]
struct State {
    /// (mount, marker length) → its template.
    templates: HashMap<(u64, usize), Template>,
    /// mount → whether its filesystem is btrfs.
    btrfs: HashMap<u64, bool>,
}

impl MarkerPages {
    /// For unnamed files that nothing else can open yet, many of them (populate): up to one
    /// template per marker length (4,096 of them on one mount) as far as a quarter of the
    /// open-file limit allows. Small files come in all lengths below 4 KiB. On btrfs one
    /// full block serves them all: it is cloned whole (the file grows for a moment) and the
    /// file cut back to its size, and the block stays shared. On xfs the cut copies the
    /// block, so each length needs a template of its own (docs/KERNEL.md, "Shared data
    /// markers").
    pub fn for_unnamed_files() -> Self {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        MarkerPages {
            state: Mutex::new(State::default()),
            limit: (soft / 4).min(2 * MARKER_LEN) as usize,
            unnamed: true,
        }
    }

    /// For files others may see (the agent's evictions): the size never changes, and at
    /// most `limit` templates are kept, since a long-lived process would hold their
    /// descriptors (and blocks) for its whole life.
    pub fn for_visible_files(limit: usize) -> Self {
        MarkerPages {
            state: Mutex::new(State::default()),
            limit,
            unnamed: false,
        }
    }

    /// Put a marker of `min(MARKER_LEN, size - at)` zero bytes at each offset in `at` of
    /// `fd` (a file of `size` bytes whose blocks there are holes or may be overwritten).
    /// `dir` is a directory on the same mount as `fd`, where a template may be created as
    /// an unnamed file (`O_TMPFILE`: it never has a name, so nothing else opens it, and an
    /// agent allows events on it without serving it). Errors are the writes' only: a clone
    /// that fails falls back to writing.
    pub fn write(
        &self,
        dir: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
        size: u64,
        at: impl IntoIterator<Item = u64>,
    ) -> Result<Placed, Errno> {
        let mut placed = Placed::default();
        let mount = mount_key(dir);
        for at in at {
            if at >= size {
                continue;
            }
            let len = (size - at).min(MARKER_LEN) as usize;
            if let Some(mount) = mount {
                if self.share(mount, dir, len, fd, at, size)? {
                    placed.shared += 1;
                    continue;
                }
            }
            write_all_at(fd, &ZEROS[..len], at)?;
            placed.written += 1;
        }
        Ok(placed)
    }

    /// Clone the template for `len` on `mount` into `fd` (of `size` bytes) at `at`; false
    /// if it cannot be.
    fn share(
        &self,
        mount: u64,
        dir: BorrowedFd<'_>,
        len: usize,
        fd: BorrowedFd<'_>,
        at: u64,
        size: u64,
    ) -> Result<bool, Errno> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let btrfs = *st.btrfs.entry(mount).or_insert_with(|| is_btrfs(dir));
        // A short tail on btrfs: the whole block, then cut back (see for_unnamed_files).
        let whole = self.unnamed && btrfs && len < MARKER_LEN as usize;
        let tlen = if whole { MARKER_LEN as usize } else { len };
        if !st.templates.contains_key(&(mount, tlen)) {
            if st.templates.len() >= self.limit {
                return Ok(false);
            }
            let made = make_template(dir, tlen).map_or(Template::Unsupported, Template::File);
            st.templates.insert((mount, tlen), made);
        }
        let Some(Template::File(src)) = st.templates.get(&(mount, tlen)) else {
            return Ok(false);
        };
        match clone_range(src.as_fd(), 0, tlen as u64, fd, at) {
            Ok(()) if whole => {
                // Back to its size: a failure here leaves the file the wrong size, so it is
                // the caller's error, not a reason to write instead.
                nix::unistd::ftruncate(fd, size as libc::off_t)?;
                Ok(true)
            }
            Ok(()) => Ok(true),
            // No reflink on this filesystem or mount: stop trying for this length there.
            Err(Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL | Errno::ENOTTY) => {
                st.templates.insert((mount, tlen), Template::Unsupported);
                Ok(false)
            }
            // Anything else (ENOSPC, say) is this file's: write its marker instead.
            Err(_) => Ok(false),
        }
    }
}

fn is_btrfs(dir: BorrowedFd<'_>) -> bool {
    nix::sys::statfs::fstatfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC)
}

/// The mount `dir` is on (clones must stay on one filesystem, and a mount that refuses them
/// is remembered as such), if it can be read: one statx per call on a kernel with unique
/// mount ids (6.8 and later), the legacy id otherwise.
fn mount_key(dir: BorrowedFd<'_>) -> Option<u64> {
    use crate::mounts::{STATX_MNT_ID, STATX_MNT_ID_UNIQUE, statx_mnt};
    match statx_mnt(dir, STATX_MNT_ID_UNIQUE) {
        Ok((unique, true)) => Some(unique),
        Ok(_) => statx_mnt(dir, STATX_MNT_ID)
            .ok()
            .map(|(legacy, _)| legacy | (1 << 63)),
        Err(_) => None,
    }
}

/// An unnamed file of `len` zero bytes, written and on disk (a clone shares only blocks
/// the filesystem has allocated; btrfs and xfs flush a range before they clone it).
fn make_template(dir: BorrowedFd<'_>, len: usize) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(
        dir,
        c".",
        OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )?;
    write_all_at(fd.as_fd(), &ZEROS[..len], 0)?;
    Ok(fd)
}

fn write_all_at(fd: BorrowedFd<'_>, mut buf: &[u8], mut at: u64) -> Result<(), Errno> {
    while !buf.is_empty() {
        let n = nix::sys::uio::pwrite(fd, buf, at as libc::off_t)?;
        if n == 0 {
            return Err(Errno::EIO);
        }
        buf = &buf[n..];
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> std::fs::File {
        let d = std::env::temp_dir();
        std::fs::File::open(d).expect("open the temp dir")
    }

    /// An unnamed file of `size` bytes, all holes, in `dir`.
    fn sized(dir: &std::fs::File, size: u64) -> OwnedFd {
        let f = nix::fcntl::openat(
            dir.as_fd(),
            c".",
            OFlag::O_TMPFILE | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        )
        .expect("O_TMPFILE");
        nix::unistd::ftruncate(&f, size as i64).expect("ftruncate");
        f
    }

    fn data_at(fd: BorrowedFd<'_>, at: u64) -> Option<u64> {
        nix::unistd::lseek(fd, at as i64, nix::unistd::Whence::SeekData)
            .ok()
            .map(|o| o as u64)
    }

    #[test]
    fn markers_read_as_zeros_and_stop_seek_data() {
        let dir = tmpdir();
        let pages = MarkerPages::for_unnamed_files();
        for size in [1u64, 100, 4095, 4096, 4097, 3 << 20] {
            let f = sized(&dir, size);
            let at: Vec<u64> = (0..size).step_by(1 << 20).collect();
            let placed = pages
                .write(dir.as_fd(), f.as_fd(), size, at.clone())
                .expect("ok");
            assert_eq!(
                placed.shared + placed.written,
                at.len() as u64,
                "size {size}"
            );
            // Still the same size, every byte zero, and data where each marker is.
            let st = crate::stat::fstatx(f.as_fd()).expect("ok");
            assert_eq!(st.size, size);
            let mut buf = vec![1u8; size as usize];
            nix::sys::uio::pread(&f, &mut buf, 0).expect("ok");
            assert!(buf.iter().all(|&b| b == 0), "size {size}");
            for a in at {
                assert_eq!(data_at(f.as_fd(), a), Some(a), "size {size} at {a}");
            }
        }
    }

    #[test]
    fn offsets_at_or_past_the_end_are_skipped() {
        let dir = tmpdir();
        let f = sized(&dir, 10);
        let placed = MarkerPages::for_visible_files(4)
            .write(dir.as_fd(), f.as_fd(), 10, [10, 4096])
            .expect("ok");
        assert_eq!(placed, Placed::default());
        assert_eq!(crate::stat::fstatx(f.as_fd()).expect("statx").size, 10);
    }
}
