//! The agent's private mounts: where fills are written, and how an open's mount tells
//! whether the file must be fetched whole before the open proceeds.
//!
//! docs/SEMANTICS.md ("Paths to a file") says why; docs/KERNEL.md has the probes.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;

use hsm_core::{LocalError, Reopener};
use hsm_kernel::fanotify::{AGENT_EVENTS, Group};
use hsm_kernel::fdio::{self, FileHandle};
use hsm_kernel::mounts::{self, PrivateMount};
use hsm_kernel::stat::{self, FileStat};
use tracing::{info, warn};

use crate::AgentError;

/// One private, writable clone per served filesystem.
#[derive(Debug)]
pub struct PrivateMounts {
    mounts: Vec<(u64, PrivateMount)>,
    /// Unique mount id → whether the opener's namespace lists it. A mount no namespace
    /// lists (overlayfs's clone of a layer) never becomes listed, and a listed mount stays
    /// what it is, so answers are cached for the mount's life (ids are never reused).
    seen: Mutex<HashMap<u64, bool>>,
}

impl PrivateMounts {
    /// Clone the mount of each tree, one per filesystem (`dev`).
    pub fn new(trees: &[PathBuf]) -> Result<Self, AgentError> {
        let mut mounts: Vec<(u64, PrivateMount)> = Vec::new();
        for tree in trees {
            let dir = std::fs::File::open(tree).map_err(|e| AgentError::Tree {
                path: tree.clone(),
                source: e,
            })?;
            let dev = stat::fstatx(dir.as_fd())?.dev;
            if mounts.iter().any(|(d, _)| *d == dev) {
                continue;
            }
            let m = PrivateMount::clone_of(tree)?;
            if !m.writable() {
                warn!(tree = %tree.display(),
                      "the filesystem is mounted read-only: stubs cannot be filled and reads of what is not local fail with EIO");
            }
            info!(tree = %tree.display(), "private mount for fills");
            mounts.push((dev, m));
        }
        Ok(PrivateMounts {
            mounts,
            seen: Mutex::new(HashMap::new()),
        })
    }

    /// Keep the agent's own accesses through its private mounts out of the group: without
    /// this a fill's open and write would raise events the agent must answer itself.
    pub fn exclude_from(&self, group: &Group) -> Result<(), AgentError> {
        for (_, m) in &self.mounts {
            group.ignore_mount(m.dir(), AGENT_EVENTS)?;
        }
        Ok(())
    }

    /// Keep the agent's own opens through its private mounts out of the open
    /// notifications of the bounded cache (they are not uses).
    pub fn exclude_opens(&self, group: &Group) -> Result<(), AgentError> {
        for (_, m) in &self.mounts {
            group.ignore_mount(m.dir(), libc::FAN_OPEN)?;
        }
        Ok(())
    }

    /// The root directory of the private mount of filesystem `dev` (the first one for a
    /// `dev` without its own, such as a btrfs subvolume): where the agent may create
    /// unnamed files that share blocks with files reopened through it.
    pub fn dir_for(&self, dev: u64) -> Option<BorrowedFd<'_>> {
        self.mounts
            .iter()
            .find(|(d, _)| *d == dev)
            .or_else(|| self.mounts.first())
            .map(|(_, m)| m.dir())
    }

    /// Reopen a file by handle on the first private mount that has it.
    pub fn open_handle(&self, handle: &FileHandle, flags: i32) -> Option<OwnedFd> {
        self.mounts
            .iter()
            .find_map(|(_, m)| fdio::open_by_handle(m.dir(), handle, flags).ok())
    }

    /// Whether a process in thread `tid`'s mount namespace can see the mount `file` was
    /// opened through. False for overlayfs's private clones of its layers (and, to be
    /// safe, when it cannot be told: the thread is gone or /proc cannot be read).
    pub fn reached_directly(&self, file: BorrowedFd<'_>, tid: i32) -> bool {
        let Ok((unique, legacy)) = mounts::mount_ids(file) else {
            return false;
        };
        if unique != 0 {
            if let Some(&v) = self
                .seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&unique)
            {
                return v;
            }
        }
        let Ok(visible) = mounts::visible_to(tid, legacy) else {
            return false;
        };
        if unique != 0 {
            self.seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(unique, visible);
        }
        visible
    }
}

impl Reopener for PrivateMounts {
    fn reopen(
        &self,
        file: BorrowedFd<'_>,
        st: &FileStat,
        flags: i32,
    ) -> Result<OwnedFd, LocalError> {
        let (handle, _) =
            fdio::handle_of(file).map_err(|e| LocalError::from_kernel("name_to_handle_at", &e))?;
        // The tree's own filesystem first; btrfs subvolumes have a dev of their own, so
        // the others are tried too. The inode must be the event's: a handle of one
        // filesystem may decode to some other file on another.
        let order = self
            .mounts
            .iter()
            .filter(|(d, _)| *d == st.dev)
            .chain(self.mounts.iter().filter(|(d, _)| *d != st.dev));
        // The error to report: the file's own filesystem's (ETXTBSY for a file being
        // executed, say), not a later "stale handle" from another filesystem's mount.
        let mut own = None;
        let mut last = None;
        for (d, m) in order {
            let e = match fdio::open_by_handle(m.dir(), &handle, flags) {
                Ok(fd) => match stat::fstatx(fd.as_fd()) {
                    Ok(s) if s.ino == st.ino && s.btime == st.btime => return Ok(fd),
                    Ok(_) => continue,
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if *d == st.dev {
                own.get_or_insert(e);
            } else {
                last = Some(e);
            }
        }
        Err(match own.or(last) {
            Some(e) => LocalError::from_kernel("open_by_handle_at (private mount)", &e),
            None => LocalError::from_io(
                "open_by_handle_at (private mount)",
                &std::io::Error::from_raw_os_error(libc::ESTALE),
            ),
        })
    }

    fn path_of(&self, file: BorrowedFd<'_>) -> String {
        let shown = hsm_core::stubio::path_of(file);
        let Ok((unique, _)) = mounts::mount_ids(file) else {
            return shown;
        };
        match self.mounts.iter().find(|(_, m)| m.unique_id() == unique) {
            // A path on the private clone reads as relative to the tree.
            Some((_, m)) => format!("{}{}", m.path().display(), shown),
            None => shown,
        }
    }
}
