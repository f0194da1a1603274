//! Prefetch from bytes the caller already has: a published trace's pack holds the bytes of
//! every entry in trace order, so one streamed request replaces a request per entry
//! (docs/MANIFEST.md, "Trace packs"). The bytes are used only when every chunk they cover
//! matches the manifest's digest for the stub's object: a stale or damaged pack is never
//! written, whatever it claims.

use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use bytes::Bytes;
use hsm_remote::Body;

use crate::agent::{AgentCore, Prefetched, lock};
use crate::error::ServeError;
use crate::metrics::Metrics;

impl AgentCore {
    /// Make `data`, the bytes of `start..start + data.len()` of the object `url` `key`,
    /// resident in the stub open at `fd` (on the agent's own mount): the granules wholly
    /// inside the range that are missing and not already being fetched are claimed (readers
    /// that arrive join them), checked and written, and a file this completes becomes an
    /// ordinary file. [`Prefetched::Unverified`] when nothing can be checked: the stub
    /// has no digests, the range does not start and end on chunk boundaries (or the
    /// object's end), or a chunk does not match. Granules the range covers only in part
    /// are left to [`AgentCore::prefetch`].
    pub async fn prefetch_supplied(
        self: &Arc<Self>,
        fd: BorrowedFd<'_>,
        url: &str,
        key: &str,
        start: u64,
        data: Bytes,
    ) -> Result<Prefetched, ServeError> {
        let stub = match self.prefetch_target(fd, url, key).await? {
            Ok(stub) => stub,
            Err(not) => return Ok(not),
        };
        Metrics::add(&self.metrics.bytes_fetched, data.len() as u64);
        let end = start + data.len() as u64;
        let size = stub.meta.remote_size;
        let Some((list, chunk)) = stub.digests(self).await? else {
            return Ok(Prefetched::Unverified);
        };
        if data.is_empty() || end > size || start % chunk != 0 || (end % chunk != 0 && end != size)
        {
            return Ok(Prefetched::Unverified);
        }
        let first = start / chunk;
        let whole = data
            .chunks(chunk as usize)
            .enumerate()
            .all(|(i, piece)| list.get(first as usize + i) == Some(&hsm_manifest::digest(piece)));
        if !whole {
            return Ok(Prefetched::Unverified);
        }
        let todo: Vec<u64> = {
            let s = lock(&stub.state);
            if s.finalized {
                return Ok(Prefetched::Fetched(0));
            }
            let upto = end.min(s.resident.floor());
            let granules = s.resident.granules_for(start.min(upto)..upto);
            s.resident
                .missing(granules)
                .filter(|&g| {
                    let r = s.resident.fetch_range(g);
                    s.resident.granule_range(g).start >= start
                        && r.end <= end
                        && !s.inflight.contains_key(&g)
                })
                .collect()
        };
        if todo.is_empty() {
            return Ok(Prefetched::Fetched(0));
        }
        // Room in the bounded cache, without waiting (like readahead).
        let Some(pieces) = stub.charge_and_claim(self, &todo) else {
            return Ok(Prefetched::Fetched(0));
        };
        let mut written = 0;
        let mut failed = None;
        for piece in pieces {
            let Range { start: a, end: b } = piece.bytes();
            let body = Body::Bytes(data.slice((a - start) as usize..(b - start) as usize));
            let result = stub.write_part(self, a, body).await;
            match &result {
                Ok(()) => written += b - a,
                Err(e) => failed = Some(e.clone()),
            }
            piece.complete(result);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        self.finalise_if_complete(&stub).await?;
        Ok(Prefetched::Fetched(written))
    }
}
