//! The event journal: what each event in flight needs, written before the agent works on
//! it, so that an agent restarted after a crash can answer the events its predecessor had
//! read but not answered (docs/SEMANTICS.md, "Agent restarts").
//!
//! One file per agent process, `STATE_DIR/journal.PID`, on a tmpfs: it has to survive the
//! process, not the machine (after a reboot no reader is waiting). Layout:
//! - a 4 KiB header: magic, version, pid, start time, the highest event fd number
//!   journaled, and a flag set when the agent stopped reading events (a handover);
//! - a 256-byte slot per fd number, at `4096 + fd * 256`: the kernel matches answers by fd
//!   number, and a number is never reused while its event is unanswered, so the slot of a
//!   number always describes the one event that may still wait on it. A slot holds the
//!   reader's thread id, the range, the file's handle and mount id, a sequence number and
//!   a CRC; a slot whose CRC does not match (a write torn by a crash) is ignored.
//!
//! Beside it, `STATE_DIR/reads.PID`, the read log: one 64 KiB region per event thread, a
//! shared mapping each thread reads its events into. What a `read` returned is then in the
//! file before the thread journals it, and the thread clears it once the batch is
//! journaled: a record still there names an event read but not journaled when the process
//! died (its fd number, reader thread and range), which a successor can still serve
//! (restart.rs, `adopt_orphans`).
//!
//! Order of operations per event: [`Journal::begin`] after the read, the answer, then
//! [`Journal::end`], and only then is the event fd closed. A crash between answer and end
//! leaves a stale slot whose number is still held by the dead process's fd (not reused),
//! so answering it again finds no event (ENOENT): harmless.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use hsm_kernel::fanotify::{EventParser, FileRange};
use hsm_kernel::fdio::{FileHandle, MAX_HANDLE_LEN};

const MAGIC: &[u8; 4] = b"HSMJ";
const SLOT_MAGIC: &[u8; 4] = b"HSMS";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;
const SLOT: u64 = 256;
const STATE_IN_FLIGHT: u32 = 1;
const FLAG_STOPPED_READING: u32 = 1;

/// Most events one read of the agent's 64 KiB buffer can return (24-byte metadata each;
/// access events add a 24-byte range record, open events nothing).
pub const EVENTS_PER_READ: RawFd = 64 * 1024 / 24;

/// Bytes of one event thread's region of the read log (its whole read buffer).
pub const READ_REGION: usize = 64 * 1024;

/// Regions in a read log (event threads beyond this read into private memory).
pub const READ_REGIONS: usize = 64;

/// Highest fd number a journal can describe (the slot offset must stay sane).
pub const MAX_FD: RawFd = 1 << 24;

/// This agent's journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    /// The read log (`reads.PID`), opened and sized when the journal is made: before the
    /// agent's marks exist, so neither raises an event (the state directory may be on a
    /// served filesystem).
    reads: PathBuf,
    reads_file: File,
    max_fd: AtomicI32,
    seq: AtomicU64,
}

/// What a slot says about one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub fd: RawFd,
    pub tid: i32,
    pub range: Option<FileRange>,
    pub mount_id: i32,
    pub handle: Option<FileHandle>,
    pub seq: u64,
}

/// A journal left by another agent process.
#[derive(Debug, Clone)]
pub struct OldJournal {
    pub path: PathBuf,
    pub pid: u32,
    pub start_ticks: u64,
    pub max_fd: RawFd,
    /// How many descriptors the writer had open when it last recorded it.
    pub open_fds: u32,
    pub stopped_reading: bool,
    pub entries: Vec<Entry>,
    /// Events its read log still holds: read, and maybe not journaled, when it died.
    pub read_log: Vec<Orphan>,
}

/// An event a dead agent's read log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub fd: RawFd,
    pub mask: u64,
    /// The reader's thread id.
    pub tid: i32,
    pub range: Option<FileRange>,
}

impl OldJournal {
    /// The highest fd number an event of this agent that is still unanswered may carry:
    /// its journaled numbers, and for events read but not yet journaled, anything below
    /// twice its last recorded count of open descriptors (room for growth since it was
    /// recorded) plus a read's worth of events for each event thread.
    pub fn number_bound(&self) -> RawFd {
        let open = (self.open_fds as RawFd).saturating_mul(2);
        self.max_fd
            .max(open)
            .saturating_add(EVENTS_PER_READ.saturating_mul(8))
    }

    /// Is the process that wrote it still running (same pid and start time, and not a
    /// zombie waiting to be reaped)?
    pub fn writer_alive(&self) -> bool {
        hsm_kernel::sys::process_alive(self.pid, self.start_ticks)
    }
}

/// Make the state directory if missing, readable by its owner only: journals say which
/// files were read, by which thread, at which offsets, and the keeper's socket hands out
/// the fanotify group. An existing directory open to others is closed (and said so); one
/// owned by another user is refused, since that user could swap what is in it.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(
            "not a directory (a symlink is not accepted as the state directory)",
        ));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(std::io::Error::other(format!(
            "owned by uid {}, not by this user (uid {me}); refusing to keep state there",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", meta.mode() & 0o7777),
            "state directory was open to other users; made it 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn journal_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("journal.{pid}"))
}

/// The read log beside a journal.
pub fn reads_path(journal: &Path, pid: u32) -> PathBuf {
    journal.with_file_name(format!("reads.{pid}"))
}

impl Journal {
    /// Create this process's journal in `dir` (made if missing).
    pub fn create(dir: &Path) -> std::io::Result<Journal> {
        Self::create_with(dir, |_| Ok(()))
    }

    /// [`Journal::create`], giving each file to `before_use` right after it is opened and
    /// before anything is written to it: with the state directory on a served filesystem
    /// and the group already marked (a restart), a write would raise an event that no
    /// event thread is there yet to answer; the agent ignore-marks the files.
    pub fn create_with(
        dir: &Path,
        mut before_use: impl FnMut(std::os::fd::BorrowedFd<'_>) -> std::io::Result<()>,
    ) -> std::io::Result<Journal> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::OpenOptionsExt;
        ensure_private_dir(dir)?;
        let pid = std::process::id();
        let path = journal_path(dir, pid);
        let file = std::fs::OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        before_use(file.as_fd())?;
        let mut header = [0u8; 64];
        header[0..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        header[8..12].copy_from_slice(&pid.to_le_bytes());
        let ticks = hsm_kernel::sys::process_start(pid).map_or(0, |(t, _)| t);
        header[16..24].copy_from_slice(&ticks.to_le_bytes());
        header[24..28].copy_from_slice(&(-1i32).to_le_bytes());
        header[32..36].copy_from_slice(&open_fd_count().to_le_bytes());
        file.write_all_at(&header, 0)?;
        let reads = reads_path(&path, pid);
        let _ = std::fs::remove_file(&reads);
        let reads_file = std::fs::OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create_new(true)
            .open(&reads)?;
        before_use(reads_file.as_fd())?;
        // Sparse: only the regions event threads touch take memory.
        reads_file.set_len((READ_REGIONS * READ_REGION) as u64)?;
        Ok(Journal {
            file,
            reads,
            reads_file,
            path,
            max_fd: AtomicI32::new(-1),
            seq: AtomicU64::new(0),
        })
    }

    /// Record an event before working on it.
    pub fn begin(
        &self,
        fd: RawFd,
        tid: i32,
        range: Option<FileRange>,
        handle: Option<(&FileHandle, i32)>,
    ) -> std::io::Result<()> {
        if !(0..MAX_FD).contains(&fd) {
            return Err(std::io::Error::other(format!(
                "event fd {fd} is beyond what the journal records"
            )));
        }
        if fd > self.max_fd.fetch_max(fd, Ordering::AcqRel) {
            // Only grows; a racing smaller value written later is corrected by the next
            // event, and recovery adds a margin anyway.
            self.file
                .write_all_at(&self.max_fd.load(Ordering::Acquire).to_le_bytes(), 24)?;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = encode_slot(&Entry {
            fd,
            tid,
            range,
            mount_id: handle.map(|h| h.1).unwrap_or(-1),
            handle: handle.map(|h| h.0.clone()),
            seq,
        });
        self.file.write_all_at(&slot, slot_offset(fd))
    }

    /// Lower the recorded high-water mark to `current` (the highest fd of the events still
    /// in flight, or -1), so that one burst of high numbers (while a predecessor's numbers
    /// were reserved) does not make every later restart reserve that many. Events begun
    /// concurrently raise it again.
    pub fn reset_high_water(&self, current: RawFd) {
        self.max_fd.store(current, Ordering::Release);
        let _ = self.file.write_all_at(&current.to_le_bytes(), 24);
        let _ = self.file.write_all_at(&open_fd_count().to_le_bytes(), 32);
    }

    /// The event at `fd` was answered (call before closing the fd).
    pub fn end(&self, fd: RawFd) {
        if (0..MAX_FD).contains(&fd) {
            let _ = self
                .file
                .write_all_at(&0u32.to_le_bytes(), slot_offset(fd) + 4);
        }
    }

    /// Say that this agent reads no more events (a handover) and up to which fd number
    /// its events were numbered.
    pub fn mark_stopped_reading(&self) -> std::io::Result<()> {
        let max = self.max_fd.load(Ordering::Acquire);
        self.file.write_all_at(&max.to_le_bytes(), 24)?;
        self.file
            .write_all_at(&FLAG_STOPPED_READING.to_le_bytes(), 28)?;
        Ok(())
    }

    /// Region `index` of the read log, mapped shared: the event thread of that index reads
    /// its events into it and clears what it read once that is journaled. Its pages are
    /// touched here, before the thread reads any event (the agent ignore-marked the file
    /// when the journal was made, so not even a fault on a served filesystem raises one).
    pub fn read_region(&self, index: usize) -> std::io::Result<hsm_kernel::fdio::MmapMut> {
        if index >= READ_REGIONS {
            return Err(std::io::Error::other(format!(
                "the read log has {READ_REGIONS} regions, for as many event threads"
            )));
        }
        let file = &self.reads_file;
        // The file is this process's own (0600 in a directory only root may write); it
        // only grows while we live, and a successor only reads it after we are gone.
        let mut map = hsm_kernel::fdio::map_private_file_shared(
            file,
            (index * READ_REGION) as u64,
            READ_REGION,
        )?;
        // Every page in now, not in the middle of a read of events.
        map.fill(0);
        Ok(map)
    }

    /// Delete the journal and the read log (clean exit: every event was answered).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.reads);
    }
}

/// How many descriptors this process has open. Recorded so that a successor knows how
/// far a crashed agent's unjournaled event numbers can reach: the kernel numbers event
/// fds lowest-free, so they stay below the count of open descriptors plus one read's worth.
pub fn open_fd_count() -> u32 {
    std::fs::read_dir("/proc/self/fd")
        .map(|rd| rd.count() as u32)
        .unwrap_or(0)
}

fn slot_offset(fd: RawFd) -> u64 {
    HEADER + fd as u64 * SLOT
}

fn encode_slot(e: &Entry) -> [u8; SLOT as usize] {
    let mut b = [0u8; SLOT as usize];
    b[0..4].copy_from_slice(SLOT_MAGIC);
    b[4..8].copy_from_slice(&STATE_IN_FLIGHT.to_le_bytes());
    b[8..12].copy_from_slice(&e.fd.to_le_bytes());
    b[12..16].copy_from_slice(&e.tid.to_le_bytes());
    if let Some(r) = e.range {
        b[16..24].copy_from_slice(&r.offset.to_le_bytes());
        b[24..32].copy_from_slice(&r.count.to_le_bytes());
        b[56..60].copy_from_slice(&1u32.to_le_bytes());
    }
    b[32..36].copy_from_slice(&e.mount_id.to_le_bytes());
    b[40..48].copy_from_slice(&e.seq.to_le_bytes());
    if let Some(h) = &e.handle {
        let len = h.bytes.len().min(MAX_HANDLE_LEN);
        b[48..52].copy_from_slice(&h.handle_type.to_le_bytes());
        b[52..56].copy_from_slice(&(len as u32).to_le_bytes());
        b[64..64 + len].copy_from_slice(&h.bytes[..len]);
    }
    let crc = crc32fast::hash(&b[..252]);
    b[252..256].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn decode_slot(b: &[u8]) -> Option<Entry> {
    if b.len() < SLOT as usize || &b[0..4] != SLOT_MAGIC || u32_at(b, 4) != STATE_IN_FLIGHT {
        return None;
    }
    if crc32fast::hash(&b[..252]) != u32_at(b, 252) {
        return None;
    }
    let handle_len = u32_at(b, 52) as usize;
    let handle = (handle_len > 0 && handle_len <= MAX_HANDLE_LEN).then(|| FileHandle {
        handle_type: u32_at(b, 48) as i32,
        bytes: b[64..64 + handle_len].to_vec(),
    });
    Some(Entry {
        fd: u32_at(b, 8) as i32,
        tid: u32_at(b, 12) as i32,
        range: (u32_at(b, 56) == 1).then(|| FileRange {
            offset: u64_at(b, 16),
            count: u64_at(b, 24),
        }),
        mount_id: u32_at(b, 32) as i32,
        handle,
        seq: u64_at(b, 40),
    })
}

/// Read one journal file. `None` if it is not a journal.
pub fn read(path: &Path) -> std::io::Result<Option<OldJournal>> {
    let data = std::fs::read(path)?;
    if data.len() < 64 || &data[0..4] != MAGIC || u32_at(&data, 4) != VERSION {
        return Ok(None);
    }
    let max_fd = u32_at(&data, 24) as i32;
    let mut entries = Vec::new();
    let mut at = HEADER as usize;
    while at + SLOT as usize <= data.len() {
        if let Some(e) = decode_slot(&data[at..at + SLOT as usize]) {
            // The slot's position is the authority for its number.
            let fd = ((at as u64 - HEADER) / SLOT) as RawFd;
            if e.fd == fd {
                entries.push(e);
            }
        }
        at += SLOT as usize;
    }
    let pid = u32_at(&data, 8);
    Ok(Some(OldJournal {
        path: path.to_path_buf(),
        read_log: read_log(&reads_path(path, pid)),
        pid,
        start_ticks: u64_at(&data, 16),
        max_fd: max_fd.max(entries.iter().map(|e| e.fd).max().unwrap_or(-1)),
        open_fds: u32_at(&data, 32),
        stopped_reading: u32_at(&data, 28) & FLAG_STOPPED_READING != 0,
        entries,
    }))
}

/// The events a read log holds: each region parsed from its start up to the first byte
/// that is not an event (a cleared region holds none).
pub fn read_log(path: &Path) -> Vec<Orphan> {
    let Ok(data) = std::fs::read(path) else {
        return Vec::new();
    };
    data.chunks(READ_REGION)
        .flat_map(|region| {
            EventParser::new(region)
                .map_while(|e| e.ok())
                .filter(|e| e.fd >= 0)
                .map(|e| Orphan {
                    fd: e.fd,
                    mask: e.mask,
                    tid: e.pid,
                    range: e.range,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A journal file too short to hold a header, whose process is gone.
fn short_and_orphaned(path: &Path, pid: u32) -> bool {
    let short = std::fs::metadata(path).is_ok_and(|m| m.len() < HEADER);
    short && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Every journal in `dir` other than this process's own.
pub fn scan(dir: &Path) -> Vec<OldJournal> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        match read(&e.path()) {
            Ok(Some(j)) => out.push(j),
            // An agent killed between creating its journal and writing the header: it
            // had read no event, so nothing is lost by removing it (otherwise every later
            // agent would warn about it forever).
            Ok(None) if short_and_orphaned(&e.path(), pid) => {
                tracing::debug!(path = %e.path().display(), "removed the empty journal of a dead agent");
                let _ = std::fs::remove_file(e.path());
                let _ = std::fs::remove_file(reads_path(&e.path(), pid));
            }
            Ok(None) => tracing::warn!(path = %e.path().display(), "not an hsm journal; ignored"),
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot read journal")
            }
        }
    }
    out.sort_by_key(|j| j.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_log_keeps_a_read_until_it_is_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::create(dir.path()).expect("create");
        let mut region = j.read_region(1).expect("region");
        // One event as a read returns it: metadata only (24 bytes), fd 9, thread 1234.
        let mut ev = Vec::new();
        ev.extend_from_slice(&24u32.to_ne_bytes());
        ev.extend_from_slice(&[3, 0]);
        ev.extend_from_slice(&24u16.to_ne_bytes());
        ev.extend_from_slice(&hsm_kernel::fanotify::FAN_PRE_ACCESS.to_ne_bytes());
        ev.extend_from_slice(&9i32.to_ne_bytes());
        ev.extend_from_slice(&1234i32.to_ne_bytes());
        region[..ev.len()].copy_from_slice(&ev);
        let log = reads_path(&j.path, std::process::id());
        // Read back through the file, as a successor does (the mapping is shared).
        assert_eq!(
            read_log(&log),
            vec![Orphan {
                fd: 9,
                mask: hsm_kernel::fanotify::FAN_PRE_ACCESS,
                tid: 1234,
                range: None
            }]
        );
        region[..ev.len()].fill(0);
        assert_eq!(read_log(&log), vec![]);
        drop(region);
        j.remove();
        assert!(!log.exists(), "the read log goes with the journal");
    }

    #[test]
    fn in_flight_events_survive_and_ended_ones_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::create(dir.path()).expect("create");
        let h = FileHandle {
            handle_type: 1,
            bytes: vec![7; 12],
        };
        let r = FileRange {
            offset: 4096,
            count: 65536,
        };
        j.begin(5, 100, Some(r), Some((&h, 33))).expect("begin");
        j.begin(9, 101, None, None).expect("begin");
        j.begin(700, 102, Some(r), Some((&h, 33))).expect("begin");
        j.end(9);
        // Read it as another process would.
        let old = read(&dir.path().join(format!("journal.{}", std::process::id())))
            .expect("read")
            .expect("a journal");
        assert_eq!(old.pid, std::process::id());
        assert_eq!(old.max_fd, 700);
        assert!(!old.stopped_reading);
        let fds: Vec<RawFd> = old.entries.iter().map(|e| e.fd).collect();
        assert_eq!(fds, vec![5, 700]);
        assert_eq!(old.entries[0].handle.as_ref(), Some(&h));
        assert_eq!(old.entries[0].mount_id, 33);
        assert_eq!(old.entries[0].range, Some(r));
        assert_eq!(old.entries[0].tid, 100);
        j.mark_stopped_reading().expect("mark");
        let old = read(&old.path).expect("read").expect("journal");
        assert!(old.stopped_reading);
        assert!(old.writer_alive());
        j.remove();
        assert!(!old.path.exists());
    }

    #[test]
    fn a_torn_slot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let j = Journal::create(dir.path()).expect("create");
        j.begin(3, 1, None, None).expect("begin");
        j.begin(4, 1, None, None).expect("begin");
        // Tear slot 4: a crash in the middle of its write.
        j.file
            .write_all_at(&[0xff; 16], slot_offset(4) + 100)
            .expect("tear");
        let old = read(&j.path).expect("read").expect("journal");
        assert_eq!(
            old.entries.iter().map(|e| e.fd).collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn garbage_is_not_a_journal_and_scan_skips_our_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("journal.1"), b"garbage").expect("write");
        let _mine = Journal::create(dir.path()).expect("create");
        assert!(scan(dir.path()).is_empty());
    }
}
