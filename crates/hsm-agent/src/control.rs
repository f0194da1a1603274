//! The control socket: `STATE_DIR/control.sock`, where `hsm status`, `hsm hydrate`,
//! `hsm evict`, `hsm pin` and `hsm unpin` talk to the running agent (docs/CONTROL.md).
//!
//! Newline-delimited JSON. One request per connection; the answer is zero or more
//! `{"file": PATH, "outcome": ...}` lines as each file is done, then one `{"done": ...}`
//! or `{"error": "..."}` line. Only root may connect: the state directory is 0700, the
//! socket 0600, and every connection's `SO_PEERCRED` uid is checked.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsm_core::AgentCore;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::cache::{CacheError, CacheOps, FileOutcome, Op, served_tree};
use crate::events::{DENY_ERRNOS, Pending};

/// The socket's name in the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// What a non-root client is told.
pub const ROOT_ONLY: &str = "the control socket is root-only: run as root";
/// Longest request line accepted (a long list of paths).
const MAX_REQUEST: u64 = 16 << 20;
/// A client must send its request this soon after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the counters behind the fetch rate and the recent errors are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const RATE_WINDOW: Duration = Duration::from_secs(60);
const ERROR_WINDOW: Duration = Duration::from_secs(3600);

/// The control socket of `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Request {
    /// `{"op":"status","path":null|"/abs/path"}`
    Status {
        op: StatusOp,
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// `{"op":"hydrate"|"evict"|"pin"|"unpin","paths":["/abs/path", ...]}`
    Cache { op: Op, paths: Vec<PathBuf> },
    /// `{"op":"prefetch","paths":["/abs/tree", ...],"wait":true}`: prefetch the traces
    /// published for each populated tree; without `wait`, answer once they are started.
    Prefetch {
        op: PrefetchOp,
        paths: Vec<PathBuf>,
        #[serde(default)]
        wait: bool,
    },
}

/// The `op` of a prefetch request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchOp {
    Prefetch,
}

/// Why a connection's request was refused (the text of its `error` line).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{ROOT_ONLY}")]
    NotRoot,
    #[error("no request within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("reading the request: {0}")]
    Read(#[source] io::Error),
    #[error("the request must be one line ending in a newline")]
    NotALine,
    #[error(
        "bad request ({0}): expected {{\"op\":\"status\",\"path\":null}} or {{\"op\":\"hydrate\"|\"evict\"|\"pin\"|\"unpin\"|\"prefetch\",\"paths\":[...]}}"
    )]
    Malformed(#[source] serde_json::Error),
    #[error("{}: paths sent to the agent must be absolute", .0.display())]
    Relative(PathBuf),
}

/// The `op` of a status request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusOp {
    Status,
}

impl Request {
    /// The request as one line, newline included.
    pub fn encode(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parse one request line; every path in it must be absolute.
    pub fn decode(line: &str) -> Result<Self, RequestError> {
        let req: Self = serde_json::from_str(line.trim_end()).map_err(RequestError::Malformed)?;
        let relative = match &req {
            Request::Status { path, .. } => path.iter().find(|p| p.is_relative()),
            Request::Cache { paths, .. } | Request::Prefetch { paths, .. } => {
                paths.iter().find(|p| p.is_relative())
            }
        };
        match relative {
            Some(p) => Err(RequestError::Relative(p.clone())),
            None => Ok(req),
        }
    }
}

/// A per-file line of the answer: the path and the [`FileOutcome`] fields.
#[derive(Debug, Serialize)]
struct FileLine<'a> {
    file: &'a Path,
    #[serde(flatten)]
    outcome: &'a FileOutcome,
}

/// The last line of a lifecycle command's answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Files reported (one line each).
    pub files: u64,
    pub hydrated: u64,
    pub evicted: u64,
    pub already_stub: u64,
    pub unpinned: u64,
    pub skipped: u64,
    pub failed: u64,
    /// Bytes fetched from remotes by this command.
    pub bytes_fetched: u64,
    /// Bytes of local data given back by evictions.
    pub bytes_freed: u64,
    pub elapsed_secs: f64,
}

impl Summary {
    /// Count one file's outcome.
    pub fn add(&mut self, o: &FileOutcome) {
        self.files += 1;
        match o {
            FileOutcome::Hydrated { fetched } => {
                self.hydrated += 1;
                self.bytes_fetched += fetched;
            }
            FileOutcome::Evicted { freed } => {
                self.evicted += 1;
                self.bytes_freed += freed;
            }
            FileOutcome::AlreadyStub => self.already_stub += 1,
            FileOutcome::Unpinned => self.unpinned += 1,
            FileOutcome::Skipped { .. } => self.skipped += 1,
            FileOutcome::Failed { .. } => self.failed += 1,
        }
    }
}

/// What `status` reports (the `done` line of a status request).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub uptime_secs: f64,
    /// What keeps the fanotify group across restarts: "keeper", "systemd" or "none".
    pub group_store: String,
    /// Whether the keeper process holds the group.
    pub keeper: bool,
    /// Whether the BPF stub guard is loaded and this agent is registered with it.
    pub guard: bool,
    pub fills_in_flight: u64,
    pub events_in_flight: u64,
    /// Bytes fetched per second over the last minute (or since start, if shorter).
    pub fetch_rate: f64,
    pub bytes_fetched: u64,
    /// Events the agent denied in the last hour, all errnos together.
    pub denies_last_hour: u64,
    /// The same per errno ("EIO", "ENOSPC", ...), only those with denies.
    pub denies_by_errno_last_hour: std::collections::BTreeMap<String, u64>,
    /// Failed fills in the last hour.
    pub fill_errors_last_hour: u64,
    /// Events the agent denied since it started.
    pub denies_total: u64,
    /// The bounded cache, when `[cache] max_size` is set.
    #[serde(default)]
    pub cache: Option<hsm_core::BudgetStatus>,
    pub trees: Vec<TreeStatus>,
}

/// One served tree (or the subtree asked for).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TreeStatus {
    /// The served tree.
    pub tree: PathBuf,
    /// What was walked: the tree, or the PATH given inside it.
    pub path: PathBuf,
    /// Files with the stub marker.
    pub stubs: u64,
    /// Regular files fetched whole, still copies of their remote object (origin xattr).
    pub hydrated: u64,
    /// Regular files that are neither (written locally, never from a remote).
    pub local_files: u64,
    /// Bytes on local disk that came from remotes: resident granules of stubs plus the
    /// size of hydrated files.
    pub resident_bytes: u64,
    /// Bytes of stubs not yet local.
    pub remote_bytes: u64,
    /// Size of the stubs and hydrated files that are pinned (on the file or a directory
    /// above it).
    pub pinned_bytes: u64,
    /// `[cache] max_size`: not implemented yet, always null ("none").
    pub cache_limit: Option<u64>,
    /// What counts against the limit: `resident_bytes`.
    pub cache_used: u64,
    /// Entries that could not be read (directory listing, stat or xattrs failed, or a
    /// stub's map did not decode).
    pub unreadable: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bytes_fetched: u64,
    denied: [u64; DENY_ERRNOS.len()],
    fill_errors: u64,
}

/// What the socket serves from: set up by `serve`'s start phase.
#[derive(Debug)]
pub(crate) struct Agent {
    pub core: Arc<AgentCore>,
    pub pending: Arc<Pending>,
    pub started: Instant,
    pub group_store: &'static str,
    pub guard: bool,
    pub trees: Vec<PathBuf>,
    pub cache: Arc<CacheOps>,
    /// Runs prefetch requests.
    pub prefetch: Option<Arc<crate::prefetch::Prefetcher>>,
    samples: Mutex<VecDeque<Sample>>,
}

impl Agent {
    pub fn new(
        core: Arc<AgentCore>,
        pending: Arc<Pending>,
        started: Instant,
        group_store: &'static str,
        guard: bool,
        trees: Vec<PathBuf>,
        cache: Arc<CacheOps>,
    ) -> Self {
        let a = Agent {
            core,
            pending,
            started,
            group_store,
            guard,
            trees,
            cache,
            prefetch: None,
            samples: Mutex::new(VecDeque::new()),
        };
        a.sample();
        a
    }

    /// Serve prefetch requests with `p`.
    pub fn with_prefetcher(mut self, p: Arc<crate::prefetch::Prefetcher>) -> Self {
        self.prefetch = Some(p);
        self
    }

    fn now(&self) -> Sample {
        let m = self.core.metrics();
        let r = std::sync::atomic::Ordering::Relaxed;
        Sample {
            at: Instant::now(),
            bytes_fetched: m.bytes_fetched.load(r),
            denied: self.pending.denied(),
            fill_errors: m.fill_errors.load(r),
        }
    }

    fn sample(&self) {
        let s = self.now();
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(s);
        while q
            .front()
            .is_some_and(|f| s.at.duration_since(f.at) > ERROR_WINDOW + SAMPLE_EVERY)
        {
            q.pop_front();
        }
    }

    /// The agent-wide part of the status (no tree walk).
    fn report(&self) -> StatusReport {
        let m = self.core.metrics();
        let r = std::sync::atomic::Ordering::Relaxed;
        let now = self.now();
        let q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        // The oldest sample inside each window (the first one is taken at start-up).
        let since = |w: Duration| {
            q.iter()
                .find(|s| now.at.duration_since(s.at) <= w + SAMPLE_EVERY)
                .copied()
        };
        let fetch_rate = since(RATE_WINDOW)
            .map(|s| {
                let dt = now.at.duration_since(s.at).as_secs_f64();
                if dt < 0.5 {
                    0.0
                } else {
                    now.bytes_fetched.saturating_sub(s.bytes_fetched) as f64 / dt
                }
            })
            .unwrap_or(0.0);
        let hour = since(ERROR_WINDOW);
        let by_errno: std::collections::BTreeMap<String, u64> = DENY_ERRNOS
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let before = hour.map_or(0, |s| s.denied[i]);
                (e.name().to_string(), now.denied[i].saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let fills = m.fills.load(r);
        let done = m.fill_duration.snapshot().count();
        StatusReport {
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs_f64(),
            group_store: self.group_store.to_string(),
            keeper: self.group_store == "keeper",
            guard: self.guard,
            fills_in_flight: fills.saturating_sub(done),
            events_in_flight: self.pending.len() as u64,
            fetch_rate,
            bytes_fetched: now.bytes_fetched,
            denies_last_hour: by_errno.values().sum(),
            denies_by_errno_last_hour: by_errno,
            fill_errors_last_hour: hour.map_or(now.fill_errors, |s| {
                now.fill_errors.saturating_sub(s.fill_errors)
            }),
            denies_total: now.denied.iter().sum(),
            cache: self.core.budget().map(|b| b.status()),
            trees: Vec::new(),
        }
    }
}

/// The bound socket, to remove at stop if it is still ours.
#[derive(Debug)]
pub(crate) struct Control {
    path: PathBuf,
    dev_ino: (u64, u64),
    task: tokio::task::JoinHandle<()>,
    sampler: tokio::task::JoinHandle<()>,
}

/// Bind `STATE_DIR/control.sock` (replacing what is there: a running predecessor is
/// handing over to us) and serve it until [`Control::close`].
pub(crate) fn start(state_dir: &Path, agent: Agent) -> io::Result<Control> {
    crate::journal::ensure_private_dir(state_dir)?;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => debug!(path = %path.display(), "replaced an earlier control socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let std_listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let meta = std::fs::symlink_metadata(&path)?;
    std_listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(std_listener)?;
    let agent = Arc::new(agent);
    let a2 = agent.clone();
    let sampler = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            a2.sample();
        }
    });
    let task = tokio::spawn(accept_loop(listener, agent));
    info!(path = %path.display(), "control socket ready");
    Ok(Control {
        path,
        dev_ino: (meta.dev(), meta.ino()),
        task,
        sampler,
    })
}

impl Control {
    /// Stop accepting; remove the socket unless a successor has already bound its own there.
    ///
    /// In a hand-over this runs before the journal says "stopped reading", and the
    /// successor binds only after it has seen that, so the check and the removal here
    /// cannot interleave with the successor's unlink and bind.
    pub(crate) fn close(self) {
        self.task.abort();
        self.sampler.abort();
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.dev_ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "could not remove the control socket");
                }
            }
            Ok(_) => debug!("the control socket is a successor's now; left in place"),
            Err(_) => {}
        }
    }
}

async fn accept_loop(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, agent.clone()));
            }
            Err(e) => {
                warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn error_line(e: &dyn std::fmt::Display) -> String {
    let mut s = serde_json::json!({ "error": e.to_string() }).to_string();
    s.push('\n');
    s
}

async fn connection(stream: UnixStream, agent: Arc<Agent>) {
    let uid = stream.peer_cred().map(|c| c.uid());
    let (rd, mut wr) = stream.into_split();
    if uid.as_ref().ok() != Some(&0) {
        debug!(?uid, "control socket: refused a non-root client");
        let _ = wr
            .write_all(error_line(&RequestError::NotRoot).as_bytes())
            .await;
        return;
    }
    let mut line = String::new();
    let mut rd = BufReader::new(rd).take(MAX_REQUEST);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_line(&mut line)).await;
    let req = match read {
        Err(_) => Err(RequestError::Timeout),
        Ok(Err(e)) => Err(RequestError::Read(e)),
        Ok(Ok(_)) if !line.ends_with('\n') => Err(RequestError::NotALine),
        Ok(Ok(_)) => Request::decode(&line),
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            let _ = wr.write_all(error_line(&e).as_bytes()).await;
            return;
        }
    };
    debug!(?req, "control request");
    // The work runs in its own task and sends lines here; this task writes them, so a
    // slow client only slows its own answer.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let work = tokio::spawn(run(req, agent, tx));
    while let Some(l) = rx.recv().await {
        if wr.write_all(l.as_bytes()).await.is_err() {
            // The client went away; the command still runs to its end.
            break;
        }
    }
    drop(rx);
    let _ = work.await;
    let _ = wr.shutdown().await;
}

async fn run(req: Request, agent: Arc<Agent>, tx: tokio::sync::mpsc::UnboundedSender<String>) {
    let started = Instant::now();
    match req {
        Request::Status { path, .. } => {
            let a = agent.clone();
            let walked =
                tokio::task::spawn_blocking(move || status_trees(&a.trees, path.as_deref())).await;
            let line = match walked {
                Ok(Ok(trees)) => {
                    let mut report = agent.report();
                    let limit = report.cache.map(|c| c.max_bytes);
                    report.trees = trees
                        .into_iter()
                        .map(|t| TreeStatus {
                            cache_limit: limit,
                            ..t
                        })
                        .collect();
                    serde_json::json!({ "done": report }).to_string()
                }
                Ok(Err(e)) => error_line(&e).trim_end().to_string(),
                Err(e) => error_line(&format_args!("status walk failed: {e}"))
                    .trim_end()
                    .to_string(),
            };
            let _ = tx.send(line + "\n");
        }
        Request::Cache { op, paths } => {
            let mut summary = Summary::default();
            let mut each = |p: &Path, o: FileOutcome| {
                summary.add(&o);
                let mut l = serde_json::to_string(&FileLine {
                    file: p,
                    outcome: &o,
                })
                .unwrap_or_default();
                l.push('\n');
                let _ = tx.send(l);
            };
            agent.cache.run(op, paths, &mut each).await;
            summary.elapsed_secs = started.elapsed().as_secs_f64();
            info!(
                ?op,
                files = summary.files,
                failed = summary.failed,
                "control command done"
            );
            let _ = tx.send(serde_json::json!({ "done": summary }).to_string() + "\n");
        }
        Request::Prefetch { paths, wait, .. } => prefetch(&agent, paths, wait, &tx).await,
    }
}

/// Prefetch each tree's published traces: one `{"tree": ..., "prefetch": summary}` line
/// per tree (or `"started": true` without `wait`), then `{"done": {"trees": N}}`. A path
/// outside the served trees, or one whose traces cannot be read, is an `error` line of its
/// own; the others still run.
async fn prefetch(
    agent: &Arc<Agent>,
    paths: Vec<PathBuf>,
    wait: bool,
    tx: &tokio::sync::mpsc::UnboundedSender<String>,
) {
    let Some(prefetcher) = agent.prefetch.clone() else {
        let _ = tx.send(error_line(&"this agent does not prefetch"));
        return;
    };
    let mut n = 0;
    for p in paths {
        let real = match served_tree(&agent.trees, &p) {
            Ok((_, real)) => real,
            Err(e) => {
                let line =
                    serde_json::json!({ "tree": p, "error": e.to_string(), "not_served": true });
                let _ = tx.send(line.to_string() + "\n");
                continue;
            }
        };
        n += 1;
        if !wait {
            prefetcher.spawn(real.clone());
            let _ =
                tx.send(serde_json::json!({ "tree": real, "started": true }).to_string() + "\n");
            continue;
        }
        let line = match prefetcher.tree(real.clone()).await {
            Ok(s) => serde_json::json!({ "tree": real, "prefetch": s }),
            Err(e) => serde_json::json!({ "tree": real, "error": e.to_string() }),
        };
        let _ = tx.send(line.to_string() + "\n");
    }
    let _ = tx.send(serde_json::json!({ "done": { "trees": n } }).to_string() + "\n");
}

/// Walk each tree (or the one holding `path`, from `path` down).
fn status_trees(trees: &[PathBuf], path: Option<&Path>) -> Result<Vec<TreeStatus>, CacheError> {
    let Some(p) = path else {
        return Ok(trees.iter().map(|t| walk(t, t)).collect());
    };
    let (tree, real) = served_tree(trees, p)?;
    Ok(vec![walk(tree, &real)])
}

fn has_xattr(path: &Path, name: &str, buf: &mut Vec<u8>) -> io::Result<bool> {
    hsm_kernel::xattr::lget(path, name, buf).map_err(|e| match e.errno() {
        Some(n) => io::Error::from_raw_os_error(n),
        None => io::Error::other(e.to_string()),
    })
}

/// Count what is under `start` (inside `tree`), never following symlinks nor leaving the
/// filesystem `start` is on.
fn walk(tree: &Path, start: &Path) -> TreeStatus {
    let mut st = TreeStatus {
        tree: tree.to_path_buf(),
        path: start.to_path_buf(),
        ..Default::default()
    };
    let mut buf = Vec::new();
    // A pin on a directory above `start` (up to the tree) covers it.
    let mut pinned_above = false;
    let mut a = start.parent();
    while let Some(d) = a {
        if !d.starts_with(tree) {
            break;
        }
        pinned_above |= has_xattr(d, hsm_stub::PIN_XATTR, &mut buf).unwrap_or(false);
        a = d.parent();
    }
    let Ok(meta) = std::fs::symlink_metadata(start) else {
        st.unreadable += 1;
        return st;
    };
    let dev = meta.dev();
    let mut stack = vec![(start.to_path_buf(), meta, pinned_above)];
    while let Some((p, meta, pinned_above)) = stack.pop() {
        let ft = meta.file_type();
        if meta.dev() != dev {
            continue;
        }
        let pinned = pinned_above || has_xattr(&p, hsm_stub::PIN_XATTR, &mut buf).unwrap_or(false);
        if ft.is_dir() {
            let Ok(rd) = std::fs::read_dir(&p) else {
                st.unreadable += 1;
                continue;
            };
            for e in rd {
                let Ok(e) = e else {
                    st.unreadable += 1;
                    continue;
                };
                let child = e.path();
                match std::fs::symlink_metadata(&child) {
                    Ok(m) => stack.push((child, m, pinned)),
                    Err(_) => st.unreadable += 1,
                }
            }
        } else if ft.is_file() {
            count_file(&mut st, &p, &meta, pinned, &mut buf);
        }
    }
    st.cache_used = st.resident_bytes;
    st
}

fn count_file(
    st: &mut TreeStatus,
    p: &Path,
    meta: &std::fs::Metadata,
    pinned: bool,
    buf: &mut Vec<u8>,
) {
    match has_xattr(p, hsm_stub::MARKER_XATTR, buf) {
        Ok(true) => {
            st.stubs += 1;
            match has_xattr(p, hsm_stub::MAP_XATTR, buf)
                .ok()
                .filter(|&b| b)
                .and_then(|_| hsm_stub::ResidentMap::decode(buf).ok())
            {
                Some(map) => {
                    let resident = resident_bytes(&map);
                    st.resident_bytes += resident;
                    st.remote_bytes += map.remote_size().saturating_sub(resident);
                }
                None => {
                    st.unreadable += 1;
                    st.remote_bytes += meta.len();
                }
            }
        }
        Ok(false) => match has_xattr(p, hsm_stub::ORIGIN_XATTR, buf) {
            Ok(true) => {
                st.hydrated += 1;
                st.resident_bytes += meta.len();
            }
            Ok(false) => {
                st.local_files += 1;
                return;
            }
            Err(_) => {
                st.unreadable += 1;
                return;
            }
        },
        Err(_) => {
            st.unreadable += 1;
            return;
        }
    }
    if pinned {
        st.pinned_bytes += meta.len();
    }
}

/// Bytes of the resident granules.
fn resident_bytes(map: &hsm_stub::ResidentMap) -> u64 {
    (0..map.granule_count())
        .filter(|&g| map.is_resident(g))
        .map(|g| {
            let r = map.granule_range(g);
            r.end - r.start
        })
        .sum()
}

#[cfg(test)]
mod tests;
