//! Blocking I/O on a stub's descriptor: its xattrs, its data, its durability.
//!
//! Everything here runs on blocking threads (`spawn_blocking`), never on the event loop.

use std::os::fd::{AsFd, BorrowedFd};

use hsm_kernel::stat::Timestamp;
use hsm_kernel::xattr::{self, SetMode};
use hsm_stub::{MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, MarkerState, Meta, ResidentMap};

use crate::error::{LocalError, ServeError};

/// What a descriptor's xattrs say about it.
#[derive(Debug)]
pub enum Loaded {
    /// No marker: an ordinary file.
    NotStub,
    /// Populate is still building it.
    Building,
    /// A ready stub.
    Stub { meta: Meta, map: ResidentMap },
}

/// Read and decode the marker, and for a ready stub its metadata and map.
pub fn load(fd: BorrowedFd<'_>) -> Result<Loaded, ServeError> {
    let mut buf = Vec::with_capacity(512);
    let present = xattr::fget(fd, MARKER_XATTR, &mut buf)
        .map_err(|e| LocalError::from_kernel("read marker xattr", &e))?;
    if !present {
        return Ok(Loaded::NotStub);
    }
    let marker = Marker::decode(&buf)?;
    if marker.state == MarkerState::Building {
        return Ok(Loaded::Building);
    }
    if !xattr::fget(fd, META_XATTR, &mut buf)
        .map_err(|e| LocalError::from_kernel("read meta xattr", &e))?
    {
        return Err(ServeError::Inconsistent(format!(
            "{MARKER_XATTR} is set but {META_XATTR} is missing"
        )));
    }
    let meta = Meta::decode(&buf)?;
    if !xattr::fget(fd, MAP_XATTR, &mut buf)
        .map_err(|e| LocalError::from_kernel("read map xattr", &e))?
    {
        return Err(ServeError::Inconsistent(format!(
            "{MARKER_XATTR} is set but {MAP_XATTR} is missing"
        )));
    }
    let map = ResidentMap::decode(&buf)?;
    map.check_meta(&meta)?;
    Ok(Loaded::Stub { meta, map })
}

const PAGE: usize = 4096;

fn is_zero(page: &[u8]) -> bool {
    // An OR-fold without early exit vectorises; pages are small enough that it wins.
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Write `data` at `offset`, skipping whole zero pages: the unfetched parts of a stub are
/// holes that already read as zeros, so a sparse object stays sparse. `offset` must be page
/// aligned (granules are). Returns the bytes actually written.
pub fn write_data(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> Result<u64, LocalError> {
    let mut written = 0u64;
    let mut i = 0usize;
    while i < data.len() {
        let end = (i + PAGE).min(data.len());
        if is_zero(&data[i..end]) {
            i = end;
            continue;
        }
        let start = i;
        i = end;
        while i < data.len() {
            let end = (i + PAGE).min(data.len());
            if is_zero(&data[i..end]) {
                break;
            }
            i = end;
        }
        pwrite_all(fd, &data[start..i], offset + start as u64)?;
        written += (i - start) as u64;
    }
    Ok(written)
}

fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> Result<(), LocalError> {
    while !buf.is_empty() {
        match nix::sys::uio::pwrite(fd, buf, offset as libc::off_t) {
            Ok(0) => {
                return Err(LocalError::Other {
                    op: "pwrite",
                    message: "wrote nothing".into(),
                });
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(LocalError::from_errno("pwrite", e)),
        }
    }
    Ok(())
}

/// Make the data durable, then record `map` in the map xattr. With `sync_meta`, also make
/// the xattr itself durable (fsync): needed before a local write is allowed, so that a crash
/// can never make a later fill overwrite bytes the user wrote and synced.
pub fn persist_map(
    fd: BorrowedFd<'_>,
    map: &ResidentMap,
    sync_meta: bool,
) -> Result<(), LocalError> {
    nix::unistd::fdatasync(fd).map_err(|e| LocalError::from_errno("fdatasync", e))?;
    store_map(fd, map, sync_meta)
}

/// Record `map` in the map xattr; the data it describes must already be durable.
pub fn store_map(fd: BorrowedFd<'_>, map: &ResidentMap, sync_meta: bool) -> Result<(), LocalError> {
    xattr::fset(fd, MAP_XATTR, &map.encode(), SetMode::Replace)
        .map_err(|e| LocalError::from_kernel("write map xattr", &e))?;
    if sync_meta {
        nix::unistd::fsync(fd).map_err(|e| LocalError::from_errno("fsync", e))?;
    }
    Ok(())
}

/// Turn a fully resident stub into an ordinary file. The marker goes first: a crash after it
/// leaves harmless orphan `trusted.*` attributes, never a marker without metadata.
pub fn finalize(fd: BorrowedFd<'_>) -> Result<(), LocalError> {
    nix::unistd::fdatasync(fd).map_err(|e| LocalError::from_errno("fdatasync", e))?;
    for name in [MARKER_XATTR, META_XATTR, MAP_XATTR] {
        xattr::fremove(fd, name).map_err(|e| LocalError::from_kernel("remove stub xattr", &e))?;
    }
    Ok(())
}

/// Put the modification time back after a fill: fetching bytes is not a modification.
pub fn restore_mtime(fd: BorrowedFd<'_>, mtime: Timestamp) -> Result<(), LocalError> {
    let omit = nix::sys::time::TimeSpec::UTIME_OMIT;
    nix::sys::stat::futimens(fd, &omit, &mtime.to_timespec())
        .map_err(|e| LocalError::from_errno("futimens", e))
}

/// The path of a descriptor, for log lines (best effort).
pub fn path_of(fd: impl AsFd) -> String {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "<unknown path>".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn zero_pages_stay_holes() {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(64 * 1024).expect("size");
        let mut data = vec![0u8; 40 * 1024];
        data[5000] = 1; // page 1
        data[5 * 4096..7 * 4096].fill(9); // pages 5-6
        data[40 * 1024 - 1] = 3; // last page
        let n = write_data(f.as_fd(), 8192, &data).expect("write");
        assert_eq!(n, 4 * 4096);
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 8192).expect("read");
        assert_eq!(back, data);
        use std::os::unix::fs::MetadataExt;
        // 4 data pages allocated (filesystems may round up, never down).
        assert!(f.metadata().expect("md").blocks() * 512 >= 4 * 4096);
    }

    #[test]
    fn odd_tail_is_written() {
        let f = tempfile::tempfile().expect("tmp");
        let data = vec![7u8; 5000];
        assert_eq!(write_data(f.as_fd(), 0, &data).expect("write"), 5000);
        let mut back = vec![0u8; 5000];
        f.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(back, data);
    }
}
