//! fanotify pre-content groups: init, marks, event parsing and responses.
//!
//! The kernel matches a response to its event by the event's fd number only, so the fd of
//! every event is owned by an [`Event`] until a response has been written for it
//! ([`Group::respond`]). Dropping an [`Event`] without answering it is a bug the agent guards
//! against one level up; here we only make it impossible to answer with an errno the kernel
//! would refuse (which would leave the reader hanging).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{KernelError, Result};

/// `FAN_PRE_ACCESS` (include/uapi/linux/fanotify.h, Linux 6.14): a read, write, truncate,
/// fallocate or mmap is about to touch the file's data.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_OPEN_PERM`: a file is being opened (before the open returns).
pub const FAN_OPEN_PERM: u64 = libc::FAN_OPEN_PERM;
/// `FAN_OPEN_EXEC_PERM`: a file is being opened for execution.
pub const FAN_OPEN_EXEC_PERM: u64 = libc::FAN_OPEN_EXEC_PERM;
/// Every event the agent marks for: the data access itself, and opens, which are where a
/// stub reached through overlayfs must be fetched whole (its mappings raise nothing).
pub const AGENT_EVENTS: u64 = FAN_PRE_ACCESS | FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM;
/// Info record carrying the byte range of a pre-content event (`FAN_EVENT_INFO_TYPE_RANGE`).
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
/// `FANOTIFY_METADATA_VERSION`; the only layout this parser understands.
pub const FANOTIFY_METADATA_VERSION: u8 = 3;
/// Size of `struct fanotify_event_metadata`.
pub const METADATA_LEN: usize = 24;
/// Size of `struct fanotify_event_info_range`.
const RANGE_INFO_LEN: usize = 24;
/// Size of `struct fanotify_event_info_header`.
const INFO_HEADER_LEN: usize = 4;
/// `FAN_Q_OVERFLOW`: the queue overflowed (never expected with an unlimited queue).
pub const FAN_Q_OVERFLOW: u64 = libc::FAN_Q_OVERFLOW;

/// The only errnos the kernel accepts in a deny response (fs/notify/fanotify/fanotify_user.c,
/// `fanotify_is_valid_errno`). Any other value makes the response write fail with EINVAL and
/// leaves the reader blocked, so the type makes it unrepresentable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyErrno {
    Eio,
    Eperm,
    Ebusy,
    Etxtbsy,
    Eagain,
    Enospc,
    Edquot,
}

impl DenyErrno {
    /// The errno value.
    pub fn errno(self) -> i32 {
        match self {
            DenyErrno::Eio => libc::EIO,
            DenyErrno::Eperm => libc::EPERM,
            DenyErrno::Ebusy => libc::EBUSY,
            DenyErrno::Etxtbsy => libc::ETXTBSY,
            DenyErrno::Eagain => libc::EAGAIN,
            DenyErrno::Enospc => libc::ENOSPC,
            DenyErrno::Edquot => libc::EDQUOT,
        }
    }

    /// Its conventional name, for logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            DenyErrno::Eio => "EIO",
            DenyErrno::Eperm => "EPERM",
            DenyErrno::Ebusy => "EBUSY",
            DenyErrno::Etxtbsy => "ETXTBSY",
            DenyErrno::Eagain => "EAGAIN",
            DenyErrno::Enospc => "ENOSPC",
            DenyErrno::Edquot => "EDQUOT",
        }
    }
}

/// The answer to a permission event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    Allow,
    Deny(DenyErrno),
}

impl Response {
    /// The `response` field of `struct fanotify_response`: `FAN_DENY | errno << 24` for an
    /// errno deny (`FAN_DENY_ERRNO`).
    pub fn encode(self) -> u32 {
        match self {
            Response::Allow => libc::FAN_ALLOW,
            Response::Deny(e) => libc::FAN_DENY | (((e.errno() as u32) & 0xff) << 24),
        }
    }
}

/// Longest fastpath handler name, with its NUL (RFC `FAN_FP_NAME_MAX`).
pub const FAN_FP_NAME_MAX: usize = 16;

/// `struct fanotify_fastpath_args` of the fastpath RFC (late 2024). Its size is checked
/// against the running kernel's BTF before use (hsm-bpf), since no kernel has shipped it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FastpathArgs {
    pub name: [u8; FAN_FP_NAME_MAX],
    pub version: u32,
    pub flags: u32,
    pub data: u64,
    pub data_size: u32,
    pub pad: u32,
}

/// `_IOW(0xA4, 0, struct fanotify_fastpath_args)`, as proposed (0xA4 is fanotify's ioctl
/// magic; unverified on a real kernel).
pub const FAN_IOC_ADD_FP: libc::c_ulong =
    (1 << 30) | ((std::mem::size_of::<FastpathArgs>() as libc::c_ulong) << 16) | (0xA4 << 8);

/// Which object a mark is placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkTarget {
    /// The whole filesystem containing the path (`FAN_MARK_FILESYSTEM`).
    Filesystem,
    /// The mount containing the path (`FAN_MARK_MOUNT`).
    Mount,
    /// The inode at the path itself (`FAN_MARK_INODE`). Used by probes: a mark on a
    /// directory inode raises no pre-content events for the files below it.
    Inode,
}

impl MarkTarget {
    fn flag(self) -> libc::c_uint {
        match self {
            MarkTarget::Filesystem => libc::FAN_MARK_FILESYSTEM,
            MarkTarget::Mount => libc::FAN_MARK_MOUNT,
            MarkTarget::Inode => libc::FAN_MARK_INODE,
        }
    }
}

/// Options for [`Group::new`].
#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    /// Report the thread id of the accessing task instead of its process id
    /// (`FAN_REPORT_TID`), so `/proc/TID/syscall` names the blocked syscall.
    pub report_tid: bool,
    /// Open the group non-blocking (for use with an async reactor).
    pub nonblock: bool,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            report_tid: true,
            nonblock: true,
        }
    }
}

/// A fanotify group of class `FAN_CLASS_PRE_CONTENT` with an unlimited queue.
///
/// With a bounded queue an event that does not fit is silently allowed, which would hand a
/// reader zeros; the queue is therefore always unlimited.
#[derive(Debug)]
pub struct Group {
    fd: OwnedFd,
}

impl Group {
    /// `fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_UNLIMITED_QUEUE | FAN_CLOEXEC ...,
    /// O_RDONLY | O_LARGEFILE)`. Event fds are read-only: the kernel opens them on the
    /// mount the reader used, and on a read-only mount (a read-only bind mount, or the
    /// private clone through which overlayfs reads a lower layer) a read-write event fd
    /// cannot be opened, so the kernel would deny the access with EPERM. Fills are written
    /// through the agent's own mount instead (`mounts::PrivateMount`).
    pub fn new(opts: GroupOptions) -> Result<Self> {
        let mut flags = libc::FAN_CLASS_PRE_CONTENT | libc::FAN_UNLIMITED_QUEUE | libc::FAN_CLOEXEC;
        if opts.report_tid {
            flags |= libc::FAN_REPORT_TID;
        }
        if opts.nonblock {
            flags |= libc::FAN_NONBLOCK;
        }
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint;
        // SAFETY: fanotify_init takes two integer arguments and returns a new fd or -1.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(KernelError::last("fanotify_init(FAN_CLASS_PRE_CONTENT)"));
        }
        // SAFETY: fanotify_init returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Group { fd })
    }

    /// A notification group (`FAN_CLASS_NOTIF`, blocking reads, a bounded queue: an
    /// overflow loses only notifications, never an answer). The bounded cache uses one to
    /// hear of opens of fully fetched files, whose reads raise no permission events.
    pub fn new_notify() -> Result<Self> {
        let flags = libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint;
        // SAFETY: as in `new`.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(KernelError::last("fanotify_init(FAN_CLASS_NOTIF)"));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Group { fd })
    }

    /// Report opens (`FAN_OPEN`) of the inode behind `file` to this group, for as long as
    /// the inode stays in memory (`FAN_MARK_EVICTABLE`: the mark pins nothing).
    pub fn add_open_mark(&self, file: BorrowedFd<'_>) -> Result<()> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_INODE | libc::FAN_MARK_EVICTABLE;
        // SAFETY: both fds are valid; a NULL pathname marks the object behind the dirfd.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                libc::FAN_OPEN,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last("fanotify_mark FAN_OPEN"));
        }
        Ok(())
    }

    /// Wrap an existing group descriptor (for example one handed back by a keeper process).
    pub fn from_owned_fd(fd: OwnedFd) -> Self {
        Group { fd }
    }

    /// Add `mask` to a filesystem or mount mark on the object containing `path`.
    pub fn add_mark(&self, target: MarkTarget, mask: u64, path: &Path) -> Result<()> {
        self.mark(libc::FAN_MARK_ADD | target.flag(), mask, path, "add")
    }

    /// Remove `mask` from a filesystem or mount mark.
    pub fn remove_mark(&self, target: MarkTarget, mask: u64, path: &Path) -> Result<()> {
        self.mark(libc::FAN_MARK_REMOVE | target.flag(), mask, path, "remove")
    }

    fn mark(&self, flags: libc::c_uint, mask: u64, path: &Path, verb: &str) -> Result<()> {
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| KernelError::Sys {
            op: format!("fanotify_mark {verb} {}", path.display()),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: the group fd is valid for the life of self; cpath is a NUL-terminated
        // string that outlives the call.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                libc::AT_FDCWD,
                cpath.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last(format!(
                "fanotify_mark {verb} {}",
                path.display()
            )));
        }
        Ok(())
    }

    /// Remove every mark of `target`'s kind from the group (`FAN_MARK_FLUSH`): no new
    /// events are raised for them. Used before a group is released on purpose, so that
    /// nothing raised meanwhile is allowed unserved.
    pub fn flush_marks(&self, target: MarkTarget) -> Result<()> {
        // SAFETY: the group fd is valid; FAN_MARK_FLUSH takes no mask or path.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                libc::FAN_MARK_FLUSH | target.flag(),
                0,
                libc::AT_FDCWD,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last("fanotify_mark FAN_MARK_FLUSH"));
        }
        Ok(())
    }

    /// Remove every mark of every kind: filesystem, mount and inode marks.
    pub fn flush_all_marks(&self) -> Result<()> {
        for t in [MarkTarget::Filesystem, MarkTarget::Mount, MarkTarget::Inode] {
            self.flush_marks(t)?;
        }
        Ok(())
    }

    /// Attach a registered fanotify fastpath handler (struct_ops) to this group by name,
    /// with the `FAN_IOC_ADD_FP` ioctl of the interface proposed upstream in late 2024.
    /// No released kernel has it: callers check the kernel's BTF first (hsm-bpf), and the
    /// argument layout below is the RFC's, unverified on a real kernel (docs/BPF.md).
    pub fn add_fastpath(&self, name: &str) -> Result<()> {
        let mut args = FastpathArgs {
            name: [0; FAN_FP_NAME_MAX],
            version: 1,
            flags: 0,
            data: 0,
            data_size: 0,
            pad: 0,
        };
        let bytes = name.as_bytes();
        if bytes.len() >= FAN_FP_NAME_MAX {
            return Err(KernelError::Sys {
                op: format!("FAN_IOC_ADD_FP {name}"),
                source: std::io::Error::from_raw_os_error(libc::ENAMETOOLONG),
            });
        }
        args.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: the group fd is valid for the life of self; args is a live, initialised
        // repr(C) struct of the size encoded in the request number, read by the kernel only.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FAN_IOC_ADD_FP,
                &args as *const FastpathArgs,
            )
        };
        if rc < 0 {
            return Err(KernelError::last(format!("FAN_IOC_ADD_FP {name}")));
        }
        Ok(())
    }

    /// Place an evictable ignore mark for `mask` on the inode behind `file`: the kernel stops
    /// sending those events for it until the inode is evicted. `FAN_MARK_IGNORE_SURV` keeps
    /// the mark across writes (and lets it be added while the file is open for write).
    pub fn add_ignore_mark(&self, file: BorrowedFd<'_>, mask: u64) -> Result<()> {
        let flags = libc::FAN_MARK_ADD
            | libc::FAN_MARK_INODE
            | libc::FAN_MARK_IGNORE_SURV
            | libc::FAN_MARK_EVICTABLE;
        // SAFETY: both fds are valid; a NULL pathname makes the kernel mark the object
        // referred to by the dirfd argument itself.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last("fanotify_mark ignore"));
        }
        Ok(())
    }

    /// Remove the ignore mark [`Group::add_ignore_mark`] placed on the inode behind `file`,
    /// so its events reach the group again (a file turned back into a stub). No mark is
    /// not an error.
    pub fn remove_ignore_mark(&self, file: BorrowedFd<'_>, mask: u64) -> Result<()> {
        let flags = libc::FAN_MARK_REMOVE | libc::FAN_MARK_INODE | libc::FAN_MARK_IGNORE;
        // SAFETY: as in add_ignore_mark.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                return Ok(());
            }
            return Err(KernelError::last("fanotify_mark remove ignore"));
        }
        Ok(())
    }

    /// Ignore `mask` for every access made through the mount of `dir` (a mount mark with
    /// an ignore mask). The agent puts one on its private clone of each served filesystem,
    /// so its own opens and fills there raise nothing: an agent waiting on its own event
    /// would deadlock.
    pub fn ignore_mount(&self, dir: BorrowedFd<'_>, mask: u64) -> Result<()> {
        let flags = libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT | libc::FAN_MARK_IGNORE_SURV;
        // SAFETY: the group fd and dir are valid for the call; "." is a NUL-terminated
        // path resolved relative to dir (a NULL path would need a non-O_PATH dirfd too,
        // but "." also works for an O_PATH one).
        let rc = unsafe {
            libc::fanotify_mark(
                self.fd.as_raw_fd(),
                flags,
                mask,
                dir.as_raw_fd(),
                c".".as_ptr(),
            )
        };
        if rc < 0 {
            return Err(KernelError::last("fanotify_mark mount ignore"));
        }
        Ok(())
    }

    /// Read whatever events are queued into `buf` and hand out each event with its fd owned.
    /// Returns how many bytes of `buf` the read filled.
    ///
    /// Returns `Ok(0)` events as an empty vector only when the read returned nothing; with a
    /// non-blocking group an empty queue is `Err` with `EAGAIN` (see [`KernelError::errno`]).
    pub fn read_events(&self, buf: &mut [u8], out: &mut Vec<Event>) -> Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes for the whole call.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(KernelError::last("read fanotify events"));
        }
        let filled = &buf[..n as usize];
        let mut parse_error = None;
        for parsed in EventParser::new(filled) {
            match parsed {
                Ok(raw) => {
                    let fd = if raw.fd >= 0 {
                        // SAFETY: the kernel installed this fd in our table for this event
                        // and the buffer was just read, so nothing else owns it; each event
                        // in the buffer is visited exactly once by the parser.
                        Some(unsafe { OwnedFd::from_raw_fd(raw.fd) })
                    } else {
                        None
                    };
                    out.push(Event {
                        mask: raw.mask,
                        fd,
                        pid: raw.pid,
                        range: raw.range,
                    });
                }
                Err(e) => {
                    parse_error = Some(e);
                    break;
                }
            }
        }
        match parse_error {
            Some(e) => Err(e),
            None => Ok(n as usize),
        }
    }

    /// Write the response for the event whose fd number is `event_fd`.
    ///
    /// The caller must keep the event's fd open until this returns `Ok`, and must answer
    /// each event once: the kernel matches responses by fd number alone.
    pub fn respond(&self, event_fd: BorrowedFd<'_>, response: Response) -> Result<()> {
        self.respond_number(event_fd.as_raw_fd(), response)
    }

    /// Answer the event whose fd number was `number` in the process that read it, which
    /// may be gone: an agent restarted after a crash answers the events its predecessor had
    /// read but not answered (the kernel keeps them pending while the group lives). The
    /// caller must make sure no event of its own holds that number (docs/SEMANTICS.md,
    /// "Agent restarts"). `ENOENT` means no event with that number is pending.
    pub fn respond_number(&self, number: RawFd, response: Response) -> Result<()> {
        let msg = libc::fanotify_response {
            fd: number,
            response: response.encode(),
        };
        let len = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: msg is a plain repr(C) struct that lives across the call; len is its size.
        let n = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&raw const msg).cast::<libc::c_void>(),
                len,
            )
        };
        if n < 0 {
            return Err(KernelError::last(format!(
                "fanotify response for fd {number}"
            )));
        }
        if n as usize != len {
            return Err(KernelError::Malformed("short fanotify response write"));
        }
        Ok(())
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Group {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The byte range of a pre-content event, exactly as the kernel reported it (page aligned
/// and not clamped to the file size; callers clamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileRange {
    pub offset: u64,
    pub count: u64,
}

impl FileRange {
    /// The end of the range, saturating.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.count)
    }
}

/// An event read from a group, owning its fd.
#[derive(Debug)]
pub struct Event {
    pub mask: u64,
    /// The event's fd; `None` only for events that carry none (queue overflow).
    pub fd: Option<OwnedFd>,
    /// Thread id (with `report_tid`) or process id of the accessing task.
    pub pid: i32,
    pub range: Option<FileRange>,
}

/// One event as laid out in the buffer, fd not yet owned. Public for tests and tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    pub mask: u64,
    pub fd: RawFd,
    pub pid: i32,
    pub range: Option<FileRange>,
}

/// Walks a buffer of events; each event's info records are walked by their header length.
#[derive(Debug)]
pub struct EventParser<'a> {
    buf: &'a [u8],
    done: bool,
}

impl<'a> EventParser<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        EventParser { buf, done: false }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Iterator for EventParser<'_> {
    type Item = Result<RawEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.buf.is_empty() {
            return None;
        }
        let b = self.buf;
        let parsed = (|| {
            let event_len = u32_at(b, 0).ok_or(KernelError::Malformed("short metadata"))? as usize;
            let vers = *b.get(4).ok_or(KernelError::Malformed("short metadata"))?;
            let metadata_len =
                u16_at(b, 6).ok_or(KernelError::Malformed("short metadata"))? as usize;
            if vers != FANOTIFY_METADATA_VERSION {
                return Err(KernelError::Malformed("unknown fanotify metadata version"));
            }
            if metadata_len < METADATA_LEN || event_len < metadata_len || event_len > b.len() {
                return Err(KernelError::Malformed("inconsistent event lengths"));
            }
            let mask = u64_at(b, 8).ok_or(KernelError::Malformed("short metadata"))?;
            let fd = i32_at(b, 16).ok_or(KernelError::Malformed("short metadata"))?;
            let pid = i32_at(b, 20).ok_or(KernelError::Malformed("short metadata"))?;
            let mut range = None;
            let mut at = metadata_len;
            while at + INFO_HEADER_LEN <= event_len {
                let info_type = b[at];
                let len =
                    u16_at(b, at + 2).ok_or(KernelError::Malformed("short info header"))? as usize;
                if len < INFO_HEADER_LEN || at + len > event_len {
                    return Err(KernelError::Malformed("bad info record length"));
                }
                if info_type == FAN_EVENT_INFO_TYPE_RANGE {
                    if len < RANGE_INFO_LEN {
                        return Err(KernelError::Malformed("short range record"));
                    }
                    let offset =
                        u64_at(b, at + 8).ok_or(KernelError::Malformed("short range record"))?;
                    let count =
                        u64_at(b, at + 16).ok_or(KernelError::Malformed("short range record"))?;
                    range = Some(FileRange { offset, count });
                }
                at += len;
            }
            Ok((
                event_len,
                RawEvent {
                    mask,
                    fd,
                    pid,
                    range,
                },
            ))
        })();
        match parsed {
            Ok((len, ev)) => {
                self.buf = &self.buf[len..];
                Some(Ok(ev))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests;
