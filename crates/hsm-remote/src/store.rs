//! [`Remote`] and [`Store`] over `object_store`: the one place its types and errors are
//! turned into the project's own.

use std::ops::Range;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart,
};

use hsm_config::RemoteConfig;
use hsm_kernel::beneath::{self, OpenFileError};
use hsm_kernel::stat::FileStat;
use nix::errno::Errno;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, RetryConfig};

use crate::{
    Body, ByteStream, Expect, ListedObject, ObjectInfo, PutInfo, Remote, RemoteError, RemoteUrl,
    Store, StoreKind, Upload,
};

/// A remote backed by an `object_store` implementation.
#[derive(Debug)]
pub struct ObjectStoreRemote {
    url: String,
    store: Arc<dyn ObjectStore>,
    /// object_store's local backend runs its file I/O inline when no runtime is current.
    inline: bool,
    /// For a local store (`file://`), its root directory: every read of an object's bytes
    /// or metadata opens the object here itself ([`hsm_kernel::beneath`]: no symlink in any
    /// component, nothing but a regular file, never blocking in `open`), not through
    /// object_store, whose local backend follows symlinks and opens FIFOs blocking.
    local_root: Option<PathBuf>,
}

/// Open the store at `url` (for publish and populate) with the `[remote]` configuration.
/// Keys are relative to the URL's prefix.
pub fn open_store(url: &RemoteUrl, cfg: &RemoteConfig) -> Result<Arc<dyn Store>, RemoteError> {
    Ok(Arc::new(ObjectStoreRemote::open(url, cfg)?))
}

/// Build the object_store for `url` with the timeouts, retries and per-URL options of `cfg`.
/// Keys used with the returned store are relative to the URL's prefix.
fn build_object_store(
    url: &RemoteUrl,
    cfg: &RemoteConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteError> {
    let err = |detail: String| RemoteError::Config {
        url: url.as_str().to_string(),
        detail,
    };
    let (kind, store_url, prefix) = match url {
        RemoteUrl::Local { root, .. } => {
            let store = object_store::local::LocalFileSystem::new_with_prefix(root)
                .map_err(|e| err(e.to_string()))?;
            return Ok(Arc::new(store));
        }
        RemoteUrl::Object {
            kind,
            store_url,
            prefix,
            ..
        } => (*kind, store_url, prefix),
    };
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: cfg.backoff_initial.0,
            max_backoff: cfg.backoff_max.0,
            base: 2.0,
        },
        max_retries: cfg.max_retries,
        retry_timeout: cfg.retry_timeout.0,
    };
    // The timeouts go in as client settings, not as a whole `ClientOptions`: that would
    // replace the client settings `from_env` read (AWS_ALLOW_HTTP, proxies, ...), and a
    // store configured by the environment alone failed every request. Options given in
    // `[remote.options]` come after, so they win.
    let mut options: Vec<(String, String)> = Vec::new();
    if !cfg.request_timeout.0.is_zero() {
        options.push(("timeout".into(), millis(cfg.request_timeout.0)));
    }
    if !cfg.connect_timeout.0.is_zero() {
        options.push(("connect_timeout".into(), millis(cfg.connect_timeout.0)));
    }
    options.extend(cfg.options_for(url.as_str()));
    let bad_key = |k: &str, e: object_store::Error| err(format!("option {k:?}: {e}"));
    // Every builder takes the same settings; only the type (and its option keys) differ.
    macro_rules! configured {
        ($builder:expr) => {{
            let mut b = $builder.with_retry(retry);
            for (k, v) in options {
                let key = k.parse().map_err(|e| bad_key(&k, e))?;
                b = b.with_config(key, v);
            }
            Arc::new(b.build().map_err(|e| err(e.to_string()))?) as Arc<dyn ObjectStore>
        }};
    }
    let store = match kind {
        StoreKind::S3 => {
            configured!(object_store::aws::AmazonS3Builder::from_env().with_url(store_url.as_str()))
        }
        StoreKind::Azure => configured!(
            object_store::azure::MicrosoftAzureBuilder::from_env().with_url(store_url.as_str())
        ),
        StoreKind::Gcs => configured!(
            object_store::gcp::GoogleCloudStorageBuilder::from_env().with_url(store_url.as_str())
        ),
        StoreKind::Http => configured!(
            object_store::http::HttpBuilder::new()
                .with_url(&store_url[..url::Position::BeforePath])
        ),
    };
    if prefix.as_ref().is_empty() {
        Ok(store)
    } else {
        Ok(Arc::new(PrefixStore::new(store, prefix.clone())))
    }
}

impl ObjectStoreRemote {
    /// Build the store for a parsed URL.
    pub fn open(url: &RemoteUrl, cfg: &RemoteConfig) -> Result<Self, RemoteError> {
        Ok(ObjectStoreRemote {
            url: url.as_str().to_string(),
            store: build_object_store(url, cfg)?,
            // object_store's local backend runs its file I/O inline outside a runtime.
            inline: matches!(url, RemoteUrl::Local { .. }),
            local_root: match url {
                RemoteUrl::Local { root, .. } => Some(root.clone()),
                RemoteUrl::Object { .. } => None,
            },
        })
    }

    /// Open object `key` of the local store at `root`: a regular file reached without
    /// following a symlink in any component (see [`ObjectStoreRemote::local_root`]).
    fn open_local(&self, root: &Path, key: &str) -> Result<(std::fs::File, FileStat), RemoteError> {
        let path = self.path(key)?;
        let root_fd = nix::fcntl::open(
            root,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| RemoteError::Failed {
            url: self.url.clone(),
            key: key.to_string(),
            detail: format!("open the store's directory {}: {e}", root.display()),
        })?;
        beneath::open_regular_beneath(root_fd.as_fd(), Path::new(path.as_ref()))
            .map_err(|e| self.local_err(key, e))
    }

    /// `statx` of object `key` of the local store at `root`, refused unless it is a regular
    /// file reached without a symlink.
    fn stat_local(&self, root: &Path, key: &str) -> Result<FileStat, RemoteError> {
        let path = self.path(key)?;
        let root_fd = nix::fcntl::open(
            root,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| RemoteError::Failed {
            url: self.url.clone(),
            key: key.to_string(),
            detail: format!("open the store's directory {}: {e}", root.display()),
        })?;
        let st = beneath::stat_beneath(root_fd.as_fd(), Path::new(path.as_ref()))
            .map_err(|e| self.local_err(key, e))?;
        if st.is_file() {
            Ok(st)
        } else if st.is_symlink() {
            Err(self.local_err(key, OpenFileError::Symlink(Errno::ELOOP)))
        } else {
            Err(self.local_err(key, OpenFileError::NotRegular(beneath::kind_of(st.mode))))
        }
    }

    /// The one mapping of a refused or failed local open to [`RemoteError`].
    fn local_err(&self, key: &str, e: OpenFileError) -> RemoteError {
        let url = self.url.clone();
        let key = key.to_string();
        match e {
            OpenFileError::Open(Errno::ENOENT | Errno::ENOTDIR)
            | OpenFileError::NotRegular("directory") => RemoteError::NotFound { url, key },
            OpenFileError::Open(e @ (Errno::EACCES | Errno::EPERM)) => {
                RemoteError::PermissionDenied {
                    url,
                    key,
                    detail: format!("read: {e}"),
                }
            }
            OpenFileError::Symlink(_) => RemoteError::PermissionDenied {
                url,
                key,
                detail: "refused: a component of the key is a symbolic link (a local store \
                         never follows one)"
                    .into(),
            },
            OpenFileError::NotRegular(kind) => RemoteError::Failed {
                url,
                key,
                detail: format!(
                    "refused: not a regular file but a {kind} (a local store serves only \
                     regular files)"
                ),
            },
            other => RemoteError::Failed {
                url,
                key,
                detail: format!("read: {other}"),
            },
        }
    }

    /// A ranged read of a local store's object, with object_store's semantics (ETag as
    /// `If-Match`, a range clamped to the object's end) but through [`Self::open_local`].
    fn open_range_local(
        &self,
        root: &Path,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<(std::fs::File, Range<u64>), RemoteError> {
        let (file, st) = self.open_local(root, key)?;
        let etag = local_etag(st.ino, st.size, st.mtime.sec, st.mtime.nsec);
        if let Some(want) = expect.etag.as_deref()
            && want != "*"
            && want.split(',').map(str::trim).all(|w| w != etag)
        {
            return Err(RemoteError::Changed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!("precondition failed: {etag} does not match {want}"),
            });
        }
        if st.size != expect.size {
            return Err(RemoteError::Changed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!(
                    "size is now {} bytes, was {} at populate",
                    st.size, expect.size
                ),
            });
        }
        if range.end <= range.start || range.start >= st.size {
            return Err(RemoteError::Failed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!("read: range {range:?} is not within {} bytes", st.size),
            });
        }
        let got = range.start..range.end.min(st.size);
        Ok((file, got))
    }

    fn path(&self, key: &str) -> Result<ObjectPath, RemoteError> {
        ObjectPath::parse(key).map_err(|e| RemoteError::InvalidKey {
            url: self.url.clone(),
            key: key.to_string(),
            detail: e.to_string(),
        })
    }

    /// Open a ranged read: the precondition (ETag, size) is checked here.
    async fn open_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<object_store::GetResult, RemoteError> {
        let path = self.path(key)?;
        let opts = GetOptions {
            if_match: expect.etag.clone(),
            version: expect.version.clone(),
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        let result = self
            .store
            .get_opts(&path, opts)
            .await
            .map_err(|e| self.map_err("read", key, e))?;
        // Without an ETag the size is the only change detector we have.
        if result.meta.size != expect.size {
            return Err(RemoteError::Changed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!(
                    "size is now {} bytes, was {} at populate",
                    result.meta.size, expect.size
                ),
            });
        }
        Ok(result)
    }

    fn check_len(&self, key: &str, range: &Range<u64>, got: u64) -> Result<(), RemoteError> {
        let want = range.end.saturating_sub(range.start);
        if got != want {
            return Err(RemoteError::Truncated {
                url: self.url.clone(),
                key: key.to_string(),
                offset: range.start,
                expected: want,
                got,
            });
        }
        Ok(())
    }

    /// The one mapping of object_store's errors to [`RemoteError`]; `op` names what failed.
    fn map_err(&self, op: &str, key: &str, e: object_store::Error) -> RemoteError {
        map_err(&self.url, op, key, e)
    }
}

fn map_err(url: &str, op: &str, key: &str, e: object_store::Error) -> RemoteError {
    let url = url.to_string();
    let key = key.to_string();
    match e {
        object_store::Error::NotFound { .. } => RemoteError::NotFound { url, key },
        object_store::Error::Precondition { source, .. } => RemoteError::Changed {
            url,
            key,
            detail: format!("precondition failed: {source}"),
        },
        object_store::Error::PermissionDenied { source, .. } => RemoteError::PermissionDenied {
            url,
            key,
            detail: format!("{op}: {source}"),
        },
        object_store::Error::InvalidPath { source } => RemoteError::InvalidKey {
            url,
            key,
            detail: source.to_string(),
        },
        other => RemoteError::Failed {
            url,
            key,
            detail: format!("{op}: {other}"),
        },
    }
}

#[async_trait]
impl Remote for ObjectStoreRemote {
    fn url(&self) -> &str {
        &self.url
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError> {
        if let Some(root) = &self.local_root {
            let (file, got) = self.open_range_local(root, key, range.clone(), expect)?;
            let bytes = read_at_most(&file, got).map_err(|e| RemoteError::Failed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!("read: {e}"),
            })?;
            self.check_len(key, &range, bytes.len() as u64)?;
            return Ok(bytes);
        }
        let result = self.open_range(key, range.clone(), expect).await?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.map_err("read", key, e))?;
        self.check_len(key, &range, bytes.len() as u64)?;
        Ok(bytes)
    }

    async fn get_body(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Body, RemoteError> {
        if let Some(root) = &self.local_root {
            let (file, got) = self.open_range_local(root, key, range.clone(), expect)?;
            let body = Body::File { file, range: got };
            self.check_len(key, &range, body.len())?;
            return Ok(body);
        }
        let result = self.open_range(key, range.clone(), expect).await?;
        let body = match result.payload {
            GetResultPayload::File(file, _) => Body::File {
                file,
                range: result.range,
            },
            GetResultPayload::Stream(_) => Body::Bytes(
                result
                    .bytes()
                    .await
                    .map_err(|e| self.map_err("read", key, e))?,
            ),
        };
        self.check_len(key, &range, body.len())?;
        Ok(body)
    }

    async fn get_stream(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<ByteStream, RemoteError> {
        if self.local_root.is_some() {
            // Local files are read in place; a stream would only copy them through memory.
            return Ok(crate::one_chunk(self.get_range(key, range, expect).await?));
        }
        let result = self.open_range(key, range, expect).await?;
        let url = self.url.clone();
        let key = key.to_string();
        Ok(Box::pin(
            result
                .into_stream()
                .map_err(move |e| map_err(&url, "read", &key, e)),
        ))
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        if let Some(root) = &self.local_root {
            let st = self.stat_local(root, key)?;
            return Ok(ObjectInfo {
                key: key.to_string(),
                size: st.size,
                etag: Some(local_etag(st.ino, st.size, st.mtime.sec, st.mtime.nsec)),
                version: None,
            });
        }
        let path = self.path(key)?;
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|e| self.map_err("head", key, e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: meta.size,
            etag: meta.e_tag,
            version: meta.version,
        })
    }

    fn runs_inline(&self) -> bool {
        self.inline
    }
}

#[async_trait]
impl Store for ObjectStoreRemote {
    async fn list(&self) -> Result<Vec<ListedObject>, RemoteError> {
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(None)
            .try_collect()
            .await
            .map_err(|e| self.map_err("list", "", e))?;
        Ok(objects
            .into_iter()
            .map(|o| ListedObject {
                key: o.location.as_ref().to_string(),
                size: o.size,
                etag: o.e_tag,
                version: o.version,
                last_modified: o.last_modified.into(),
            })
            .collect())
    }

    async fn get(&self, key: &str) -> Result<Bytes, RemoteError> {
        if let Some(root) = &self.local_root {
            let (file, st) = self.open_local(root, key)?;
            return read_at_most(&file, 0..st.size).map_err(|e| RemoteError::Failed {
                url: self.url.clone(),
                key: key.to_string(),
                detail: format!("read: {e}"),
            });
        }
        let path = self.path(key)?;
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.map_err("read", key, e))?;
        result
            .bytes()
            .await
            .map_err(|e| self.map_err("read", key, e))
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<PutInfo, RemoteError> {
        let path = self.path(key)?;
        let result = self
            .store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|e| self.map_err("put", key, e))?;
        Ok(PutInfo {
            etag: result.e_tag,
            version: result.version,
        })
    }

    async fn start_upload(
        &self,
        key: &str,
        part_size: usize,
    ) -> Result<Option<Box<dyn Upload>>, RemoteError> {
        let path = self.path(key)?;
        match self.store.put_multipart(&path).await {
            Ok(upload) => Ok(Some(Box::new(ObjectStoreUpload {
                url: self.url.clone(),
                key: key.to_string(),
                writer: WriteMultipart::new_with_chunk_size(upload, part_size),
            }))),
            Err(object_store::Error::NotImplemented { .. }) => Ok(None),
            Err(e) => Err(self.map_err("start multipart upload", key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        let path = self.path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err("delete", key, e)),
        }
    }
}

/// A multipart upload through object_store's `WriteMultipart`.
struct ObjectStoreUpload {
    url: String,
    key: String,
    writer: WriteMultipart,
}

impl std::fmt::Debug for ObjectStoreUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreUpload")
            .field("url", &self.url)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Upload for ObjectStoreUpload {
    async fn wait_for_capacity(&mut self, max: usize) -> Result<(), RemoteError> {
        self.writer
            .wait_for_capacity(max)
            .await
            .map_err(|e| map_err(&self.url, "upload part", &self.key, e))
    }

    fn put(&mut self, data: Bytes) {
        self.writer.put(data);
    }

    async fn finish(self: Box<Self>) -> Result<PutInfo, RemoteError> {
        let ObjectStoreUpload { url, key, writer } = *self;
        let result = writer
            .finish()
            .await
            .map_err(|e| map_err(&url, "finish multipart upload", &key, e))?;
        Ok(PutInfo {
            etag: result.e_tag,
            version: result.version,
        })
    }

    async fn abort(self: Box<Self>) -> Result<(), RemoteError> {
        let ObjectStoreUpload { url, key, writer } = *self;
        writer
            .abort()
            .await
            .map_err(|e| map_err(&url, "abort multipart upload", &key, e))
    }
}

/// The ETag object_store's local backend gives a file with this inode, size and mtime.
///
/// Populate walks local trees itself (it needs modes, owners and links, which a listing does
/// not give) and computes the ETag the agent will later send as `If-Match`. The scheme is
/// object_store's (`"{inode:x}-{mtime_micros:x}-{size:x}"`); a test pins the two together.
pub fn local_etag(ino: u64, size: u64, mtime_sec: i64, mtime_nsec: u32) -> String {
    let micros: u128 = if mtime_sec < 0 {
        0 // object_store maps pre-epoch times to zero
    } else {
        mtime_sec as u128 * 1_000_000 + u128::from(mtime_nsec / 1000)
    };
    format!("\"{ino:x}-{micros:x}-{size:x}\"")
}

/// Bytes `range` of `file`, fewer where the file ends first (the caller checks the length).
fn read_at_most(file: &std::fs::File, range: Range<u64>) -> std::io::Result<Bytes> {
    hsm_kernel::sys::read_at_most(file, range).map(Bytes::from)
}

/// A duration as object_store's configuration strings take it.
fn millis(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests;
