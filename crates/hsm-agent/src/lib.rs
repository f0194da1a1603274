//! `hsm agent`: the fanotify adapter.
//!
//! It places `FAN_PRE_ACCESS` marks, reads events, turns each into an
//! [`hsm_core::AccessEvent`] for the core, writes the answer, and places ignore marks for
//! files with nothing to fetch. Policy lives in `hsm-core`; this crate only translates.

mod bounded;
pub mod cache;
pub mod control;
mod dispatch;
pub mod events;
mod exporter;
pub mod journal;
pub mod keeper;
mod marks;
pub mod mounts;
pub mod prefetch;
pub mod restart;
mod serve;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use hsm_config::AgentConfig;
use hsm_core::metrics::Metrics;
use hsm_core::{AgentCore, MarkSink};
use hsm_kernel::fanotify::{AGENT_EVENTS, Group};
use tracing::{debug, warn};

/// Why the agent could not start (or stopped abnormally). Each names what it was doing
/// and the file, tree or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("hsm agent needs CAP_SYS_ADMIN for fanotify pre-content events: run it as root")]
    NotRoot,
    #[error(
        "kernel {major}.{minor} has no fanotify pre-content events (FAN_PRE_ACCESS needs Linux 6.14 or newer); \
         refusing to start, stubs would read as zeros"
    )]
    KernelTooOld { major: u32, minor: u32 },
    #[error("no trees to serve: give DST directories or [agent] trees in the config")]
    NoTrees,
    #[error("{}: {source}", path.display())]
    Tree {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// fanotify refused the mark on a tree.
    #[error("{}: {}", path.display(), mark_refusal(source))]
    Mark {
        path: PathBuf,
        #[source]
        source: hsm_kernel::KernelError,
    },
    #[error("{}: ignoring opens on its mount: {source}", path.display())]
    IgnoreOpens {
        path: PathBuf,
        #[source]
        source: hsm_kernel::KernelError,
    },
    /// fanotify_init refused the group.
    #[error("{}", group_refusal(.0))]
    Group(#[source] hsm_kernel::KernelError),
    /// A file or socket in the state directory (or the ready file).
    #[error("{what} {}: {source}", path.display())]
    State {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The group could not be handed to what keeps it across restarts.
    #[error("{to}: {source}")]
    HandOver {
        to: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("reserving fd numbers: {0}")]
    Reserve(#[source] hsm_kernel::KernelError),
    #[error("[agent] guard = \"require\", but the stub guard cannot be installed: {0}")]
    GuardRequired(#[source] hsm_bpf::BpfError),
    #[error("could not register with the stub guard: {0}")]
    GuardRegistration(#[source] hsm_bpf::BpfError),
    /// `[metrics] listen` could not be bound.
    #[error("[metrics] listen = \"{addr}\": cannot listen there: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("fanotify: {0}")]
    Kernel(#[from] hsm_kernel::KernelError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn mark_refusal(e: &hsm_kernel::KernelError) -> String {
    match e.errno() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => "this filesystem cannot raise pre-content events (ext4, xfs and btrfs can; tmpfs, NFS and overlayfs cannot)".into(),
        Some(libc::EXDEV) => "the path is on an idmapped or special mount that cannot be marked; use the filesystem's own mount".into(),
        _ => e.to_string(),
    }
}

fn group_refusal(e: &hsm_kernel::KernelError) -> String {
    match e.errno() {
        Some(libc::EPERM) => "fanotify_init: permission denied (needs CAP_SYS_ADMIN)".into(),
        Some(libc::EINVAL) => {
            "fanotify_init refused FAN_CLASS_PRE_CONTENT: the kernel lacks pre-content support"
                .into()
        }
        _ => e.to_string(),
    }
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub trees: Vec<PathBuf>,
    pub config: AgentConfig,
    pub remote: hsm_config::RemoteConfig,
    /// Serve Prometheus metrics here (`[metrics] listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `[cache]`: the bounded cache.
    pub cache: hsm_config::CacheConfig,
    /// `[prefetch]`: published access traces fetched ahead of readers.
    pub prefetch: hsm_config::PrefetchConfig,
}

/// The core's view of an event's range: the core knows nothing of fanotify.
fn core_range(r: Option<hsm_kernel::fanotify::FileRange>) -> Option<hsm_core::FileRange> {
    r.map(|r| hsm_core::FileRange {
        offset: r.offset,
        count: r.count,
    })
}

/// The answer fanotify carries for the errno the core chose.
fn kernel_errno(e: hsm_core::DenyErrno) -> hsm_kernel::fanotify::DenyErrno {
    use hsm_kernel::fanotify::DenyErrno as K;
    match e {
        hsm_core::DenyErrno::Eio => K::Eio,
        hsm_core::DenyErrno::Enospc => K::Enospc,
        hsm_core::DenyErrno::Edquot => K::Edquot,
    }
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
    /// The bounded cache's open notifications (`bounded.rs`), when there is a limit.
    opens: Option<Arc<Group>>,
}

impl MarkSink for GroupMarks {
    fn ignore(&self, fd: std::os::fd::BorrowedFd<'_>) {
        match self.group.add_ignore_mark(fd, AGENT_EVENTS) {
            Ok(()) => Metrics::inc(&self.metrics.ignore_marks),
            Err(e) => debug!(error = %e, "could not place ignore mark"),
        }
    }

    fn watch_opens(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if let Some(g) = &self.opens {
            if let Err(e) = g.add_open_mark(fd) {
                debug!(error = %e, "could not place open mark");
            }
        }
    }
}

/// Learns what a blocked thread is about to do from `/proc/TID/syscall` (the thread that
/// raised a pre-content event sleeps inside its syscall until it is answered).
#[derive(Debug)]
struct ProcIntent;

impl hsm_core::IntentProbe for ProcIntent {
    fn classify_now(&self, tid: i32) -> Option<hsm_core::Access> {
        let seen = hsm_kernel::intent::classify_now(tid)?;
        if seen.access != hsm_core::Access::Read {
            debug!(tid, syscall = ?seen.syscall, access = ?seen.access, "access is not a read");
        }
        Some(seen.access)
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
    runtime.block_on(serve::serve(opts, own))
}

/// Replace `path` with `text` all at once. The temporary file gets a fresh name and is
/// created exclusively without following symlinks, and `rename` replaces a symlink at
/// `path` rather than writing through it: a link planted in a shared directory can never
/// make the agent overwrite the file it points at.
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    for attempt in 0..16u32 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{attempt}.tmp", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp);
        let mut file = match file {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        };
        let written = file.write_all(text.as_bytes()).and_then(|()| {
            drop(file);
            std::fs::rename(&tmp, path)
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return written;
    }
    Err(std::io::Error::other("could not create a temporary file"))
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

#[cfg(test)]
mod write_atomic_tests {
    use super::write_atomic;

    #[test]
    fn replaces_a_symlink_instead_of_writing_through_it() {
        let d = tempfile::tempdir().expect("test setup");
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").expect("test setup");
        let stats = d.path().join("stats.json");
        std::os::unix::fs::symlink(&victim, &stats).expect("test setup");
        // The old fixed temporary name, planted as a link too.
        std::os::unix::fs::symlink(&victim, d.path().join("stats.tmp")).expect("test setup");
        write_atomic(&stats, "{}").expect("test setup");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("test setup"),
            "precious"
        );
        assert!(
            !std::fs::symlink_metadata(&stats)
                .expect("test setup")
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&stats).expect("test setup"), "{}");
        let left: Vec<_> = std::fs::read_dir(d.path())
            .expect("test setup")
            .map(|e| {
                e.expect("test setup")
                    .file_name()
                    .into_string()
                    .expect("test setup")
            })
            .filter(|n| n.ends_with(".tmp") && n != "stats.tmp")
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }
}
