//! Resuming: what an earlier run (its manifest, or the partial one) already uploaded.

use std::collections::HashMap;

use hsm_manifest::{FileObject, MANIFEST_KEY, Manifest};
use hsm_remote::{RemoteError, Store};
use tracing::{info, warn};

use super::PARTIAL_KEY;

/// Whether two ETags name the same object version. Stores are not consistent about quoting
/// (Azure's listing gives `0x8D...` where its put returned `"0x8D..."`).
pub(super) fn same_etag(a: &str, b: &str) -> bool {
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
pub(super) async fn previous_files(store: &dyn Store, url: &str, chunk_size: u64) -> Previous {
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
