//! Integrity: manifest digests (cached per remote and manifest), chunk verification, and
//! the length check every fetched body passes before it may become resident.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use hsm_remote::{Body, Expect, Remote, RemoteError};
use tracing::warn;

use crate::agent::AgentCore;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::stub::Stub;

/// (remote URL, manifest key).
pub(crate) type ManifestId = (String, String);

/// The digests a manifest lists, by object key.
#[derive(Debug)]
pub(crate) struct ManifestDigests {
    chunk_size: u64,
    by_key: HashMap<String, Arc<Vec<hsm_manifest::Digest>>>,
    /// The manifest object's ETag and size when it was read.
    pub(crate) etag: Option<String>,
    pub(crate) size: u64,
}

impl AgentCore {
    /// The manifest `integrity` names: the one read last, or with `refresh` the current
    /// one (a HEAD tells whether the cached one still is). The body is read with the ETag
    /// its HEAD gave as a precondition, so a manifest replaced mid-read is an error, never
    /// a mix.
    pub(crate) async fn manifest(
        &self,
        remote: &Arc<dyn Remote>,
        integrity: &hsm_stub::Integrity,
        refresh: bool,
    ) -> Result<Arc<ManifestDigests>, ServeError> {
        let id = (remote.url().to_string(), integrity.manifest_key.clone());
        let mut cache = self.manifests.lock().await;
        if let Some(m) = cache.get(&id) {
            if !refresh {
                return Ok(m.clone());
            }
        }
        let key = &integrity.manifest_key;
        let info = remote.head(key).await?;
        if let Some(m) = cache.get(&id) {
            if info.etag.is_some() && m.etag == info.etag && m.size == info.size {
                return Ok(m.clone());
            }
        }
        let expect = Expect {
            etag: info.etag.clone(),
            version: info.version.clone(),
            size: info.size,
        };
        let bytes = remote.get_range(key, 0..info.size, &expect).await?;
        let manifest = hsm_manifest::Manifest::decode(&bytes)
            .map_err(|e| ServeError::Inconsistent(format!("manifest {key}: {e}")))?;
        let by_key = manifest
            .entries
            .into_iter()
            .filter_map(|e| match e.kind {
                hsm_manifest::Kind::File(f) => Some((f.key, Arc::new(f.digests))),
                _ => None,
            })
            .collect();
        let m = Arc::new(ManifestDigests {
            chunk_size: manifest.chunk_size,
            by_key,
            etag: info.etag.clone(),
            size: info.size,
        });
        cache.insert(id, m.clone());
        Ok(m)
    }
}

impl Stub {
    /// Check every chunk of `bytes` (starting at object offset `start`, chunk aligned)
    /// against the manifest's digests. A mismatch is never written or marked resident.
    pub(crate) fn verify(
        &self,
        bytes: &[u8],
        start: u64,
        list: &[hsm_manifest::Digest],
        chunk: u64,
    ) -> Result<(), ServeError> {
        for (i, piece) in bytes.chunks(chunk as usize).enumerate() {
            let index = start / chunk + i as u64;
            let want = list.get(index as usize);
            if want != Some(&hsm_manifest::digest(piece)) {
                warn!(path = %self.path(), key = %self.meta.key, chunk = index, "fetched chunk does not match its digest");
                return Err(RemoteError::Corrupt {
                    url: self.remote.url().to_string(),
                    key: self.meta.key.clone(),
                    chunk: index,
                    offset: index * chunk,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Count a ranged read's body and check its length: whatever the remote promises, a
    /// short or long body never becomes resident.
    pub(crate) fn accept_body(
        &self,
        core: &AgentCore,
        part: &Range<u64>,
        body: Body,
    ) -> Result<Body, ServeError> {
        Metrics::add(&core.metrics.bytes_fetched, body.len());
        let want = part.end - part.start;
        let aligned = match &body {
            Body::File { range, .. } => range.start == part.start,
            Body::Bytes(_) => true,
        };
        if body.len() != want || !aligned {
            return Err(RemoteError::Truncated {
                url: self.remote.url().to_string(),
                key: self.meta.key.clone(),
                offset: part.start,
                expected: want,
                got: body.len(),
            }
            .into());
        }
        Ok(body)
    }

    /// The digests of this object and their chunk size, when its metadata names a manifest:
    /// the ones whose hash the metadata pins, from the manifest read last or, if that one
    /// lists others (the package was republished since), from a fresh read. A manifest
    /// that no longer lists these digests means the object was replaced: the stub is stale.
    pub(crate) async fn digests(
        &self,
        core: &Arc<AgentCore>,
    ) -> Result<Option<(Arc<Vec<hsm_manifest::Digest>>, u64)>, ServeError> {
        let Some(integrity) = &self.meta.integrity else {
            return Ok(None);
        };
        let chunk = 1u64 << integrity.chunk_shift;
        let pick = |m: &ManifestDigests| {
            m.by_key
                .get(&self.meta.key)
                .filter(|list| {
                    m.chunk_size == chunk
                        && list.len() as u64
                            == hsm_manifest::chunk_count(self.meta.remote_size, chunk)
                        && hsm_manifest::list_hash(list) == integrity.list_hash
                })
                .cloned()
        };
        let list = self
            .digests
            .get_or_try_init(|| async {
                let m = core.manifest(&self.remote, integrity, false).await?;
                if let Some(list) = pick(&m) {
                    return Ok::<_, ServeError>(list);
                }
                let m = core.manifest(&self.remote, integrity, true).await?;
                pick(&m).ok_or_else(|| {
                    RemoteError::Changed {
                        url: self.remote.url().to_string(),
                        key: self.meta.key.clone(),
                        detail: format!(
                            "{} no longer lists the digests it had at populate time",
                            integrity.manifest_key
                        ),
                    }
                    .into()
                })
            })
            .await?;
        Ok(Some((list.clone(), chunk)))
    }
}
