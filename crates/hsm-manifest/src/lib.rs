//! The manifest `hsm publish` writes at a remote's prefix, and `hsm populate` and the agent
//! read: every entry of a published tree with its metadata, and per-chunk digests of every
//! file. Documented in docs/MANIFEST.md.
//!
//! Format: JSON Lines. A header line, one line per entry, and a trailer line that counts the
//! entries and carries the BLAKE3 of every byte before it. Decoding checks the format name
//! and version, every path (no `..`, empty or absolute segments), the entry count, the
//! checksum, and size limits, before anything is trusted.

use std::collections::HashMap;

pub mod trace;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The manifest's object name at a remote's prefix.
pub const MANIFEST_KEY: &str = ".hsm-manifest";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Largest manifest accepted (bytes).
pub const MAX_MANIFEST_LEN: usize = 4 << 30;
/// Largest single line accepted (a 1 TiB file's digests at 1 MiB chunks fit).
pub const MAX_LINE_LEN: usize = 64 << 20;
/// Digest length (BLAKE3).
pub const DIGEST_LEN: usize = 32;

const FORMAT: &str = "hsm-manifest";

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; DIGEST_LEN];

/// The digest of one chunk.
pub fn digest(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("manifest line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error("manifest has no trailer (truncated?)")]
    Truncated,
    #[error("manifest checksum mismatch (corrupted)")]
    Checksum,
    #[error(
        "manifest format {format:?} version {version} is not supported (this is version {VERSION})"
    )]
    Unsupported { format: String, version: u32 },
}

/// Ownership, permissions and times of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    pub atime: (i64, u32),
}

/// A regular file's object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileObject {
    pub size: u64,
    /// Object key relative to the prefix.
    pub key: String,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// One digest per `chunk_size` bytes (the last chunk may be short).
    pub digests: Vec<Digest>,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(FileObject),
    Symlink {
        target: String,
    },
    /// Another name of the file at `to` (a path in this manifest).
    HardLink {
        to: String,
    },
}

/// One entry: a path relative to the tree's root ("" is the root directory itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    pub attrs: Attrs,
}

/// A decoded manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Bytes per digest chunk (a power of two).
    pub chunk_size: u64,
    pub entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    chunk_size: u64,
    digest: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Trailer {
    end: u64,
    blake3: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(flatten)]
    attrs: Attrs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digests: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<String>,
}

/// Why one entry (or a path in it) is not valid; path errors name the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    #[error("{0:?} is absolute")]
    Absolute(String),
    #[error("{0:?} has an empty, '.' or '..' segment")]
    BadSegment(String),
    #[error("{0:?} contains a control character")]
    ControlCharacter(String),
    #[error("{0:?} has a segment longer than 255 bytes")]
    LongSegment(String),
    #[error("{count} digests for {size} bytes")]
    DigestCount { count: usize, size: u64 },
    #[error("{0}")]
    Missing(&'static str),
    #[error("digests: {0}")]
    Digests(#[source] base64::DecodeError),
    #[error("{len} digest bytes do not fit {size} bytes in chunks of {chunk_size}")]
    DigestBytes {
        len: usize,
        size: u64,
        chunk_size: u64,
    },
    #[error("unknown entry type {0:?}")]
    UnknownType(String),
    #[error("the root entry must be a directory")]
    RootNotDir,
}

/// Check a manifest path or object key: every segment a plain name.
pub fn check_path(path: &str) -> Result<(), InvalidEntry> {
    if path.starts_with('/') {
        return Err(InvalidEntry::Absolute(path.to_string()));
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(InvalidEntry::BadSegment(path.to_string()));
        }
        if part.contains('\0') || part.chars().any(|c| c.is_ascii_control()) {
            return Err(InvalidEntry::ControlCharacter(path.to_string()));
        }
        if part.len() > 255 {
            return Err(InvalidEntry::LongSegment(path.to_string()));
        }
    }
    Ok(())
}

/// Number of chunks for `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

impl Manifest {
    /// Encode as JSON Lines with header and checksummed trailer.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        let bad = |line: usize, reason: String| ManifestError::Invalid { line, reason };
        if !self.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&self.chunk_size) {
            return Err(bad(
                1,
                format!(
                    "chunk size {} is not a power of two in 4 KiB..1 GiB",
                    self.chunk_size
                ),
            ));
        }
        let mut out = Vec::new();
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            chunk_size: self.chunk_size,
            digest: "blake3".into(),
        };
        push_json(&mut out, &header);
        for (i, e) in self.entries.iter().enumerate() {
            if !e.path.is_empty() {
                check_path(&e.path).map_err(|r| bad(i + 2, r.to_string()))?;
            }
            push_json(
                &mut out,
                &to_line(e, self.chunk_size).map_err(|r| bad(i + 2, r.to_string()))?,
            );
        }
        let trailer = Trailer {
            end: self.entries.len() as u64,
            blake3: blake3::hash(&out).to_hex().to_string(),
        };
        push_json(&mut out, &trailer);
        Ok(out)
    }

    /// Decode and check a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLarge {
                len: bytes.len(),
                max: MAX_MANIFEST_LEN,
            });
        }
        // The trailer is the last line; everything before it is covered by its checksum.
        let body_end = bytes[..bytes.len().saturating_sub(1)]
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| i + 1)
            .ok_or(ManifestError::Truncated)?;
        let trailer: Trailer =
            serde_json::from_slice(&bytes[body_end..]).map_err(|_| ManifestError::Truncated)?;
        if blake3::hash(&bytes[..body_end]).to_hex().as_str() != trailer.blake3 {
            return Err(ManifestError::Checksum);
        }
        let mut lines = bytes[..body_end]
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty());
        let invalid = |line: usize, reason: String| ManifestError::Invalid { line, reason };
        let first = lines.next().ok_or(ManifestError::Truncated)?;
        let header: Header =
            serde_json::from_slice(first).map_err(|e| invalid(1, e.to_string()))?;
        if header.format != FORMAT || header.version != VERSION || header.digest != "blake3" {
            return Err(ManifestError::Unsupported {
                format: header.format,
                version: header.version,
            });
        }
        if !header.chunk_size.is_power_of_two() || !(4096..=1 << 30).contains(&header.chunk_size) {
            return Err(invalid(
                1,
                format!(
                    "chunk size {} is not a power of two in 4 KiB..1 GiB",
                    header.chunk_size
                ),
            ));
        }
        let mut entries = Vec::new();
        for (i, raw) in lines.enumerate() {
            let n = i + 2;
            if raw.len() > MAX_LINE_LEN {
                return Err(invalid(
                    n,
                    format!("line of {} bytes is too long", raw.len()),
                ));
            }
            let line: Line = serde_json::from_slice(raw).map_err(|e| invalid(n, e.to_string()))?;
            entries
                .push(from_line(line, header.chunk_size).map_err(|r| invalid(n, r.to_string()))?);
        }
        if entries.len() as u64 != trailer.end {
            return Err(invalid(
                entries.len() + 2,
                "entry count does not match the trailer".into(),
            ));
        }
        let m = Manifest {
            chunk_size: header.chunk_size,
            entries,
        };
        m.check_tree()?;
        Ok(m)
    }

    /// Paths unique, hard links pointing at files in the manifest.
    fn check_tree(&self) -> Result<(), ManifestError> {
        let mut seen: HashMap<&str, &Kind> = HashMap::new();
        for (i, e) in self.entries.iter().enumerate() {
            if seen.insert(&e.path, &e.kind).is_some() {
                return Err(ManifestError::Invalid {
                    line: i + 2,
                    reason: format!("duplicate path {:?}", e.path),
                });
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            if let Kind::HardLink { to } = &e.kind {
                if !matches!(seen.get(to.as_str()), Some(Kind::File(_))) {
                    return Err(ManifestError::Invalid {
                        line: i + 2,
                        reason: format!(
                            "hard link {:?} points at {to:?}, which is not a file in the manifest",
                            e.path
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The file objects by key (for the agent, which needs digests by key).
    pub fn files_by_key(&self) -> HashMap<&str, &FileObject> {
        self.entries
            .iter()
            .filter_map(|e| match &e.kind {
                Kind::File(f) => Some((f.key.as_str(), f)),
                _ => None,
            })
            .collect()
    }
}

fn push_json<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    // Serialising these plain structs cannot fail.
    if serde_json::to_writer(&mut *out, v).is_ok() {
        out.push(b'\n');
    }
}

fn to_line(e: &Entry, chunk_size: u64) -> Result<Line, InvalidEntry> {
    let mut line = Line {
        path: e.path.clone(),
        kind: String::new(),
        attrs: e.attrs,
        size: None,
        key: None,
        etag: None,
        version: None,
        digests: None,
        target: None,
        to: None,
    };
    match &e.kind {
        Kind::Dir => line.kind = "dir".into(),
        Kind::File(f) => {
            check_path(&f.key)?;
            if f.digests.len() as u64 != chunk_count(f.size, chunk_size) {
                return Err(InvalidEntry::DigestCount {
                    count: f.digests.len(),
                    size: f.size,
                });
            }
            line.kind = "file".into();
            line.size = Some(f.size);
            line.key = Some(f.key.clone());
            line.etag = f.etag.clone();
            line.version = f.version.clone();
            line.digests =
                Some(base64::engine::general_purpose::STANDARD.encode(f.digests.concat()));
        }
        Kind::Symlink { target } => {
            line.kind = "symlink".into();
            line.target = Some(target.clone());
        }
        Kind::HardLink { to } => {
            check_path(to)?;
            line.kind = "hardlink".into();
            line.to = Some(to.clone());
        }
    }
    Ok(line)
}

fn from_line(l: Line, chunk_size: u64) -> Result<Entry, InvalidEntry> {
    use InvalidEntry::Missing;
    if !l.path.is_empty() {
        check_path(&l.path)?;
    }
    let kind = match l.kind.as_str() {
        "dir" => Kind::Dir,
        "file" => {
            let size = l.size.ok_or(Missing("file without size"))?;
            let key = l.key.ok_or(Missing("file without key"))?;
            check_path(&key)?;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(l.digests.ok_or(Missing("file without digests"))?)
                .map_err(InvalidEntry::Digests)?;
            if raw.len() % DIGEST_LEN != 0
                || (raw.len() / DIGEST_LEN) as u64 != chunk_count(size, chunk_size)
            {
                return Err(InvalidEntry::DigestBytes {
                    len: raw.len(),
                    size,
                    chunk_size,
                });
            }
            let digests = raw
                .chunks_exact(DIGEST_LEN)
                .map(|c| {
                    let mut d = [0u8; DIGEST_LEN];
                    d.copy_from_slice(c);
                    d
                })
                .collect();
            Kind::File(FileObject {
                size,
                key,
                etag: l.etag,
                version: l.version,
                digests,
            })
        }
        "symlink" => Kind::Symlink {
            target: l.target.ok_or(Missing("symlink without target"))?,
        },
        "hardlink" => {
            let to = l.to.ok_or(Missing("hard link without 'to'"))?;
            check_path(&to)?;
            Kind::HardLink { to }
        }
        other => return Err(InvalidEntry::UnknownType(other.to_string())),
    };
    if l.path.is_empty() && kind != Kind::Dir {
        return Err(InvalidEntry::RootNotDir);
    }
    Ok(Entry {
        path: l.path,
        kind,
        attrs: l.attrs,
    })
}

/// What a stub pins its digests by: the BLAKE3 of the object's chunk digests concatenated.
pub fn list_hash(digests: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new();
    for d in digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

/// Digests of `data` cut into `chunk_size` chunks (the last may be short).
pub fn chunk_digests(data: &[u8], chunk_size: u64) -> Vec<Digest> {
    data.chunks(chunk_size as usize).map(digest).collect()
}

/// Chunk digests of a stream fed in pieces of any size (the same digests
/// [`chunk_digests`] gives for the concatenation).
#[derive(Debug, Clone)]
pub struct ChunkDigester {
    chunk_size: u64,
    in_chunk: u64,
    hasher: blake3::Hasher,
    digests: Vec<Digest>,
    total: u64,
}

impl ChunkDigester {
    pub fn new(chunk_size: u64) -> Self {
        ChunkDigester {
            chunk_size,
            in_chunk: 0,
            hasher: blake3::Hasher::new(),
            digests: Vec::new(),
            total: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        while !data.is_empty() {
            let take = ((self.chunk_size - self.in_chunk) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            self.in_chunk += take as u64;
            data = &data[take..];
            if self.in_chunk == self.chunk_size {
                self.digests.push(*self.hasher.finalize().as_bytes());
                self.hasher.reset();
                self.in_chunk = 0;
            }
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The digests, one per chunk (the last may cover a short chunk).
    pub fn finish(mut self) -> Vec<Digest> {
        if self.in_chunk > 0 {
            self.digests.push(*self.hasher.finalize().as_bytes());
        }
        self.digests
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Attrs {
        Attrs {
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime: (1_700_000_000, 5),
            atime: (1_700_000_001, 0),
        }
    }

    #[test]
    fn streaming_digests_match_whole_buffer() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for pieces in [1usize, 7, 4096, 5000, 20_000] {
            let mut d = ChunkDigester::new(4096);
            for p in data.chunks(pieces) {
                d.update(p);
            }
            assert_eq!(d.len(), 20_000);
            assert_eq!(d.finish(), chunk_digests(&data, 4096), "pieces of {pieces}");
        }
        assert!(ChunkDigester::new(4096).finish().is_empty());
    }

    fn sample() -> Manifest {
        let data = vec![7u8; 5000];
        Manifest {
            chunk_size: 4096,
            entries: vec![
                Entry {
                    path: "".into(),
                    kind: Kind::Dir,
                    attrs: attrs(),
                },
                Entry {
                    path: "d".into(),
                    kind: Kind::Dir,
                    attrs: attrs(),
                },
                Entry {
                    path: "d/f".into(),
                    kind: Kind::File(FileObject {
                        size: 5000,
                        key: "d/f".into(),
                        etag: Some("\"e\"".into()),
                        version: None,
                        digests: chunk_digests(&data, 4096),
                    }),
                    attrs: attrs(),
                },
                Entry {
                    path: "l".into(),
                    kind: Kind::Symlink {
                        target: "d/f".into(),
                    },
                    attrs: attrs(),
                },
                Entry {
                    path: "h".into(),
                    kind: Kind::HardLink { to: "d/f".into() },
                    attrs: attrs(),
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode().expect("encode");
        assert_eq!(Manifest::decode(&bytes), Ok(m));
    }

    #[test]
    fn corruption_and_truncation_are_detected() {
        let bytes = sample().encode().expect("encode");
        let mut bad = bytes.clone();
        let i = bytes.iter().position(|&b| b == b'7').unwrap_or(10);
        bad[i] ^= 1;
        assert!(Manifest::decode(&bad).is_err());
        let cut = &bytes[..bytes.len() / 2];
        assert!(Manifest::decode(cut).is_err());
        assert!(Manifest::decode(b"").is_err());
    }

    #[test]
    fn escaping_paths_are_refused_by_name() {
        for bad in ["../x", "a/../../x", "/abs", "a//b", "a/./b"] {
            let mut m = sample();
            m.entries[1].path = bad.into();
            let e = m.encode().expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(check_path("ok/path").is_ok());
    }

    #[test]
    fn digests_must_cover_the_file() {
        let mut m = sample();
        if let Kind::File(f) = &mut m.entries[2].kind {
            f.digests.pop();
        }
        assert!(m.encode().is_err());
    }

    #[test]
    fn hard_links_must_point_at_files() {
        let mut m = sample();
        m.entries[4].kind = Kind::HardLink { to: "d".into() };
        let bytes = {
            // Encode bypasses the tree check; decode must still refuse.
            m.encode().expect("encode")
        };
        assert!(Manifest::decode(&bytes).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2000)) {
            let _ = Manifest::decode(&data);
        }
    }
}
