//! Agent restarts without stranding readers (docs/SEMANTICS.md, "Agent restarts").
//!
//! - [`obtain_group`]: the fanotify group comes from systemd's fd store, from the keeper,
//!   or is created (and then handed to the keeper or the fd store).
//! - [`take_over`]: a previous agent that is still running is asked to stop reading events
//!   (SIGUSR2) before this one starts: two processes must never read the same group at
//!   once, since the kernel matches answers by fd number alone.
//! - [`reserve`]: every fd number a previous agent's unanswered events may carry is held
//!   by a placeholder, so no event this agent reads can be given one of them.
//! - [`recover`]: the journaled events are answered (the file reopened by handle, the
//!   range filled, the verdict written by number); then every other number the dead agent
//!   could have used is answered EIO (events it read but had not journaled yet).

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_config::{AgentConfig, KeeperMode};
use hsm_core::{AccessEvent, AgentCore, IntentSource, Verdict};
use hsm_kernel::fanotify::{DenyErrno, Group, GroupOptions, Response};
use hsm_kernel::fdio::ReservedFds;
use tracing::{info, warn};

use crate::AgentError;
use crate::journal::{self, OldJournal};
use crate::keeper;
use crate::mounts::PrivateMounts;

/// systemd's name for the group in its fd store.
pub const FDSTORE_NAME: &str = "hsm-fanotify";

/// Who keeps the group alive across restarts.
#[derive(Debug)]
pub enum GroupStore {
    /// Nobody: the group dies with this process.
    None,
    /// systemd's fd store (`FDSTORE=1`).
    Systemd,
    /// Our keeper process, over this connection.
    Keeper(keeper::Client),
}

impl GroupStore {
    pub fn is_some(&self) -> bool {
        !matches!(self, GroupStore::None)
    }

    /// What `hsm status` calls it.
    pub fn name(&self) -> &'static str {
        match self {
            GroupStore::Keeper(_) => "keeper",
            GroupStore::Systemd => "systemd",
            GroupStore::None => "none",
        }
    }
}

/// The group and where it came from.
#[derive(Debug)]
pub struct Obtained {
    pub group: Arc<Group>,
    /// It was held across a restart (marks and waiting events included).
    pub restored: bool,
    pub store: GroupStore,
}

fn new_group() -> Result<Group, AgentError> {
    Group::new(GroupOptions::default()).map_err(AgentError::Group)
}

/// The group from the fd store or the keeper, or a new one.
pub fn obtain_group(cfg: &AgentConfig) -> Result<Obtained, AgentError> {
    if cfg.keeper == KeeperMode::Off {
        return Ok(Obtained {
            group: Arc::new(new_group()?),
            restored: false,
            store: GroupStore::None,
        });
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        let restored = fdstore_restore();
        let restored_some = restored.is_some();
        let group = match restored {
            Some(fd) => Group::from_owned_fd(fd),
            None => new_group()?,
        };
        return Ok(Obtained {
            group: Arc::new(group),
            restored: restored_some,
            store: GroupStore::Systemd,
        });
    }
    crate::journal::ensure_private_dir(&cfg.state_dir).map_err(|source| AgentError::State {
        what: "state directory",
        path: cfg.state_dir.clone(),
        source,
    })?;
    let socket = keeper::socket_path(&cfg.state_dir);
    let client = keeper::Client::connect_or_spawn(
        &socket,
        cfg.keeper_grace.0,
        &cfg.state_dir.join("keeper.log"),
    )
    .map_err(|source| AgentError::State {
        what: "keeper at",
        path: socket.clone(),
        source,
    })?;
    let held = client.get().map_err(|source| AgentError::State {
        what: "keeper at",
        path: socket.clone(),
        source,
    })?;
    let restored = held.is_some();
    let group = match held {
        Some(fd) => Group::from_owned_fd(fd),
        None => new_group()?,
    };
    Ok(Obtained {
        group: Arc::new(group),
        restored,
        store: GroupStore::Keeper(client),
    })
}

/// Hand a new group to its holder (after the marks are placed).
pub fn hand_over_group(store: &GroupStore, group: &Group) -> Result<(), AgentError> {
    match store {
        GroupStore::None => Ok(()),
        GroupStore::Systemd => fdstore_put(group.as_fd()).map_err(|source| AgentError::HandOver {
            to: "systemd fd store",
            source,
        }),
        GroupStore::Keeper(c) => c.put(group.as_fd()).map_err(|source| AgentError::HandOver {
            to: "keeper",
            source,
        }),
    }
}

/// Release the group for good (a clean stop): the holder drops its copy.
pub fn release_group(store: &GroupStore) {
    let r = match store {
        GroupStore::None => Ok(()),
        GroupStore::Systemd => fdstore_remove(),
        GroupStore::Keeper(c) => c.close(),
    };
    if let Err(e) = r {
        warn!(error = %e, "could not tell the group's holder to release it");
    }
}

/// Ask each running previous agent to stop reading events, and wait until it says it has.
/// Returns the journals as they stand afterwards.
pub fn take_over(state_dir: &Path, wait: Duration) -> Vec<OldJournal> {
    let olds = journal::scan(state_dir);
    for j in olds
        .iter()
        .filter(|j| j.writer_alive() && !j.stopped_reading)
    {
        info!(
            pid = j.pid,
            "asking the running agent to hand over (SIGUSR2)"
        );
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(j.pid as i32),
            nix::sys::signal::Signal::SIGUSR2,
        ) {
            warn!(pid = j.pid, error = %e, "could not signal the running agent");
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let olds = journal::scan(state_dir);
        let waiting: Vec<u32> = olds
            .iter()
            .filter(|j| j.writer_alive() && !j.stopped_reading)
            .map(|j| j.pid)
            .collect();
        if waiting.is_empty() || Instant::now() >= deadline {
            if !waiting.is_empty() {
                warn!(
                    ?waiting,
                    "agents still reading events after the hand-over wait"
                );
            }
            return olds;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Numbers above a previous agent's highest journaled event fd that its unjournaled
/// events may still have had (events are numbered lowest-free, so they stay below the
/// number of descriptors it had open).
pub fn margin(cfg: &AgentConfig) -> RawFd {
    (cfg.cache_entries.min(1 << 20) as RawFd).saturating_add(4096)
}

/// Hold every fd number up to `limit`.
pub fn reserve(limit: RawFd) -> Result<ReservedFds, AgentError> {
    let placeholder = std::fs::File::open("/dev/null")?;
    ReservedFds::fill_up_to(placeholder.as_fd(), limit).map_err(AgentError::Reserve)
}

/// Counts from [`recover`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Recovered {
    /// Journaled events answered after filling what they needed.
    pub answered: usize,
    /// Journaled events that had been answered already (no event with that number).
    pub stale: usize,
    /// Journaled events that could not be served (file gone, no handle): answered EIO.
    pub failed: usize,
}

/// What [`adopt_orphans`] found in dead agents' read logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// Events read but not journaled whose file was found: served like journaled ones.
    pub adopted: usize,
    /// Such events whose file could not be named with certainty: answered EIO.
    pub uncertain: usize,
}

/// Events a dead agent read but had not journaled when it died are still in its read log
/// (journal.rs): their numbers, reader threads and ranges, not their files. The reader is
/// still blocked in the same call; when that call is a read-family one whose offset lies
/// in the event's range, on a file of a served filesystem, and its process maps no file of
/// a served filesystem (else the event could be a page fault on the read's buffer), the
/// call's descriptor names the file: the event becomes a journal entry and is served like
/// the others. Anything less certain is left to [`sweep_unjournaled`] (EIO).
pub fn adopt_orphans(dead: &mut [OldJournal], served_devs: &[u64]) -> Adopted {
    let mut a = Adopted::default();
    for j in dead.iter_mut() {
        let journaled: std::collections::HashSet<RawFd> = j.entries.iter().map(|e| e.fd).collect();
        let orphans: Vec<journal::Orphan> = j
            .read_log
            .iter()
            .filter(|o| !journaled.contains(&o.fd))
            .copied()
            .collect();
        for o in orphans {
            match o
                .range
                .and_then(|range| orphan_file(o.tid, range, served_devs))
            {
                Some((handle, mount_id)) => {
                    j.entries.push(journal::Entry {
                        fd: o.fd,
                        tid: o.tid,
                        range: o.range,
                        mount_id,
                        handle: Some(handle),
                        seq: 0,
                    });
                    a.adopted += 1;
                }
                None => a.uncertain += 1,
            }
        }
    }
    a
}

/// The file (its handle and mount id) of an access event of thread `tid` over `range`, if
/// it can be named with certainty (see [`adopt_orphans`]).
fn orphan_file(
    tid: i32,
    range: hsm_kernel::fanotify::FileRange,
    served_devs: &[u64],
) -> Option<(hsm_kernel::fdio::FileHandle, i32)> {
    let read = hsm_kernel::intent::blocked_read(tid)?;
    if read.offset < range.offset || read.offset >= range.offset + range.count.max(1) {
        return None;
    }
    let mapped = hsm_kernel::intent::mapped_devices(tid)?;
    if mapped.iter().any(|d| served_devs.contains(d)) {
        return None;
    }
    let file = nix::fcntl::open(
        format!("/proc/{tid}/fd/{}", read.fd).as_str(),
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .ok()?;
    if !served_devs.contains(&hsm_kernel::stat::fstatx(file.as_fd()).ok()?.dev) {
        return None;
    }
    hsm_kernel::fdio::handle_of(file.as_fd()).ok()
}

/// Answer EIO every number up to `limit` that no journal entry claims: events a dead
/// agent had read but not journaled. Only when no earlier agent is still running (its
/// numbers are its own until it exits). Returns how many events that answered.
pub fn sweep_unjournaled(group: &Group, dead: &[OldJournal], limit: RawFd) -> usize {
    let journaled: std::collections::HashSet<RawFd> = dead
        .iter()
        .flat_map(|j| j.entries.iter().map(|e| e.fd))
        .collect();
    (0..=limit)
        .filter(|n| !journaled.contains(n))
        .filter(|&n| {
            group
                .respond_number(n, Response::Deny(DenyErrno::Eio))
                .is_ok()
        })
        .count()
}

/// Answer the journaled events dead agents left waiting, each in its own task (one slow
/// fill must not hold up the others), then delete their journals.
pub async fn recover(
    core: Arc<AgentCore>,
    group: Arc<Group>,
    private: &PrivateMounts,
    dead: Vec<OldJournal>,
) -> Recovered {
    let mut tasks = Vec::new();
    for j in &dead {
        for e in j.entries.iter().cloned() {
            // Reopened on the agent's own mount: the reader's may be read-only or an
            // overlayfs clone that no longer exists.
            let file = e
                .handle
                .as_ref()
                .and_then(|h| private.open_handle(h, libc::O_RDONLY | libc::O_LARGEFILE));
            let (core, group, pid) = (core.clone(), group.clone(), j.pid);
            tasks.push(tokio::spawn(async move {
                answer_entry(&core, &group, pid, &e, file).await
            }));
        }
    }
    let mut r = Recovered::default();
    for t in tasks {
        match t.await {
            Ok(Outcome::Answered) => r.answered += 1,
            Ok(Outcome::Stale) => r.stale += 1,
            Ok(Outcome::Failed) => r.failed += 1,
            Err(_) => r.failed += 1,
        }
    }
    for j in &dead {
        let _ = std::fs::remove_file(&j.path);
        let _ = std::fs::remove_file(journal::reads_path(&j.path, j.pid));
    }
    r
}

enum Outcome {
    Answered,
    Stale,
    Failed,
}

async fn answer_entry(
    core: &Arc<AgentCore>,
    group: &Group,
    pid: u32,
    e: &journal::Entry,
    file: Option<OwnedFd>,
) -> Outcome {
    let mut failed = false;
    let response = match file {
        Some(f) => {
            let verdict = core
                .handle(AccessEvent {
                    fd: f.as_fd(),
                    range: crate::core_range(e.range),
                    intent: IntentSource::Tid(e.tid),
                })
                .await;
            match verdict {
                Verdict::Allow | Verdict::AllowAndIgnore => Response::Allow,
                Verdict::Deny(errno) => Response::Deny(crate::kernel_errno(errno)),
            }
        }
        None => {
            failed = true;
            warn!(
                fd = e.fd,
                pid,
                "cannot reopen the file of an event a previous agent left waiting; answering EIO"
            );
            Response::Deny(DenyErrno::Eio)
        }
    };
    match group.respond_number(e.fd, response) {
        Ok(()) if failed => Outcome::Failed,
        Ok(()) => Outcome::Answered,
        Err(err) if err.errno() == Some(libc::ENOENT) => Outcome::Stale,
        Err(err) => {
            warn!(fd = e.fd, error = %err, "answering a previous agent's event");
            Outcome::Failed
        }
    }
}

// --- systemd fd store -------------------------------------------------------------------

/// The group systemd kept for us (LISTEN_FDS / LISTEN_FDNAMES), if any.
fn fdstore_restore() -> Option<OwnedFd> {
    hsm_kernel::fdio::take_listen_fd(FDSTORE_NAME)
}

/// Send `msg` (and a descriptor) to systemd's NOTIFY_SOCKET (sd_notify).
pub fn notify_with_fd(msg: &str, fd: Option<std::os::fd::BorrowedFd<'_>>) -> std::io::Result<()> {
    let path = std::env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| std::io::Error::other("NOTIFY_SOCKET is not set"))?;
    notify_at(&path, msg, fd)
}

fn notify_at(
    path: &std::ffi::OsStr,
    msg: &str,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        sock.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(
            abstract_name,
        )?)?;
    } else {
        sock.connect(Path::new(path))?;
    }
    hsm_kernel::fdio::send_fd(sock.as_fd(), msg.as_bytes(), fd).map_err(std::io::Error::other)
}

fn fdstore_put(group: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    notify_with_fd(&format!("FDSTORE=1\nFDNAME={FDSTORE_NAME}"), Some(group))
}

fn fdstore_remove() -> std::io::Result<()> {
    notify_with_fd(&format!("FDSTOREREMOVE=1\nFDNAME={FDSTORE_NAME}"), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_store_message_carries_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let file = tempfile::tempfile().expect("tempfile");
        notify_at(
            path.as_os_str(),
            &format!("FDSTORE=1\nFDNAME={FDSTORE_NAME}"),
            Some(file.as_fd()),
        )
        .expect("notify");
        let mut buf = [0u8; 128];
        let (n, fd) = hsm_kernel::fdio::recv_fd(server.as_fd(), &mut buf).expect("recv");
        assert_eq!(
            std::str::from_utf8(&buf[..n]).expect("utf8"),
            "FDSTORE=1\nFDNAME=hsm-fanotify"
        );
        assert!(fd.is_some());
    }
}
