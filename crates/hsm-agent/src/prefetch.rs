//! Prefetch of a populated tree's published access traces (docs/SEMANTICS.md, "Access
//! traces and prefetch").
//!
//! The tree's root names the remote it was populated from (`trusted.hsm.tree`, written by
//! populate). Its traces are `.hsm-traces/NAME` under that prefix, listed in
//! `.hsm-traces/index`; entries name object keys, which are the paths in the tree (publish
//! names objects by path; the manifest is read to map a key that is not). Entries are
//! fetched in trace order, at most `[prefetch] jobs` at once and `bandwidth` bytes per
//! second, on the agent's private mount: from the trace's pack (`.hsm-trace-packs/NAME`,
//! one streamed request) through [`AgentCore::prefetch_supplied`], which writes the bytes
//! only if they match the manifest's digests, and otherwise through
//! [`AgentCore::prefetch`]. Readers that arrive join a fetch in flight, and always have the
//! other fetch slots of their own.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hsm_config::{PrefetchConfig, RemoteConfig};
use hsm_core::{AgentCore, Prefetched, ServeError};
use hsm_manifest::trace::{self, TRACES_PREFIX, TraceEntry};
use hsm_remote::{RemoteError, RemoteUrl, Store};
use tracing::{debug, info, warn};

use crate::cache::CacheOps;

/// The object at a tree's prefix that lists its traces' names (a JSON array of strings).
pub const TRACE_INDEX: &str = ".hsm-traces/index";

/// What one prefetch of a tree did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefetchSummary {
    pub tree: PathBuf,
    /// The remote URL the tree was populated from.
    pub url: String,
    pub traces: usize,
    pub entries: usize,
    /// Bytes fetched by the prefetch (not those readers fetched first).
    pub bytes_fetched: u64,
    /// Entries whose file is gone, no longer a stub, or names another object now.
    pub skipped: usize,
    pub failed: usize,
    /// Entries whose bytes a pack held but that were fetched from their objects instead:
    /// the bytes did not match the manifest's digests (or the stub has none to check).
    #[serde(default)]
    pub pack_refused: usize,
    pub elapsed_secs: f64,
}

/// Why a tree's traces could not be prefetched.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("{}: {why}", .tree.display())]
    Tree { tree: PathBuf, why: String },
    #[error("{url}: {source}")]
    Remote {
        url: String,
        #[source]
        source: RemoteError,
    },
    #[error("{url}{key}: {why}")]
    Trace {
        url: String,
        key: String,
        why: String,
    },
}

/// The remote URL `tree`'s root names, or `None` when it names none (not populated by
/// an hsm that records it).
pub fn tree_url(tree: &Path) -> Result<Option<String>, PrefetchError> {
    let bad = |why: String| PrefetchError::Tree {
        tree: tree.to_path_buf(),
        why,
    };
    let dir = std::fs::File::open(tree).map_err(|e| bad(e.to_string()))?;
    let mut buf = Vec::new();
    match hsm_kernel::xattr::fget(dir.as_fd(), hsm_stub::TREE_XATTR, &mut buf) {
        Ok(false) => Ok(None),
        Ok(true) => String::from_utf8(buf)
            .map(Some)
            .map_err(|_| bad(format!("{} is not UTF-8", hsm_stub::TREE_XATTR))),
        Err(e) => Err(bad(format!("reading {}: {e}", hsm_stub::TREE_XATTR))),
    }
}

/// The names `url`'s trace index lists, each checked like a trace's name (none when there
/// is no index).
pub async fn published_trace_names(
    store: &dyn Store,
    url: &str,
) -> Result<Vec<String>, PrefetchError> {
    let index = match store.get(TRACE_INDEX).await {
        Ok(b) => b,
        Err(RemoteError::NotFound { .. }) => return Ok(Vec::new()),
        Err(source) => {
            return Err(PrefetchError::Remote {
                url: url.to_string(),
                source,
            });
        }
    };
    let names: Vec<String> = serde_json::from_slice(&index).map_err(|e| PrefetchError::Trace {
        url: url.to_string(),
        key: TRACE_INDEX.into(),
        why: format!("not a JSON list of names: {e}"),
    })?;
    for name in &names {
        trace::check_name(name).map_err(|why| PrefetchError::Trace {
            url: url.to_string(),
            key: format!("{TRACES_PREFIX}{name}"),
            why,
        })?;
    }
    Ok(names)
}

/// The traces published at `url`, in index order (none when there is no index).
pub async fn published_traces(
    store: &dyn Store,
    url: &str,
) -> Result<Vec<Published>, PrefetchError> {
    let remote = |source| PrefetchError::Remote {
        url: url.to_string(),
        source,
    };
    let mut out = Vec::new();
    for name in published_trace_names(store, url).await? {
        let key = format!("{TRACES_PREFIX}{name}");
        let bad = |why: String| PrefetchError::Trace {
            url: url.to_string(),
            key: key.clone(),
            why,
        };
        let bytes = match store.get(&key).await {
            Ok(b) => b,
            // Removed by a publish of a newer set since the index was read.
            Err(RemoteError::NotFound { .. }) => {
                warn!(
                    url,
                    key,
                    "a trace the index names is gone (a newer set replaced it?); going on without it"
                );
                continue;
            }
            Err(e) => return Err(remote(e)),
        };
        let entries = trace::parse(&bytes).map_err(|e| bad(e.to_string()))?;
        out.push(Published {
            name,
            entries,
            raw: bytes,
        });
    }
    Ok(out)
}

/// One published trace.
#[derive(Debug, Clone)]
pub struct Published {
    /// Its name (`.hsm-traces/NAME`).
    pub name: String,
    pub entries: Vec<TraceEntry>,
    /// The object's bytes (a pack names their digest).
    pub raw: bytes::Bytes,
}

/// One thing for the prefetch to do: fetch an entry's range, or write bytes of it a pack
/// supplied (checked against the digests first; fetched instead if they do not match).
enum Work {
    Ranged(TraceEntry),
    Supplied(TraceEntry, bytes::Bytes),
}

/// The body of `t`'s pack after its header, and how many of `t`'s first entries it holds;
/// `None` (the entries are fetched one by one) when there is no pack or it cannot be used.
async fn open_pack(
    store: &dyn Store,
    url: &str,
    t: &Published,
) -> Option<(hsm_remote::ByteStream, bytes::BytesMut, usize)> {
    let key = format!("{}{}", trace::PACKS_PREFIX, t.name);
    let info = match store.head(&key).await {
        Ok(i) => i,
        Err(RemoteError::NotFound { .. }) => {
            debug!(%url, %key, "no pack for this trace: its entries are fetched one by one");
            return None;
        }
        Err(e) => {
            warn!(%url, %key, error = %e, "cannot read the trace's pack: its entries are fetched one by one");
            return None;
        }
    };
    let expect = hsm_remote::Expect {
        etag: info.etag.clone(),
        version: info.version.clone(),
        size: info.size,
    };
    let unusable = |why: String| {
        warn!(%url, %key, why, "the trace's pack is not usable: its entries are fetched one by one");
    };
    let mut body = match store.get_stream(&key, 0..info.size, &expect).await {
        Ok(b) => b,
        Err(e) => {
            unusable(e.to_string());
            return None;
        }
    };
    let mut buf = bytes::BytesMut::new();
    let nl = loop {
        if let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            break nl;
        }
        if buf.len() >= trace::MAX_PACK_HEADER {
            unusable("no header line".into());
            return None;
        }
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => {
                unusable(e.to_string());
                return None;
            }
            None => {
                unusable("ends before its header line".into());
                return None;
            }
        }
    };
    let header = match trace::PackHeader::parse_for(&buf[..nl], &t.raw, t.entries.len()) {
        Ok(h) => h,
        Err(why) => {
            unusable(why);
            return None;
        }
    };
    let want: u64 = t.entries[..header.entries]
        .iter()
        .map(|e| e.end - e.start)
        .sum();
    if header.bytes != want || info.size != (nl as u64 + 1) + want {
        unusable(format!(
            "holds {} bytes after a header of {} bytes, its entries need {want}",
            info.size.saturating_sub(nl as u64 + 1),
            nl + 1
        ));
        return None;
    }
    let _ = buf.split_to(nl + 1);
    Some((body, buf, header.entries))
}

/// Most bytes of a pack one piece of work holds: a longer entry (a file read whole is one
/// entry) is handed on in pieces of this size, so at most `jobs` of them are in memory. A
/// piece that covers a granule only in part (granules above 8 MiB: objects over 128 GiB)
/// leaves that granule to a ranged fetch.
const PACK_PIECE: u64 = 8 << 20;

/// `t`'s entries as work, in order: those its pack holds with their bytes (read from the
/// pack as the prefetch gets to them, in pieces of at most [`PACK_PIECE`], each reserved
/// against the rate first), the rest, and all after a pack that breaks, to be fetched.
fn trace_work(
    pack: Option<(hsm_remote::ByteStream, bytes::BytesMut, usize)>,
    entries: Vec<TraceEntry>,
    pace: Arc<Pace>,
    url: String,
    name: String,
) -> impl futures::Stream<Item = Work> + Send {
    struct St {
        pack: Option<(hsm_remote::ByteStream, bytes::BytesMut, usize)>,
        entries: std::vec::IntoIter<TraceEntry>,
        /// Entries taken from `entries` so far.
        taken: usize,
        /// What is left of the entry being read from the pack.
        cur: Option<TraceEntry>,
    }
    let st = St {
        pack,
        entries: entries.into_iter(),
        taken: 0,
        cur: None,
    };
    futures::stream::unfold(st, move |mut st| {
        let (pace, url, name) = (pace.clone(), url.clone(), name.clone());
        async move {
            let e = match st.cur.take() {
                Some(rest) => rest,
                None => {
                    let e = st.entries.next()?;
                    st.taken += 1;
                    if st
                        .pack
                        .as_ref()
                        .is_some_and(|(_, _, held)| st.taken > *held)
                    {
                        st.pack = None;
                    }
                    e
                }
            };
            let Some((body, buf, _)) = st.pack.as_mut() else {
                return Some((Work::Ranged(e), st));
            };
            let end = e.end.min(e.start + PACK_PIECE);
            let len = (end - e.start) as usize;
            pace.reserve(len as u64).await;
            while buf.len() < len {
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    other => {
                        let why = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "ended early".into(),
                        };
                        warn!(%url, trace = %name, entry = st.taken, why,
                              "the trace's pack broke: the rest of its entries are fetched one by one");
                        st.pack = None;
                        return Some((Work::Ranged(e), st));
                    }
                }
            }
            let data = buf.split_to(len).freeze();
            if end < e.end {
                st.cur = Some(TraceEntry {
                    start: end,
                    ..e.clone()
                });
            }
            let piece = TraceEntry { end, ..e };
            Some((Work::Supplied(piece, data), st))
        }
    })
}

/// Object keys to paths in the tree, from the manifest, read only when an entry's key is
/// not the path of its stub: publish names each object by its path, so the manifest (one
/// GET and a decode of the whole tree's entries) stays off the start of the prefetch.
struct KeyPaths {
    store: Arc<dyn Store>,
    url: String,
    map: tokio::sync::OnceCell<HashMap<String, Vec<String>>>,
}

impl KeyPaths {
    /// Every name the manifest gives the object `key`: its file's path, then its hard links.
    async fn get(&self, key: &str) -> Vec<String> {
        let map = self
            .map
            .get_or_init(|| async {
                key_paths(&*self.store, &self.url)
                    .await
                    .unwrap_or_else(|e| {
                        warn!(url = %self.url, error = %e,
                              "cannot read the manifest to find renamed trace entries; they are skipped");
                        HashMap::new()
                    })
            })
            .await;
        map.get(key).cloned().unwrap_or_default()
    }
}

/// Object key to its names in the tree (the file's path, then the other names of its
/// hard links), from the manifest at `url` (none: keys are paths).
async fn key_paths(
    store: &dyn Store,
    url: &str,
) -> Result<HashMap<String, Vec<String>>, PrefetchError> {
    let bytes = match store.get(hsm_manifest::MANIFEST_KEY).await {
        Ok(b) => b,
        Err(RemoteError::NotFound { .. }) => return Ok(HashMap::new()),
        Err(source) => {
            return Err(PrefetchError::Remote {
                url: url.to_string(),
                source,
            });
        }
    };
    let m = hsm_manifest::Manifest::decode(&bytes).map_err(|e| PrefetchError::Trace {
        url: url.to_string(),
        key: hsm_manifest::MANIFEST_KEY.into(),
        why: e.to_string(),
    })?;
    Ok(names_by_key(m.entries))
}

/// Object key → its names: a file entry's path, then its hard links' paths.
fn names_by_key(entries: Vec<hsm_manifest::Entry>) -> HashMap<String, Vec<String>> {
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    let mut key_of: HashMap<String, String> = HashMap::new();
    let mut links = Vec::new();
    for e in entries {
        match e.kind {
            hsm_manifest::Kind::File(f) => {
                key_of.insert(e.path.clone(), f.key.clone());
                names.entry(f.key).or_default().push(e.path);
            }
            hsm_manifest::Kind::HardLink { to } => links.push((e.path, to)),
            _ => {}
        }
    }
    for (path, to) in links {
        if let Some(key) = key_of.get(&to) {
            names.entry(key.clone()).or_default().push(path);
        }
    }
    names
}

/// Keeps prefetch to a byte rate: each entry reserves its bytes before it is fetched (so
/// the time a fetch takes counts towards its share) and gives back what it did not need.
struct Pace {
    bytes_per_sec: u64,
    /// When the bytes reserved so far will have been allowed.
    next: std::sync::Mutex<Instant>,
}

impl Pace {
    fn cost(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
    }

    /// Reserve `bytes` and wait for their turn.
    async fn reserve(&self, bytes: u64) {
        // Nothing to reserve (a pack's piece, paced as it was read) waits for nobody's turn.
        if self.bytes_per_sec == 0 || bytes == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let start = (*next).max(Instant::now());
            *next = start + self.cost(bytes);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    /// Give back `bytes` of a reservation that were not fetched.
    fn refund(&self, bytes: u64) {
        if self.bytes_per_sec == 0 || bytes == 0 {
            return;
        }
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        *next = next
            .checked_sub(self.cost(bytes))
            .unwrap_or(*next)
            .max(Instant::now());
    }
}

/// Prefetch the traces published for `tree` (a served tree, or a directory in one that
/// was populated by itself). `Ok(None)`: the tree names no remote, or it has no traces.
pub async fn prefetch_tree(
    ops: Arc<CacheOps>,
    core: Arc<AgentCore>,
    tree: PathBuf,
    cfg: PrefetchConfig,
    remote_cfg: RemoteConfig,
) -> Result<Option<PrefetchSummary>, PrefetchError> {
    let started = Instant::now();
    let Some(url) = tree_url(&tree)? else {
        debug!(tree = %tree.display(), "no remote recorded on the tree's root: nothing to prefetch");
        return Ok(None);
    };
    let store = RemoteUrl::parse(&url)
        .and_then(|u| hsm_remote::open_store(&u, &remote_cfg))
        .map_err(|source| PrefetchError::Remote {
            url: url.clone(),
            source,
        })?;
    let traces = published_traces(&*store, &url).await?;
    if traces.is_empty() {
        debug!(tree = %tree.display(), %url, "no published traces");
        return Ok(None);
    }
    let paths = Arc::new(KeyPaths {
        store: store.clone(),
        url: url.clone(),
        map: tokio::sync::OnceCell::new(),
    });
    let pace = Arc::new(Pace {
        bytes_per_sec: cfg.bandwidth.0,
        next: std::sync::Mutex::new(Instant::now()),
    });
    // Each trace with a pack is one stream of its entries' bytes; the others are
    // interleaved entry by entry, as before packs.
    let mut streams: Vec<futures::stream::BoxStream<'static, Work>> = Vec::new();
    let mut unpacked: Vec<Vec<TraceEntry>> = Vec::new();
    let mut entries = 0;
    let mut packs = 0;
    for t in &traces {
        entries += t.entries.len();
        match open_pack(&*store, &url, t).await {
            Some(pack) => {
                packs += 1;
                streams.push(Box::pin(trace_work(
                    Some(pack),
                    t.entries.clone(),
                    pace.clone(),
                    url.clone(),
                    t.name.clone(),
                )));
            }
            None => unpacked.push(t.entries.clone()),
        }
    }
    if !unpacked.is_empty() {
        let rest = trace::interleave(&unpacked);
        streams.push(Box::pin(futures::stream::iter(
            rest.into_iter().map(Work::Ranged),
        )));
    }
    info!(tree = %tree.display(), %url, traces = traces.len(), packs, entries,
          "prefetching the published traces");
    let mut summary = PrefetchSummary {
        tree: tree.clone(),
        url: url.clone(),
        traces: traces.len(),
        entries,
        ..Default::default()
    };
    let results = futures::stream::select_all(streams)
        .map(|w| {
            let (ops, core, pace, tree, url, paths) = (
                ops.clone(),
                core.clone(),
                pace.clone(),
                tree.clone(),
                url.clone(),
                paths.clone(),
            );
            async move {
                let (e, data) = match w {
                    Work::Ranged(e) => (e, None),
                    Work::Supplied(e, data) => (e, Some(data)),
                };
                // A pack's bytes were paced as they were read.
                let want = if data.is_none() { e.end - e.start } else { 0 };
                pace.reserve(want).await;
                let mut rel = e.key.clone();
                let mut r = one(&ops, &core, &tree, &rel, &url, &e, data.clone()).await;
                if matches!(r, Err(One::Skip(_)) | Ok((Prefetched::Elsewhere, _))) {
                    // Renamed, or a hard link whose first name is gone: the manifest's
                    // other names for the object.
                    for p in paths.get(&e.key).await {
                        if p == e.key {
                            continue;
                        }
                        let again = one(&ops, &core, &tree, &p, &url, &e, data.clone()).await;
                        let found =
                            !matches!(again, Err(One::Skip(_)) | Ok((Prefetched::Elsewhere, _)));
                        (rel, r) = (p, again);
                        if found {
                            break;
                        }
                    }
                }
                let got = match &r {
                    Ok((Prefetched::Fetched(n), _)) => *n,
                    _ => 0,
                };
                pace.refund(want.saturating_sub(got));
                (rel, r)
            }
        })
        .buffered(cfg.jobs.max(1));
    futures::pin_mut!(results);
    while let Some((rel, r)) = results.next().await {
        if let Ok((_, true)) = r {
            summary.pack_refused += 1;
        }
        match r {
            Ok((Prefetched::Fetched(n), _)) => summary.bytes_fetched += n,
            Ok(_) => summary.skipped += 1,
            Err(One::Skip(why)) => {
                debug!(tree = %tree.display(), path = %rel, why, "prefetch skipped an entry");
                summary.skipped += 1;
            }
            Err(One::Failed(ServeError::ShuttingDown)) => break,
            Err(One::Failed(e)) => {
                if summary.failed == 0 {
                    warn!(tree = %tree.display(), path = %rel, error = %e,
                          "prefetch of a trace entry failed (a reader will fetch it on demand)");
                }
                summary.failed += 1;
            }
        }
    }
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    if summary.pack_refused > 0 {
        warn!(tree = %tree.display(), %url, entries = summary.pack_refused,
              "the traces' packs held bytes that are not the objects' (published before the objects changed?): those entries were fetched from the objects instead; publish --trace again");
    }
    info!(tree = %tree.display(), entries = summary.entries, bytes = summary.bytes_fetched,
          skipped = summary.skipped, failed = summary.failed,
          secs = format!("{:.2}", summary.elapsed_secs), "prefetch done");
    Ok(Some(summary))
}

enum One {
    Skip(&'static str),
    Failed(ServeError),
}

async fn one(
    ops: &CacheOps,
    core: &Arc<AgentCore>,
    tree: &Path,
    rel: &str,
    url: &str,
    e: &TraceEntry,
    supplied: Option<bytes::Bytes>,
) -> Result<(Prefetched, bool), One> {
    // Manifest paths are checked by its decoder; a bare key is checked here.
    if hsm_manifest::check_path(rel).is_err() {
        return Err(One::Skip("not a path inside the tree"));
    }
    let path = tree.join(rel);
    let (fd, _) = match ops.reopen(&path, libc::O_RDONLY) {
        Ok(x) => x,
        Err(_) => return Err(One::Skip("no such regular file")),
    };
    debug!(fd = fd.as_raw_fd(), path = %path.display(), start = e.start, end = e.end,
           packed = supplied.is_some(), "prefetch");
    let mut written = 0;
    let mut refused = false;
    if let Some(data) = supplied {
        match core
            .prefetch_supplied(fd.as_fd(), url, &e.key, e.start, data)
            .await
            .map_err(One::Failed)?
        {
            Prefetched::Fetched(n) => written = n,
            Prefetched::Unverified => {
                debug!(path = %path.display(), "the pack's bytes for this entry cannot be checked or are not the object's: fetching it");
                refused = true;
            }
            other => return Ok((other, false)),
        }
    }
    // What the pack did not cover (or all of it, without one).
    let p = match core
        .prefetch(fd.as_fd(), url, &e.key, e.start..e.end)
        .await
        .map_err(One::Failed)?
    {
        Prefetched::Fetched(n) => Prefetched::Fetched(written + n),
        other if written == 0 => other,
        _ => Prefetched::Fetched(written),
    };
    Ok((p, refused))
}

/// What prefetches need, shared by the start-up prefetch and the control socket's.
#[derive(Debug)]
pub(crate) struct Prefetcher {
    pub ops: Arc<CacheOps>,
    pub core: Arc<AgentCore>,
    pub cfg: PrefetchConfig,
    pub remote: RemoteConfig,
}

impl Prefetcher {
    /// [`prefetch_tree`] for `tree`.
    pub fn tree(
        &self,
        tree: PathBuf,
    ) -> impl std::future::Future<Output = Result<Option<PrefetchSummary>, PrefetchError>> + use<>
    {
        prefetch_tree(
            self.ops.clone(),
            self.core.clone(),
            tree,
            self.cfg.clone(),
            self.remote.clone(),
        )
    }

    /// Prefetch `tree` in a task of its own; a failure is logged.
    pub fn spawn(&self, tree: PathBuf) {
        let fut = self.tree(tree.clone());
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                warn!(tree = %tree.display(), error = %e, "could not prefetch the tree's traces");
            }
        });
    }

    /// At start: every served tree whose root names a remote, unless `[prefetch]` is off.
    pub fn spawn_at_start(&self, trees: &[PathBuf]) {
        if self.cfg.enabled {
            for tree in trees {
                self.spawn(tree.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_found_by_its_file_path_then_its_hard_links() {
        let attrs = hsm_manifest::Attrs {
            mode: 0o100644,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            atime: (0, 0),
        };
        let file = |path: &str, key: &str| hsm_manifest::Entry {
            path: path.into(),
            kind: hsm_manifest::Kind::File(hsm_manifest::FileObject {
                size: 1,
                key: key.into(),
                etag: None,
                version: None,
                digests: Vec::new(),
            }),
            attrs,
        };
        let link = |path: &str, to: &str| hsm_manifest::Entry {
            path: path.into(),
            kind: hsm_manifest::Kind::HardLink { to: to.into() },
            attrs,
        };
        let names = names_by_key(vec![
            link("a/early-link", "a/file"),
            file("a/file", "a/file"),
            file("b/renamed", "objects/0001"),
            link("c/late-link", "a/file"),
            link("dangling", "nowhere"),
        ]);
        assert_eq!(names["a/file"], ["a/file", "a/early-link", "c/late-link"]);
        assert_eq!(names["objects/0001"], ["b/renamed"]);
        assert_eq!(names.len(), 2);
    }

    fn entry(key: &str, start: u64, end: u64) -> TraceEntry {
        TraceEntry {
            url: None,
            key: key.into(),
            start,
            end,
        }
    }

    fn body(chunks: Vec<Result<bytes::Bytes, RemoteError>>) -> hsm_remote::ByteStream {
        Box::pin(futures::stream::iter(chunks))
    }

    async fn work(
        pack: Option<(hsm_remote::ByteStream, bytes::BytesMut, usize)>,
        entries: Vec<TraceEntry>,
    ) -> Vec<(String, u64, u64, Option<Vec<u8>>)> {
        let pace = Arc::new(Pace {
            bytes_per_sec: 0,
            next: std::sync::Mutex::new(Instant::now()),
        });
        trace_work(pack, entries, pace, "s3://b/p".into(), "t".into())
            .map(|w| match w {
                Work::Ranged(e) => (e.key, e.start, e.end, None),
                Work::Supplied(e, d) => (e.key, e.start, e.end, Some(d.to_vec())),
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_pack_is_handed_on_in_pieces_and_entries_past_it_are_fetched() {
        const MIB: u64 = 1 << 20;
        let data: Vec<u8> = (0..(20 * MIB + 3)).map(|i| (i % 251) as u8).collect();
        // The pack holds the first two entries; its bytes arrive in odd-sized chunks, the
        // first few already read past the header.
        let chunks: Vec<_> = data[5..]
            .chunks(3 * MIB as usize + 7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let pack = (body(chunks), bytes::BytesMut::from(&data[..5]), 2);
        let got = work(
            Some(pack),
            vec![
                entry("big", 4 * MIB, 24 * MIB),
                entry("small", 0, 3),
                entry("after", 0, MIB),
            ],
        )
        .await;
        let d = |a: u64, b: u64| Some(data[a as usize..b as usize].to_vec());
        assert_eq!(
            got,
            vec![
                ("big".into(), 4 * MIB, 12 * MIB, d(0, 8 * MIB)),
                ("big".into(), 12 * MIB, 20 * MIB, d(8 * MIB, 16 * MIB)),
                ("big".into(), 20 * MIB, 24 * MIB, d(16 * MIB, 20 * MIB)),
                ("small".into(), 0, 3, d(20 * MIB, 20 * MIB + 3)),
                ("after".into(), 0, MIB, None),
            ]
        );
    }

    #[tokio::test]
    async fn nothing_reserved_waits_for_no_turn() {
        let pace = Pace {
            bytes_per_sec: 1 << 20,
            next: std::sync::Mutex::new(Instant::now()),
        };
        pace.reserve(1 << 20).await;
        // The next second is taken; a reservation of nothing does not wait for it.
        let t = Instant::now();
        pace.reserve(0).await;
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Bytes do.
        let t = Instant::now();
        pace.reserve(64 << 10).await;
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_pack_that_breaks_leaves_the_rest_to_ranged_fetches() {
        let err = RemoteError::NotFound {
            url: "s3://b/p".into(),
            key: ".hsm-trace-packs/t".into(),
        };
        let pack = (
            body(vec![Ok(bytes::Bytes::from_static(b"abcd")), Err(err)]),
            bytes::BytesMut::new(),
            3,
        );
        let got = work(
            Some(pack),
            vec![entry("a", 0, 2), entry("b", 0, 10), entry("c", 0, 1)],
        )
        .await;
        assert_eq!(
            got,
            vec![
                ("a".into(), 0, 2, Some(b"ab".to_vec())),
                ("b".into(), 0, 10, None),
                ("c".into(), 0, 1, None),
            ]
        );
        // Without a pack, every entry is fetched.
        let got = work(None, vec![entry("a", 0, 2)]).await;
        assert_eq!(got, vec![("a".into(), 0, 2, None)]);
    }
}
