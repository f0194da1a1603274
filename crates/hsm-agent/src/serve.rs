//! `serve` as three phases: [`start`] (everything before the first event is read),
//! [`Running::until_signal`] (serving until a signal says how to stop), and
//! [`Running::stop`] (one shutdown, for a plain stop and for a hand-over to a new agent).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hsm_config::{AgentConfig, MarkKind};
use hsm_core::metrics::{Gauges, Metrics};
use hsm_core::{AgentCore, CoreOptions, UrlRemotes};
use hsm_kernel::fanotify::{DenyErrno, Group};
use hsm_kernel::fdio::ReservedFds;
use nix::sys::eventfd::{EfdFlags, EventFd};
use tracing::{debug, error, info, warn};

use crate::cache::CacheOps;
use crate::dispatch::{Ctx, Shared, event_thread};
use crate::events::Pending;
use crate::journal::OldJournal;
use crate::restart::{self, GroupStore};
use crate::{
    AgentError, AgentOptions, GroupMarks, OwnThreads, ProcIntent, control, exporter, journal,
    marks, mounts, notify_systemd, stats_json, write_atomic,
};
use crate::{bounded, prefetch};

/// Serve until SIGTERM or SIGINT (stop) or SIGUSR2 (hand over to a new agent).
pub(crate) async fn serve(opts: AgentOptions, own: Arc<OwnThreads>) -> Result<(), AgentError> {
    let running = start(&opts, own).await?;
    let how = running.until_signal().await?;
    running.stop(how).await;
    Ok(())
}

/// How the agent leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Finish the fetches in flight, then release the group (SIGTERM, SIGINT).
    Shutdown,
    /// Stop reading, finish what was read, and leave the group to the successor (SIGUSR2).
    HandOver,
}

/// A serving agent: what the shutdown needs to undo.
pub(crate) struct Running {
    cfg: AgentConfig,
    core: Arc<AgentCore>,
    group: Arc<Group>,
    pending: Arc<Pending>,
    ctx: Arc<Ctx>,
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    journal: Option<Arc<journal::Journal>>,
    store: GroupStore,
    registration: Option<hsm_bpf::Registration>,
    _fastpath: Option<hsm_bpf::fastpath::FastpathHandle>,
    /// The Prometheus endpoint, served until the agent stops.
    exporter: Option<tokio::task::JoinHandle<()>>,
    /// The control socket (`hsm status`, `hsm hydrate`, ...).
    control: Option<control::Control>,
    started: Instant,
}

/// What earlier agents on the same state directory left: the journals of those still
/// running (they hand over) and of those that died, and the fd numbers held for them.
struct Earlier {
    live: Vec<OldJournal>,
    dead: Vec<OldJournal>,
    reserved: Option<ReservedFds>,
}

/// Phase 1: everything before the first event is read.
async fn start(opts: &AgentOptions, own: Arc<OwnThreads>) -> Result<Running, AgentError> {
    marks::preflight()?;
    let cfg = opts.config.clone();
    // First, so a bad address stops the agent before it touches anything.
    let metrics_listener = opts.metrics_listen.map(exporter::bind).transpose()?;
    let trees = resolve_trees(opts)?;
    let nofile = hsm_kernel::sys::raise_nofile_limit()?;
    debug!(nofile, "open file limit");
    presize_fd_table(&cfg, nofile);

    // The group: kept by the keeper or systemd across restarts, or new.
    let obtained = restart::obtain_group(&cfg)?;
    let group = obtained.group.clone();
    let store = obtained.store;
    let served_devs = served_devices(&trees);
    let earlier = earlier_agents(
        &cfg,
        &group,
        &store,
        obtained.restored,
        nofile,
        &served_devs,
    )
    .await?;
    let journal = open_journal(&cfg, &store, &group)?;
    let metrics = Arc::new(Metrics::default());
    // Fills go through the agent's own clone of each tree's mount, whatever mount the
    // reader used (docs/SEMANTICS.md, "Paths to a file").
    let private = Arc::new(mounts::PrivateMounts::new(&trees)?);
    if cfg.mark == MarkKind::Mount {
        warn!(
            "mark = \"mount\" covers only the trees' own mounts: overlayfs layers, other mount namespaces and other bind mounts of the trees are not served (their stubs read as holes); use the default filesystem mark"
        );
    }
    // The bounded cache, if configured: its limits and the group that hears opens of
    // fully fetched files (docs/SEMANTICS.md, "The bounded cache").
    let cache_limits = bounded::limits(&opts.cache, &trees)?;
    let opens = match cache_limits {
        Some(_) => Some(bounded::open_watch(&private)?),
        None => None,
    };
    let core = AgentCore::new(
        core_options(opts),
        Arc::new(UrlRemotes::new(opts.remote.clone())),
        Arc::new(GroupMarks {
            group: group.clone(),
            metrics: metrics.clone(),
            opens: opens.clone(),
        }),
        private.clone(),
        Arc::new(ProcIntent),
        metrics.clone(),
    );

    let (registration, fastpath) =
        attach_kernel(&cfg, &group, &trees, &private, &store, obtained.restored)?;

    // The event threads.
    let pending = Arc::new(Pending::new(group.clone(), journal.clone()));
    let shared = Shared {
        core: core.clone(),
        group: group.clone(),
        pending: pending.clone(),
        private: private.clone(),
        own,
        metrics,
    };
    let ctx = Arc::new(Ctx::new(shared, nofile));
    let (stop, threads) = spawn_event_threads(&cfg, &ctx)?;
    spawn_recovery(&cfg, &core, &group, &private, earlier);
    let started = Instant::now();
    let exporter = metrics_listener.map(|l| spawn_exporter(l, &core, &pending, started));

    // The control socket, once the marks are placed: a command served from here on acts
    // on trees this agent serves. Before the ready file, so that "ready" includes it.
    let ops = Arc::new(CacheOps::new(
        trees.clone(),
        core.clone(),
        group.clone(),
        private.clone(),
    )?);
    if let (Some(limits), Some(opens)) = (cache_limits, opens) {
        bounded::start(&core, &ops, limits, opens)?;
    }
    if let Some(path) = &cfg.record_trace {
        let recorder =
            hsm_core::trace::TraceRecorder::create(path).map_err(|source| AgentError::State {
                what: "access trace",
                path: path.clone(),
                source,
            })?;
        info!(path = %path.display(), "recording an access trace");
        core.record_trace(Arc::new(recorder));
    }
    let prefetcher = Arc::new(prefetch::Prefetcher {
        ops: ops.clone(),
        core: core.clone(),
        cfg: opts.prefetch.clone(),
        remote: opts.remote.clone(),
    });
    let agent = control::Agent::new(
        core.clone(),
        pending.clone(),
        started,
        store.name(),
        registration.is_some(),
        trees.clone(),
        ops.clone(),
    )
    .with_prefetcher(prefetcher.clone());
    let control = control::start(&cfg.state_dir, agent).map_err(|source| AgentError::State {
        what: "control socket",
        path: control::socket_path(&cfg.state_dir),
        source,
    })?;

    write_ready_file(&cfg)?;
    notify_systemd("READY=1");
    prefetcher.spawn_at_start(&trees);
    preload_indexes(&trees);
    info!(
        trees = trees.len(),
        pid = std::process::id(),
        event_threads = threads.len(),
        "hsm agent ready"
    );
    Ok(Running {
        cfg,
        core,
        group,
        pending,
        ctx,
        stop,
        threads,
        journal,
        store,
        registration,
        _fastpath: fastpath,
        exporter,
        control: Some(control),
        started,
    })
}

/// The kernel side, in this order: the guard, the marks, the private mounts kept out of
/// the group, the group handed to its store, registration with the guard (after the marks:
/// a stub opened once registered must raise events, docs/BPF.md "Order at start-up"), and
/// the fastpath.
fn attach_kernel(
    cfg: &AgentConfig,
    group: &Arc<Group>,
    trees: &[PathBuf],
    private: &mounts::PrivateMounts,
    store: &GroupStore,
    restored: bool,
) -> Result<
    (
        Option<hsm_bpf::Registration>,
        Option<hsm_bpf::fastpath::FastpathHandle>,
    ),
    AgentError,
> {
    let guard_installed = marks::install_guard(cfg.guard)?;
    marks::place_marks(group, trees, cfg.mark)?;
    // Before any event is read, so before the core can open anything there.
    private.exclude_from(group)?;
    if !restored {
        restart::hand_over_group(store, group)?;
    }
    // Registration comes after the marks: a stub opened once we are registered must raise
    // events (docs/BPF.md, "Order at start-up").
    let registration = if guard_installed {
        let keeper_pid = match store {
            GroupStore::Keeper(c) => c.keeper_pid(),
            _ => None,
        };
        marks::register_with_guard(cfg.guard, trees, keeper_pid)?
    } else {
        None
    };
    let fastpath = attach_fastpath(cfg, group);
    Ok((registration, fastpath))
}

/// The event journal, where a keeper or systemd keeps the group across restarts (the next
/// agent answers what this one had read).
fn open_journal(
    cfg: &AgentConfig,
    store: &GroupStore,
    group: &Group,
) -> Result<Option<Arc<journal::Journal>>, AgentError> {
    if !store.is_some() {
        return Ok(None);
    }
    // The agent's own files raise no event, wherever the state directory is.
    let ignore = |file: std::os::fd::BorrowedFd<'_>| {
        group
            .add_ignore_mark(file, hsm_kernel::fanotify::AGENT_EVENTS)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    let j = journal::Journal::create_with(&cfg.state_dir, ignore).map_err(|source| {
        AgentError::State {
            what: "journal in",
            path: cfg.state_dir.clone(),
            source,
        }
    })?;
    Ok(Some(Arc::new(j)))
}

/// `[agent] event_threads` threads reading events, and the eventfd that stops them.
fn spawn_event_threads(
    cfg: &AgentConfig,
    ctx: &Arc<Ctx>,
) -> Result<(Arc<EventFd>, Vec<std::thread::JoinHandle<()>>), AgentError> {
    let stop = Arc::new(
        EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| AgentError::Io(e.into()))?,
    );
    let mut threads = Vec::new();
    for i in 0..cfg.event_threads.max(1) {
        let (ctx, stop) = (ctx.clone(), stop.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("hsm-events-{i}"))
                .spawn(move || event_thread(&ctx, i, &stop))?,
        );
    }
    Ok((stop, threads))
}

/// The Prometheus endpoint on an address already bound.
fn spawn_exporter(
    listener: tokio::net::TcpListener,
    core: &Arc<AgentCore>,
    pending: &Arc<Pending>,
    started: Instant,
) -> tokio::task::JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let (core, pending) = (core.clone(), pending.clone());
    exporter::spawn(
        listener,
        Arc::new(move || {
            core.metrics().render_prometheus(&Gauges {
                uptime_secs: started.elapsed().as_secs_f64(),
                cached_stubs: core.cached_stubs() as u64,
                events_in_flight: pending.len() as u64,
                cache: core.budget().map(|b| b.status()).unwrap_or_default(),
            })
        }),
    )
}

/// `[agent] ready_file`, if set: this agent's pid, written atomically.
fn write_ready_file(cfg: &AgentConfig) -> Result<(), AgentError> {
    let Some(p) = &cfg.ready_file else {
        return Ok(());
    };
    write_atomic(p, &format!("{}\n", std::process::id())).map_err(|source| AgentError::State {
        what: "ready file",
        path: p.clone(),
        source,
    })
}

/// The trees from the command line and the config, resolved once.
fn resolve_trees(opts: &AgentOptions) -> Result<Vec<PathBuf>, AgentError> {
    let trees: Vec<PathBuf> = opts
        .config
        .trees
        .iter()
        .chain(&opts.trees)
        .cloned()
        .collect();
    if trees.is_empty() {
        return Err(AgentError::NoTrees);
    }
    trees
        .into_iter()
        .map(|t| std::fs::canonicalize(&t).map_err(|source| AgentError::Tree { path: t, source }))
        .collect()
}

/// The device numbers of the served filesystems, both as `stat` reports them and as the
/// superblock's (what `/proc/PID/maps` and mountinfo show): on btrfs the two differ (each
/// subvolume has its own anonymous device), and recovery must recognise a served file by
/// either (restart.rs, `adopt_orphans`).
fn served_devices(trees: &[PathBuf]) -> Vec<u64> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut devs = Vec::new();
    for t in trees {
        if let Ok(m) = std::fs::metadata(t) {
            devs.push(std::os::unix::fs::MetadataExt::dev(&m));
        }
        // The mount the tree is on: the longest mount point that contains it.
        let best = mountinfo
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_ascii_whitespace().collect();
                let point = f.get(4)?.replace("\\040", " ");
                let (maj, min) = f.get(2)?.split_once(':')?;
                let inside = t.starts_with(&point);
                inside.then(|| {
                    (
                        point.len(),
                        maj.parse::<u32>().ok(),
                        min.parse::<u32>().ok(),
                    )
                })
            })
            .max_by_key(|(len, _, _)| *len);
        if let Some((_, Some(maj), Some(min))) = best {
            devs.push(libc::makedev(maj, min));
        }
    }
    devs.sort_unstable();
    devs.dedup();
    devs
}

/// Read the served trees' indexes in the background, so that no event thread scans one
/// whole on its tree's first cold read (with the others' lookups waiting).
fn preload_indexes(trees: &[PathBuf]) {
    let trees = trees.to_vec();
    tokio::task::spawn_blocking(move || {
        for tree in trees {
            match hsm_core::index::reader().preload(&tree) {
                Ok(Some((tag, records))) => {
                    info!(tree = %tree.display(), tag = format!("{tag:08x}"), records, "tree index read ahead")
                }
                Ok(None) => {}
                // Each read of one of its stubs fails the same way, and says so.
                Err(e) => {
                    warn!(tree = %tree.display(), error = %e, "could not read the tree's index ahead")
                }
            }
        }
    });
}

/// Descriptors the table is sized for beyond the stub cache: events in flight, writers of
/// running fills, fetch connections, sockets.
const FD_TABLE_HEADROOM: u64 = 4096;

/// Size the descriptor table for a full stub cache now. Grown later, one doubling at a
/// time, each growth would hold an event thread for an RCU grace period (5-18 ms
/// measured) while a reader waits: at 256, 512, 1024, ... cached stubs.
fn presize_fd_table(cfg: &AgentConfig, nofile: u64) {
    let slots = (cfg.cache_entries as u64 + FD_TABLE_HEADROOM).min(nofile);
    match hsm_kernel::sys::presize_fd_table(slots as u32) {
        Ok(size) => debug!(slots, size, "descriptor table sized"),
        // Only a latency cost: the table still grows on demand.
        Err(e) => warn!(error = %e, slots, "could not size the descriptor table up front"),
    }
}

fn core_options(opts: &AgentOptions) -> CoreOptions {
    let cfg = &opts.config;
    CoreOptions {
        max_concurrent_fetches: cfg.max_concurrent_fetches,
        max_request_size: cfg.max_request_size.0,
        readahead: cfg.readahead.0,
        readahead_max: cfg.readahead_max.0,
        // Each holds a connection open while its reader is between windows.
        readahead_streams: (cfg.max_concurrent_fetches / 2).max(1),
        persist_interval: cfg.persist_interval.0,
        cache_entries: cfg.cache_entries,
        max_bandwidth: cfg.max_bandwidth.0,
        read_timeout: opts.remote.read_timeout.0,
    }
}

/// Take over from earlier agents: ask a running one to stop reading, hold every fd number
/// their unanswered events may carry (before we read a single event: docs/SEMANTICS.md,
/// "Agent restarts"), and answer EIO at once to what a dead one read but never journaled.
async fn earlier_agents(
    cfg: &AgentConfig,
    group: &Arc<Group>,
    store: &GroupStore,
    restored: bool,
    nofile: u64,
    served_devs: &[u64],
) -> Result<Earlier, AgentError> {
    // A previous agent still running hands over: it stops reading before we start. The
    // wait for it is a blocking poll of its journal, so it runs off the async threads.
    let olds = if !store.is_some() {
        Vec::new()
    } else {
        let dir = cfg.state_dir.clone();
        tokio::task::spawn_blocking(move || restart::take_over(&dir, Duration::from_secs(10)))
            .await
            .unwrap_or_default()
    };
    let (live, mut dead): (Vec<_>, Vec<_>) = olds.into_iter().partition(|j| j.writer_alive());
    debug!(
        restored,
        live = live.len(),
        dead = dead.len(),
        "group obtained; earlier journals read"
    );
    let bound = live.iter().chain(&dead).map(|j| j.number_bound()).max();
    let reserve_to = (restored || bound.is_some()).then(|| {
        let wanted = bound.unwrap_or(restart::margin(cfg));
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
        wanted.min(cap)
    });
    let mut reserved = reserve_to.map(restart::reserve).transpose()?;
    debug!(?reserve_to, "fd numbers held");
    // Events a dead agent read but never journaled can only be answered blind: EIO, at
    // once. Then only the journaled numbers (and a running predecessor's) stay held, so
    // this agent's own events are numbered low again.
    if let (Some(limit), Some(held)) = (reserve_to, reserved.as_mut()) {
        if live.is_empty() {
            let adopted = restart::adopt_orphans(&mut dead, served_devs);
            if adopted != restart::Adopted::default() {
                info!(
                    adopted = adopted.adopted,
                    uncertain = adopted.uncertain,
                    "events a crashed agent had read but not journaled, found in its read log"
                );
            }
            let swept = restart::sweep_unjournaled(group, &dead, limit);
            if swept > 0 {
                warn!(
                    swept,
                    "answered EIO to events a crashed agent had read but not journaled"
                );
            }
            let journaled: std::collections::HashSet<i32> = dead
                .iter()
                .flat_map(|j| j.entries.iter().map(|e| e.fd))
                .collect();
            held.retain(|n| journaled.contains(&n));
        }
    }
    debug!("unjournaled events answered");
    Ok(Earlier {
        live,
        dead,
        reserved,
    })
}

fn attach_fastpath(cfg: &AgentConfig, group: &Group) -> Option<hsm_bpf::fastpath::FastpathHandle> {
    if !cfg.fastpath {
        return None;
    }
    match hsm_bpf::fastpath::attach(group) {
        hsm_bpf::fastpath::Fastpath::Attached(h) => {
            info!("fanotify fastpath handler attached: events for non-stubs stay in the kernel");
            Some(h)
        }
        hsm_bpf::fastpath::Fastpath::Absent(why) => {
            info!(reason = %why, "fanotify fastpath unavailable; ignore marks keep files that are not stubs away from the agent");
            None
        }
    }
}

/// Answer what earlier agents left waiting, while new events are already served (they are
/// numbered above the reservation).
fn spawn_recovery(
    cfg: &AgentConfig,
    core: &Arc<AgentCore>,
    group: &Arc<Group>,
    private: &Arc<mounts::PrivateMounts>,
    earlier: Earlier,
) {
    let Earlier {
        live,
        dead,
        reserved,
    } = earlier;
    if reserved.is_none() {
        return;
    }
    let (core, group, state_dir) = (core.clone(), group.clone(), cfg.state_dir.clone());
    let private = private.clone();
    tokio::spawn(async move {
        let r = restart::recover(core.clone(), group.clone(), &private, dead).await;
        info!(
            answered = r.answered,
            already_answered = r.stale,
            failed = r.failed,
            "answered the events earlier agents left waiting"
        );
        // A running predecessor keeps answering its own events by number until it exits:
        // hold the numbers until then.
        let mut live = live;
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

impl Running {
    /// Phase 2: serve (the event threads do) and write the stats file, until a signal.
    async fn until_signal(&self) -> Result<Stop, AgentError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigusr2 = signal(SignalKind::user_defined2())?;
        let mut stats_tick =
            tokio::time::interval(self.cfg.stats_interval.0.max(Duration::from_millis(100)));
        Ok(loop {
            tokio::select! {
                _ = sigterm.recv() => { info!("SIGTERM: finishing fetches in flight"); break Stop::Shutdown; }
                _ = sigint.recv() => { info!("SIGINT: finishing fetches in flight"); break Stop::Shutdown; }
                _ = sigusr2.recv() => {
                    info!("SIGUSR2: handing over to a new agent; reading no more events");
                    break Stop::HandOver;
                }
                _ = stats_tick.tick() => {
                    self.write_stats(self.pending.len());
                    self.core.flush_trace();
                    self.pending.refresh_journal_high_water();
                }
            }
        })
    }

    /// Phase 3: the one shutdown.
    ///
    /// - Shutdown: no new fetches; the event threads keep answering (resident ranges and
    ///   non-stubs are allowed, new fetches get EIO) until the fills in flight are done;
    ///   then the guard registration and the marks go, the threads drain the queue and
    ///   stop, and the group is released.
    /// - Hand-over: the threads stop reading first (the successor waits for our journal
    ///   to say so, then reads the same group); we finish what we read and leave without
    ///   releasing anything.
    async fn stop(mut self, how: Stop) {
        // No new commands; a successor's socket is left alone.
        if let Some(c) = self.control.take() {
            c.close();
        }
        match how {
            Stop::Shutdown => {
                notify_systemd("STOPPING=1");
                self.core.begin_shutdown();
            }
            Stop::HandOver => {
                self.join_event_threads();
                if let Some(j) = &self.journal {
                    if let Err(e) = j.mark_stopped_reading() {
                        warn!(error = %e, "could not record the hand-over in the journal");
                    }
                }
            }
        }
        self.settle(how).await;
        if how == Stop::Shutdown {
            self.close_group().await;
        }
        let failed = self.core.flush_all().await;
        self.core.flush_trace();
        self.write_stats(0);
        if how == Stop::Shutdown {
            restart::release_group(&self.store);
        }
        let Running {
            cfg,
            core,
            pending,
            ctx,
            journal,
            store,
            registration,
            exporter,
            ..
        } = self;
        if let Some(e) = exporter {
            e.abort();
        }
        drop(registration);
        // Every event is answered and nothing else holds the journal: remove it.
        drop((pending, ctx));
        if let Some(j) = journal.and_then(|j| Arc::try_unwrap(j).ok()) {
            j.remove();
        }
        match how {
            Stop::HandOver => info!(unflushed = failed, "hsm agent handed over and stopped"),
            Stop::Shutdown => {
                info!(metrics = %core.metrics().to_json(), unflushed = failed, "hsm agent stopped");
                if let Some(p) = &cfg.ready_file {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        drop(store);
    }

    /// Wait until no event is in flight and no fill is running, or deny what is left
    /// with EIO at the shutdown timeout.
    async fn settle(&self, how: Stop) {
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown_timeout.0;
        while !(self.pending.is_empty() && self.core.wait_fills(Duration::ZERO).await) {
            if tokio::time::Instant::now() >= deadline {
                let denied = self.pending.deny_all(DenyErrno::Eio);
                match how {
                    Stop::Shutdown => {
                        warn!(denied, "shutdown timeout: denied events still waiting")
                    }
                    Stop::HandOver => {
                        warn!(denied, "hand-over timeout: denied events still waiting")
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.write_stats(self.pending.len());
        }
    }

    /// Shutdown only: take the group out of the path of readers, then stop reading.
    async fn close_group(&mut self) {
        // From here on the guard (if installed) fails stub reads with EIO instead of
        // letting them reach a group that is about to close.
        if let Some(r) = self.registration.take() {
            if let Err(e) = r.release() {
                warn!(error = %e, "could not deregister from the stub guard");
            }
        }
        // No new events from here on: anything touching a stub now is either denied by
        // the guard or (without one) reads what is resident, but never waits on a group
        // that is about to be released.
        if let Err(e) = self.group.flush_all_marks() {
            warn!(error = %e, "could not remove the marks before releasing the group");
        }
        // Stop the event threads; each drains what is queued before it exits. Anything
        // raised after the group closes is allowed by the kernel (docs/SEMANTICS.md).
        self.join_event_threads();
        for _ in 0..200 {
            if self.pending.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let denied = self.pending.deny_all(DenyErrno::Eio);
        if denied > 0 {
            warn!(denied, "denied events still waiting at exit");
        }
    }

    fn join_event_threads(&mut self) {
        self.ctx.stop_reading();
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                error!("an event thread panicked");
            }
        }
    }

    fn write_stats(&self, pending: usize) {
        if let Some(p) = &self.cfg.stats_file {
            if let Err(e) = write_atomic(p, &stats_json(&self.core, self.started, pending)) {
                warn!(path = %p.display(), error = %e, "could not write stats file");
            }
        }
    }
}
