//! Remote access for hsm.
//!
//! The agent, publish and populate talk to traits the project owns, not to a vendor type:
//! [`Remote`] (ranged reads with a precondition, and metadata: all the agent needs) and
//! [`Store`] (a `Remote` that can also list, read whole objects, put, upload in parts and
//! delete: what publish and populate need). [`ObjectStoreRemote`] puts `object_store`
//! behind both, and this is the only crate that names `object_store`; the `mock` feature
//! adds an in-memory store and a fault-injecting wrapper that every other crate's tests
//! can use.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

mod location;
mod store;

#[cfg(feature = "mock")]
pub mod mock;

pub use location::{KeyError, RemoteUrl, StoreKind, check_key, key_from_relative_path, redact_url};
pub use store::{ObjectStoreRemote, local_etag, open_store};

use std::time::SystemTime;

/// What a ranged read expects of the object: it must still be the object populate saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expect {
    /// The ETag recorded at populate time; sent as `If-Match`.
    pub etag: Option<String>,
    /// The object version recorded at populate time, where the store has versions.
    pub version: Option<String>,
    /// The object size recorded at populate time; a different size means the object changed.
    pub size: u64,
}

/// The body of a ranged read.
#[derive(Debug)]
pub enum Body {
    /// The bytes, in memory.
    Bytes(Bytes),
    /// A local backend's open file and the object range to copy from it: the caller can
    /// move the bytes kernel-to-kernel (copy_file_range, splice) instead of through memory.
    /// The precondition was checked when the file was opened.
    File {
        file: std::fs::File,
        range: Range<u64>,
    },
}

impl Body {
    /// Length of the body in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { range, .. } => range.end.saturating_sub(range.start),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The body of a streamed read: its chunks in order. The stream may end early or yield an
/// error at any point (a reset connection, a request timeout); the caller counts what it
/// got.
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, RemoteError>>;

/// A body that arrives as one chunk (a store that cannot stream, or local files).
pub fn one_chunk(bytes: Bytes) -> ByteStream {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}

/// Metadata of a remote object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
}

/// Why a remote operation failed. Each cause that needs its own handling has its own
/// variant: the agent maps these to errnos in exactly one place.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: object {key:?} not found")]
    NotFound { url: String, key: String },
    #[error(
        "{url}: object {key:?} changed since populate ({detail}); run `hsm populate` again to refresh the stub"
    )]
    Changed {
        url: String,
        key: String,
        detail: String,
    },
    #[error("{url}: permission denied for {key:?}: {detail}")]
    PermissionDenied {
        url: String,
        key: String,
        detail: String,
    },
    #[error("{url}: short read of {key:?} at {offset}: expected {expected} bytes, got {got}")]
    Truncated {
        url: String,
        key: String,
        offset: u64,
        expected: u64,
        got: u64,
    },
    #[error("{url}: key {key:?} is not valid for this store: {detail}")]
    InvalidKey {
        url: String,
        key: String,
        detail: String,
    },
    /// Any other failure; `detail` says which operation (read, put, list, ...) and why.
    #[error("{url}: {key:?}: {detail}")]
    Failed {
        url: String,
        key: String,
        detail: String,
    },
    #[error("remote {url:?}: {detail}")]
    Config { url: String, detail: String },
    #[error(
        "{url}: chunk {chunk} of {key:?} (bytes {offset}..) does not match its digest in the manifest; not written"
    )]
    Corrupt {
        url: String,
        key: String,
        chunk: u64,
        offset: u64,
    },
    #[error("{url}: reading {key:?} took longer than the read timeout ({after_ms} ms)")]
    Timeout {
        url: String,
        key: String,
        after_ms: u64,
    },
}

/// A remote object store, as the agent and populate need it.
#[async_trait]
pub trait Remote: Send + Sync + Debug {
    /// The remote's base URL, without credentials (safe to log).
    fn url(&self) -> &str;

    /// Read `range` of `key`. The object must match `expect`, else [`RemoteError::Changed`].
    /// Returns exactly `range.end - range.start` bytes or an error.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError>;

    /// Metadata of `key`.
    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError>;

    /// Like [`Remote::get_range`], but a local backend may hand back its open file instead
    /// of reading the bytes into memory.
    async fn get_body(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Body, RemoteError> {
        Ok(Body::Bytes(self.get_range(key, range, expect).await?))
    }

    /// Read `range` of `key` as one request whose body arrives as a stream: the caller
    /// consumes it at its own pace (an unread body holds the connection back) and may drop
    /// it at any point. The precondition is checked when the request is made. The default
    /// is one [`Remote::get_range`] yielded as a single chunk.
    async fn get_stream(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<ByteStream, RemoteError> {
        Ok(one_chunk(self.get_range(key, range, expect).await?))
    }

    /// True when this remote's futures need no reactor: polled outside a tokio runtime they
    /// do their (local, blocking) I/O on the calling thread and complete on first poll. The
    /// agent then serves small fills on its event threads without a thread hop.
    fn runs_inline(&self) -> bool {
        false
    }
}

#[async_trait]
impl<R: Remote + ?Sized> Remote for Arc<R> {
    fn url(&self) -> &str {
        (**self).url()
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Bytes, RemoteError> {
        (**self).get_range(key, range, expect).await
    }

    async fn head(&self, key: &str) -> Result<ObjectInfo, RemoteError> {
        (**self).head(key).await
    }

    async fn get_body(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<Body, RemoteError> {
        (**self).get_body(key, range, expect).await
    }

    async fn get_stream(
        &self,
        key: &str,
        range: Range<u64>,
        expect: &Expect,
    ) -> Result<ByteStream, RemoteError> {
        (**self).get_stream(key, range, expect).await
    }

    fn runs_inline(&self) -> bool {
        (**self).runs_inline()
    }
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Key, relative to the store's prefix.
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub last_modified: SystemTime,
}

/// What the store recorded for an object it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutInfo {
    /// The new object's ETag, when the store returns one from a put (WebDAV does not).
    pub etag: Option<String>,
    pub version: Option<String>,
}

/// A multipart upload in progress (see [`Store::start_upload`]). Parts are sent in the
/// background as they fill; dropping an upload without [`Upload::finish`] abandons it.
#[async_trait]
pub trait Upload: Send + Debug {
    /// Wait until fewer than `max` parts are being sent.
    async fn wait_for_capacity(&mut self, max: usize) -> Result<(), RemoteError>;

    /// Add the next bytes of the object (buffered into parts of the upload's part size).
    fn put(&mut self, data: Bytes);

    /// Send what is buffered and complete the object.
    async fn finish(self: Box<Self>) -> Result<PutInfo, RemoteError>;

    /// Abandon the upload and remove the parts sent so far.
    async fn abort(self: Box<Self>) -> Result<(), RemoteError>;
}

/// A remote that can also be written and listed: what `hsm publish` and `hsm populate`
/// need. The agent only reads ([`Remote`]). Keys are relative to the store's URL prefix.
#[async_trait]
pub trait Store: Remote {
    /// Every object under the prefix. A store that cannot list (a plain HTTP server) fails.
    async fn list(&self) -> Result<Vec<ListedObject>, RemoteError>;

    /// The whole object `key`, whatever its version.
    async fn get(&self, key: &str) -> Result<Bytes, RemoteError>;

    /// Create or replace `key` with `data` in one request.
    async fn put(&self, key: &str, data: Bytes) -> Result<PutInfo, RemoteError>;

    /// Start a multipart upload of `key` with parts of `part_size` bytes, or `None` when
    /// the store has no multipart upload (plain HTTP, WebDAV): then [`Store::put`] it whole.
    async fn start_upload(
        &self,
        key: &str,
        part_size: usize,
    ) -> Result<Option<Box<dyn Upload>>, RemoteError>;

    /// Remove `key`; removing an object that is not there is not an error.
    async fn delete(&self, key: &str) -> Result<(), RemoteError>;
}

#[async_trait]
impl<S: Store + ?Sized> Store for Arc<S> {
    async fn list(&self) -> Result<Vec<ListedObject>, RemoteError> {
        (**self).list().await
    }

    async fn get(&self, key: &str) -> Result<Bytes, RemoteError> {
        (**self).get(key).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<PutInfo, RemoteError> {
        (**self).put(key, data).await
    }

    async fn start_upload(
        &self,
        key: &str,
        part_size: usize,
    ) -> Result<Option<Box<dyn Upload>>, RemoteError> {
        (**self).start_upload(key, part_size).await
    }

    async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        (**self).delete(key).await
    }
}

/// Opens a remote from its URL with the `[remote]` configuration. The agent keeps one per
/// base URL.
pub fn open_remote(
    url: &str,
    cfg: &hsm_config::RemoteConfig,
) -> Result<Arc<dyn Remote>, RemoteError> {
    let parsed = RemoteUrl::parse(url)?;
    Ok(Arc::new(ObjectStoreRemote::open(&parsed, cfg)?))
}
