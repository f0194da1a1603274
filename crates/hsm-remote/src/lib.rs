//! Remote access for hsm.
//!
//! The agent and populate talk to a narrow trait the project owns, [`Remote`], not to a
//! vendor type: ranged reads with a precondition, and metadata. [`ObjectStoreRemote`] puts
//! `object_store` behind it; the `mock` feature adds an in-memory remote and a
//! fault-injecting wrapper that every other crate's tests can use.

use std::fmt::Debug;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

mod location;
mod store;

#[cfg(feature = "mock")]
pub mod mock;

pub use location::{RemoteUrl, StoreKind, check_key, key_from_relative_path, redact_url};
pub use store::{ObjectStoreRemote, local_etag, open_store};

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
    #[error("{url}: permission denied reading {key:?}: {detail}")]
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
    #[error("{url}: reading {key:?} failed: {detail}")]
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

    fn runs_inline(&self) -> bool {
        (**self).runs_inline()
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
