//! Recording an access trace (`hsm agent --record-trace FILE`): each granule of each stub
//! the first time a reader touches it, in that order, as hsm-manifest's trace format.
//! Recorded from the stub's metadata (its remote URL and object key), never from a path, so
//! a trace is the same however the files were reached (directly, through overlayfs, a bind
//! mount or another mount namespace). Readahead is not recorded: only what readers asked.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hsm_manifest::trace::{TraceEntry, header_line};
use tracing::warn;

use crate::agent::lock;
use crate::stub::Stub;

/// Writes one trace file while the agent runs.
#[derive(Debug)]
pub struct TraceRecorder {
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    out: BufWriter<File>,
    /// Granules already recorded, per object (remote URL, key): one bit each. Per object
    /// rather than per stub, so two stubs of one object (a copied tree) count once.
    seen: HashMap<(String, String), Vec<u64>>,
    /// The last entry, held back while the next touch may extend it.
    pending: Option<TraceEntry>,
    entries: u64,
    failed: bool,
}

impl TraceRecorder {
    /// Create (or empty) `path`, mode 0600, and write the header. A symbolic link there is
    /// refused (`ELOOP`), not followed: the agent runs as root, and a link another user
    /// left in /tmp must not make it empty a file the link points to.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let mut out = BufWriter::new(file);
        out.write_all(header_line().as_bytes())?;
        out.flush()?;
        Ok(TraceRecorder {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                out,
                seen: HashMap::new(),
                pending: None,
                entries: 0,
                failed: false,
            }),
        })
    }

    /// A reader touched `range` of `stub`: record the granules it had not touched before.
    pub(crate) fn touch(&self, stub: &Stub, range: &Range<u64>) {
        let size = stub.meta.remote_size;
        let end = range.end.min(size);
        if range.start >= end {
            return;
        }
        let (granules, shift) = {
            let s = lock(&stub.state);
            (
                s.resident.granules_for(range.start..end),
                s.resident.granule_shift(),
            )
        };
        let mut inner = lock(&self.inner);
        let words = inner
            .seen
            .entry((stub.meta.remote_url.clone(), stub.meta.key.clone()))
            .or_default();
        let mut runs: Vec<Range<u64>> = Vec::new();
        for g in granules {
            let (w, bit) = ((g / 64) as usize, 1u64 << (g % 64));
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            if words[w] & bit != 0 {
                continue;
            }
            words[w] |= bit;
            match runs.last_mut() {
                Some(r) if r.end == g => r.end += 1,
                _ => runs.push(g..g + 1),
            }
        }
        for r in runs {
            let entry = TraceEntry {
                url: Some(stub.meta.remote_url.clone()),
                key: stub.meta.key.clone(),
                start: r.start << shift,
                end: (r.end << shift).min(size),
            };
            inner.add(entry, &self.path);
        }
    }

    /// Write what is held back and flush (at stop, and by the agent now and then).
    pub fn flush(&self) {
        let mut inner = lock(&self.inner);
        if let Some(e) = inner.pending.take() {
            inner.write(&e, &self.path);
        }
        if let Err(e) = inner.out.flush() {
            inner.fail(&self.path, e);
        }
    }

    /// Entries recorded so far (the one held back included).
    pub fn entries(&self) -> u64 {
        let inner = lock(&self.inner);
        inner.entries + u64::from(inner.pending.is_some())
    }
}

impl Inner {
    fn add(&mut self, e: TraceEntry, path: &Path) {
        if let Some(p) = &mut self.pending {
            if p.key == e.key && p.url == e.url && p.end == e.start {
                p.end = e.end;
                return;
            }
        }
        if let Some(p) = self.pending.replace(e) {
            self.write(&p, path);
            // Whole lines reach the file at once: a killed agent leaves a usable trace.
            if let Err(err) = self.out.flush() {
                self.fail(path, err);
            }
        }
    }

    fn write(&mut self, e: &TraceEntry, path: &Path) {
        if self.failed {
            return;
        }
        match self.out.write_all(e.line().as_bytes()) {
            Ok(()) => self.entries += 1,
            Err(err) => self.fail(path, err),
        }
    }

    fn fail(&mut self, path: &Path, e: io::Error) {
        if !self.failed {
            self.failed = true;
            warn!(path = %path.display(), error = %e, "writing the access trace failed; recording stopped");
        }
    }
}
