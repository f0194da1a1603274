//! The event threads: read fanotify events, answer on the spot what can be answered,
//! hand the rest to the async core, and write each answer exactly once.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hsm_core::metrics::Metrics;
use hsm_core::{AccessEvent, AgentCore, IntentSource, Later, Verdict};
use hsm_kernel::fanotify::{AGENT_EVENTS, Event, FAN_PRE_ACCESS, Group, Response};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::EventFd;
use tracing::{debug, error, warn};

use crate::events::{self, Pending};
use crate::{OwnThreads, mounts};

/// Why an event thread stopped serving: a system call on its epoll set failed.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {errno}")]
struct LoopError {
    op: &'static str,
    errno: nix::errno::Errno,
}

pub(crate) struct Ctx {
    /// Open descriptors the agent may use before it stops reading events (each event
    /// brings one, each cached stub holds one); the rest is room for everything else.
    fd_budget: usize,
    /// Descriptors the reads in progress may bring: each read claims room for the events
    /// its buffer can hold (two descriptors each, see [`FDS_PER_EVENT`]) before it reads,
    /// and gives the claim back once they are dispatched, so concurrent reads never take
    /// the agent past the budget together.
    reading: AtomicUsize,
    shared: Shared,
    rt: tokio::runtime::Handle,
    stopping: AtomicBool,
    paused: AtomicBool,
}

/// What the event threads share with the rest of the agent.
pub(crate) struct Shared {
    pub core: Arc<AgentCore>,
    pub group: Arc<Group>,
    pub pending: Arc<Pending>,
    pub private: Arc<mounts::PrivateMounts>,
    pub own: Arc<OwnThreads>,
    pub metrics: Arc<Metrics>,
}

impl Ctx {
    /// `nofile`: the open-file limit.
    pub(crate) fn new(shared: Shared, nofile: u64) -> Self {
        Ctx {
            // What is left outside the budget is for descriptors held briefly: stub loads
            // on the blocking pool (up to 512 at once), a writer per running fill, fetch
            // connections, the journal, sockets and files. Too small a margin here failed
            // reopens with EMFILE under 10,000 held events (fstest 038).
            fd_budget: (nofile as usize).saturating_sub(FD_MARGIN).max(256),
            reading: AtomicUsize::new(0),
            shared,
            rt: tokio::runtime::Handle::current(),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
        }
    }

    /// Ask the event threads to stop once they have drained what is queued.
    pub(crate) fn stop_reading(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// One event thread: wait for events (one thread woken per event, EPOLLEXCLUSIVE), answer
/// what can be answered on the spot, hand the rest to the async core.
pub(crate) fn event_thread(ctx: &Arc<Ctx>, index: usize, stop: &EventFd) {
    let tid = hsm_kernel::sys::gettid();
    ctx.shared.own.add(tid);
    let run = || -> Result<(), LoopError> {
        let fail = |op| move |errno| LoopError { op, errno };
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(fail("epoll_create"))?;
        ep.add(
            ctx.shared.group.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, 0),
        )
        .map_err(fail("epoll add fanotify"))?;
        ep.add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 1))
            .map_err(fail("epoll add eventfd"))?;
        // With a journal, events are read into this thread's region of the read log, so a
        // batch read but not yet journaled outlives a crash (journal.rs).
        let mut log = ctx.shared.pending.journal().map(|j| j.read_region(index));
        if let Some(Err(e)) = &log {
            warn!(error = %e, "no read log: events a crash catches before they are journaled will be answered EIO");
        }
        let mut owned = Vec::new();
        let buf: &mut [u8] = match &mut log {
            Some(Ok(region)) => &mut region[..],
            _ => {
                owned.resize(crate::journal::READ_REGION, 0u8);
                &mut owned[..]
            }
        };
        let mut batch = Vec::with_capacity(64);
        let mut ready = [EpollEvent::empty(); 2];
        loop {
            if over_fd_budget(ctx) {
                // Events wait in the kernel's (unlimited) queue until answers free some
                // descriptors; reading more now would fail them with EMFILE.
                if !ctx.paused.swap(true, Ordering::Relaxed) {
                    Metrics::inc(&ctx.shared.metrics.reads_paused);
                    warn!(
                        in_flight = ctx.shared.pending.len(),
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
                Err(errno) => return Err(fail("epoll_wait")(errno)),
            }
            drain(ctx, buf, &mut batch);
            if ctx.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            // Events come in bursts (a sequential reader's next read follows its answer at
            // once): keep polling briefly after a burst so the next event finds this thread
            // awake instead of paying a wake-up (tens of microseconds on a virtual CPU).
            // Not after an inline fill: see `hsm_core::take_filled_inline`.
            let mut idle_since = Instant::now();
            while !hsm_core::take_filled_inline() && idle_since.elapsed() < SPIN_AFTER_EVENT {
                if drain(ctx, buf, &mut batch) > 0 {
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
    ctx.shared.own.remove(tid);
}

/// How long an event thread keeps polling after its last event before it sleeps.
const SPIN_AFTER_EVENT: Duration = Duration::from_micros(100);

/// Descriptors kept outside the event budget (see [`Ctx::new`]).
const FD_MARGIN: usize = 4096;

/// The shortest event: metadata without an information record (an open permission
/// event). A buffer of `n * MIN_EVENT_LEN` bytes returns at most `n` events.
const MIN_EVENT_LEN: usize = hsm_kernel::fanotify::METADATA_LEN;

/// What one event read may add before the budget sees it: the event's own descriptor and,
/// when dispatching it loads a stub that was not cached, the stub state's. Claiming one
/// per event let four threads reading at once (2,730 events a read) go past the limit by
/// the stubs they loaded, and every reopen then failed with EMFILE while the held events
/// waited for fills that needed one (fstest 038).
const FDS_PER_EVENT: usize = 2;

/// Descriptors in use that the budget counts: events in flight, cached stubs, and the
/// room claimed by reads in progress.
fn fds_used(ctx: &Ctx) -> usize {
    ctx.shared.pending.len()
        + ctx.shared.core.stub_descriptors()
        + ctx.reading.load(Ordering::SeqCst)
}

/// Near the descriptor limit?
fn over_fd_budget(ctx: &Ctx) -> bool {
    fds_used(ctx) >= ctx.fd_budget
}

/// Claim room for one read's events: returns how many descriptors were claimed
/// ([`FDS_PER_EVENT`] per event the read may return; 0 when the budget is spent). The
/// caller gives the claim back once the events are dispatched (and so counted as pending
/// events and live stub states).
fn claim_room(ctx: &Ctx, buf_len: usize) -> usize {
    let most = buf_len / MIN_EVENT_LEN * FDS_PER_EVENT;
    let mut claimed = 0;
    let _ = ctx
        .reading
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |reading| {
            let used = ctx.shared.pending.len() + ctx.shared.core.stub_descriptors() + reading;
            let room = ctx.fd_budget.saturating_sub(used).min(most);
            claimed = room - room % FDS_PER_EVENT;
            (claimed > 0).then_some(reading + claimed)
        });
    claimed
}

/// Read and answer every queued event (until the descriptor budget is used); returns how
/// many.
fn drain(ctx: &Arc<Ctx>, buf: &mut [u8], batch: &mut Vec<Event>) -> usize {
    let mut n = 0;
    loop {
        let room = claim_room(ctx, buf.len());
        if room == 0 {
            return n;
        }
        batch.clear();
        // Never shorter than one event with its range record (a shorter buffer is EINVAL);
        // that may exceed the claim by one event, which the margin covers.
        let len = (room / FDS_PER_EVENT * MIN_EVENT_LEN).clamp(2 * MIN_EVENT_LEN, buf.len());
        let r = ctx.shared.group.read_events(&mut buf[..len], batch);
        n += batch.len();
        // Journal the whole batch before working on any of it: an event read but not yet
        // journaled is one a crash leaves a restarted agent unable to serve (it answers
        // such events EIO), and serving an event may take a fill's time.
        if !batch.is_empty() {
            crash_point();
        }
        let registered: Vec<_> = batch.drain(..).filter_map(|ev| register(ctx, ev)).collect();
        // Journaled: the read log's copy is no longer needed, and must not outlive the
        // events (their numbers are reused once they are answered).
        if let Ok(n) = &r {
            buf[..*n].fill(0);
        }
        for (ev, guard) in registered {
            dispatch(ctx, ev, guard);
        }
        ctx.reading.fetch_sub(room, Ordering::SeqCst);
        match r {
            Ok(_) => {}
            Err(e) if e.errno() == Some(libc::EAGAIN) => return n,
            Err(e) => {
                error!(error = %e, "reading fanotify events");
                return n;
            }
        }
    }
}

/// For tests of crash recovery (fstest 085): with `HSM_TEST_KILL_AFTER_READS=N`, the agent
/// SIGKILLs itself when its Nth batch of events has been read and before it is journaled.
fn crash_point() {
    static LEFT: std::sync::OnceLock<Option<AtomicUsize>> = std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        std::env::var("HSM_TEST_KILL_AFTER_READS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(AtomicUsize::new)
    });
    if let Some(left) = left {
        if left.fetch_sub(1, Ordering::SeqCst) == 1 {
            warn!("HSM_TEST_KILL_AFTER_READS: killing this agent before it journals what it read");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Register (and so journal) one event; `None` for an event with no descriptor (a queue
/// overflow), which needs no answer.
fn register(ctx: &Ctx, mut ev: Event) -> Option<(Event, events::EventGuard)> {
    let Some(fd) = ev.fd.take() else {
        if ev.mask & hsm_kernel::fanotify::FAN_Q_OVERFLOW != 0 {
            Metrics::inc(&ctx.shared.metrics.queue_overflows);
            error!("fanotify queue overflow: some accesses were allowed unserved");
        }
        return None;
    };
    let guard = ctx.shared.pending.register(fd, ev.pid, ev.range);
    Some((ev, guard))
}

fn dispatch(ctx: &Arc<Ctx>, ev: Event, guard: events::EventGuard) {
    if ev.mask & AGENT_EVENTS == 0 || ctx.shared.own.contains(ev.pid) {
        Metrics::inc(&ctx.shared.metrics.events_own);
        guard.respond(Response::Allow);
        return;
    }
    let access = ev.mask & FAN_PRE_ACCESS != 0;
    let now = if access {
        ctx.shared.core.try_handle_now(&AccessEvent {
            fd: guard.fd(),
            range: crate::core_range(ev.range),
            intent: IntentSource::Tid(ev.pid),
        })
    } else {
        // An open. Fetch the whole stub first when later accesses may raise nothing:
        // through overlayfs, whose mappings of lower files raise no event (and whose exec
        // maps segments without one). An exec through a visible mount is served at mmap
        // time like any mapping.
        let whole = !ctx.shared.private.reached_directly(guard.fd(), ev.pid);
        match ctx.shared.core.try_open_now(guard.fd(), ev.pid, whole) {
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
                let verdict = ctx2.shared.core.handle_open(guard.fd(), ev.pid).await;
                answer(&ctx2, guard, verdict);
            });
        }
        Err(Later(intent)) => {
            let ctx2 = ctx.clone();
            ctx.rt.spawn(async move {
                let verdict = ctx2
                    .shared
                    .core
                    .handle(AccessEvent {
                        fd: guard.fd(),
                        range: crate::core_range(ev.range),
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
            match ctx.shared.group.add_ignore_mark(guard.fd(), AGENT_EVENTS) {
                Ok(()) => Metrics::inc(&ctx.shared.metrics.ignore_marks),
                Err(e) => debug!(error = %e, "could not place ignore mark"),
            }
            Response::Allow
        }
        Verdict::Deny(errno) => Response::Deny(crate::kernel_errno(errno)),
    };
    guard.respond(response);
}
