//! `hsm publish SRC URL`: upload a local tree to an object store and write its manifest.
//!
//! Files are uploaded in parallel (one put below [`MULTIPART_THRESHOLD`], multipart above),
//! digested chunk by chunk while they are read, and listed with their metadata in the
//! manifest written last at the prefix (`.hsm-manifest`, see docs/MANIFEST.md). While the
//! upload runs, `.hsm-manifest.partial` records what is done, so a re-run after a failure
//! skips every object already uploaded and unchanged (same path, size and mtime, and the
//! store still holds the object with the recorded ETag).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hsm_config::RemoteConfig;
use hsm_manifest::{ChunkDigester, Entry, FileObject, MANIFEST_KEY, Manifest};
use hsm_remote::{RemoteError, RemoteUrl, Store, open_store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tracing::{info, warn};

use crate::remote::current_etags;
use crate::source::{Attrs, Kind, LocalSource, Source};
use crate::{EntryError, PopulateError, human_bytes};

/// Files at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 << 20;
/// Part size of multipart uploads (S3 wants at least 5 MiB).
pub const PART_SIZE: usize = 16 << 20;
/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
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

/// One entry of the tree, in walk order.
enum Item {
    Dir,
    Symlink(String),
    /// Index into the file table.
    File(usize),
    /// Another name of the file at this index.
    Link(usize),
}

struct WalkedFile {
    rel: String,
    size: u64,
    attrs: Attrs,
}

struct Walk {
    root: Attrs,
    items: Vec<(String, Item, Attrs)>,
    files: Vec<WalkedFile>,
    skipped_special: u64,
    errors: Vec<EntryError>,
}

fn entry_error(path: impl Into<String>, error: impl Into<String>) -> EntryError {
    EntryError {
        path: path.into(),
        error: error.into(),
    }
}

/// Walk SRC (no following of symlinks), collecting what the manifest will list.
fn walk(src: &LocalSource) -> Result<Walk, PopulateError> {
    let root = src.root_attrs()?;
    let mut w = Walk {
        root,
        items: Vec::new(),
        files: Vec::new(),
        skipped_special: 0,
        errors: Vec::new(),
    };
    let mut links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let list = match src.list(&dir) {
            Ok(l) => l,
            Err(e) => {
                w.errors
                    .push(entry_error(dir.display().to_string(), e.to_string()));
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for e in list {
            let rel_path = dir.join(&e.name);
            let Some(rel) = rel_path.to_str().map(str::to_string) else {
                w.errors.push(entry_error(
                    rel_path.to_string_lossy(),
                    "name is not valid UTF-8; manifest paths and object keys must be",
                ));
                continue;
            };
            if dir.as_os_str().is_empty() && rel.starts_with(".hsm-") {
                w.errors.push(entry_error(
                    &rel,
                    "names starting with .hsm- at the top are reserved for hsm's own files",
                ));
                continue;
            }
            if let Err(why) = hsm_manifest::check_path(&rel) {
                w.errors.push(entry_error(&rel, why.to_string()));
                continue;
            }
            match e.kind {
                Kind::Dir => {
                    w.items.push((rel, Item::Dir, e.attrs));
                    subdirs.push(rel_path);
                }
                Kind::Symlink { target } => match target.into_string() {
                    Ok(t) => w.items.push((rel, Item::Symlink(t), e.attrs)),
                    Err(_) => w
                        .errors
                        .push(entry_error(&rel, "symlink target is not valid UTF-8")),
                },
                Kind::Special(what) => {
                    warn!(path = %rel, "skipping {what}: special files are not published");
                    w.skipped_special += 1;
                }
                Kind::File(info) => {
                    if let Some(id) = info.link_id {
                        if let Some(&i) = links.get(&id) {
                            w.items.push((rel, Item::Link(i), e.attrs));
                            continue;
                        }
                        links.insert(id, w.files.len());
                    }
                    w.items
                        .push((rel.clone(), Item::File(w.files.len()), e.attrs));
                    w.files.push(WalkedFile {
                        rel,
                        size: info.size,
                        attrs: e.attrs,
                    });
                }
            }
        }
        // Depth first in name order: pushing in reverse pops the first name first.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(w)
}

fn manifest_attrs(a: &Attrs) -> hsm_manifest::Attrs {
    hsm_manifest::Attrs {
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        mtime: (a.mtime.sec, a.mtime.nsec),
        atime: (a.atime.sec, a.atime.nsec),
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

/// Whether two ETags name the same object version. Stores are not consistent about quoting
/// (Azure's listing gives `0x8D...` where its put returned `"0x8D..."`).
fn same_etag(a: &str, b: &str) -> bool {
    fn bare(e: &str) -> &str {
        e.strip_prefix("W/").unwrap_or(e).trim_matches('"')
    }
    bare(a) == bare(b)
}

/// What an earlier run recorded for a path, keyed by path.
type Previous = HashMap<String, (FileObject, (i64, u32))>;

async fn read_manifest(store: &dyn Store, key: &str, url: &str) -> Option<Manifest> {
    let bytes = match store.get(key).await {
        Ok(b) => b,
        Err(RemoteError::NotFound { .. }) => return None,
        Err(e) => {
            warn!("{url}/{key}: cannot read ({e}); everything is uploaded again");
            return None;
        }
    };
    match Manifest::decode(&bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            warn!("{url}/{key}: {e}; ignored");
            None
        }
    }
}

/// Files recorded by the last manifest and the partial one (newer) at this chunk size.
async fn previous_files(store: &dyn Store, url: &str, chunk_size: u64) -> Previous {
    let mut prev = Previous::new();
    for key in [MANIFEST_KEY, PARTIAL_KEY] {
        let Some(m) = read_manifest(store, key, url).await else {
            continue;
        };
        if m.chunk_size != chunk_size {
            info!(
                "{url}/{key}: chunk size {} differs from {chunk_size}; not reused",
                m.chunk_size
            );
            continue;
        }
        for e in m.entries {
            if let hsm_manifest::Kind::File(f) = e.kind {
                prev.insert(e.path, (f, e.attrs.mtime));
            }
        }
    }
    prev
}

/// Read, digest and upload one file. The file must still have the size and mtime the walk
/// saw when it has been read, else the upload is refused (publish again once it is quiet).
async fn upload_file(
    store: Arc<dyn Store>,
    path: PathBuf,
    key: String,
    want: (u64, (i64, u32)),
    chunk_size: u64,
    progress: ProgressBar,
) -> Result<FileObject, UploadError> {
    let io = |op| move |source| UploadError::Io { op, source };
    let file = std::fs::File::open(&path).map_err(io("open"))?;
    let changed = |f: &std::fs::File| -> Result<(), UploadError> {
        let md = f.metadata().map_err(io("stat"))?;
        if md.size() != want.0 || (md.mtime(), md.mtime_nsec() as u32) != want.1 {
            return Err(UploadError::Changed);
        }
        Ok(())
    };
    changed(&file)?;
    let size = want.0;
    let multipart = if size < MULTIPART_THRESHOLD {
        None
    } else {
        // None: the store has no multipart upload (plain HTTP, WebDAV): one PUT of it all.
        store.start_upload(&key, PART_SIZE).await?
    };
    let (file, digests, result) = match multipart {
        None => {
            let (file, data, digests) = tokio::task::spawn_blocking(move || {
                let mut data = Vec::with_capacity(size as usize);
                use std::io::Read;
                (&file)
                    .take(size + 1)
                    .read_to_end(&mut data)
                    .map_err(io("read"))?;
                let digests = hsm_manifest::chunk_digests(&data, chunk_size);
                Ok::<_, UploadError>((file, data, digests))
            })
            .await
            .map_err(UploadError::Reader)??;
            if data.len() as u64 != size {
                return Err(UploadError::Changed);
            }
            let result = store.put(&key, Bytes::from(data)).await?;
            progress.inc(size);
            (file, digests, result)
        }
        Some(mut upload) => {
            let mut digester = Some(ChunkDigester::new(chunk_size));
            let mut file = Some(file);
            let mut offset = 0u64;
            let outcome: Result<(), UploadError> = async {
                while offset < size {
                    let f = file.take().expect("file is returned by every read");
                    let mut d = digester.take().expect("digester is returned by every read");
                    let len = (size - offset).min(PART_SIZE as u64) as usize;
                    let (f, buf, d) = tokio::task::spawn_blocking(move || {
                        use std::os::unix::fs::FileExt;
                        let mut buf = vec![0u8; len];
                        let r = f.read_exact_at(&mut buf, offset);
                        if r.is_ok() {
                            d.update(&buf);
                        }
                        (f, r.map(|()| buf), d)
                    })
                    .await
                    .map_err(UploadError::Reader)?;
                    file = Some(f);
                    digester = Some(d);
                    let buf = buf.map_err(|source| UploadError::ReadAt { offset, source })?;
                    upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                    upload.put(Bytes::from(buf));
                    offset += len as u64;
                    progress.inc(len as u64);
                }
                Ok(())
            }
            .await;
            if let Err(e) = outcome {
                let _ = upload.abort().await;
                return Err(e);
            }
            let result = upload.finish().await?;
            (
                file.expect("file is returned by every read"),
                digester
                    .expect("digester is returned by every read")
                    .finish(),
                result,
            )
        }
    };
    changed(&file)?;
    let (etag, version) = if result.etag.is_some() {
        (result.etag, result.version)
    } else {
        // Some stores (WebDAV) do not return the ETag from a put.
        let meta = store.head(&key).await?;
        (meta.etag, result.version.or(meta.version))
    };
    Ok(FileObject {
        size,
        key,
        etag,
        version,
        digests,
    })
}

/// Put `manifest` at `key`.
async fn put_manifest(
    store: &dyn Store,
    key: &'static str,
    manifest: &Manifest,
) -> Result<(), ManifestWriteError> {
    let bytes = manifest
        .encode()
        .map_err(|source| ManifestWriteError::Encode { key, source })?;
    store
        .put(key, Bytes::from(bytes))
        .await
        .map(|_| ())
        .map_err(|source| ManifestWriteError::Put { key, source })
}

fn build_manifest(
    walked: &Walk,
    done: &[Option<FileObject>],
    chunk_size: u64,
    complete: bool,
) -> Manifest {
    let mut entries = vec![Entry {
        path: String::new(),
        kind: hsm_manifest::Kind::Dir,
        attrs: manifest_attrs(&walked.root),
    }];
    for (path, item, attrs) in &walked.items {
        let kind = match item {
            Item::Dir if complete => hsm_manifest::Kind::Dir,
            Item::Symlink(t) if complete => hsm_manifest::Kind::Symlink { target: t.clone() },
            Item::File(i) => match &done[*i] {
                Some(f) => hsm_manifest::Kind::File(f.clone()),
                None => continue,
            },
            Item::Link(i) if complete => match &done[*i] {
                Some(_) => hsm_manifest::Kind::HardLink {
                    to: walked.files[*i].rel.clone(),
                },
                None => continue,
            },
            _ => continue,
        };
        entries.push(Entry {
            path: path.clone(),
            kind,
            attrs: manifest_attrs(attrs),
        });
    }
    Manifest {
        chunk_size,
        entries,
    }
}

async fn upload_all(
    store: Arc<dyn Store>,
    url: &str,
    src_root: &Path,
    walked: Walk,
    opts: &PublishOptions,
    objects: &[(&str, &[u8])],
) -> Result<PublishSummary, PopulateError> {
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

    let prev = previous_files(store.as_ref(), url, opts.chunk_size).await;
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
        match current_etags(store.as_ref(), url, &keys, None).await {
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

    let total: u64 = todo.iter().map(|&i| walked.files[i].size).sum();
    let progress = if opts.progress && std::io::stderr().is_terminal() {
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "publish [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let mut set = tokio::task::JoinSet::new();
    let mut next = todo.into_iter();
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
                src_root.join(&f.rel),
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
            let partial = build_manifest(&walked, &done, opts.chunk_size, false);
            if let Err(e) = put_manifest(store.as_ref(), PARTIAL_KEY, &partial).await {
                progress.suspend(|| warn!("{url}: {e}"));
            }
            last_checkpoint = Instant::now();
            dirty = false;
        }
    }
    progress.finish_and_clear();

    let ok = s.errors.is_empty() || opts.allow_errors;
    if ok {
        for (key, bytes) in objects {
            store
                .put(key, bytes::Bytes::copy_from_slice(bytes))
                .await
                .map_err(|e| PopulateError::Setup(format!("{url}: writing {key}: {e}")))?;
        }
        let manifest = build_manifest(&walked, &done, opts.chunk_size, true);
        put_manifest(store.as_ref(), MANIFEST_KEY, &manifest)
            .await
            .map_err(|e| PopulateError::Setup(format!("{url}: {e}")))?;
        s.manifest_written = true;
        if let Err(e) = store.delete(PARTIAL_KEY).await {
            warn!("{url}/{PARTIAL_KEY}: cannot remove ({e})");
        }
    } else if dirty || s.uploaded > 0 {
        // Keep what was done for the next run.
        let partial = build_manifest(&walked, &done, opts.chunk_size, false);
        if let Err(e) = put_manifest(store.as_ref(), PARTIAL_KEY, &partial).await {
            warn!("{url}: {e}");
        }
    }
    s.errors.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::same_etag;

    #[test]
    fn etags_compare_without_quotes() {
        assert!(same_etag("\"0x8D1\"", "0x8D1"));
        assert!(same_etag("W/\"abc\"", "\"abc\""));
        assert!(!same_etag("\"abc\"", "\"abd\""));
    }
}
