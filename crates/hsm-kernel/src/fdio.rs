//! Descriptors across process lifetimes: file handles, passing fds over unix sockets, and
//! keeping fd numbers out of the allocator's reach.
//!
//! These exist for agent restarts (docs/SEMANTICS.md, "Agent restarts"): a keeper process
//! holds the fanotify group while the agent is replaced, the agent journals a file handle
//! for each event it works on, and a restarted agent reopens those files by handle and
//! answers the old events by number, after making sure none of its own new events can be
//! given one of those numbers.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::{KernelError, Result};

pub use memmap2::MmapMut;

/// Largest handle we keep (the kernel's MAX_HANDLE_SZ is 128).
pub const MAX_HANDLE_LEN: usize = 128;

/// A file handle (`name_to_handle_at`), enough to reopen the file on the same filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHandle {
    pub handle_type: i32,
    pub bytes: Vec<u8>,
}

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_LEN],
}

/// The handle of the file open at `fd`, and the id of the mount it was reached through
/// (as in /proc/self/mountinfo), which tells a later process where to reopen it.
pub fn handle_of(fd: BorrowedFd<'_>) -> Result<(FileHandle, i32)> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_LEN as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_LEN],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: raw is a live struct whose handle_bytes says how much room f_handle has; the
    // empty path with AT_EMPTY_PATH names fd itself; mount_id is a valid out-pointer.
    let rc = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            (&raw mut raw).cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(KernelError::last("name_to_handle_at"));
    }
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_LEN);
    Ok((
        FileHandle {
            handle_type: raw.handle_type,
            bytes: raw.f_handle[..len].to_vec(),
        },
        mount_id,
    ))
}

/// Reopen a file by handle. `mount` is any descriptor on the same filesystem (a tree's
/// directory). Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(mount: BorrowedFd<'_>, handle: &FileHandle, flags: i32) -> Result<OwnedFd> {
    if handle.bytes.len() > MAX_HANDLE_LEN {
        return Err(KernelError::Malformed(
            "file handle longer than MAX_HANDLE_SZ",
        ));
    }
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_LEN],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: raw is a live, initialised struct file_handle of handle_bytes bytes; the
    // kernel only reads it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&raw mut raw).cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(KernelError::last("open_by_handle_at"));
    }
    // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `fd` with the bytes `msg` over a unix socket (SCM_RIGHTS).
pub fn send_fd(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [std::io::IoSlice::new(msg)];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsg: Vec<ControlMessage<'_>> = match &fds {
        Some(f) => vec![ControlMessage::ScmRights(f)],
        None => vec![],
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(|e| KernelError::from_errno("sendmsg", e))?;
    Ok(())
}

/// Receive one message (up to `buf.len()` bytes) and at most one descriptor. Returns the
/// message length (0 at end of stream) and the descriptor, if one came.
pub fn recv_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| KernelError::from_errno("recvmsg", e))?;
    let mut got = None;
    for c in msg
        .cmsgs()
        .map_err(|e| KernelError::from_errno("recvmsg cmsgs", e))?
    {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: SCM_RIGHTS installed these descriptors in our table for us alone;
                // each is wrapped exactly once (extra ones are closed on drop).
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    Ok((msg.bytes, got))
}

/// Take the descriptor systemd passed under `name` (sd_listen_fds: LISTEN_PID, LISTEN_FDS,
/// LISTEN_FDNAMES; descriptors start at 3). At most once per process: later calls, or a
/// LISTEN_PID that is not ours, give `None`.
pub fn take_listen_fd(name: &str) -> Option<OwnedFd> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let count: usize = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names.split(':').position(|n| n == name)?;
    if index >= count || TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    let raw = 3 + index as RawFd;
    // SAFETY: F_GETFD only checks that the number is open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched) for us
    // alone, and the TAKEN flag makes sure it is wrapped only once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: F_SETFD on a descriptor we own; keeps it out of programs we exec.
    unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}

/// Accept one connection on a listening unix socket (close-on-exec).
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd> {
    let raw = nix::sys::socket::accept4(
        listener.as_raw_fd(),
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| KernelError::from_errno("accept4", e))?;
    // SAFETY: accept4 returned a fresh connection descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Descriptors that occupy every free fd number up to `limit`, so the kernel hands
/// numbers above `limit` to anything opened while they are held (fanotify event fds in
/// particular). Built with `F_DUPFD`, which takes the lowest free number: other threads
/// opening files meanwhile are never disturbed (no number is closed or replaced).
#[derive(Debug)]
pub struct ReservedFds {
    fds: Vec<OwnedFd>,
}

impl ReservedFds {
    /// Fill every free number `<= limit` with a duplicate of `placeholder`.
    pub fn fill_up_to(placeholder: BorrowedFd<'_>, limit: RawFd) -> Result<ReservedFds> {
        let mut fds = Vec::new();
        loop {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC, 0) duplicates a valid descriptor onto the
            // lowest free number and returns it, or -1.
            let n = unsafe { libc::fcntl(placeholder.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
            if n < 0 {
                return Err(KernelError::last(format!(
                    "reserving fd numbers up to {limit} (F_DUPFD)"
                )));
            }
            // SAFETY: n is a fresh duplicate that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(n) };
            if n > limit {
                // Past the limit: everything at or below it is taken. Give this one back.
                drop(fd);
                return Ok(ReservedFds { fds });
            }
            fds.push(fd);
        }
    }

    /// Keep holding only the numbers for which `keep` is true; release the others.
    pub fn retain(&mut self, keep: impl Fn(RawFd) -> bool) {
        self.fds.retain(|fd| keep(fd.as_raw_fd()));
    }

    /// How many numbers are held.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

/// Highest fd number currently open in this process (from /proc/self/fd).
pub fn highest_open_fd() -> RawFd {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()))
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// Map `len` bytes of `file` at `offset` shared and writable: stores land in the file's page
/// cache, so they outlive the process (the agent's read log).
///
/// The file must be the caller's own: no other process may truncate or write it while it
/// is mapped (a truncate would make touching the mapping raise SIGBUS).
pub fn map_private_file_shared(
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: by this function's contract nothing else truncates or writes the file while
    // the mapping lives, which is what memmap2 requires of a mutable mapping.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_mut(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn handle_round_trips_to_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").expect("write");
        let f = std::fs::File::open(&path).expect("open");
        let h = match handle_of(f.as_fd()) {
            Ok((h, _)) => h,
            // tmpfs and some overlay setups cannot encode handles; nothing to test there.
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => return,
            Err(e) => panic!("name_to_handle_at: {e}"),
        };
        let d = std::fs::File::open(dir.path()).expect("dir");
        let again = open_by_handle(d.as_fd(), &h, libc::O_RDONLY).expect("open_by_handle_at");
        let a = nix::sys::stat::fstat(&f).expect("fstat");
        let b = nix::sys::stat::fstat(&again).expect("fstat");
        assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
    }

    #[test]
    fn fds_pass_over_a_socket() {
        let (a, b) = UnixStream::pair().expect("pair");
        let file = tempfile::tempfile().expect("tempfile");
        send_fd(a.as_fd(), b"PUT", Some(file.as_fd())).expect("send");
        let mut buf = [0u8; 16];
        let (n, fd) = recv_fd(b.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..n], b"PUT");
        let got = fd.expect("a descriptor came");
        let x = nix::sys::stat::fstat(&file).expect("fstat");
        let y = nix::sys::stat::fstat(&got).expect("fstat");
        assert_eq!((x.st_dev, x.st_ino), (y.st_dev, y.st_ino));
        send_fd(a.as_fd(), b"GET", None).expect("send");
        let (n, fd) = recv_fd(b.as_fd(), &mut buf).expect("recv");
        assert_eq!((&buf[..n], fd.is_none()), (&b"GET"[..], true));
    }

    #[test]
    fn reserved_numbers_occupy_every_number_up_to_the_limit() {
        // Other test threads open and close files concurrently, which would make the
        // check below racy: run it alone, in a child process of this test binary.
        const NAME: &str = "fdio::tests::reserved_numbers_occupy_every_number_up_to_the_limit";
        if std::env::var_os("HSM_FDIO_ALONE").is_none() {
            let exe = std::env::current_exe().expect("test binary");
            let out = std::process::Command::new(exe)
                .args(["--exact", NAME, "--test-threads", "1"])
                .env("HSM_FDIO_ALONE", "1")
                .output()
                .expect("run the test alone");
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let base = std::fs::File::open("/dev/null").expect("open");
        let start = highest_open_fd() + 1;
        let limit = start + 50;
        let held = ReservedFds::fill_up_to(base.as_fd(), limit).expect("reserve");
        assert!(held.len() >= 50);
        for n in start..=limit {
            // SAFETY: F_GETFD only queries the descriptor table.
            let rc = unsafe { libc::fcntl(n, libc::F_GETFD) };
            assert!(rc >= 0, "fd {n} is free");
        }
        let next = std::fs::File::open("/dev/null").expect("open");
        assert!(next.as_raw_fd() > limit);
    }
}
