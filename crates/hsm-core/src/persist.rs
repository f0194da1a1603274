//! Durability of the resident map: per-stub persists, the batching persister (one syncfs
//! per filesystem for big batches), and finalisation once a stub is complete.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Weak};

use hsm_stub::ResidentMap;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::agent::{AgentCore, lock};
use crate::error::{LocalError, ServeError};
use crate::metrics::Metrics;
use crate::stub::{Stub, StubState};
use crate::stubio::{self};

impl AgentCore {
    pub(crate) fn queue_persist(&self, stub: &Arc<Stub>, state: &mut StubState) {
        if !state.queued {
            state.queued = true;
            // The receiver lives as long as the core; a send error means we are dropping.
            let _ = self.persist_tx.send(stub.clone());
        }
    }
}

impl Stub {
    /// Make the resident map durable: fdatasync the data, then write the xattr (and fsync it
    /// when a local write is about to happen). Finalises the stub when complete.
    pub(crate) async fn persist(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        sync_meta: bool,
    ) -> Result<(), ServeError> {
        let _serial = self.persist_lock.lock().await;
        let Some(snapshot) = self.persist_begin(sync_meta) else {
            return Ok(());
        };
        let stub = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            stubio::persist_map(stub.fd.as_fd(), &stub.meta, &snapshot, sync_meta)
                .map(|done| (snapshot, done))
        })
        .await
        .map_err(|e| ServeError::TaskFailed(e.to_string()))?;
        self.persist_end(core, result, sync_meta)
    }

    /// What to persist: a snapshot of the resident map taken before the data is synced (so it
    /// never claims bytes written after the sync), or `None` if nothing changed.
    fn persist_begin(&self, sync_meta: bool) -> Option<ResidentMap> {
        let mut s = lock(&self.state);
        if s.finalized || s.retired || (!s.dirty && (!sync_meta || s.meta_synced)) {
            return None;
        }
        s.dirty = false;
        // Until this persist ends, the xattr on disk is not the fsynced one any more.
        s.meta_synced = false;
        Some(s.resident.clone())
    }

    /// Record the outcome of a persist: the map now durable, or the stub finalised (its map
    /// was complete: the xattrs are gone and it is an ordinary file).
    fn persist_end(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        result: Result<(ResidentMap, bool), LocalError>,
        sync_meta: bool,
    ) -> Result<(), ServeError> {
        let mut s = lock(&self.state);
        match result {
            Ok((snapshot, finalized)) => {
                Metrics::inc(&core.metrics.persists);
                s.durable = snapshot;
                s.meta_synced = sync_meta;
                if finalized {
                    s.finalized = true;
                    drop(s);
                    self.finalized(core);
                }
                Ok(())
            }
            Err(e) => {
                s.forget_unsynced();
                Err(e.into())
            }
        }
    }

    /// The stub became an ordinary file: stop its events and forget it.
    pub(crate) fn finalized(self: &Arc<Self>, core: &Arc<AgentCore>) {
        core.marks.ignore(self.fd.as_fd());
        if core.budget().is_some() {
            // Its reads raise no events from now on; the bounded cache still needs its uses.
            core.marks.watch_opens(self.fd.as_fd());
        }
        {
            let mut stubs = lock(&core.stubs);
            if stubs.get(&self.key).is_some_and(|s| Arc::ptr_eq(s, self)) {
                stubs.remove(&self.key);
            }
        }
        Metrics::inc(&core.metrics.hydrated);
        info!(path = %self.path(), "stub fully resident; now an ordinary file");
    }
}

/// Persists dirty maps in batches: one wake-up per `persist_interval`, however many fills.
pub(crate) async fn persister(core: Weak<AgentCore>, mut rx: mpsc::UnboundedReceiver<Arc<Stub>>) {
    while let Some(first) = rx.recv().await {
        let Some(interval) = core.upgrade().map(|c| c.opts.persist_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let mut batch = vec![first];
        while let Ok(s) = rx.try_recv() {
            if !batch.iter().any(|b| Arc::ptr_eq(b, &s)) {
                batch.push(s);
            }
        }
        let Some(core) = core.upgrade() else { return };
        let _gate = core.persist_gate.lock().await;
        for s in &batch {
            lock(&s.state).queued = false;
        }
        let mut by_fs: HashMap<u64, Vec<Arc<Stub>>> = HashMap::new();
        for s in batch {
            by_fs.entry(s.key.dev).or_default().push(s);
        }
        for (_, group) in by_fs {
            let failed = if group.len() >= SYNCFS_BATCH {
                persist_group(&core, &group).await
            } else {
                let jobs = group.iter().map(|s| {
                    let core = core.clone();
                    async move { s.persist(&core, false).await.err().map(|e| (s.clone(), e)) }
                });
                futures::future::join_all(jobs)
                    .await
                    .into_iter()
                    .flatten()
                    .collect()
            };
            for (s, e) in failed {
                warn!(path = %s.path(), error = %e, "could not persist resident map; will retry");
                let mut st = lock(&s.state);
                core.queue_persist(&s, &mut st);
            }
        }
    }
}

/// From this many dirty stubs on one filesystem, one syncfs (one journal commit) replaces
/// an fdatasync per stub.
const SYNCFS_BATCH: usize = 4;

/// Persist many stubs of one filesystem: snapshot all, one syncfs, then every xattr.
async fn persist_group(core: &Arc<AgentCore>, group: &[Arc<Stub>]) -> Vec<(Arc<Stub>, ServeError)> {
    let mut guards = Vec::with_capacity(group.len());
    for s in group {
        guards.push(s.persist_lock.lock().await);
    }
    let snaps: Vec<(Arc<Stub>, ResidentMap)> = group
        .iter()
        .filter_map(|s| s.persist_begin(false).map(|m| (s.clone(), m)))
        .collect();
    let Some((first, _)) = snaps.first() else {
        return Vec::new();
    };
    let first = first.clone();
    let results = tokio::task::spawn_blocking(move || {
        let synced = hsm_kernel::sys::syncfs(first.fd.as_fd())
            .map_err(|e| LocalError::from_kernel("syncfs", &e));
        snaps
            .into_iter()
            .map(|(s, m)| {
                let r = synced.clone().and_then(|()| {
                    stubio::commit_map(s.fd.as_fd(), &s.meta, &m, false).map(|done| (m, done))
                });
                (s, r)
            })
            .collect::<Vec<_>>()
    })
    .await;
    drop(guards);
    let mut failed = Vec::new();
    match results {
        Ok(results) => {
            for (s, r) in results {
                if let Err(e) = s.persist_end(core, r, false) {
                    failed.push((s, e));
                }
            }
        }
        Err(e) => {
            for s in group {
                lock(&s.state).forget_unsynced();
                failed.push((s.clone(), ServeError::TaskFailed(e.to_string())));
            }
        }
    }
    failed
}
