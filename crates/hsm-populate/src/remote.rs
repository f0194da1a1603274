//! Sources behind object-store URLs: a published manifest when there is one at the prefix
//! (full metadata and digests), otherwise a listing (sizes, ETags, directories implied by
//! key prefixes, default modes). Everything is read up front; `list` serves from memory.

use std::collections::HashMap;
use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use hsm_config::RemoteConfig;
use hsm_kernel::stat::Timestamp;
use hsm_manifest::{MANIFEST_KEY, Manifest};
use hsm_remote::{RemoteError, RemoteUrl, Store, check_key, open_store};
use hsm_stub::{DigestAlgorithm, Integrity};

use crate::source::{Attrs, FileInfo, Kind, Source, SourceEntry, SourceError};

/// A tree read from an object store.
#[derive(Debug)]
pub struct RemoteSource {
    url: String,
    root: Attrs,
    dirs: HashMap<PathBuf, Vec<SourceEntry>>,
    etags: HashMap<String, Option<String>>,
    holes: HashMap<PathBuf, Vec<Range<u64>>>,
    chunk_shift: Option<u8>,
    /// Keys refused (they would escape DST, or cannot be names): reported, never created.
    pub refused: Vec<(String, String)>,
    /// Whether the tree came from a manifest (else from a listing).
    pub from_manifest: bool,
    local_root: Option<PathBuf>,
}

fn ts(sec: i64, nsec: u32) -> Timestamp {
    Timestamp { sec, nsec }
}

fn to_attrs(a: &hsm_manifest::Attrs) -> Attrs {
    Attrs {
        mode: a.mode & 0o7777,
        uid: a.uid,
        gid: a.gid,
        atime: ts(a.atime.0, a.atime.1),
        mtime: ts(a.mtime.0, a.mtime.1),
    }
}

/// Size and ETag of an object as the store reports it now.
pub(crate) type SizeEtag = (u64, Option<String>);

/// Size and ETag of each object the store holds now, by key.
pub(crate) type Current = HashMap<String, SizeEtag>;

/// What the store reports now for the objects `keys` name (a key missing from the answer is
/// not in the store): from one listing when the store can list, else from one HEAD per key.
///
/// `probe` is a key and the ETag recorded for it elsewhere (a manifest). When the store
/// cannot list and a HEAD of that key returns the recorded ETag, the recorded ETags are
/// taken as right and `None` is returned instead of asking for every object. Publish, which
/// must never trust an earlier upload blindly, passes no probe.
pub(crate) async fn current_etags(
    store: &dyn Store,
    url: &str,
    keys: &[&str],
    probe: Option<(&str, Option<&str>)>,
) -> Result<Option<Current>, RemoteError> {
    match store.list().await {
        Ok(list) => {
            return Ok(Some(
                list.into_iter()
                    .map(|o| (o.key, (o.size, o.etag)))
                    .collect(),
            ));
        }
        Err(e) => tracing::debug!("{url}: cannot list ({e})"),
    }
    if let Some((key, recorded)) = probe {
        if let Ok(info) = store.head(key).await {
            if info.etag.is_some() && info.etag.as_deref() == recorded {
                return Ok(None);
            }
        }
    }
    tracing::info!(
        "{url}: the store cannot list; asking it for each of {} objects",
        keys.len()
    );
    let heads: Vec<Option<(String, SizeEtag)>> = futures::stream::iter(keys)
        .map(|key| async move {
            match store.head(key).await {
                Ok(info) => Ok(Some((key.to_string(), (info.size, info.etag)))),
                Err(RemoteError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok(Some(heads.into_iter().flatten().collect()))
}

/// Seconds and nanoseconds since the epoch (negative before it, as `Timestamp` counts).
fn timestamp(t: std::time::SystemTime) -> Timestamp {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => ts(d.as_secs() as i64, d.subsec_nanos()),
        Err(before) => {
            let d = before.duration();
            match d.subsec_nanos() {
                0 => ts(-(d.as_secs() as i64), 0),
                n => ts(-(d.as_secs() as i64) - 1, 1_000_000_000 - n),
            }
        }
    }
}

impl RemoteSource {
    /// Read the tree at `url`.
    pub fn open(url: &str, cfg: &RemoteConfig) -> Result<Self, SourceError> {
        let parsed = RemoteUrl::parse(url)?;
        let store = open_store(&parsed, cfg)?;
        let mut src = Self::from_store(store.as_ref())?;
        src.local_root = parsed.local_root().map(Path::to_path_buf);
        Ok(src)
    }

    /// Read the tree in `store`: its manifest, else its listing.
    pub fn from_store(store: &dyn Store) -> Result<Self, SourceError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SourceError::Runtime)?
            .block_on(Self::read(store))
    }

    async fn read(store: &dyn Store) -> Result<Self, SourceError> {
        let canonical = store.url().to_string();
        match store.get(MANIFEST_KEY).await {
            Ok(bytes) => {
                let manifest = Manifest::decode(&bytes).map_err(|e| SourceError::Manifest {
                    url: canonical.clone(),
                    key: MANIFEST_KEY.to_string(),
                    source: e,
                })?;
                let files: Vec<&hsm_manifest::FileObject> =
                    manifest.files_by_key().into_values().collect();
                let current = if files.is_empty() {
                    None
                } else {
                    let keys: Vec<&str> = files.iter().map(|f| f.key.as_str()).collect();
                    // The first key in order: the same probe on every run.
                    let probe = files
                        .iter()
                        .min_by_key(|f| f.key.as_str())
                        .map(|f| (f.key.as_str(), f.etag.as_deref()));
                    current_etags(store, &canonical, &keys, probe).await?
                };
                let current: Option<HashMap<String, Option<String>>> =
                    current.map(|c| c.into_iter().map(|(key, (_, etag))| (key, etag)).collect());
                Ok(Self::from_manifest(canonical, &manifest, current.as_ref()))
            }
            Err(RemoteError::NotFound { .. }) => Self::from_listing(canonical, store).await,
            Err(e) => Err(e.into()),
        }
    }

    fn empty(url: String, root: Attrs, from_manifest: bool) -> Self {
        RemoteSource {
            url,
            root,
            dirs: HashMap::from([(PathBuf::new(), Vec::new())]),
            etags: HashMap::new(),
            holes: HashMap::new(),
            chunk_shift: None,
            refused: Vec::new(),
            from_manifest,
            local_root: None,
        }
    }

    /// Add `entry` at `rel`, creating implied parent directories with `dir_attrs`.
    fn insert(&mut self, rel: &Path, entry: SourceEntry, dir_attrs: Attrs) {
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let mut missing = Vec::new();
        let mut p = parent.clone();
        while !self.dirs.contains_key(&p) {
            missing.push(p.clone());
            match p.parent() {
                Some(pp) => p = pp.to_path_buf(),
                None => break,
            }
        }
        for d in missing.into_iter().rev() {
            self.dirs.insert(d.clone(), Vec::new());
            let up = d.parent().unwrap_or(Path::new("")).to_path_buf();
            let name = d.file_name().map(OsString::from).unwrap_or_default();
            if let Some(list) = self.dirs.get_mut(&up) {
                list.push(SourceEntry {
                    name,
                    kind: Kind::Dir,
                    attrs: dir_attrs,
                });
            }
        }
        if entry.kind == Kind::Dir {
            // Explicit directory: replace implied attributes if it was implied already.
            if self.dirs.contains_key(rel) {
                if let Some(list) = self.dirs.get_mut(&parent) {
                    if let Some(e) = list.iter_mut().find(|e| e.name == entry.name) {
                        e.attrs = entry.attrs;
                        return;
                    }
                }
            }
            self.dirs.insert(rel.to_path_buf(), Vec::new());
        }
        if let Some(list) = self.dirs.get_mut(&parent) {
            list.push(entry);
        }
    }

    fn from_manifest(
        url: String,
        m: &Manifest,
        current: Option<&HashMap<String, Option<String>>>,
    ) -> Self {
        let root = m
            .entries
            .iter()
            .find(|e| e.path.is_empty())
            .map(|e| to_attrs(&e.attrs))
            .unwrap_or(Attrs {
                mode: 0o755,
                uid: 0,
                gid: 0,
                atime: ts(0, 0),
                mtime: ts(0, 0),
            });
        let mut src = Self::empty(url, root, true);
        let chunk_shift = m.chunk_size.trailing_zeros() as u8;
        src.chunk_shift = Some(chunk_shift);
        let integrity = |f: &hsm_manifest::FileObject| Integrity {
            algorithm: DigestAlgorithm::Blake3,
            chunk_shift,
            manifest_key: MANIFEST_KEY.to_string(),
            list_hash: hsm_manifest::list_hash(&f.digests),
        };
        // Files that have other names share a link id (the target's index).
        let index: HashMap<&str, usize> = m
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.as_str(), i))
            .collect();
        let linked = link_targets(m, &index);
        let zero_full = hsm_manifest::digest(&vec![0u8; m.chunk_size as usize]);
        let default_dir = root;
        // Directories first, so implied parents get their real attributes.
        let mut order: Vec<&hsm_manifest::Entry> =
            m.entries.iter().filter(|e| !e.path.is_empty()).collect();
        order.sort_by_key(|e| !matches!(e.kind, hsm_manifest::Kind::Dir));
        // What is not a directory cannot hold entries: one whose parent (or any ancestor)
        // is a file or a symlink in the manifest is refused by name, never dropped unseen.
        let leaves = leaves(m);
        for e in order {
            let rel = PathBuf::from(&e.path);
            let blocked = rel.ancestors().skip(1).find_map(|a| {
                let a = a.to_str()?;
                leaves.get(a).map(|kind| (a, *kind))
            });
            if let Some((parent, kind)) = blocked {
                src.refused.push((
                    e.path.clone(),
                    format!(
                        "its parent {parent:?} is {kind} in the manifest, not a directory; not created"
                    ),
                ));
                continue;
            }
            let name = rel.file_name().map(OsString::from).unwrap_or_default();
            let attrs = to_attrs(&e.attrs);
            // The ETag the store reports now (or the recorded one); None if the object is gone.
            let etag_now = |f: &hsm_manifest::FileObject| match current {
                None => Some(f.etag.clone()),
                Some(c) => c.get(&f.key).cloned(),
            };
            let file_info = |f: &hsm_manifest::FileObject, id: Option<usize>, etag| FileInfo {
                size: f.size,
                key: Ok(f.key.clone()),
                etag,
                version: f.version.clone(),
                link_id: id.map(|i| (u64::MAX, i as u64)),
                maybe_sparse: true,
                integrity: Some(integrity(f)),
            };
            let kind = match &e.kind {
                hsm_manifest::Kind::Dir => Kind::Dir,
                hsm_manifest::Kind::Symlink { target } => Kind::Symlink {
                    target: OsString::from(target),
                },
                hsm_manifest::Kind::File(f) => {
                    let i = index[e.path.as_str()];
                    let Some(etag) = etag_now(f) else {
                        src.refused.push((
                            e.path.clone(),
                            format!(
                                "object {:?} is in the manifest but not in the store; not created",
                                f.key
                            ),
                        ));
                        continue;
                    };
                    src.etags.insert(f.key.clone(), etag.clone());
                    src.holes
                        .insert(rel.clone(), zero_ranges(f, m.chunk_size, &zero_full));
                    Kind::File(file_info(f, linked.contains(&i).then_some(i), etag))
                }
                hsm_manifest::Kind::HardLink { to } => {
                    // Decode checked the target is a file of this manifest.
                    let i = index[to.as_str()];
                    let hsm_manifest::Kind::File(f) = &m.entries[i].kind else {
                        continue;
                    };
                    let Some(etag) = etag_now(f) else { continue }; // refused with its target
                    src.holes
                        .insert(rel.clone(), zero_ranges(f, m.chunk_size, &zero_full));
                    Kind::File(file_info(f, Some(i), etag))
                }
            };
            src.insert(&rel, SourceEntry { name, kind, attrs }, default_dir);
        }
        src.sort();
        src
    }

    async fn from_listing(url: String, store: &dyn Store) -> Result<Self, SourceError> {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let dir_attrs = Attrs {
            mode: 0o755,
            uid,
            gid,
            atime: ts(now, 0),
            mtime: ts(now, 0),
        };
        let mut src = Self::empty(url.clone(), dir_attrs, false);
        let objects = store.list().await.map_err(|e| match e {
            // A listing the store refuses over one key it cannot parse (the message names
            // it): nothing of it can be used, so refuse it all.
            RemoteError::InvalidKey { detail, .. } => SourceError::UnusableListing {
                url: url.clone(),
                detail,
            },
            e => SourceError::Remote(e),
        })?;
        for o in objects {
            let key = o.key;
            if key.starts_with(".hsm-") {
                continue; // our own files (a partial manifest)
            }
            if let Err(why) = check_key(&key) {
                src.refused.push((key, why.to_string()));
                continue;
            }
            let t = timestamp(o.last_modified);
            let rel = PathBuf::from(&key);
            let name = rel.file_name().map(OsString::from).unwrap_or_default();
            src.etags.insert(key.clone(), o.etag.clone());
            let entry = SourceEntry {
                name,
                kind: Kind::File(FileInfo {
                    size: o.size,
                    key: Ok(key.clone()),
                    etag: o.etag,
                    version: o.version,
                    link_id: None,
                    maybe_sparse: false,
                    integrity: None,
                }),
                attrs: Attrs {
                    mode: 0o644,
                    uid,
                    gid,
                    atime: t,
                    mtime: t,
                },
            };
            src.insert(&rel, entry, dir_attrs);
        }
        // A key that is both an object and a prefix ("a" and "a/b") cannot be both a file
        // and a directory: refuse the object.
        let dirs: std::collections::HashSet<PathBuf> = src.dirs.keys().cloned().collect();
        for (parent, list) in src.dirs.iter_mut() {
            list.retain(|e| {
                let clash = matches!(e.kind, Kind::File(_)) && dirs.contains(&parent.join(&e.name));
                if clash {
                    let key = parent.join(&e.name).display().to_string();
                    src.refused.push((
                        key.clone(),
                        format!("key {key:?} is also a prefix of other keys; refused"),
                    ));
                }
                !clash
            });
        }
        src.sort();
        Ok(src)
    }

    fn sort(&mut self) {
        use std::os::unix::ffi::OsStrExt;
        for list in self.dirs.values_mut() {
            list.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
            list.dedup_by(|a, b| a.name == b.name);
        }
    }
}

/// Byte ranges whose chunks are all zeros (holes to keep as holes).
fn zero_ranges(
    f: &hsm_manifest::FileObject,
    chunk: u64,
    zero_full: &hsm_manifest::Digest,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (i, d) in f.digests.iter().enumerate() {
        let start = i as u64 * chunk;
        let end = (start + chunk).min(f.size);
        let zero = if end - start == chunk {
            d == zero_full
        } else {
            *d == hsm_manifest::digest(&vec![0u8; (end - start) as usize])
        };
        if zero {
            match out.last_mut() {
                Some(r) if r.end == start => r.end = end,
                _ => out.push(start..end),
            }
        }
    }
    out
}

impl Source for RemoteSource {
    fn url(&self) -> &str {
        &self.url
    }

    fn describe(&self) -> String {
        format!(
            "{} ({})",
            self.url,
            if self.from_manifest {
                "manifest"
            } else {
                "listing"
            }
        )
    }

    fn root_attrs(&self) -> Result<Attrs, SourceError> {
        Ok(self.root)
    }

    fn list(&self, rel: &Path) -> Result<Vec<SourceEntry>, SourceError> {
        Ok(self.dirs.get(rel).cloned().unwrap_or_default())
    }

    fn holes(&self, rel: &Path, _size: u64) -> Vec<Range<u64>> {
        self.holes.get(rel).cloned().unwrap_or_default()
    }

    fn current_etag(&self, key: &str) -> Option<String> {
        self.etags.get(key).cloned().flatten()
    }

    fn min_granule_shift(&self) -> u8 {
        self.chunk_shift.unwrap_or(hsm_stub::MIN_GRANULE_SHIFT)
    }

    fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    fn refused(&self) -> Vec<(String, String)> {
        self.refused.clone()
    }
}

/// The manifest entries other names link to (their indexes).
fn link_targets(m: &Manifest, index: &HashMap<&str, usize>) -> std::collections::HashSet<usize> {
    m.entries
        .iter()
        .filter_map(|e| match &e.kind {
            hsm_manifest::Kind::HardLink { to } => index.get(to.as_str()).copied(),
            _ => None,
        })
        .collect()
}

/// The manifest's entries that cannot hold entries, by path, with what they are.
fn leaves(m: &Manifest) -> HashMap<&str, &'static str> {
    m.entries
        .iter()
        .filter_map(|e| match e.kind {
            hsm_manifest::Kind::Dir => None,
            hsm_manifest::Kind::Symlink { .. } => Some((e.path.as_str(), "a symbolic link")),
            hsm_manifest::Kind::File(_) | hsm_manifest::Kind::HardLink { .. } => {
                Some((e.path.as_str(), "a file"))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: hsm_manifest::Kind) -> hsm_manifest::Entry {
        hsm_manifest::Entry {
            path: path.to_string(),
            kind,
            attrs: hsm_manifest::Attrs {
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: (1, 0),
                atime: (1, 0),
            },
        }
    }

    fn file(key: &str) -> hsm_manifest::Kind {
        hsm_manifest::Kind::File(hsm_manifest::FileObject {
            size: 1,
            key: key.to_string(),
            etag: Some("e".into()),
            version: None,
            digests: vec![hsm_manifest::digest(b"x")],
        })
    }

    /// Entries below a symlink or a file of the manifest are refused by name, in whatever
    /// order the manifest lists them; the symlink and the file themselves stay what they
    /// are (neither becomes an implied directory).
    #[test]
    fn entries_below_a_symlink_or_a_file_are_refused_by_name() {
        let symlink = || hsm_manifest::Kind::Symlink { target: "d".into() };
        for reversed in [false, true] {
            let mut entries = vec![
                entry("", hsm_manifest::Kind::Dir),
                entry("d", hsm_manifest::Kind::Dir),
                entry("ln/f", file("d/f")),
                entry("ln", symlink()),
                entry("plain.txt/sub/g", file("g")),
                entry("plain.txt", file("plain.txt")),
                entry("ok", file("ok")),
            ];
            if reversed {
                entries[1..].reverse();
            }
            let m = Manifest {
                chunk_size: 1 << 20,
                entries,
            };
            let src = RemoteSource::from_manifest("file:///store".into(), &m, None);
            let mut refused: Vec<&str> = src.refused.iter().map(|(p, _)| p.as_str()).collect();
            refused.sort();
            assert_eq!(refused, ["ln/f", "plain.txt/sub/g"], "{:?}", src.refused);
            assert!(
                src.refused
                    .iter()
                    .any(|(_, why)| why.contains("\"ln\" is a symbolic link")),
                "{:?}",
                src.refused
            );
            let root = src.list(Path::new("")).expect("list");
            let kinds: Vec<(String, bool)> = root
                .iter()
                .map(|e| {
                    (
                        e.name.to_string_lossy().into_owned(),
                        matches!(e.kind, Kind::Dir),
                    )
                })
                .collect();
            assert_eq!(
                kinds,
                [
                    ("d".into(), true),
                    ("ln".into(), false),
                    ("ok".into(), false),
                    ("plain.txt".into(), false)
                ]
            );
        }
    }
}
