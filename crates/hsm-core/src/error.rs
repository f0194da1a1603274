//! Why serving an access failed, and the one place that turns that into an errno.

use hsm_kernel::fanotify::DenyErrno;
use hsm_remote::RemoteError;
use hsm_stub::FormatError;

/// A local I/O failure, classified where it happens so the cause stays matchable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LocalError {
    #[error("{op}: no space left on device")]
    NoSpace { op: &'static str },
    #[error("{op}: disk quota exceeded")]
    QuotaExceeded { op: &'static str },
    #[error("{op}: {message}")]
    Other { op: &'static str, message: String },
}

impl LocalError {
    /// Classify an I/O error from operation `op`.
    pub fn from_io(op: &'static str, e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) => LocalError::NoSpace { op },
            Some(libc::EDQUOT) => LocalError::QuotaExceeded { op },
            _ => LocalError::Other {
                op,
                message: e.to_string(),
            },
        }
    }

    pub fn from_errno(op: &'static str, e: nix::errno::Errno) -> Self {
        Self::from_io(op, &std::io::Error::from_raw_os_error(e as i32))
    }

    pub fn from_kernel(op: &'static str, e: &hsm_kernel::KernelError) -> Self {
        match e.errno() {
            Some(n) => Self::from_io(op, &std::io::Error::from_raw_os_error(n)),
            None => LocalError::Other {
                op,
                message: e.to_string(),
            },
        }
    }
}

/// Why a stub could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// Reading from the remote failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// Writing or syncing the local file failed.
    #[error(transparent)]
    Local(#[from] LocalError),
    /// The stub's xattrs are missing or do not decode.
    #[error("stub metadata: {0}")]
    Metadata(#[from] FormatError),
    /// A marker without metadata (or similar): the stub is inconsistent.
    #[error("inconsistent stub: {0}")]
    Inconsistent(String),
    /// The agent is stopping and did not start this fetch.
    #[error("agent is shutting down")]
    ShuttingDown,
    /// A fill task died without reporting (a bug; never expected).
    #[error("fill task failed: {0}")]
    TaskFailed(String),
}

/// The errno a reader sees for `e`. Every cause is matched explicitly so that a new error
/// variant cannot silently fall into a default; see docs/SEMANTICS.md for the table.
pub fn deny_errno(e: &ServeError) -> DenyErrno {
    match e {
        ServeError::Remote(r) => match r {
            RemoteError::NotFound { .. } => DenyErrno::Eio,
            RemoteError::Changed { .. } => DenyErrno::Eio,
            RemoteError::PermissionDenied { .. } => DenyErrno::Eio,
            RemoteError::Truncated { .. } => DenyErrno::Eio,
            RemoteError::InvalidKey { .. } => DenyErrno::Eio,
            RemoteError::Failed { .. } => DenyErrno::Eio,
            RemoteError::Config { .. } => DenyErrno::Eio,
        },
        ServeError::Local(l) => match l {
            LocalError::NoSpace { .. } => DenyErrno::Enospc,
            LocalError::QuotaExceeded { .. } => DenyErrno::Edquot,
            LocalError::Other { .. } => DenyErrno::Eio,
        },
        ServeError::Metadata(_) => DenyErrno::Eio,
        ServeError::Inconsistent(_) => DenyErrno::Eio,
        ServeError::ShuttingDown => DenyErrno::Eio,
        ServeError::TaskFailed(_) => DenyErrno::Eio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_enospc_and_remote_is_eio() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            deny_errno(&LocalError::from_io("pwrite", &e).into()),
            DenyErrno::Enospc
        );
        let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(
            deny_errno(&LocalError::from_io("pwrite", &e).into()),
            DenyErrno::Edquot
        );
        let changed = RemoteError::Changed {
            url: "file:///x".into(),
            key: "k".into(),
            detail: "etag".into(),
        };
        assert_eq!(deny_errno(&changed.into()), DenyErrno::Eio);
    }
}
