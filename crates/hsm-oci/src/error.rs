//! The errors of this crate: one variant per cause a caller or a test tells apart.

use std::fmt;
use std::path::PathBuf;

/// Which blob of the image a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobRole {
    /// A nested image index (a multi-platform image).
    Index,
    /// The image manifest.
    Manifest,
    /// The image configuration.
    Config,
    /// Layer N, counted from 1 in the manifest's order (lowest first).
    Layer(usize),
}

impl fmt::Display for BlobRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobRole::Index => f.write_str("image index"),
            BlobRole::Manifest => f.write_str("manifest"),
            BlobRole::Config => f.write_str("config"),
            BlobRole::Layer(n) => write!(f, "layer {n}"),
        }
    }
}

/// Why one entry of a layer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("absolute path: entries must be relative to the image root")]
    Absolute,
    #[error("path escapes the image root through `..`")]
    Escapes,
    #[error("path is not valid UTF-8")]
    NotUtf8,
    #[error("parent {parent:?} is a symlink; extraction never follows symlinks")]
    SymlinkParent { parent: String },
    #[error("parent {parent:?} is not a directory")]
    ParentNotDir { parent: String },
    #[error("hard link to {target:?}, which is outside the image")]
    HardLinkOutside { target: String },
    #[error("hard link to {target:?}, which no earlier entry of the image created")]
    HardLinkMissing { target: String },
    #[error("hard link to directory {target:?}")]
    HardLinkToDir { target: String },
    #[error("whiteout {name:?} names no valid entry")]
    BadWhiteout { name: String },
    #[error("the image root can only be a directory")]
    RootNotDir,
    #[error("unsupported tar entry type {0:?}")]
    UnsupportedType(char),
    #[error("owner {0} does not fit 32 bits")]
    BadOwner(u64),
    #[error("{op}: {errno}")]
    Sys {
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("reading the entry: {0}")]
    Read(String),
}

/// Everything that can go wrong reading an image or building a runtime spec.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0:?} is not an image reference: expected oci:DIR or oci:DIR:TAG")]
    BadReference(String),
    #[error("{dir}: not an OCI image layout: {why}")]
    NotLayout { dir: PathBuf, why: String },
    #[error("{file}: not valid JSON for an {what}: {detail}")]
    BadJson {
        file: String,
        what: &'static str,
        detail: String,
    },
    #[error("{dir}: no image tagged {tag:?} (tags found: {found})")]
    TagNotFound {
        dir: PathBuf,
        tag: String,
        found: String,
    },
    #[error(
        "{dir}: the index holds {count} images; choose one with oci:DIR:TAG (tags found: {found})"
    )]
    Ambiguous {
        dir: PathBuf,
        count: usize,
        found: String,
    },
    #[error("{dir}: the index holds no image manifest")]
    NoImage { dir: PathBuf },
    #[error("{index}: no linux/amd64 image in the index (platforms: {found})")]
    NoPlatform { index: String, found: String },
    #[error("{role} {digest}: unsupported media type {media_type:?}")]
    UnknownMediaType {
        role: BlobRole,
        digest: String,
        media_type: String,
    },
    #[error("{role}: unsupported digest {digest:?} (only sha256:<64 hex digits>)")]
    BadDigest { role: BlobRole, digest: String },
    #[error("{role} {digest}: {path}: {source}")]
    BlobIo {
        role: BlobRole,
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{role} {digest}: {got} bytes where the descriptor says {want}; refused")]
    SizeMismatch {
        role: BlobRole,
        digest: String,
        want: u64,
        got: u64,
    },
    #[error("{role}: content has digest sha256:{got}, not {digest}; refused")]
    DigestMismatch {
        role: BlobRole,
        digest: String,
        got: String,
    },
    #[error("{role} {digest}: larger than {limit} bytes; refused")]
    TooLarge {
        role: BlobRole,
        digest: String,
        limit: u64,
    },
    #[error("layer {layer} ({digest}): entry {entry:?}: {problem}")]
    Entry {
        layer: usize,
        digest: String,
        entry: String,
        problem: EntryProblem,
    },
    #[error("layer {layer} ({digest}): corrupt archive: {detail}")]
    Archive {
        layer: usize,
        digest: String,
        detail: String,
    },
    #[error("staging {path}: {detail}")]
    Staging { path: PathBuf, detail: String },
    #[error("runtime spec: {0}")]
    Spec(String),
    #[error("user {name:?} is not in {file}")]
    UnknownUser { name: String, file: PathBuf },
    #[error("group {name:?} is not in {file}")]
    UnknownGroup { name: String, file: PathBuf },
}
