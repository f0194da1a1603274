//! Syscalls `nix` does not wrap (or wraps awkwardly) that the project needs.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{KernelError, Result};

/// `syncfs`: flush the whole filesystem containing `fd` (one journal commit for many files).
pub fn syncfs(fd: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: syncfs takes a valid descriptor and has no memory arguments.
    let rc = unsafe { libc::syncfs(fd.as_raw_fd()) };
    if rc < 0 {
        return Err(KernelError::last("syncfs"));
    }
    Ok(())
}

/// Start writeback of a range without waiting for it (`SYNC_FILE_RANGE_WRITE`), so a later
/// `fdatasync` finds less to do and writeback overlaps the next fetch.
pub fn start_writeback(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
    // SAFETY: sync_file_range takes a valid descriptor and plain integers.
    let rc = unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc < 0 {
        return Err(KernelError::last("sync_file_range"));
    }
    Ok(())
}

/// Raise the soft open-file limit to the hard limit and return the new soft limit. Every
/// event in flight holds a descriptor; if the kernel cannot open one it denies the access.
pub fn raise_nofile_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)
        .map_err(|e| KernelError::from_errno("getrlimit(RLIMIT_NOFILE)", e))?;
    // Root may go past the hard limit, up to fs.nr_open: event fds, cached stubs and the
    // fd numbers held across a restart all count against it.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .min(1 << 20);
    if ceiling > hard && setrlimit(Resource::RLIMIT_NOFILE, ceiling, ceiling).is_ok() {
        return Ok(ceiling);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| KernelError::from_errno("setrlimit(RLIMIT_NOFILE)", e))?;
    Ok(hard)
}

/// Grow this process's descriptor table now so it holds at least `slots` descriptors.
///
/// The kernel grows the table by doubling (256, 512, 1024, ...) when a new descriptor does
/// not fit, and in a process with several threads every growth waits for an RCU grace
/// period before it returns: 8-32 ms here (docs/KERNEL.md, "Descriptor table growth").
/// An agent that opens one descriptor per cached stub would pay that on its event
/// threads, with a reader waiting, each time the cache doubles. Duplicating a descriptor
/// to number `slots - 1` and closing it pays the growth once, up front; the table never
/// shrinks. Returns the table size the kernel reports afterwards (`FDSize`).
pub fn presize_fd_table(slots: u32) -> Result<u64> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let anchor = std::fs::File::open("/dev/null").map_err(|source| KernelError::Sys {
        op: "open /dev/null".into(),
        source,
    })?;
    let top = slots.saturating_sub(1).min(i32::MAX as u32) as libc::c_int;
    // SAFETY: F_DUPFD_CLOEXEC takes a valid descriptor and an integer; it returns a new
    // descriptor (owned below) or -1.
    let dup = unsafe { libc::fcntl(anchor.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) };
    if dup < 0 {
        return Err(KernelError::last("fcntl(F_DUPFD_CLOEXEC)"));
    }
    // SAFETY: `dup` was just returned by fcntl and nothing else owns it.
    drop(unsafe { OwnedFd::from_raw_fd(dup) });
    fd_table_size().ok_or_else(|| KernelError::Sys {
        op: "read FDSize in /proc/self/status".into(),
        source: std::io::Error::other("no FDSize line"),
    })
}

/// The size of this process's descriptor table (`FDSize` in /proc/self/status).
pub fn fd_table_size() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// The running kernel's release as (major, minor), from `uname`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let uts = nix::sys::utsname::uname().ok()?;
    parse_release(&uts.release().to_string_lossy())
}

/// Parse "6.18.44-fc-v657" into (6, 18).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_releases() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("7.3.0-1-cloud-amd64"), Some((7, 3)));
        assert_eq!(parse_release("garbage"), None);
        assert!(kernel_version().is_some());
    }

    #[test]
    fn presizing_grows_the_descriptor_table_once() {
        let before = fd_table_size().expect("FDSize in /proc/self/status");
        let want = (before * 4).max(4096) as u32;
        let after = presize_fd_table(want).expect("presize");
        assert!(
            after >= want as u64,
            "FDSize {after} after asking for {want}"
        );
        assert_eq!(fd_table_size(), Some(after));
        // The descriptor used to grow it is gone: the next open gets a low number again.
        let f = std::fs::File::open("/dev/null").expect("open");
        assert!(
            (f.as_raw_fd() as u64) < before,
            "fd {} after presizing",
            f.as_raw_fd()
        );
    }
}

/// A process's start time in clock ticks (field 22 of /proc/PID/stat), and whether it is a
/// zombie (exited, not yet reaped). Together with the pid, the start time names one process:
/// a reused pid has another.
pub fn process_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let zombie = fields.next()? == "Z";
    // After the state (field 3), the start time is field 22: 18 fields further.
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((ticks, zombie))
}

/// Is the process `pid` that started at `start_ticks` still running (and not a zombie)?
pub fn process_alive(pid: u32, start_ticks: u64) -> bool {
    pid != 0 && process_start(pid) == Some((start_ticks, false))
}

/// One mounted filesystem, from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount id (as `name_to_handle_at` reports it).
    pub id: i32,
    /// "major:minor" of the filesystem.
    pub dev: String,
    pub point: std::path::PathBuf,
    pub fstype: String,
}

/// Every mount this process sees, in mountinfo order.
pub fn mounts() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(parse_mountinfo_line)
        .collect()
}

fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-")?;
    Some(Mount {
        id: fields.first()?.parse().ok()?,
        dev: fields.get(2)?.to_string(),
        point: std::path::PathBuf::from(unescape_mountinfo(fields.get(4)?)),
        fstype: fields.get(sep + 1)?.to_string(),
    })
}

/// Undo mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod proc_tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_pid_0_is_not() {
        let me = std::process::id();
        let (ticks, zombie) = process_start(me).expect("our own stat");
        assert!(!zombie);
        assert!(process_alive(me, ticks));
        assert!(!process_alive(me, ticks + 1));
        assert!(!process_alive(0, 0));
    }

    #[test]
    fn mountinfo_lines_and_escapes() {
        let m = parse_mountinfo_line(
            "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw",
        )
        .expect("parses");
        assert_eq!(m.id, 36);
        assert_eq!(m.dev, "98:0");
        assert_eq!(m.point, std::path::Path::new("/mnt/a b"));
        assert_eq!(m.fstype, "ext3");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
        assert!(
            mounts()
                .iter()
                .any(|m| m.point == std::path::Path::new("/"))
        );
    }
}

/// Take a write lease on `fd` (`F_SETLEASE F_WRLCK`): granted only while no other open
/// file description of the inode exists (not open elsewhere, not mapped, not executing);
/// while held, any other open of the inode waits (up to `/proc/sys/fs/lease-break-time`)
/// until [`release_lease`] or the descriptor is closed. `Ok(false)` when the inode is in
/// use (EAGAIN, or ETXTBSY for a file being executed). The kernel signals a break with
/// SIGIO to the holder: the holder must ignore SIGIO ([`ignore_sigio`]) or it is killed.
pub fn write_lease(fd: BorrowedFd<'_>) -> Result<bool> {
    // SAFETY: plain fcntl on a valid descriptor.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if rc < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        if matches!(
            errno,
            Some(libc::EAGAIN) | Some(libc::ETXTBSY) | Some(libc::EBUSY)
        ) {
            return Ok(false);
        }
        return Err(KernelError::last("fcntl(F_SETLEASE, F_WRLCK)"));
    }
    Ok(true)
}

/// Is a write lease taken with [`write_lease`] still held, unbroken? (`F_GETLEASE`: a
/// lease being broken by another open reports the type it is being downgraded to.)
pub fn lease_held(fd: BorrowedFd<'_>) -> Result<bool> {
    // SAFETY: plain fcntl on a valid descriptor.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETLEASE) };
    if rc < 0 {
        return Err(KernelError::last("fcntl(F_GETLEASE)"));
    }
    Ok(rc == libc::F_WRLCK)
}

/// Give up a lease taken with [`write_lease`].
pub fn release_lease(fd: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: plain fcntl on a valid descriptor.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    if rc < 0 {
        return Err(KernelError::last("fcntl(F_SETLEASE, F_UNLCK)"));
    }
    Ok(())
}

/// Ignore SIGIO for the whole process: lease breaks then wait for the holder instead of
/// killing it (SIGIO's default action is to terminate).
pub fn ignore_sigio() -> Result<()> {
    // SAFETY: setting a signal disposition to SIG_IGN installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGIO,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map_err(|e| KernelError::from_errno("signal(SIGIO, SIG_IGN)", e))?;
    Ok(())
}

/// Give back the blocks of `len` bytes at `offset` (`FALLOC_FL_PUNCH_HOLE`, keeping the
/// size): they read as zeros until written again, and their page cache is dropped.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
    nix::fcntl::fallocate(
        fd,
        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(|e| KernelError::from_errno("fallocate(PUNCH_HOLE)", e))
}

/// Bytes `range` of `file` read with `pread`, fewer where the file ends first (the caller
/// checks the length); interrupted reads are retried.
pub fn read_at_most(file: &std::fs::File, range: std::ops::Range<u64>) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(range.end.saturating_sub(range.start))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], range.start + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}
