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
}
