//! The cache lifecycle commands the control socket runs: hydrate, evict, pin and unpin
//! paths inside the served trees. Each walks the paths it is given (never following
//! symlinks, never leaving the tree's filesystem) and reports one [`FileOutcome`] per
//! regular file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

/// A lifecycle command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Hydrate,
    Evict,
    Pin,
    Unpin,
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum FileOutcome {
    /// Hydrate/pin: every byte is now local (`fetched` of them fetched by this command).
    Hydrated { fetched: u64 },
    /// Evict: the file is a stub again and `freed` bytes of data were given back.
    Evicted { freed: u64 },
    /// Evict: nothing was resident.
    AlreadyStub,
    /// Unpin: the pin was removed (also reported for a file that had none).
    Unpinned,
    /// Left alone, and why ("pinned", "modified locally", "in use: open, mapped or
    /// executing", "not from a remote", ...).
    Skipped { reason: String },
    /// The operation failed on this file.
    Failed { error: String },
}

/// Where the commands act: what `serve` builds at start-up.
#[derive(Debug)]
pub struct CacheOps {
    #[allow(dead_code)] // until the commands land
    pub(crate) trees: Vec<PathBuf>,
}

impl CacheOps {
    /// Run `op` on every regular file under `paths`, calling `each` once per file as it is
    /// done (for progress). Paths outside every served tree fail with a message naming
    /// them, as [`FileOutcome::Failed`] for the path itself.
    pub async fn run(
        self: &Arc<Self>,
        op: Op,
        paths: Vec<PathBuf>,
        each: &mut (dyn FnMut(&Path, FileOutcome) + Send),
    ) {
        for p in paths {
            each(
                &p,
                FileOutcome::Failed {
                    error: format!("{op:?}: not implemented yet"),
                },
            );
        }
    }
}
