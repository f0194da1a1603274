//! The bounded cache's adapter side (`[cache] max_size`; the policy is hsm-core's
//! `budget`): the limits in bytes, the evictor (the same eviction `hsm evict` runs), the
//! opens of fully fetched files, and what the trees already hold when the agent starts.
//!
//! A fully fetched file carries an ignore mark, so its reads never reach the agent. Its
//! uses are learnt from a second, notification-only fanotify group with an `FAN_OPEN` mark
//! on each such file: an open costs one queued notification and no waiting. The agent's
//! own opens (on its private mounts) are ignored there too.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hsm_config::CacheConfig;
use hsm_core::{AgentCore, Budget, CacheLimits, EvictOutcome, Evictor, FileKey};
use hsm_kernel::fanotify::Group;
use hsm_kernel::fdio::FileHandle;
use hsm_kernel::stat;
use tracing::{debug, info, warn};

use crate::AgentError;
use crate::cache::{CacheOps, FileOutcome, SkipReason};
use crate::mounts::PrivateMounts;

/// The limits `cfg` asks for, in bytes, or `None` without a limit. A percentage is of the
/// filesystem holding the first tree.
pub(crate) fn limits(
    cfg: &CacheConfig,
    trees: &[PathBuf],
) -> Result<Option<CacheLimits>, AgentError> {
    let fs_bytes = match (cfg.max_size, trees.first()) {
        (hsm_config::CacheSize::Percent(_), Some(t)) => {
            let v = nix::sys::statvfs::statvfs(t).map_err(|e| AgentError::Tree {
                path: t.clone(),
                source: e.into(),
            })?;
            v.blocks() as u64 * v.fragment_size() as u64
        }
        _ => 0,
    };
    let max = cfg.max_size.bytes(fs_bytes);
    if max == 0 {
        return Ok(None);
    }
    let share = |p: hsm_config::Percent| (max as u128 * p.0 as u128 / 100) as u64;
    Ok(Some(CacheLimits {
        max,
        high: share(cfg.high_watermark),
        low: share(cfg.low_watermark),
    }))
}

/// The notification group for opens of fully fetched files, with the agent's private
/// mounts excluded.
pub(crate) fn open_watch(private: &PrivateMounts) -> Result<Arc<Group>, AgentError> {
    let g = Group::new_notify().map_err(AgentError::Group)?;
    private.exclude_opens(&g)?;
    Ok(Arc::new(g))
}

/// Read the open notifications for as long as the agent runs: each is a use.
fn spawn_open_reader(group: Arc<Group>, budget: Arc<Budget>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("hsm-opens".into())
        .spawn(move || {
            // Each notification carries a descriptor: a small buffer keeps them within the
            // margin of the agent's descriptor budget (at most 170 at a time).
            let mut buf = vec![0u8; 4096];
            let mut events = Vec::new();
            loop {
                events.clear();
                if let Err(e) = group.read_events(&mut buf, &mut events) {
                    if e.errno() == Some(libc::EINTR) {
                        continue;
                    }
                    warn!(error = %e, "reading open notifications stopped; the cache order no longer sees opens of fetched files");
                    return;
                }
                for ev in events.drain(..) {
                    if let Some(fd) = ev.fd {
                        if let Ok(st) = stat::fstatx(fd.as_fd()) {
                            let _ = budget.touch(&st);
                        }
                    }
                }
            }
        })
        .map(|_| ())
}

/// The bounded cache evicts with the lifecycle commands' eviction.
#[derive(Debug)]
pub(crate) struct OpsEvictor(pub(crate) Arc<CacheOps>);

type EvictFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = EvictOutcome> + Send + 'a>>;

impl Evictor for OpsEvictor {
    fn evict(&self, handle: FileHandle, key: FileKey) -> EvictFuture<'_> {
        Box::pin(async move {
            let ops = &self.0;
            let Some(fd) = ops
                .private()
                .open_handle(&handle, libc::O_PATH | libc::O_CLOEXEC)
            else {
                return EvictOutcome::Gone;
            };
            match stat::fstatx(fd.as_fd()) {
                Ok(st) if key.is(&st) && st.nlink > 0 => {}
                _ => return EvictOutcome::Gone,
            }
            let path = PathBuf::from(hsm_core::Reopener::path_of(
                ops.private().as_ref(),
                fd.as_fd(),
            ));
            drop(fd);
            match ops.evict_one(&path).await {
                FileOutcome::Evicted { .. } | FileOutcome::AlreadyStub => EvictOutcome::Freed,
                FileOutcome::Failed { error } => EvictOutcome::Failed(error),
                FileOutcome::Skipped { reason } => match reason {
                    SkipReason::Pinned => EvictOutcome::Pinned,
                    SkipReason::Modified | SkipReason::NotRemote => EvictOutcome::NotCache,
                    SkipReason::InUse
                    | SkipReason::FillsInFlight
                    | SkipReason::Building
                    | SkipReason::NoLongerStub => EvictOutcome::InUse,
                    SkipReason::NotPinned => EvictOutcome::Failed(reason.to_string()),
                },
                o @ (FileOutcome::Hydrated { .. } | FileOutcome::Unpinned) => {
                    EvictOutcome::Failed(format!("eviction answered {o:?}"))
                }
            }
        })
    }
}

/// Start the bounded cache: the budget fills are charged to, its eviction task, the reader
/// of open notifications and the walk that counts what the trees already hold.
pub(crate) fn start(
    core: &Arc<AgentCore>,
    ops: &Arc<CacheOps>,
    limits: CacheLimits,
    opens: Arc<Group>,
) -> Result<(), AgentError> {
    let budget = Budget::new(limits);
    core.set_budget(budget.clone());
    budget.start(Arc::new(OpsEvictor(ops.clone())));
    spawn_open_reader(opens.clone(), budget.clone())?;
    spawn_adoption(ops.clone(), budget, opens);
    info!(
        max = limits.max,
        high = limits.high,
        low = limits.low,
        "bounded cache"
    );
    Ok(())
}

/// Count what the trees already hold (stubs with resident data, fully fetched copies), in
/// the background: the limit applies from start-up, the order (oldest change first) once
/// this is done.
fn spawn_adoption(ops: Arc<CacheOps>, budget: Arc<Budget>, opens: Arc<Group>) {
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let mut files = 0u64;
        for t in &ops.trees {
            files += adopt_tree(t, &ops, &budget, &opens);
        }
        let s = budget.status();
        info!(
            files,
            used = s.used_bytes,
            max = s.max_bytes,
            secs = started.elapsed().as_secs_f64(),
            "bounded cache: counted what the trees hold"
        );
    });
}

fn adopt_tree(tree: &Path, ops: &CacheOps, budget: &Budget, opens: &Group) -> u64 {
    let Ok(top) = std::fs::symlink_metadata(tree) else {
        return 0;
    };
    let dev = std::os::unix::fs::MetadataExt::dev(&top);
    let mut n = 0;
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let p = e.path();
            if ft.is_dir() {
                let same = std::fs::symlink_metadata(&p)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) == dev);
                if same {
                    stack.push(p);
                }
            } else if ft.is_file() && adopt_file(&p, ops, budget, opens) {
                n += 1;
            }
        }
    }
    n
}

/// Count one file if it holds remote data. Returns whether it did.
fn adopt_file(path: &Path, ops: &CacheOps, budget: &Budget, opens: &Group) -> bool {
    let Ok((fd, st)) = ops.reopen(path, libc::O_RDONLY | libc::O_NONBLOCK) else {
        return false;
    };
    let (bytes, whole) = match hsm_core::stubio::load(fd.as_fd()) {
        Ok(hsm_core::stubio::Loaded::Stub { meta, map }) => {
            let g = map.resident_count() << map.granule_shift();
            (g.min(meta.remote_size), false)
        }
        Ok(hsm_core::stubio::Loaded::NotStub) => {
            let mut buf = Vec::new();
            match hsm_kernel::xattr::fget(fd.as_fd(), hsm_stub::ORIGIN_XATTR, &mut buf) {
                Ok(true) => (st.size, true),
                _ => return false,
            }
        }
        _ => return false,
    };
    if bytes == 0 {
        return false;
    }
    let Ok((handle, _)) = hsm_kernel::fdio::handle_of(fd.as_fd()) else {
        return false;
    };
    if whole {
        if let Err(e) = opens.add_open_mark(fd.as_fd()) {
            debug!(path = %path.display(), error = %e, "no open mark");
        }
    }
    budget.adopt(&st, handle, bytes, st.ctime.sec.max(0) as u64);
    true
}
