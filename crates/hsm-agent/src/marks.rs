//! Where the agent is allowed to start and what it tells the kernel: the pre-flight
//! checks, the fanotify marks on each tree, and the BPF stub guard.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use hsm_config::{GuardMode, MarkKind};
use hsm_kernel::fanotify::{
    AGENT_EVENTS, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FAN_PRE_ACCESS, Group, MarkTarget,
};
use hsm_kernel::stat;
use tracing::{debug, info, warn};

use crate::AgentError;

/// Check the kernel before touching fanotify, so the error says what to do.
pub(crate) fn preflight() -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    if let Some((major, minor)) = hsm_kernel::sys::kernel_version() {
        if (major, minor) < (6, 14) {
            return Err(AgentError::KernelTooOld { major, minor });
        }
    }
    Ok(())
}

pub(crate) fn place_marks(
    group: &Group,
    trees: &[PathBuf],
    kind: MarkKind,
) -> Result<(), AgentError> {
    let root_dev = stat::fstatx(std::fs::File::open("/")?.as_fd())
        .map(|s| s.dev)
        .ok();
    let mut seen = HashSet::new();
    for tree in trees {
        let dir = std::fs::File::open(tree).map_err(|source| AgentError::Tree {
            path: tree.clone(),
            source,
        })?;
        let st = stat::fstatx(dir.as_fd())?;
        if !st.is_dir() {
            return Err(AgentError::NotADirectory { path: tree.clone() });
        }
        let target = match kind {
            MarkKind::Filesystem => MarkTarget::Filesystem,
            MarkKind::Mount => MarkTarget::Mount,
        };
        let key = (
            st.dev,
            matches!(kind, MarkKind::Mount).then(|| tree.clone()),
        );
        // Opens matter only where the tree is reached through a mount the agent does not
        // serve directly (overlayfs's private layer mounts, other namespaces, bind mounts);
        // a mount mark covers none of those, so it asks for the data accesses alone.
        let mask = match kind {
            MarkKind::Filesystem => AGENT_EVENTS,
            MarkKind::Mount => FAN_PRE_ACCESS,
        };
        if !seen.insert(key) {
            place_open_ignore(group, &dir, tree, kind)?;
            continue;
        }
        group
            .add_mark(target, mask, tree)
            .map_err(|source| AgentError::Mark {
                path: tree.clone(),
                source,
            })?;
        place_open_ignore(group, &dir, tree, kind)?;
        let shared = Some(st.dev) == root_dev || st.mount_root == Some(false);
        if shared && kind == MarkKind::Filesystem {
            warn!(
                tree = %tree.display(),
                "the filesystem mark covers the whole filesystem holding this tree, not just the tree: \
                 every file read on it raises one event until it is ignore-marked"
            );
        }
        info!(tree = %tree.display(), mark = ?kind, "marked");
    }
    Ok(())
}

/// The tree's own mount (the one the agent resolved it through) raises no open events:
/// reads and mappings there raise events of their own, so an open needs no answer. Opens
/// through every other mount of the filesystem still arrive (overlayfs's private layer
/// mounts, bind mounts, other namespaces). Without this, 10,000 readers opening at once
/// add 10,000 answers, each of which wakes every reader waiting on the group
/// (docs/RELIABILITY.md).
fn place_open_ignore(
    group: &Group,
    dir: &std::fs::File,
    tree: &Path,
    kind: MarkKind,
) -> Result<(), AgentError> {
    if kind != MarkKind::Filesystem {
        return Ok(());
    }
    group
        .ignore_mount(dir.as_fd(), FAN_OPEN_PERM | FAN_OPEN_EXEC_PERM)
        .map_err(|source| AgentError::IgnoreOpens {
            path: tree.to_path_buf(),
            source,
        })
}

fn warn_stale(stale: &[String]) {
    for p in stale {
        warn!(path = %p, "removed the staging directory of a guard install that did not finish");
    }
}

/// Install the BPF LSM stub guard as `mode` says. `Ok(true)` when it is in place.
pub(crate) fn install_guard(mode: GuardMode) -> Result<bool, AgentError> {
    if mode == GuardMode::Off {
        debug!("stub guard off by configuration");
        return Ok(false);
    }
    match hsm_bpf::install_guard() {
        Ok(hsm_bpf::GuardInstall::Installed {
            skipped_hooks,
            replaced,
            stale,
        }) => {
            warn_stale(&stale);
            if let Some(what) = replaced {
                warn!(
                    pinned = hsm_bpf::PIN_DIR,
                    planted = %what,
                    "removed what was at the guard's pin directory: it was not the guard's"
                );
            }
            info!(
                pinned = hsm_bpf::PIN_DIR,
                ?skipped_hooks,
                "stub guard installed (BPF LSM): stubs nobody serves fail with EIO"
            );
            Ok(true)
        }
        Ok(hsm_bpf::GuardInstall::AlreadyInstalled { stale }) => {
            warn_stale(&stale);
            info!(pinned = hsm_bpf::PIN_DIR, "stub guard already installed");
            Ok(true)
        }
        Err(e) if mode == GuardMode::Require => Err(AgentError::GuardRequired(e)),
        Err(e) => {
            warn!(
                reason = %e,
                "stub guard unavailable on this kernel; serving without it (a stub read while no agent serves it returns zeros)"
            );
            Ok(false)
        }
    }
}

pub(crate) fn register_with_guard(
    mode: GuardMode,
    trees: &[PathBuf],
    keeper_pid: Option<u32>,
) -> Result<Option<hsm_bpf::Registration>, AgentError> {
    let mut devs = Vec::new();
    for t in trees {
        let dir = std::fs::File::open(t)?;
        devs.push(stat::fstatx(dir.as_fd())?.dev);
    }
    devs.sort_unstable();
    devs.dedup();
    if let Some(pid) = keeper_pid {
        // While the keeper holds the group, readers wait for the next agent instead of
        // failing: the keeper counts as a holder.
        if let Err(e) = hsm_bpf::guard::register_other(hsm_bpf::HolderKind::Keeper, pid, &devs) {
            warn!(error = %e, "could not register the keeper with the stub guard");
        }
    }
    match hsm_bpf::Registration::register(hsm_bpf::HolderKind::Agent, &devs) {
        Ok(r) => {
            info!(filesystems = devs.len(), "registered with the stub guard");
            Ok(Some(r))
        }
        Err(e) if mode == GuardMode::Require => Err(AgentError::GuardRegistration(e)),
        Err(e) => {
            warn!(error = %e, "could not register with the stub guard: its stubs will fail with EIO");
            Ok(None)
        }
    }
}
