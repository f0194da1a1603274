//! Building the manifest (complete, or partial while uploads run) and writing it.

use bytes::Bytes;
use hsm_manifest::{Entry, FileObject, Manifest};
use hsm_remote::Store;

use super::ManifestWriteError;
use super::walk::{Item, Walk};
use crate::source::Attrs;

fn manifest_attrs(a: &Attrs) -> hsm_manifest::Attrs {
    hsm_manifest::Attrs {
        mode: a.mode,
        uid: a.uid,
        gid: a.gid,
        mtime: (a.mtime.sec, a.mtime.nsec),
        atime: (a.atime.sec, a.atime.nsec),
    }
}

/// Put `manifest` at `key`.
pub(super) async fn put_manifest(
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

pub(super) fn build_manifest(
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
