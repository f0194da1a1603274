//! `hsm publish SRC URL`: upload a local tree to an object store and write its manifest.
//!
//! Files are uploaded in parallel (one put below [`MULTIPART_THRESHOLD`], multipart above),
//! digested chunk by chunk while they are read, and listed with their metadata in the
//! manifest written last at the prefix (`.hsm-manifest`, see docs/MANIFEST.md). While the
//! upload runs, `.hsm-manifest.partial` records what is done, so a re-run after a failure
//! skips every object already uploaded and unchanged (same path, size and mtime, and the
//! store still holds the object with the recorded ETag).

mod manifest;
mod resume;
mod upload;
mod walk;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_config::RemoteConfig;
use hsm_manifest::{FileObject, MANIFEST_KEY};
use hsm_remote::{RemoteError, RemoteUrl, Store, open_store};
use serde::Serialize;
use tracing::{info, warn};

use self::manifest::{build_manifest, put_manifest};
use self::resume::{previous_files, same_etag};
use self::upload::upload_file;
use self::walk::{Item, Walk, walk};
use crate::remote::current_etags;
use crate::source::{LocalSource, Source};
use crate::{EntryError, PopulateError, human_bytes};

/// Files at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Part size of multipart uploads (S3 wants at least 5 MiB).
pub const PART_SIZE: usize = 16 << 20;
/// The partial manifest's key.
pub const PARTIAL_KEY: &str = ".hsm-manifest.partial";

/// Why one file could not be published (the summary names its path).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("read at {offset}: {source}")]
    ReadAt {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("file changed while being published; publish again")]
    Changed,
    #[error("reader: {0}")]
    Reader(#[source] tokio::task::JoinError),
    /// The store refused or failed (the error names the URL and key).
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// Why a manifest could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestWriteError {
    #[error("encoding {key}: {source}")]
    Encode {
        key: &'static str,
        #[source]
        source: hsm_manifest::ManifestError,
    },
    #[error("writing {key}: {source}")]
    Put {
        key: &'static str,
        #[source]
        source: RemoteError,
    },
}

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    /// Files uploaded at once.
    pub jobs: usize,
    /// Bytes per digest chunk (a power of two, 4 KiB..1 GiB).
    pub chunk_size: u64,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
    /// Write the manifest even when some entries failed (they are left out of it).
    pub allow_errors: bool,
    /// How often the partial manifest is rewritten during a long upload.
    pub checkpoint_interval: Duration,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            jobs: 8,
            chunk_size: 1 << 20,
            progress: true,
            allow_errors: false,
            checkpoint_interval: Duration::from_secs(30),
        }
    }
}

/// What publish did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishSummary {
    pub source: String,
    pub destination: String,
    pub entries: u64,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    pub skipped_special: u64,
    /// Files uploaded by this run.
    pub uploaded: u64,
    /// Files already in the store and unchanged (not uploaded again).
    pub unchanged: u64,
    /// Logical bytes of all files.
    pub bytes: u64,
    pub bytes_uploaded: u64,
    /// Whether `.hsm-manifest` was written (not when entries failed, unless allowed).
    pub manifest_written: bool,
    pub elapsed_secs: f64,
    pub errors: Vec<EntryError>,
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "publish: {} entries, {} of files: {} uploaded ({}), {} unchanged, {} dirs, {} symlinks, \
             {} hard links, {} special skipped, {} errors in {:.2} s; manifest {}",
            self.entries,
            human_bytes(self.bytes),
            self.uploaded,
            human_bytes(self.bytes_uploaded),
            self.unchanged,
            self.dirs,
            self.symlinks,
            self.hard_links,
            self.skipped_special,
            self.errors.len(),
            self.elapsed_secs,
            if self.manifest_written {
                "written"
            } else {
                "NOT written (fix the errors and re-run; finished uploads are kept)"
            }
        )
    }
}

fn entry_error(path: impl Into<String>, error: impl Into<String>) -> EntryError {
    EntryError {
        path: path.into(),
        error: error.into(),
    }
}

fn check_chunk_size(opts: &PublishOptions) -> Result<(), PopulateError> {
    if !opts.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&opts.chunk_size) {
        return Err(PopulateError::Setup(format!(
            "chunk size {} is not a power of two between 4 KiB and 1 GiB",
            opts.chunk_size
        )));
    }
    Ok(())
}

/// Upload `src` to `url` and write the manifest there.
pub fn publish(
    src: &str,
    url: &str,
    cfg: &RemoteConfig,
    opts: &PublishOptions,
) -> Result<PublishSummary, PopulateError> {
    publish_with_objects(src, url, cfg, opts, &[])
}

/// [`publish`], also putting `objects` (key, bytes) at the prefix after the tree and before
/// the manifest, so a manifest never names a publication whose objects are missing. Keys
/// must start with `.hsm-` (names a tree cannot use at its top) and not be the manifest's.
pub fn publish_with_objects(
    src: &str,
    url: &str,
    cfg: &RemoteConfig,
    opts: &PublishOptions,
    objects: &[(&str, &[u8])],
) -> Result<PublishSummary, PopulateError> {
    let setup = PopulateError::Setup;
    for (key, _) in objects {
        if !key.starts_with(".hsm-") || *key == MANIFEST_KEY || *key == PARTIAL_KEY {
            return Err(setup(format!(
                "{key:?}: extra objects need a .hsm- name other than the manifest's"
            )));
        }
    }
    let start = Instant::now();
    check_chunk_size(opts)?;
    let source = LocalSource::open(src)?;
    let parsed = RemoteUrl::parse(url).map_err(|e| setup(e.to_string()))?;
    if let Some(root) = parsed.local_root() {
        std::fs::create_dir_all(root)
            .map_err(|e| setup(format!("{}: cannot create: {e}", root.display())))?;
        let real =
            std::fs::canonicalize(root).map_err(|e| setup(format!("{}: {e}", root.display())))?;
        let src_root = source.local_root().unwrap_or(Path::new("/"));
        if real.starts_with(src_root) || src_root.starts_with(&real) {
            return Err(setup(format!(
                "{} and {} overlap: the destination must not be inside SRC or contain it",
                src_root.display(),
                real.display()
            )));
        }
    }
    let store = open_store(&parsed, cfg).map_err(|e| setup(e.to_string()))?;
    let mut summary = publish_to(source, store, opts, objects)?;
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// Upload the local tree `source` to `store` and write the manifest there (what [`publish`]
/// does once it has checked its arguments and opened the store).
pub fn publish_to(
    source: LocalSource,
    store: Arc<dyn Store>,
    opts: &PublishOptions,
    objects: &[(&str, &[u8])],
) -> Result<PublishSummary, PopulateError> {
    let start = Instant::now();
    check_chunk_size(opts)?;
    let walked = walk(&source)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| PopulateError::Setup(format!("runtime: {e}")))?;
    let src_root = source
        .local_root()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let url = store.url().to_string();
    let mut summary = rt.block_on(upload_all(store, &url, &src_root, walked, opts, objects))?;
    summary.source = source.describe();
    summary.destination = url;
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// What is left to do once earlier uploads are accounted for.
struct Plan {
    summary: PublishSummary,
    /// Per file: the object it is published as, once known.
    done: Vec<Option<FileObject>>,
    /// Files to upload, in walk order.
    todo: Vec<usize>,
}

async fn upload_all(
    store: Arc<dyn Store>,
    url: &str,
    src_root: &Path,
    walked: Walk,
    opts: &PublishOptions,
    objects: &[(&str, &[u8])],
) -> Result<PublishSummary, PopulateError> {
    let mut plan = plan_uploads(store.as_ref(), url, &walked, opts).await;
    let dirty = upload_files(&store, url, src_root, &walked, opts, &mut plan).await?;
    finish(store.as_ref(), url, &walked, opts, objects, plan, dirty).await
}

/// Count the tree and decide per file whether an earlier run's object can be reused.
async fn plan_uploads(store: &dyn Store, url: &str, walked: &Walk, opts: &PublishOptions) -> Plan {
    let mut s = PublishSummary {
        errors: walked.errors.clone(),
        skipped_special: walked.skipped_special,
        ..Default::default()
    };
    for (_, item, _) in &walked.items {
        s.entries += 1;
        match item {
            Item::Dir => s.dirs += 1,
            Item::Symlink(_) => s.symlinks += 1,
            Item::File(_) => s.files += 1,
            Item::Link(_) => s.hard_links += 1,
        }
    }
    s.bytes = walked.files.iter().map(|f| f.size).sum();

    let prev = previous_files(store, url, opts.chunk_size).await;
    // Files an earlier run recorded with the same path, size and mtime: reused if the store
    // still holds their objects under the recorded ETags.
    let candidates: Vec<(usize, &FileObject)> = walked
        .files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match prev.get(&f.rel) {
            Some((obj, m))
                if obj.size == f.size
                    && *m == (f.attrs.mtime.sec, f.attrs.mtime.nsec)
                    && obj.key == f.rel =>
            {
                Some((i, obj))
            }
            _ => None,
        })
        .collect();
    let now = if candidates.is_empty() {
        Default::default()
    } else {
        let keys: Vec<&str> = candidates.iter().map(|(_, o)| o.key.as_str()).collect();
        match current_etags(store, url, &keys, None).await {
            Ok(now) => now.unwrap_or_default(),
            Err(e) => {
                warn!("{url}: cannot check earlier uploads ({e}); they are uploaded again");
                Default::default()
            }
        }
    };
    // Decide per file: reuse what an earlier run uploaded, or upload.
    let mut done: Vec<Option<FileObject>> = vec![None; walked.files.len()];
    for (i, obj) in candidates {
        let same = matches!(now.get(&obj.key), Some((size, Some(etag))) if *size == obj.size
            && obj.etag.as_deref().is_some_and(|e| same_etag(e, etag)));
        if same {
            s.unchanged += 1;
            done[i] = Some(obj.clone());
        }
    }
    let todo: Vec<usize> = (0..walked.files.len())
        .filter(|&i| done[i].is_none())
        .collect();
    Plan {
        summary: s,
        done,
        todo,
    }
}

/// Upload the files of `todo` (`jobs` at once, failures once more alone at the end), with
/// progress and checkpoints of the partial manifest. Returns whether uploads finished since
/// the last checkpoint.
async fn upload_files(
    store: &Arc<dyn Store>,
    url: &str,
    src_root: &Path,
    walked: &Walk,
    opts: &PublishOptions,
    plan: &mut Plan,
) -> Result<bool, PopulateError> {
    let Plan {
        summary: s,
        done,
        todo,
    } = plan;
    let total: u64 = todo.iter().map(|&i| walked.files[i].size).sum();
    let progress = crate::progress_bar(
        opts.progress,
        Some(total),
        "publish [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    );
    let mut set = tokio::task::JoinSet::new();
    let mut next = std::mem::take(todo).into_iter();
    let mut last_checkpoint = Instant::now();
    let mut dirty = false;
    let jobs = opts.jobs.max(1);
    let mut retry: Vec<usize> = Vec::new();
    let mut retried = std::collections::HashSet::new();
    loop {
        let limit = if retried.is_empty() { jobs } else { 1 };
        while set.len() < limit {
            let i = match next.next() {
                Some(i) => i,
                None if set.is_empty() && !retry.is_empty() => {
                    retried.extend(retry.iter().copied());
                    next = std::mem::take(&mut retry).into_iter();
                    continue;
                }
                None => break,
            };
            let f = &walked.files[i];
            let fut = upload_file(
                store.clone(),
                src_root.to_path_buf(),
                f.rel.clone(),
                (f.size, (f.attrs.mtime.sec, f.attrs.mtime.nsec)),
                opts.chunk_size,
                progress.clone(),
            );
            set.spawn(async move { (i, fut.await) });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, result) = joined.map_err(|e| PopulateError::Setup(format!("upload task: {e}")))?;
        let f = &walked.files[i];
        match result {
            Ok(obj) => {
                s.uploaded += 1;
                s.bytes_uploaded += f.size;
                done[i] = Some(obj);
                dirty = true;
            }
            Err(e) if !retried.contains(&i) => {
                // Once more at the end, alone: concurrent uploads can trip over each other
                // (WebDAV servers lock a collection another PUT is creating).
                progress.suspend(
                    || info!(path = %f.rel, error = %e, "upload failed; retrying at the end"),
                );
                retry.push(i);
            }
            Err(e) => {
                progress.suspend(|| warn!(path = %f.rel, error = %e, "publish error"));
                s.errors.push(entry_error(&f.rel, e.to_string()));
            }
        }
        progress.set_message(format!("{} files", s.uploaded));
        if dirty && last_checkpoint.elapsed() >= opts.checkpoint_interval {
            let partial = build_manifest(walked, done, opts.chunk_size, false);
            if let Err(e) = put_manifest(store.as_ref(), PARTIAL_KEY, &partial).await {
                progress.suspend(|| warn!("{url}: {e}"));
            }
            last_checkpoint = Instant::now();
            dirty = false;
        }
    }
    progress.finish_and_clear();
    Ok(dirty)
}

/// Write the extra objects and the manifest when the run succeeded (or errors are allowed),
/// else keep a partial manifest for the next run.
async fn finish(
    store: &dyn Store,
    url: &str,
    walked: &Walk,
    opts: &PublishOptions,
    objects: &[(&str, &[u8])],
    plan: Plan,
    dirty: bool,
) -> Result<PublishSummary, PopulateError> {
    let Plan {
        summary: mut s,
        done,
        ..
    } = plan;
    let ok = s.errors.is_empty() || opts.allow_errors;
    if ok {
        for (key, bytes) in objects {
            store
                .put(key, bytes::Bytes::copy_from_slice(bytes))
                .await
                .map_err(|e| PopulateError::Setup(format!("{url}: writing {key}: {e}")))?;
        }
        let manifest = build_manifest(walked, &done, opts.chunk_size, true);
        put_manifest(store, MANIFEST_KEY, &manifest)
            .await
            .map_err(|e| PopulateError::Setup(format!("{url}: {e}")))?;
        s.manifest_written = true;
        if let Err(e) = store.delete(PARTIAL_KEY).await {
            warn!("{url}/{PARTIAL_KEY}: cannot remove ({e})");
        }
    } else if dirty || s.uploaded > 0 {
        // Keep what was done for the next run.
        let partial = build_manifest(walked, &done, opts.chunk_size, false);
        if let Err(e) = put_manifest(store, PARTIAL_KEY, &partial).await {
            warn!("{url}: {e}");
        }
    }
    s.errors.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(s)
}
