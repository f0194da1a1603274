//! Blocking I/O on a stub's descriptor: its xattrs, its data, its durability.
//!
//! Everything here runs on blocking threads (`spawn_blocking`), never on the event loop.

use std::os::fd::{AsFd, BorrowedFd};

use hsm_kernel::stat::Timestamp;
use hsm_kernel::xattr::{self, SetMode};
use hsm_stub::{
    MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, MarkerState, Meta, ORIGIN_XATTR, Origin,
    ResidentMap,
};

use crate::error::{LocalError, ServeError};

/// What a descriptor's xattrs say about it.
#[derive(Debug)]
pub enum Loaded {
    /// No marker: an ordinary file.
    NotStub,
    /// Populate is still building it.
    Building,
    /// A ready stub.
    Stub { meta: Box<Meta>, map: ResidentMap },
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
    let meta = if xattr::fget(fd, META_XATTR, &mut buf)
        .map_err(|e| LocalError::from_kernel("read meta xattr", &e))?
    {
        Some(Meta::decode(&buf)?)
    } else {
        None
    };
    if !xattr::fget(fd, MAP_XATTR, &mut buf)
        .map_err(|e| LocalError::from_kernel("read map xattr", &e))?
    {
        return Err(ServeError::Inconsistent(format!(
            "{MARKER_XATTR} is set but {MAP_XATTR} is missing"
        )));
    }
    let map = ResidentMap::decode(&buf)?;
    // No metadata on the stub: it is in its tree's index (`hsm populate --index`).
    let meta = match meta {
        Some(m) => m,
        None => crate::index::reader().lookup(map.stub_id()).map_err(|e| {
            ServeError::Inconsistent(format!(
                "{MARKER_XATTR} is set, {META_XATTR} is not, and the tree index does not \
                 give the metadata: {e}"
            ))
        })?,
    };
    map.check_meta(&meta)?;
    Ok(Loaded::Stub {
        meta: Box::new(meta),
        map,
    })
}

const PAGE: usize = 4096;

fn is_zero(page: &[u8]) -> bool {
    // Most data pages have a non-zero byte at the very start: decide those without
    // scanning the page (a full scan is a second pass over every fetched byte). Otherwise an
    // OR-fold without early exit, which vectorises.
    let head = page.len().min(16);
    if page[..head].iter().any(|&b| b != 0) {
        return false;
    }
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

/// Bodies up to this size are copied through a reused buffer (with zero pages skipped);
/// larger ones kernel-to-kernel.
const SMALL_COPY: u64 = 256 << 10;

thread_local! {
    static COPY_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copy `range` of the local object `src` to `dst` at `dst_off`, keeping the source's holes
/// as holes. Returns the bytes written. The object must still hold the whole range: a
/// shorter file (it changed under us) is an error, never a partial fill.
pub fn copy_range(
    src: &std::fs::File,
    range: std::ops::Range<u64>,
    dst: BorrowedFd<'_>,
    dst_off: u64,
) -> Result<u64, LocalError> {
    let len = range.end.saturating_sub(range.start);
    let size = src
        .metadata()
        .map_err(|e| LocalError::from_io("stat remote file", &e))?
        .len();
    if size < range.end {
        return Err(LocalError::Other {
            op: "read remote file",
            message: format!(
                "file is {size} bytes, range ends at {} (it changed)",
                range.end
            ),
        });
    }
    if len <= SMALL_COPY {
        return COPY_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            buf.resize(len as usize, 0);
            pread_exact(src.as_fd(), &mut buf, range.start)?;
            write_data(dst, dst_off, &buf)
        });
    }
    use nix::unistd::{Whence, lseek};
    let mut written = 0u64;
    let mut pos = range.start;
    while pos < range.end {
        // Next data extent of the source (holes raise no read and stay holes here).
        let data = match lseek(src, pos as libc::off_t, Whence::SeekData) {
            Ok(d) => (d as u64).min(range.end),
            Err(nix::errno::Errno::ENXIO) => range.end, // the rest is a hole
            Err(_) => pos,                              // no SEEK_DATA: treat all as data
        };
        if data >= range.end {
            break;
        }
        let hole = match lseek(src, data as libc::off_t, Whence::SeekHole) {
            Ok(h) => (h as u64).min(range.end),
            Err(_) => range.end,
        };
        copy_all(
            src.as_fd(),
            data,
            dst,
            dst_off + (data - range.start),
            hole - data,
        )?;
        written += hole - data;
        pos = hole;
    }
    Ok(written)
}

/// The remote file is shorter than its range: it changed under us.
fn ended_early(op: &'static str) -> LocalError {
    LocalError::Other {
        op,
        message: "file ended early (it changed)".into(),
    }
}

fn pread_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8], mut offset: u64) -> Result<(), LocalError> {
    while !buf.is_empty() {
        match nix::sys::uio::pread(fd, buf, offset as libc::off_t) {
            Ok(0) => {
                return Err(ended_early("read remote file"));
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(LocalError::from_errno("read remote file", e)),
        }
    }
    Ok(())
}

/// Copy `len` bytes kernel-to-kernel: copy_file_range (which may even share extents on
/// one filesystem), else splice through a pipe (between filesystems).
fn copy_all(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: u64,
) -> Result<(), LocalError> {
    let (mut off_in, mut off_out) = (src_off as i64, dst_off as i64);
    let mut left = len;
    while left > 0 {
        match nix::fcntl::copy_file_range(
            src,
            Some(&mut off_in),
            dst,
            Some(&mut off_out),
            left as usize,
        ) {
            Ok(0) => {
                return Err(ended_early("copy from remote file"));
            }
            Ok(n) => left -= n as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::EINVAL
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::ENOSYS,
            ) => {
                return splice_all(src, off_in as u64, dst, off_out as u64, left);
            }
            Err(e) => return Err(LocalError::from_errno("copy_file_range", e)),
        }
    }
    Ok(())
}

fn splice_all(
    src: BorrowedFd<'_>,
    src_off: u64,
    dst: BorrowedFd<'_>,
    dst_off: u64,
    len: u64,
) -> Result<(), LocalError> {
    use nix::fcntl::{SpliceFFlags, splice};
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LocalError::from_errno("pipe", e))?;
    let cap = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20))
        .map(|c| c as u64)
        .unwrap_or(64 << 10)
        .max(4096);
    let (mut off_in, mut off_out) = (src_off as i64, dst_off as i64);
    let mut left = len;
    while left > 0 {
        let mut n = loop {
            match splice(
                src,
                Some(&mut off_in),
                &w,
                None,
                left.min(cap) as usize,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => {
                    break other
                        .map_err(|e| LocalError::from_errno("splice from remote file", e))?;
                }
            }
        };
        if n == 0 {
            return Err(ended_early("copy from remote file"));
        }
        left -= n as u64;
        while n > 0 {
            match splice(
                &r,
                None,
                dst,
                Some(&mut off_out),
                n,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(m) => n -= m,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(LocalError::from_errno("splice into stub", e)),
            }
        }
    }
    Ok(())
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

/// Make the data durable, then [`commit_map`]. With `sync_meta`, the map xattr itself is
/// made durable too (fsync): needed before a local write is allowed, so that a crash can
/// never make a later fill overwrite bytes the user wrote and synced.
pub fn persist_map(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    map: &ResidentMap,
    sync_meta: bool,
) -> Result<bool, LocalError> {
    nix::unistd::fdatasync(fd).map_err(|e| LocalError::from_errno("fdatasync", e))?;
    commit_map(fd, meta, map, sync_meta)
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
pub fn finalize(fd: BorrowedFd<'_>, meta: &Meta, map: &ResidentMap) -> Result<(), LocalError> {
    nix::unistd::fdatasync(fd).map_err(|e| LocalError::from_errno("fdatasync", e))?;
    remove_stub_xattrs(fd, meta, map)
}

/// [`finalize`] for a stub whose data is already durable (just synced). A stub never
/// written locally first gets its origin record, so `hsm evict` can make it a stub again.
pub fn remove_stub_xattrs(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    map: &ResidentMap,
) -> Result<(), LocalError> {
    if !map.locally_modified() {
        // Only an optimisation for later: a file without the record is never evicted.
        if let Err(e) = write_origin(fd, meta, map) {
            tracing::warn!(path = %path_of(fd), error = %e,
                           "no origin record: this file cannot be evicted");
        }
    }
    for name in [MARKER_XATTR, META_XATTR, MAP_XATTR] {
        xattr::fremove(fd, name).map_err(|e| LocalError::from_kernel("remove stub xattr", &e))?;
    }
    Ok(())
}

/// Chunk size of the digest in an origin record when the stub has no manifest digests.
pub const ORIGIN_CHUNK_SHIFT: u8 = 20;

/// Record what a complete stub is a copy of, and the digest of its bytes now.
fn write_origin(fd: BorrowedFd<'_>, meta: &Meta, map: &ResidentMap) -> Result<(), LocalError> {
    let (chunk_shift, digest) = match &meta.integrity {
        // Every chunk was verified against these digests as it was fetched.
        Some(i) => (i.chunk_shift, i.list_hash),
        None => (
            ORIGIN_CHUNK_SHIFT,
            content_digest(fd, meta.remote_size, ORIGIN_CHUNK_SHIFT)?,
        ),
    };
    let origin = Origin {
        granule_shift: map.granule_shift(),
        chunk_shift,
        digest,
        meta: meta.clone(),
    };
    let value = origin
        .encode()
        .map_err(|e| LocalError::from_io("encode origin", &std::io::Error::other(e)))?;
    xattr::fset(fd, ORIGIN_XATTR, &value, SetMode::Any)
        .map_err(|e| LocalError::from_kernel("write origin xattr", &e))
}

/// The digest an origin record keeps: BLAKE3 of the BLAKE3 digests of the first `size`
/// bytes cut into `1 << chunk_shift` chunks (a manifest's list hash, computed locally).
/// Fails if the file is shorter than `size`.
pub fn content_digest(
    fd: BorrowedFd<'_>,
    size: u64,
    chunk_shift: u8,
) -> Result<[u8; 32], LocalError> {
    let mut digester = hsm_manifest::ChunkDigester::new(1u64 << chunk_shift);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        let want = ((size - offset) as usize).min(buf.len());
        match nix::sys::uio::pread(fd, &mut buf[..want], offset as i64) {
            Ok(0) => {
                return Err(LocalError::from_io(
                    "digest file",
                    &std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                ));
            }
            Ok(n) => {
                digester.update(&buf[..n]);
                offset += n as u64;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(LocalError::from_errno("pread", e)),
        }
    }
    Ok(hsm_manifest::list_hash(&digester.finish()))
}

/// After the data of `map` is durable: record the map, or, when it is complete, make the
/// stub an ordinary file. Returns whether it finalised.
pub fn commit_map(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    map: &ResidentMap,
    sync_meta: bool,
) -> Result<bool, LocalError> {
    if map.is_complete() {
        remove_stub_xattrs(fd, meta, map)?;
        return Ok(true);
    }
    store_map(fd, map, sync_meta)?;
    Ok(false)
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
    use std::os::fd::AsFd;
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
    fn copies_keep_source_holes_and_refuse_short_sources() {
        let src = tempfile::tempfile().expect("tmp");
        src.set_len(8 << 20).expect("len");
        src.write_all_at(&vec![5u8; 1 << 20], 2 << 20)
            .expect("write");
        src.write_all_at(&[9u8; 100], (7 << 20) + 3).expect("write");
        let dst = tempfile::tempfile().expect("tmp");
        dst.set_len(8 << 20).expect("len");
        let n = copy_range(&src, 0..(8 << 20), dst.as_fd(), 0).expect("copy");
        assert!(
            ((1 << 20) + 100..4 << 20).contains(&n),
            "copied {n}: data extents only"
        );
        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![0u8; 8 << 20];
        src.read_exact_at(&mut a, 0).expect("read");
        dst.read_exact_at(&mut b, 0).expect("read");
        assert!(a == b, "copy differs");
        // Small bodies go through the buffer path.
        let small = tempfile::tempfile().expect("tmp");
        small.set_len(4096 * 3).expect("len");
        assert_eq!(
            copy_range(&src, (2 << 20)..(2 << 20) + 8192, small.as_fd(), 4096).expect("small"),
            8192
        );
        // A range past the end of the source is an error, not a partial copy.
        assert!(copy_range(&src, (8 << 20) - 10..(8 << 20) + 10, dst.as_fd(), 0).is_err());
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
