//! What is the blocked thread about to do to the file?
//!
//! A pre-content event says only "data access to this range". Reads and writes raise the same
//! event, and the agent needs to know which: before a write is allowed, the resident map that
//! covers the range must be durable, or a crash could later let a fill overwrite the written
//! bytes. The thread that raised the event is blocked inside its syscall until we answer, so
//! `/proc/TID/syscall` names that syscall and its arguments (readable by root).
//!
//! Anything not proven to be a read is treated as a write: the cost of a wrong "write" is one
//! extra flush, the cost of a wrong "read" could be a lost local write after a crash.

use std::io::Read;

/// The kind of access that raised an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// read, pread, readv, a private or read-only mapping, exec.
    Read,
    /// Anything that may modify the file or that we cannot classify.
    Write,
    /// The thread did not reach its wait in time to be classified (a loaded machine): it
    /// may be a write, so it is guarded like one, but it is not taken for a modification
    /// (the file's times are kept; a write shows itself later by moving the mtime).
    Unknown,
    /// `truncate`/`ftruncate` to `length` bytes.
    Truncate { length: u64 },
    /// An `fallocate` that moves the file's tail (collapse or insert range): every byte from
    /// the range's start to the end of the file must be local first.
    Shift,
}

/// The classification and the syscall number it came from (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub access: Access,
    pub syscall: Option<i64>,
}

#[cfg(target_arch = "x86_64")]
mod nr {
    pub const READS: &[i64] = &[
        0,   // read
        17,  // pread64
        19,  // readv
        59,  // execve
        134, // uselib
        295, // preadv
        322, // execveat
        327, // preadv2
    ];
    /// read, pread64, readv, preadv, preadv2: the calls whose file and offset a blocked
    /// thread's arguments name (with where the offset argument is, if any).
    pub const FILE_READS: &[(i64, Option<usize>)] = &[
        (0, None),
        (17, Some(3)),
        (19, None),
        (295, Some(3)),
        (327, Some(3)),
    ];
    pub const MMAP: i64 = 9;
    pub const TRUNCATE: i64 = 76;
    pub const FTRUNCATE: i64 = 77;
    pub const FALLOCATE: i64 = 285;
}

#[cfg(target_arch = "aarch64")]
mod nr {
    pub const READS: &[i64] = &[
        63,  // read
        65,  // readv
        67,  // pread64
        69,  // preadv
        221, // execve
        281, // execveat
        286, // preadv2
    ];
    pub const FILE_READS: &[(i64, Option<usize>)] = &[
        (63, None),
        (67, Some(3)),
        (65, None),
        (69, Some(3)),
        (286, Some(3)),
    ];
    pub const MMAP: i64 = 222;
    pub const TRUNCATE: i64 = 45;
    pub const FTRUNCATE: i64 = 46;
    pub const FALLOCATE: i64 = 47;
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod nr {
    // Unknown syscall table: every access is classified as a write (always safe).
    pub const READS: &[i64] = &[];
    pub const FILE_READS: &[(i64, Option<usize>)] = &[];
    pub const MMAP: i64 = i64::MIN;
    pub const TRUNCATE: i64 = i64::MIN;
    pub const FTRUNCATE: i64 = i64::MIN;
    pub const FALLOCATE: i64 = i64::MIN;
}

const MAP_TYPE_MASK: u64 = 0x0f;
const FALLOC_FL_COLLAPSE_RANGE: u64 = 0x08;
const FALLOC_FL_INSERT_RANGE: u64 = 0x20;
const MAP_PRIVATE: u64 = 0x02;

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse::<i64>().ok().map(|v| v as u64),
    }
}

/// Classify one line of `/proc/TID/syscall`. `fd_read_only(fd)` answers whether the blocked
/// task's descriptor `fd` is open read-only (used for shared mappings).
pub fn classify_line(line: &str, fd_read_only: impl FnOnce(i32) -> Option<bool>) -> Observed {
    let mut parts = line.split_ascii_whitespace();
    let Some(first) = parts.next() else {
        return Observed {
            access: Access::Write,
            syscall: None,
        };
    };
    // "running" or "-1 sp pc" (not in a syscall): cannot classify.
    let Ok(nr) = first.parse::<i64>() else {
        return Observed {
            access: Access::Write,
            syscall: None,
        };
    };
    let args: Vec<u64> = parts.take(6).filter_map(parse_num).collect();
    let access = if nr::READS.contains(&nr) {
        Access::Read
    } else if nr == nr::MMAP && args.len() == 6 {
        let flags = args[3];
        if flags & MAP_TYPE_MASK == MAP_PRIVATE {
            Access::Read
        } else {
            // A shared mapping of a read-only descriptor can never be made writable.
            match fd_read_only(args[4] as i32) {
                Some(true) => Access::Read,
                _ => Access::Write,
            }
        }
    } else if (nr == nr::TRUNCATE || nr == nr::FTRUNCATE) && args.len() >= 2 {
        Access::Truncate { length: args[1] }
    } else if nr == nr::FALLOCATE
        && args.len() >= 2
        && args[1] & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE) != 0
    {
        Access::Shift
    } else {
        Access::Write
    };
    Observed {
        access,
        syscall: Some(nr),
    }
}

/// A read-family system call a thread is blocked in: the descriptor it reads and the file
/// offset the read starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockedRead {
    pub fd: i32,
    pub offset: u64,
}

/// Parse one line of `/proc/TID/syscall` as a read-family call (read, pread64, readv,
/// preadv, preadv2; not exec). `position(fd)` gives the descriptor's file position, for
/// the calls that read from it.
pub fn blocked_read_line(
    line: &str,
    position: impl FnOnce(i32) -> Option<u64>,
) -> Option<BlockedRead> {
    let mut parts = line.split_ascii_whitespace();
    let nr = parts.next()?.parse::<i64>().ok()?;
    let &(_, offset_arg) = nr::FILE_READS.iter().find(|(n, _)| *n == nr)?;
    let args: Vec<u64> = parts.take(6).filter_map(parse_num).collect();
    let fd = i32::try_from(*args.first()?).ok()?;
    let offset = match offset_arg.map(|i| args.get(i).copied()) {
        // preadv2 with offset -1 reads at the position, like readv.
        Some(Some(off)) if off as i64 >= 0 => off,
        Some(Some(_)) | None => position(fd)?,
        Some(None) => return None,
    };
    Some(BlockedRead { fd, offset })
}

/// The read-family call thread `tid` is blocked in, if it is in one.
pub fn blocked_read(tid: i32) -> Option<BlockedRead> {
    let line = std::fs::read_to_string(format!("/proc/{tid}/syscall")).ok()?;
    blocked_read_line(&line, |fd| fd_position(tid, fd))
}

/// The file position `/proc/TID/fdinfo/FD` reports.
pub fn fd_position(tid: i32, fd: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("pos:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The devices of every file thread `tid`'s process maps (`/proc/TID/maps`).
pub fn mapped_devices(tid: i32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/maps")).ok()?;
    Some(mapped_devices_of(&text))
}

/// [`mapped_devices`] of the text of a maps file: lines `start-end perms offset MAJ:MIN
/// inode [path]`; anonymous mappings (inode 0) are left out.
pub fn mapped_devices_of(maps: &str) -> Vec<u64> {
    let mut devs: Vec<u64> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace().skip(3);
            let (maj, min) = f.next()?.split_once(':')?;
            let inode = f.next()?.parse::<u64>().ok()?;
            if inode == 0 {
                return None;
            }
            let maj = u32::from_str_radix(maj, 16).ok()?;
            let min = u32::from_str_radix(min, 16).ok()?;
            Some(libc::makedev(maj, min))
        })
        .collect();
    devs.sort_unstable();
    devs.dedup();
    devs
}

/// Whether `/proc/TID/fdinfo/FD` says the descriptor is open read-only.
pub fn fd_is_read_only(tid: i32, fd: i32) -> Option<bool> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/fdinfo/{fd}")).ok()?;
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
    Some(flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32)
}

/// Classify the syscall thread `tid` is blocked in, if it is blocked: `None` while it is
/// still running. Any failure to read the file yields `Write`.
///
/// The kernel queues an event and wakes the listener before the accessing thread goes to
/// sleep waiting for the answer, so a fast listener can find it still "running" (the file
/// then says only that); under load it may even be preempted there for a while. It cannot
/// go anywhere else before it is answered, so callers look again a little later.
pub fn classify_now(tid: i32) -> Option<Observed> {
    let mut buf = [0u8; 256];
    let line = std::fs::File::open(format!("/proc/{tid}/syscall"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()
        .and_then(|n| std::str::from_utf8(&buf[..n]).ok());
    match line {
        Some(l) if l.starts_with("running") => None,
        Some(l) => Some(classify_line(l, |fd| fd_is_read_only(tid, fd))),
        None => Some(Observed {
            access: Access::Write,
            syscall: None,
        }),
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    fn c(line: &str) -> Access {
        classify_line(line, |_| Some(false)).access
    }

    #[test]
    fn names_the_descriptor_and_offset_of_a_blocked_read() {
        let at = |line: &str| blocked_read_line(line, |fd| Some(4096 * fd as u64));
        let r = |fd, offset| Some(BlockedRead { fd, offset });
        // pread64(5, buf, 65536, 0x300000)
        assert_eq!(
            at("17 0x5 0x7f21d0000000 0x10000 0x300000 0x0 0x0 0x7ffd9c 0x7f21e1"),
            r(5, 0x300000)
        );
        // read(3, buf, 4096): at the descriptor's position
        assert_eq!(
            at("0 0x3 0x55d0c0 0x1000 0x0 0x0 0x0 0x7ffd9c 0x7f21e1"),
            r(3, 3 * 4096)
        );
        // readv(7, iov, 2)
        assert_eq!(
            at("19 0x7 0x7ffd10 0x2 0x0 0x0 0x0 0x7ffd9c 0x7f21e1"),
            r(7, 7 * 4096)
        );
        // preadv2(4, iov, 1, -1, 0, 0): -1 reads at the position
        assert_eq!(
            at("327 0x4 0x7ffd10 0x1 0xffffffffffffffff 0x0 0x0 0x7ffd9c 0x7f21e1"),
            r(4, 4 * 4096)
        );
        assert_eq!(
            at("295 0x4 0x7ffd10 0x1 0x2000 0x0 0x0 0x7ffd9c 0x7f21e1"),
            r(4, 0x2000)
        );
        // Not a read of a file: a write, an exec, a page fault outside any call, running.
        assert_eq!(
            at("1 0x3 0x55d0c0 0x1000 0x0 0x0 0x0 0x7ffd9c 0x7f21e1"),
            None
        );
        assert_eq!(
            at("59 0x55d0c0 0x7ffd10 0x7ffd20 0x0 0x0 0x0 0x7ffd9c 0x7f21e1"),
            None
        );
        assert_eq!(at("-1 0x7ffd9c 0x7f21e1"), None);
        assert_eq!(at("running"), None);
        // The position unknown (the descriptor is gone): no answer.
        assert_eq!(
            blocked_read_line("0 0x3 0x55d0c0 0x1000 0x0 0x0 0x0 0x1 0x2", |_| None),
            None
        );
    }

    #[test]
    fn lists_the_devices_of_mapped_files() {
        let maps = "\
55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1310 /usr/bin/python3.11
7f21d0000000-7f21d0100000 r--s 00000000 07:03 12 /mnt/dst/f.bin
7f21e0000000-7f21e0021000 rw-p 00000000 00:00 0
7ffd9c000000-7ffd9c021000 rw-p 00000000 00:00 0 [stack]
7f21e1000000-7f21e1001000 r--p 00001000 fd:01 1311 /usr/lib/x86_64-linux-gnu/libc.so.6
";
        let mut want = vec![libc::makedev(0xfd, 1), libc::makedev(7, 3)];
        want.sort_unstable();
        assert_eq!(mapped_devices_of(maps), want);
    }

    #[test]
    fn classifies_lines_seen_on_linux_6_18() {
        // Lines captured from blocked readers in a probe on this machine kind.
        assert_eq!(
            c(
                "0 0x0 0x55e46ef5c000 0x1000 0x7fc9b431cb60 0x55e4379be610 0x0 0x7ffc89675148 0x7fc9b44052ad"
            ),
            Access::Read
        );
        assert_eq!(
            c("17 0x3 0x7ff92aa9d9d0 0xa 0x1388 0x0 0x0 0x7ffdca94e2e8 0x7ff92b2bc3d3"),
            Access::Read
        );
        assert_eq!(
            c("1 0x1 0x7ffc32b84a00 0x2000 0x1000 0x0 0x0 0x7ffc32b848e8 0x7fe00d7ca350"),
            Access::Write
        );
        assert_eq!(
            c("18 0x3 0x7feaddf119d0 0xa 0x30d40 0x0 0x0 0x7ffd7009f188 0x7feade114483"),
            Access::Write
        );
        assert_eq!(
            c("77 0x3 0xc350 0x0 0x7f15f9429330 0x0 0x841 0x7ffff633b478 0x7f15f951b057"),
            Access::Truncate { length: 50000 }
        );
        assert_eq!(
            c("285 0x3 0x3 0x1000 0x2000 0x0 0x0 0x7ffe5ad0dba8 0x7fbb490c8dc3"),
            Access::Write
        );
        assert_eq!(
            c(
                "59 0x55f5babc5440 0x55f5babf0590 0x55f5babce0e0 0x2d5d09d9aad04724 0x7 0x55f5babf0590 0x7ffe8ef63648 0x7fe87ac0ead7"
            ),
            Access::Read
        );
        // mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0)
        assert_eq!(
            c("9 0x0 0x11170 0x1 0x2 0x3 0x0 0x7ffe10db5028 0x7f2542f1f9b3"),
            Access::Read
        );
        // mmap(..., MAP_SHARED, fd 3, ...): read-only descriptor → read, else write.
        let shared = "9 0x0 0x11170 0x1 0x1 0x3 0x0 0x7ffe10db5028 0x7f2542f1f9b3";
        assert_eq!(
            classify_line(shared, |fd| {
                assert_eq!(fd, 3);
                Some(true)
            })
            .access,
            Access::Read
        );
        assert_eq!(classify_line(shared, |_| Some(false)).access, Access::Write);
        assert_eq!(classify_line(shared, |_| None).access, Access::Write);
    }

    #[test]
    fn unknown_states_are_writes() {
        assert_eq!(c("running"), Access::Write);
        assert_eq!(c("-1 0x7ffe 0x7ffe"), Access::Write);
        assert_eq!(c(""), Access::Write);
        assert_eq!(c("77"), Access::Write);
    }

    #[test]
    fn classify_sees_our_own_read() {
        // While a thread reads its own /proc/TID/syscall it is inside read(2).
        let tid = nix::unistd::gettid().as_raw();
        let seen = (0..100)
            .find_map(|_| classify_now(tid))
            .expect("a thread reading is not running");
        assert_eq!(seen.syscall, Some(0));
        assert_eq!(seen.access, Access::Read);
        // A thread that does not exist is classified conservatively.
        assert_eq!(
            classify_now(i32::MAX).map(|o| o.access),
            Some(Access::Write)
        );
    }
}
