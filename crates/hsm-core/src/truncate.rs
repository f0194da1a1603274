//! The truncate barrier: keep fills away from the bytes an allowed truncate removes until
//! it is seen done.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_kernel::stat::{self};
use tracing::warn;

use crate::agent::{AgentCore, lock};
use crate::api::Access;
use crate::metrics::Metrics;
use crate::stub::Stub;

impl Stub {
    /// A truncate to `length` is about to be allowed. Wait for writes in progress, then keep
    /// fills away from `length..` until the truncate is seen done.
    pub(crate) async fn install_barrier(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        length: u64,
        tid: Option<i32>,
    ) {
        if length >= lock(&self.state).resident.floor() {
            return; // growing, or within bytes that are already local
        }
        Metrics::inc(&core.metrics.truncates);
        {
            let _quiet = self.gate.write().await;
            self.barrier.send_modify(|b| {
                *b = Some(b.map_or(length, |old| old.min(length)));
            });
        }
        let stub = self.clone();
        let core = core.clone();
        tokio::spawn(async move {
            stub.resolve_truncate(&core, length, tid).await;
        });
    }

    /// Watch for the allowed truncate to happen (or to fail), then lift the barrier.
    pub(crate) async fn resolve_truncate(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        length: u64,
        tid: Option<i32>,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut confirmed = None;
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let size = stat::fstatx(self.fd.as_fd()).map(|s| s.size).ok();
            if let Some(size) = size.filter(|&s| s <= length) {
                confirmed = Some(size);
                break;
            }
            let still_truncating = tid.is_some_and(|t| match core.intent.classify_now(t) {
                None => true, // running: not done yet
                Some(a) => matches!(a, Access::Truncate { length: l } if l == length),
            });
            if !still_truncating {
                // The syscall is over: one last look decides.
                confirmed = stat::fstatx(self.fd.as_fd())
                    .ok()
                    .map(|s| s.size)
                    .filter(|&s| s <= length);
                break;
            }
            if Instant::now() > deadline {
                warn!(path = %self.path(), length, "truncate not seen completing after 10 s; lifting the fill barrier");
                break;
            }
        }
        {
            let mut s = lock(&self.state);
            if let Some(size) = confirmed {
                if s.lower_floor(size) {
                    core.queue_persist(self, &mut s);
                }
            }
        }
        self.barrier.send_modify(|b| {
            if *b == Some(length) {
                *b = None;
            }
        });
    }
}
