//! Read-only private file mappings.
//!
//! The exact flags matter: the kernel raises the fanotify pre-content event
//! at mmap time for the mapped range, and the reference harness maps with
//! `PROT_READ | PROT_EXEC` and `MAP_PRIVATE`.
//!
//! * `--no-exec` (`PROT_READ`, `MAP_PRIVATE`): memmap2's
//!   `MmapOptions::map_copy_read_only` produces exactly these flags.
//! * default (`PROT_READ | PROT_EXEC`, `MAP_PRIVATE`): memmap2 cannot do this
//!   at mmap time (`map_exec` is `MAP_SHARED`; `map_copy` + `make_exec` maps
//!   `PROT_READ | PROT_WRITE` first and `mprotect`s afterwards), so
//!   [`ExecMapping`] calls `libc::mmap` directly.
//!
//! Like any file mapping, the bytes may change underneath us if the file is
//! modified concurrently, and an I/O error while faulting a page in is
//! delivered as SIGBUS (which kills the process); both are accepted for a
//! test tool that only reads plain `u8`s.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A whole-file read-only private mapping, made with or without `PROT_EXEC`.
#[derive(Debug)]
pub enum Mapping {
    Exec(ExecMapping),
    NoExec(memmap2::Mmap),
}

impl Mapping {
    /// Maps the first `len` bytes of `file` (`len` must be non-zero).
    pub fn new(file: &File, len: usize, exec: bool) -> io::Result<Self> {
        if exec {
            ExecMapping::new(file, len).map(Self::Exec)
        } else {
            let mut opts = memmap2::MmapOptions::new();
            opts.len(len);
            // SAFETY: the mapping is private and only read as plain bytes (any
            // bit pattern is a valid u8); concurrent modification of the file
            // can change what we read but that is exactly what we are testing.
            let map = unsafe { opts.map_copy_read_only(file) }?;
            Ok(Self::NoExec(map))
        }
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Self::Exec(m) => m.as_slice(),
            Self::NoExec(m) => m,
        }
    }

    /// Human-readable mmap flags, for messages.
    pub fn describe(exec: bool) -> &'static str {
        if exec {
            "PROT_READ|PROT_EXEC, MAP_PRIVATE"
        } else {
            "PROT_READ, MAP_PRIVATE"
        }
    }
}

/// `mmap(NULL, len, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0)`, unmapped on drop.
#[derive(Debug)]
pub struct ExecMapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl ExecMapping {
    fn new(file: &File, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: we ask the kernel for a fresh mapping at an address of its
        // choosing (NULL hint, no MAP_FIXED), so no existing memory is
        // affected; the fd is valid for the duration of the call and the
        // mapping stays valid after the file is closed.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, len })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to a live mapping of `len` readable bytes that
        // is only unmapped when `self` is dropped, which the returned borrow
        // prevents. The bytes are only read as u8 (every bit pattern is
        // valid); see the module docs about concurrent file changes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ExecMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping created in `new`,
        // and no borrows of it outlive `self`.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        debug_assert_eq!(rc, 0, "munmap failed: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn maps_file_contents_both_ways() {
        let mut f = tempfile::tempfile().expect("tempfile");
        f.write_all(b"hello mapping").expect("write");
        for exec in [false, true] {
            match Mapping::new(&f, 13, exec) {
                Ok(m) => assert_eq!(m.as_slice(), b"hello mapping"),
                // The temp dir may be on a noexec mount.
                Err(e) if exec && e.raw_os_error() == Some(libc::EPERM) => {}
                Err(e) => panic!("mmap (exec={exec}) failed: {e}"),
            }
        }
    }

    #[test]
    fn zero_length_is_einval() {
        let f = tempfile::tempfile().expect("tempfile");
        let err = ExecMapping::new(&f, 0).expect_err("zero-length mapping");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
