//! The kernel interface of hsm: every syscall the project makes that `nix` does not wrap
//! safely lives here, behind small typed wrappers.
//!
//! - [`beneath`]: opening paths below a root descriptor without following symlinks.
//! - [`fanotify`]: pre-content groups, marks, event parsing and responses.
//! - [`xattr`]: extended attributes on descriptors (the stub marker and metadata).
//! - [`stat`]: `statx` on descriptors and directory entries.
//! - [`intent`]: what the blocked thread is doing, read from `/proc/TID/syscall`.
//! - [`markers`]: data-marker pages, shared between stubs (`FICLONERANGE`) where possible.
//! - [`mounts`]: the agent's private writable mount of a tree; mount visibility.
//! - [`sys`]: the remaining odds and ends (`syncfs`, `sync_file_range`, limits).
//!
//! Kernel constants that `libc` lacks are defined once, in [`fanotify`], with their source.

// This crate is the project's boundary with the kernel: unsafe is allowed here and nowhere
// else in the workspace (bar the mmap test tool). Every block carries a SAFETY comment.
#![allow(unsafe_code)]

pub mod beneath;
pub mod fanotify;
pub mod fdio;
pub mod intent;
pub mod markers;
pub mod mounts;
pub mod stat;
pub mod sys;
pub mod xattr;

use std::io;

/// An error from a syscall, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The syscall failed; `op` names it and its target.
    #[error("{op}: {source}")]
    Sys {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel handed us bytes we cannot parse (never expected; reported, not trusted).
    #[error("malformed fanotify event buffer: {0}")]
    Malformed(&'static str),
}

impl KernelError {
    pub(crate) fn last(op: impl Into<String>) -> Self {
        KernelError::Sys {
            op: op.into(),
            source: io::Error::last_os_error(),
        }
    }

    pub(crate) fn from_errno(op: impl Into<String>, errno: nix::errno::Errno) -> Self {
        KernelError::Sys {
            op: op.into(),
            source: io::Error::from_raw_os_error(errno as i32),
        }
    }

    /// The errno behind this error, if it came from a syscall.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KernelError::Sys { source, .. } => source.raw_os_error(),
            KernelError::Malformed(_) => None,
        }
    }
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;
