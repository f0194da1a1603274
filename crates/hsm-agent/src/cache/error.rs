//! Why a lifecycle command left a file alone ([`SkipReason`]) or failed on it
//! ([`CacheError`]), and which served tree a path is in ([`served_tree`], shared with the
//! status walk). Each is typed so that callers (the bounded cache, the summary) match on
//! the cause instead of on text; the text is what the control socket sends.

use std::path::{Path, PathBuf};

use hsm_core::{DenyErrno, LocalError, ServeError};
use hsm_kernel::KernelError;
use hsm_stub::FormatError;

/// Why a file was left alone. Its text is the `reason` of a `skipped` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    #[error("pinned")]
    Pinned,
    /// Repin: no pin covers it.
    #[error("not pinned")]
    NotPinned,
    /// Written or truncated locally: no longer a copy of the remote.
    #[error("modified locally")]
    Modified,
    /// An ordinary file (or one written locally before it was ever a stub).
    #[error("not a copy of a remote object (local file, or written locally)")]
    NotRemote,
    #[error("populate is still building it")]
    Building,
    /// The agent is fetching into it.
    #[error("in use: fills in flight")]
    FillsInFlight,
    /// Another process has it open, mapped or executing (no lease).
    #[error("in use: open, mapped or executing")]
    InUse,
    /// It became whole between the look and the lease, twice.
    #[error("no longer a stub")]
    NoLongerStub,
}

impl serde::Serialize for SkipReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A lifecycle command failed on `path`.
#[derive(Debug, thiserror::Error)]
#[error("{}: {cause}", path.display())]
pub struct CacheError {
    pub path: PathBuf,
    pub cause: Cause,
}

/// What went wrong (the path is in [`CacheError`]).
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("not in a served tree (this agent serves {})", list(trees))]
    NotServed { trees: Vec<PathBuf> },
    #[error("not a regular file or a directory")]
    NotFileOrDir,
    #[error("not a regular file")]
    NotFile,
    #[error("no longer a file")]
    NoLongerFile,
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: KernelError,
    },
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("{what}: {source}")]
    Format {
        what: &'static str,
        #[source]
        source: FormatError,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// The agent's own fill answered with this errno.
    #[error("{}", .0.name())]
    Denied(DenyErrno),
    #[error("worker task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl CacheError {
    pub fn new(path: &Path, cause: impl Into<Cause>) -> Self {
        CacheError {
            path: path.to_path_buf(),
            cause: cause.into(),
        }
    }

    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::new(path, Cause::Io { op, source })
    }

    pub(crate) fn kernel(path: &Path, op: &'static str, source: KernelError) -> Self {
        Self::new(path, Cause::Kernel { op, source })
    }

    pub(crate) fn format(path: &Path, what: &'static str, source: FormatError) -> Self {
        Self::new(path, Cause::Format { what, source })
    }
}

fn list(trees: &[PathBuf]) -> String {
    trees
        .iter()
        .map(|t| t.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The served tree `path` is in (the innermost, if trees nest) and `path` with every
/// symlink resolved. Errors name `path` as the caller gave it.
pub(crate) fn served_tree<'a>(
    trees: &'a [PathBuf],
    path: &Path,
) -> Result<(&'a PathBuf, PathBuf), CacheError> {
    let real =
        std::fs::canonicalize(path).map_err(|e| CacheError::io(path, "resolving the path", e))?;
    let tree = trees
        .iter()
        .filter(|t| real.starts_with(t))
        .max_by_key(|t| t.as_os_str().len())
        .ok_or_else(|| {
            CacheError::new(
                path,
                Cause::NotServed {
                    trees: trees.to_vec(),
                },
            )
        })?;
    Ok((tree, real))
}
