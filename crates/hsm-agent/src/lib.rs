//! `hsm agent`: the fanotify adapter.
//!
//! It places `FAN_PRE_ACCESS` marks, reads events, turns each into an
//! [`hsm_core::AccessEvent`] for the core, writes the answer, and places ignore marks for
//! files with nothing to fetch. Policy lives in `hsm-core`; this crate only translates.

pub mod events;
pub mod journal;
pub mod keeper;
pub mod mounts;
pub mod restart;

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hsm_config::{AgentConfig, GuardMode, MarkKind};
use hsm_core::metrics::Metrics;
use hsm_core::{
    AccessEvent, AgentCore, CoreOptions, IntentSource, Later, MarkSink, UrlRemotes, Verdict,
};
use hsm_kernel::fanotify::{
    AGENT_EVENTS, DenyErrno, Event, FAN_OPEN_EXEC_PERM, FAN_OPEN_PERM, FAN_PRE_ACCESS, Group,
    MarkTarget, Response,
};
use hsm_kernel::stat;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, error, info, warn};

use crate::events::Pending;

/// Why the agent could not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Startup(String),
    #[error("{}: {source}", path.display())]
    Tree {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fanotify: {0}")]
    Kernel(#[from] hsm_kernel::KernelError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub trees: Vec<PathBuf>,
    pub config: AgentConfig,
    pub remote: hsm_config::RemoteConfig,
}

/// Thread ids of the agent's own threads: their events are allowed at once (the agent's
/// reads of a local remote on the same filesystem would otherwise wait on itself).
#[derive(Debug, Default)]
struct OwnThreads(RwLock<HashSet<i32>>);

impl OwnThreads {
    fn add(&self, tid: i32) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tid);
    }
    fn remove(&self, tid: i32) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tid);
    }
    fn contains(&self, tid: i32) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&tid)
    }
}

#[derive(Debug)]
struct GroupMarks {
    group: Arc<Group>,
    metrics: Arc<Metrics>,
}

impl MarkSink for GroupMarks {
    fn ignore(&self, fd: std::os::fd::BorrowedFd<'_>) {
        match self.group.add_ignore_mark(fd, AGENT_EVENTS) {
            Ok(()) => Metrics::inc(&self.metrics.ignore_marks),
            Err(e) => debug!(error = %e, "could not place ignore mark"),
        }
    }
}

/// Run the agent until SIGTERM or SIGINT. Builds its own runtime so that every thread it
/// creates is known as the agent's own.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let own = Arc::new(OwnThreads::default());
    own.add(hsm_kernel::sys::gettid());
    let (on_start, on_stop) = (own.clone(), own.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hsm-agent")
        .on_thread_start(move || on_start.add(hsm_kernel::sys::gettid()))
        .on_thread_stop(move || on_stop.remove(hsm_kernel::sys::gettid()))
        .build()?;
    runtime.block_on(serve(opts, own))
}

/// Check the kernel before touching fanotify, so the error says what to do.
fn preflight() -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::Startup(
            "hsm agent needs CAP_SYS_ADMIN for fanotify pre-content events: run it as root".into(),
        ));
    }
    if let Some((major, minor)) = hsm_kernel::sys::kernel_version() {
        if (major, minor) < (6, 14) {
            return Err(AgentError::Startup(format!(
                "kernel {major}.{minor} has no fanotify pre-content events (FAN_PRE_ACCESS needs Linux 6.14 or newer); \
                 refusing to start, stubs would read as zeros"
            )));
        }
    }
    Ok(())
}

fn place_marks(group: &Group, trees: &[PathBuf], kind: MarkKind) -> Result<(), AgentError> {
    let root_dev = stat::fstatx(std::fs::File::open("/")?.as_fd())
        .map(|s| s.dev)
        .ok();
    let mut seen = HashSet::new();
    for tree in trees {
        let dir = std::fs::File::open(tree)
            .map_err(|e| AgentError::Startup(format!("{}: {e}", tree.display())))?;
        let st = stat::fstatx(dir.as_fd())?;
        if !st.is_dir() {
            return Err(AgentError::Startup(format!(
                "{}: not a directory",
                tree.display()
            )));
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
        if let Err(e) = group.add_mark(target, mask, tree) {
            let why = match e.errno() {
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => format!(
                    "{}: this filesystem cannot raise pre-content events (ext4, xfs and btrfs can; tmpfs, NFS and overlayfs cannot)",
                    tree.display()
                ),
                Some(libc::EXDEV) => format!(
                    "{}: the path is on an idmapped or special mount that cannot be marked; use the filesystem's own mount",
                    tree.display()
                ),
                _ => format!("{}: {e}", tree.display()),
            };
            return Err(AgentError::Startup(why));
        }
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
        .map_err(|e| {
            AgentError::Startup(format!(
                "{}: ignoring opens on its mount: {e}",
                tree.display()
            ))
        })
}

/// Install the BPF LSM stub guard as `mode` says. `Ok(true)` when it is in place.
fn install_guard(mode: GuardMode) -> Result<bool, AgentError> {
    if mode == GuardMode::Off {
        debug!("stub guard off by configuration");
        return Ok(false);
    }
    match hsm_bpf::install_guard() {
        Ok(hsm_bpf::GuardInstall::Installed { skipped_hooks }) => {
            info!(
                pinned = hsm_bpf::PIN_DIR,
                ?skipped_hooks,
                "stub guard installed (BPF LSM): stubs nobody serves fail with EIO"
            );
            Ok(true)
        }
        Ok(hsm_bpf::GuardInstall::AlreadyInstalled) => {
            info!(pinned = hsm_bpf::PIN_DIR, "stub guard already installed");
            Ok(true)
        }
        Err(e) if mode == GuardMode::Require => Err(AgentError::Startup(format!(
            "[agent] guard = \"require\", but the stub guard cannot be installed: {e}"
        ))),
        Err(e) => {
            warn!(
                reason = %e,
                "stub guard unavailable on this kernel; serving without it (a stub read while no agent serves it returns zeros)"
            );
            Ok(false)
        }
    }
}

fn register_with_guard(
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
        Err(e) if mode == GuardMode::Require => Err(AgentError::Startup(format!(
            "could not register with the stub guard: {e}"
        ))),
        Err(e) => {
            warn!(error = %e, "could not register with the stub guard: its stubs will fail with EIO");
            Ok(None)
        }
    }
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn stats_json(core: &AgentCore, started: Instant, pending: usize) -> String {
    let mut v = core.metrics().to_json();
    if let Some(m) = v.as_object_mut() {
        m.insert("uptime_secs".into(), started.elapsed().as_secs_f64().into());
        m.insert("cached_stubs".into(), (core.cached_stubs() as u64).into());
        m.insert("events_in_flight".into(), (pending as u64).into());
    }
    v.to_string()
}

/// Tell systemd we are ready, if it asked (`NOTIFY_SOCKET`).
fn notify_systemd(state: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = restart::notify_with_fd(state, None) {
        warn!(error = %e, "could not notify systemd");
    }
}

async fn serve(opts: AgentOptions, own: Arc<OwnThreads>) -> Result<(), AgentError> {
    preflight()?;
    let cfg = &opts.config;
    let mut trees: Vec<PathBuf> = cfg.trees.iter().chain(&opts.trees).cloned().collect();
    if trees.is_empty() {
        return Err(AgentError::Startup(
            "no trees to serve: give DST directories or [agent] trees in the config".into(),
        ));
    }
    for t in &mut trees {
        *t = std::fs::canonicalize(&*t)
            .map_err(|e| AgentError::Startup(format!("{}: {e}", t.display())))?;
    }
    let nofile = hsm_kernel::sys::raise_nofile_limit()?;
    debug!(nofile, "open file limit");

    // The group: kept by the keeper or systemd across restarts, or new.
    let obtained = restart::obtain_group(cfg)?;
    let group = obtained.group.clone();
    let holder = obtained.holder;
    // A previous agent still running hands over: it stops reading before we start.
    let olds = if holder.is_some() {
        restart::take_over(&cfg.state_dir, Duration::from_secs(10))
    } else {
        Vec::new()
    };
    let (live_olds, dead_olds): (Vec<_>, Vec<_>) = olds.into_iter().partition(|j| j.writer_alive());
    debug!(
        restored = obtained.restored,
        live = live_olds.len(),
        dead = dead_olds.len(),
        "group obtained; earlier journals read"
    );
    // Hold every fd number an earlier agent's unanswered events may carry, before we read
    // a single event (docs/SEMANTICS.md, "Agent restarts").
    let earlier_bound = live_olds
        .iter()
        .chain(&dead_olds)
        .map(|j| j.number_bound())
        .max();
    let reserve_to = if obtained.restored || earlier_bound.is_some() {
        let wanted = earlier_bound.unwrap_or(restart::margin(cfg));
        // Leave room for our own descriptors above the reservation.
        let cap = (nofile as i64 - 4096).clamp(1024, i32::MAX as i64) as i32;
        if wanted > cap {
            error!(
                wanted,
                cap,
                nofile,
                "an earlier agent's events may carry fd numbers beyond what the open-file limit lets us hold: raise RLIMIT_NOFILE (a collision could answer the wrong event)"
            );
        }
        Some(wanted.min(cap))
    } else {
        None
    };
    let mut reserved = match reserve_to {
        Some(limit) => Some(restart::reserve(limit)?),
        None => None,
    };
    debug!(?reserve_to, "fd numbers held");
    // Events a dead agent read but never journaled can only be answered blind: EIO, at
    // once. Then only the journaled numbers (and a running predecessor's) stay held, so
    // this agent's own events are numbered low again.
    if let (Some(limit), Some(held)) = (reserve_to, reserved.as_mut()) {
        if live_olds.is_empty() {
            let swept = restart::sweep_unjournaled(&group, &dead_olds, limit);
            if swept > 0 {
                warn!(
                    swept,
                    "answered EIO to events a crashed agent had read but not journaled"
                );
            }
            let journaled: std::collections::HashSet<i32> = dead_olds
                .iter()
                .flat_map(|j| j.entries.iter().map(|e| e.fd))
                .collect();
            held.retain(|n| journaled.contains(&n));
        }
    }
    debug!("unjournaled events answered");
    let journal = if holder.is_some() {
        Some(Arc::new(journal::Journal::create(&cfg.state_dir).map_err(
            |e| AgentError::Startup(format!("journal in {}: {e}", cfg.state_dir.display())),
        )?))
    } else {
        None
    };
    let metrics = Arc::new(Metrics::default());
    // Fills go through the agent's own clone of each tree's mount, whatever mount the
    // reader used (docs/SEMANTICS.md, "Paths to a file").
    let private = Arc::new(mounts::PrivateMounts::new(&trees)?);
    if cfg.mark == MarkKind::Mount {
        warn!(
            "mark = \"mount\" covers only the trees' own mounts: overlayfs layers, other mount namespaces and other bind mounts of the trees are not served (their stubs read as holes); use the default filesystem mark"
        );
    }
    let core = AgentCore::new(
        CoreOptions {
            max_concurrent_fetches: cfg.max_concurrent_fetches,
            max_request_size: cfg.max_request_size.0,
            readahead: cfg.readahead.0,
            persist_interval: cfg.persist_interval.0,
            cache_entries: cfg.cache_entries,
            max_bandwidth: cfg.max_bandwidth.0,
            read_timeout: opts.remote.read_timeout.0,
        },
        Arc::new(UrlRemotes::new(opts.remote.clone())),
        Arc::new(GroupMarks {
            group: group.clone(),
            metrics: metrics.clone(),
        }),
        private.clone(),
        metrics.clone(),
    );
    let guard_installed = install_guard(cfg.guard)?;
    place_marks(&group, &trees, cfg.mark)?;
    // Before any event is read, so before the core can open anything there.
    private.exclude_from(&group)?;
    if !obtained.restored {
        restart::hand_over_group(&holder, &group)?;
    }
    // Registration comes after the marks: a stub opened once we are registered must raise
    // events (docs/BPF.md, "Order at start-up").
    let registration = if guard_installed {
        let keeper_pid = match &holder {
            restart::Holder::Keeper(c) => c.keeper_pid(),
            _ => None,
        };
        register_with_guard(cfg.guard, &trees, keeper_pid)?
    } else {
        None
    };
    let _fastpath = if cfg.fastpath {
        match hsm_bpf::fastpath::attach(&group) {
            hsm_bpf::fastpath::Fastpath::Attached(h) => {
                info!(
                    "fanotify fastpath handler attached: events for non-stubs stay in the kernel"
                );
                Some(h)
            }
            hsm_bpf::fastpath::Fastpath::Absent(why) => {
                info!(reason = %why, "fanotify fastpath unavailable; ignore marks keep files that are not stubs away from the agent");
                None
            }
        }
    } else {
        None
    };

    let pending = Arc::new(Pending::new(group.clone(), journal.clone()));
    let started = Instant::now();
    let ctx = Arc::new(Ctx {
        // Every event thread may be inside one read (up to ~1365 events, each with an fd)
        // when the budget is reached; 1024 more for sockets, files and the journal.
        fd_budget: (nofile as usize)
            .saturating_sub(cfg.event_threads.max(1) * journal::EVENTS_PER_READ as usize + 1024)
            .max(256),
        core: core.clone(),
        group: group.clone(),
        pending: pending.clone(),
        private: private.clone(),
        own,
        metrics: metrics.clone(),
        rt: tokio::runtime::Handle::current(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        paused: std::sync::atomic::AtomicBool::new(false),
    });
    let stop = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| AgentError::Startup(format!("eventfd: {e}")))?,
    );
    let mut threads = Vec::new();
    for i in 0..cfg.event_threads.max(1) {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("hsm-events-{i}"))
                .spawn(move || event_thread(&ctx, &stop))?,
        );
    }
    // Answer what earlier agents left waiting, while new events are already served (they
    // are numbered above the reservation).
    if reserved.is_some() {
        let (core, group, state_dir) = (core.clone(), group.clone(), cfg.state_dir.clone());
        let private = private.clone();
        tokio::spawn(async move {
            let r = restart::recover(core.clone(), group.clone(), &private, dead_olds).await;
            info!(
                answered = r.answered,
                already_answered = r.stale,
                failed = r.failed,
                "answered the events earlier agents left waiting"
            );
            // A running predecessor keeps answering its own events by number until it
            // exits: hold the numbers until then.
            let mut live = live_olds;
            while !live.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                live.retain(|j| j.writer_alive());
            }
            let leftover: Vec<_> = journal::scan(&state_dir)
                .into_iter()
                .filter(|j| !j.writer_alive())
                .collect();
            if !leftover.is_empty() {
                // It stopped reading before it died, so every event it read is journaled.
                let r = restart::recover(core, group, &private, leftover).await;
                warn!(
                    answered = r.answered,
                    "a predecessor died during its hand-over; answered what it left"
                );
            }
            drop(reserved);
        });
    }
    if let Some(p) = &cfg.ready_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| AgentError::Startup(format!("ready file {}: {e}", p.display())))?;
    }
    notify_systemd("READY=1");
    info!(
        trees = trees.len(),
        pid = std::process::id(),
        event_threads = threads.len(),
        "hsm agent ready"
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigusr2 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())?;
    let mut stats_tick =
        tokio::time::interval(cfg.stats_interval.0.max(Duration::from_millis(100)));
    let write_stats = |pending: usize| {
        if let Some(p) = &cfg.stats_file {
            if let Err(e) = write_atomic(p, &stats_json(&core, started, pending)) {
                warn!(path = %p.display(), error = %e, "could not write stats file");
            }
        }
    };
    let handover = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: finishing fetches in flight"); break false; }
            _ = sigint.recv() => { info!("SIGINT: finishing fetches in flight"); break false; }
            _ = sigusr2.recv() => {
                info!("SIGUSR2: handing over to a new agent; reading no more events");
                break true;
            }
            _ = stats_tick.tick() => {
                write_stats(pending.len());
                pending.refresh_journal_high_water();
            }
        }
    };
    if handover {
        // The successor waits for our journal to say we stopped reading, then reads the
        // same group. We finish what we read, then leave without releasing anything.
        ctx.stopping.store(true, Ordering::SeqCst);
        let _ = stop.write(1);
        for t in threads {
            if t.join().is_err() {
                error!("an event thread panicked");
            }
        }
        if let Some(j) = &journal {
            if let Err(e) = j.mark_stopped_reading() {
                warn!(error = %e, "could not record the hand-over in the journal");
            }
        }
        let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout.0;
        while !(pending.is_empty() && core.wait_fills(Duration::ZERO).await) {
            if tokio::time::Instant::now() >= deadline {
                let denied = pending.deny_all(DenyErrno::Eio);
                warn!(denied, "hand-over timeout: denied events still waiting");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let failed = core.flush_all().await;
        write_stats(0);
        drop(registration);
        if let Some(j) = journal {
            drop(pending);
            drop(ctx);
            if let Ok(j) = Arc::try_unwrap(j) {
                j.remove();
            }
        }
        info!(unflushed = failed, "hsm agent handed over and stopped");
        return Ok(());
    }

    // Shutdown: no new fetches. The event threads keep answering (resident ranges and
    // non-stubs are allowed, new fetches get EIO) until the fills in flight are done.
    notify_systemd("STOPPING=1");
    core.begin_shutdown();
    let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout.0;
    loop {
        if pending.is_empty() && core.wait_fills(Duration::ZERO).await {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let denied = pending.deny_all(DenyErrno::Eio);
            warn!(denied, "shutdown timeout: denied events still waiting");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        write_stats(pending.len());
    }
    // From here on the guard (if installed) fails stub reads with EIO instead of letting
    // them reach a group that is about to close.
    if let Some(r) = registration {
        if let Err(e) = r.release() {
            warn!(error = %e, "could not deregister from the stub guard");
        }
    }
    // No new events from here on: anything touching a stub now is either denied by the
    // guard or (without one) reads what is resident, but never waits on a group that is
    // about to be released.
    if let Err(e) = group.flush_all_marks() {
        warn!(error = %e, "could not remove the marks before releasing the group");
    }
    // Stop the event threads; each drains what is queued before it exits. Anything raised
    // after the group closes is allowed by the kernel (see docs/SEMANTICS.md).
    ctx.stopping.store(true, Ordering::SeqCst);
    let _ = stop.write(1);
    for t in threads {
        if t.join().is_err() {
            error!("an event thread panicked");
        }
    }
    for _ in 0..200 {
        if pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let denied = pending.deny_all(DenyErrno::Eio);
    if denied > 0 {
        warn!(denied, "denied events still waiting at exit");
    }
    let failed = core.flush_all().await;
    write_stats(0);
    restart::release_group(&holder);
    if let Some(j) = journal {
        drop(pending);
        drop(ctx);
        if let Ok(j) = Arc::try_unwrap(j) {
            j.remove();
        }
    }
    info!(metrics = %core.metrics().to_json(), unflushed = failed, "hsm agent stopped");
    if let Some(p) = &cfg.ready_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

struct Ctx {
    /// Open descriptors the agent may use before it stops reading events (each event
    /// brings one, each cached stub holds one); the rest is room for everything else.
    fd_budget: usize,
    core: Arc<AgentCore>,
    group: Arc<Group>,
    pending: Arc<Pending>,
    private: Arc<mounts::PrivateMounts>,
    own: Arc<OwnThreads>,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    stopping: std::sync::atomic::AtomicBool,
    paused: std::sync::atomic::AtomicBool,
}

/// One event thread: wait for events (one thread woken per event, EPOLLEXCLUSIVE), answer
/// what can be answered on the spot, hand the rest to the async core.
fn event_thread(ctx: &Arc<Ctx>, stop: &EventFd) {
    let tid = hsm_kernel::sys::gettid();
    ctx.own.add(tid);
    let run = || -> Result<(), String> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        ep.add(
            ctx.group.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, 0),
        )
        .map_err(|e| format!("epoll add fanotify: {e}"))?;
        ep.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .map_err(|e| format!("epoll add eventfd: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut batch = Vec::with_capacity(64);
        let mut ready = [EpollEvent::empty(); 2];
        loop {
            if over_fd_budget(ctx) {
                // Events wait in the kernel's (unlimited) queue until answers free some
                // descriptors; reading more now would fail them with EMFILE.
                if !ctx.paused.swap(true, Ordering::Relaxed) {
                    Metrics::inc(&ctx.metrics.reads_paused);
                    warn!(
                        in_flight = ctx.pending.len(),
                        "open descriptors near the limit: reading events paused"
                    );
                }
                std::thread::sleep(Duration::from_millis(1));
                if ctx.stopping.load(Ordering::SeqCst) {
                    return Ok(());
                }
                continue;
            }
            ctx.paused.store(false, Ordering::Relaxed);
            match ep.wait(&mut ready, EpollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("epoll_wait: {e}")),
            }
            drain(ctx, &mut buf, &mut batch);
            if ctx.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Events come in bursts (a program opening file after file): keep polling
            // briefly after a burst so the next event finds this thread awake instead of
            // paying a wake-up (tens of microseconds on a virtual CPU).
            let mut idle_since = Instant::now();
            while idle_since.elapsed() < SPIN_AFTER_EVENT {
                if drain(ctx, &mut buf, &mut batch) > 0 {
                    idle_since = Instant::now();
                } else {
                    std::thread::yield_now();
                }
                if ctx.stopping.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
        }
    };
    if let Err(e) = run() {
        error!(error = %e, "event thread failed");
    }
    ctx.own.remove(tid);
}

/// How long an event thread keeps polling after its last event before it sleeps.
const SPIN_AFTER_EVENT: Duration = Duration::from_micros(100);

/// Near the descriptor limit? (events in flight plus cached stubs, each one fd)
fn over_fd_budget(ctx: &Ctx) -> bool {
    ctx.pending.len() + ctx.core.cached_stubs() >= ctx.fd_budget
}

/// Read and answer every queued event (until the descriptor budget is used); returns how
/// many.
fn drain(ctx: &Arc<Ctx>, buf: &mut [u8], batch: &mut Vec<Event>) -> usize {
    let mut n = 0;
    loop {
        if over_fd_budget(ctx) {
            return n;
        }
        batch.clear();
        let r = ctx.group.read_events(buf, batch);
        n += batch.len();
        for ev in batch.drain(..) {
            dispatch(ctx, ev);
        }
        match r {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EAGAIN) => return n,
            Err(e) => {
                error!(error = %e, "reading fanotify events");
                return n;
            }
        }
    }
}

fn dispatch(ctx: &Arc<Ctx>, ev: Event) {
    let Some(fd) = ev.fd else {
        if ev.mask & hsm_kernel::fanotify::FAN_Q_OVERFLOW != 0 {
            Metrics::inc(&ctx.metrics.queue_overflows);
            error!("fanotify queue overflow: some accesses were allowed unserved");
        }
        return;
    };
    let guard = ctx.pending.register(fd, ev.pid, ev.range);
    if ev.mask & AGENT_EVENTS == 0 || ctx.own.contains(ev.pid) {
        Metrics::inc(&ctx.metrics.events_own);
        guard.respond(Response::Allow);
        return;
    }
    let access = ev.mask & FAN_PRE_ACCESS != 0;
    let now = if access {
        ctx.core.try_handle_now(&AccessEvent {
            fd: guard.fd(),
            range: ev.range,
            intent: IntentSource::Tid(ev.pid),
        })
    } else {
        // An open. Fetch the whole stub first when later accesses may raise nothing:
        // through overlayfs, whose mappings of lower files raise no event (and whose exec
        // maps segments without one). An exec through a visible mount is served at mmap
        // time like any mapping.
        let whole = !ctx.private.reached_directly(guard.fd(), ev.pid);
        match ctx.core.try_open_now(guard.fd(), ev.pid, whole) {
            // Could not look at it now: its reads and mappings raise events of their own.
            Err(Later(_)) if !whole => Ok(Verdict::Allow),
            other => other,
        }
    };
    match now {
        Ok(verdict) => answer(ctx, guard, verdict),
        Err(Later(_)) if !access => {
            let ctx2 = ctx.clone();
            ctx.rt.spawn(async move {
                let verdict = ctx2.core.handle_open(guard.fd(), ev.pid).await;
                answer(&ctx2, guard, verdict);
            });
        }
        Err(Later(intent)) => {
            let ctx2 = ctx.clone();
            ctx.rt.spawn(async move {
                let verdict = ctx2
                    .core
                    .handle(AccessEvent {
                        fd: guard.fd(),
                        range: ev.range,
                        intent,
                    })
                    .await;
                answer(&ctx2, guard, verdict);
            });
        }
    }
}

fn answer(ctx: &Ctx, guard: events::EventGuard, verdict: Verdict) {
    let response = match verdict {
        Verdict::Allow => Response::Allow,
        Verdict::AllowAndIgnore => {
            match ctx.group.add_ignore_mark(guard.fd(), AGENT_EVENTS) {
                Ok(()) => Metrics::inc(&ctx.metrics.ignore_marks),
                Err(e) => debug!(error = %e, "could not place ignore mark"),
            }
            Response::Allow
        }
        Verdict::Deny(errno) => Response::Deny(errno),
    };
    guard.respond(response);
}
