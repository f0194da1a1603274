//! Readahead streams: one request per sequential reader of a network store.
//!
//! A store that charges per request (or, like moto, by the object's size per request)
//! makes a read of many ranged requests slow however large they are. So readahead from a
//! network store opens one request from where the reader is to the object's end and
//! consumes its body only as far as the readahead window goes: the window's granules are
//! queued as *pieces* of at most `max_request_size`, each in flight (readers join it) until
//! its bytes have arrived, been checked against the manifest's digests and been written.
//! An unread body holds the connection back (TCP flow control), so nothing beyond the
//! window is buffered. The stream ends after [`STREAM_IDLE`] without pieces; a stream that
//! breaks (an error, a short body, a chunk that does not come within [`stall`]) hands its
//! pieces to ranged requests, so a reader who joined one never sees the stream's error
//! unless the ranged request fails too.

use std::ops::Range;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use hsm_remote::{Body, ByteStream, RemoteError};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tracing::debug;

use crate::agent::{AgentCore, lock};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::stub::{FillResult, Stub, StubState};

/// A stream with no piece to fill for this long ends, and its connection is dropped.
const STREAM_IDLE: Duration = Duration::from_secs(2);

/// A chunk of the body taking longer than this breaks the stream (its pieces go to ranged
/// requests, which have the read timeout's own bounds).
const STREAM_STALL: Duration = Duration::from_secs(5);

/// Pieces of one stream being written at once, while its body goes on arriving.
const WRITES_AHEAD: usize = 2;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The stall bound: [`STREAM_STALL`], or less when the read timeout leaves less room
/// (the ranged requests the pieces then go to need time of their own).
fn stall(core: &AgentCore) -> Duration {
    let limit = core.opts.read_timeout;
    if limit.is_zero() {
        STREAM_STALL
    } else {
        STREAM_STALL.min(limit / 4)
    }
}

/// The running stream of a stub, as its state holds it: where the queued pieces end, and
/// how to queue more.
#[derive(Debug)]
pub(crate) struct StreamTx {
    id: u64,
    tx: mpsc::UnboundedSender<Piece>,
    /// End (in bytes) of the last piece queued.
    next: u64,
}

/// Granules a stream owes: in flight until their bytes are written, then resident.
/// Completed exactly once, by [`Piece::complete`] or, if the task running it died, by
/// `Drop` with an error (the granules are then free to be fetched again).
#[derive(Debug)]
pub(crate) struct Piece {
    run: Range<u64>,
    /// The bytes to write: the run's first granule's start to its last's fetch end.
    bytes: Range<u64>,
    stub: Weak<Stub>,
    core: Weak<AgentCore>,
    tx: Option<oneshot::Sender<FillResult>>,
}

impl Piece {
    pub(crate) fn complete(mut self, result: Result<(), ServeError>) {
        self.finish(result);
    }

    /// The bytes to write.
    pub(crate) fn bytes(&self) -> Range<u64> {
        self.bytes.clone()
    }

    fn finish(&mut self, result: Result<(), ServeError>) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let result = result.map_err(Arc::new);
        if let (Some(stub), Some(core)) = (self.stub.upgrade(), self.core.upgrade()) {
            {
                let mut s = lock(&stub.state);
                s.clear_inflight(self.run.clone());
                match &result {
                    Ok(()) => stub.mark_filled(&core, &mut s, self.run.clone()),
                    Err(e) => {
                        Metrics::inc(&core.metrics.fill_errors);
                        if let Some(b) = core.budget() {
                            b.refund(stub.key, s.run_bytes(&self.run));
                        }
                        debug!(path = %stub.path(), error = %e, "readahead failed");
                    }
                }
            }
            if core.fills_running.fetch_sub(1, Ordering::SeqCst) == 1 {
                core.fills_done.notify_waiters();
            }
        }
        let _ = tx.send(result);
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        self.finish(Err(ServeError::TaskFailed("readahead stream ended".into())));
    }
}

impl Stub {
    /// Queue readahead of the missing granules `todo` (sorted) on this stub's stream,
    /// opening one if it has none or the pieces are not just ahead of it. Returns false,
    /// having done nothing, when a new stream is needed and every stream slot is taken
    /// (the caller then uses ranged requests).
    pub(crate) fn stream_ahead(self: &Arc<Self>, core: &Arc<AgentCore>, todo: &[u64]) -> bool {
        let Some(&first) = todo.first() else {
            return true;
        };
        let gap = core.opts.max_request_size;
        // A slot for a new stream, taken before anything is charged or claimed.
        let mut permit: Option<OwnedSemaphorePermit> = None;
        {
            let s = lock(&self.state);
            let start = s.resident.granule_range(first).start;
            if !joins(&s, start, gap) {
                match core.stream_slots.clone().try_acquire_owned() {
                    Ok(p) => permit = Some(p),
                    Err(_) => return false,
                }
            }
        }
        // Readahead never waits for room.
        let Some(pieces) = self.charge_and_claim(core, todo) else {
            return true;
        };
        // Pieces that could not be queued fail (freeing their granules) once the lock is
        // released: completing one takes it.
        let unqueued = self.queue_pieces(core, &mut lock(&self.state), pieces, permit);
        drop(unqueued);
        true
    }

    /// Claim the granules of `todo` (sorted) that are missing and not in flight as pieces
    /// (readers that arrive join them), charged to the bounded cache without waiting:
    /// `None`, having claimed nothing, when there is no room or nothing to claim. What
    /// was charged is squared with what was claimed (a claim may take more or fewer bytes
    /// than the charge, if a fill ended or started in between).
    pub(crate) fn charge_and_claim(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        todo: &[u64],
    ) -> Option<Vec<Piece>> {
        let budget = core.budget().cloned();
        let mut charged = 0;
        if let Some(b) = &budget {
            let bytes: u64 = {
                let s = lock(&self.state);
                todo.iter()
                    .filter(|g| !s.resident.is_resident(**g) && !s.inflight.contains_key(*g))
                    .map(|&g| s.run_bytes(&(g..g + 1)))
                    .sum()
            };
            if bytes == 0 || !b.try_charge(self.fd.as_fd(), self.key, bytes) {
                return None;
            }
            charged = bytes;
        }
        let pieces = self.claim_pieces(core, &mut lock(&self.state), todo);
        let claimed: u64 = pieces.iter().map(|p| p.bytes.end - p.bytes.start).sum();
        if let Some(b) = &budget {
            if charged > claimed {
                b.refund(self.key, charged - claimed);
            } else if claimed > charged {
                b.add(self.fd.as_fd(), self.key, claimed - charged);
            }
        }
        Some(pieces)
    }

    /// Queue `pieces` on the stub's stream, opening a new one (with `permit`, or a slot
    /// taken now) if there is none or they cannot join it. Returns what could not be
    /// queued.
    fn queue_pieces(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        s: &mut StubState,
        pieces: Vec<Piece>,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Vec<Piece> {
        let Some(head) = pieces.first() else {
            return pieces;
        };
        let gap = core.opts.max_request_size;
        let start = head.bytes.start;
        let end = pieces.last().map_or(start, |p| p.bytes.end);
        let stream = match s.stream.as_mut() {
            Some(t) if joins_stream(t, start, gap) => t,
            _ => {
                // Either no stream, or one this batch cannot join: a new one (the old
                // one's sender goes, so it ends once its queue is done).
                let permit = match permit {
                    Some(p) => p,
                    None => match core.stream_slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        // Lost a race for the last slot: a reader fetches these granules
                        // when it gets there.
                        Err(_) => return pieces,
                    },
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                Metrics::inc(&core.metrics.readahead_streams);
                let stub = Arc::downgrade(self);
                let core2 = core.clone();
                core.rt.spawn(async move {
                    Stub::run_stream(stub, &core2, id, rx, permit).await;
                });
                s.stream.insert(StreamTx {
                    id,
                    tx,
                    next: start,
                })
            }
        };
        stream.next = end;
        // The receiver lives until its task has taken the stream out of the state (under
        // this lock), so sends fail only if that task died.
        pieces
            .into_iter()
            .filter_map(|p| stream.tx.send(p).err().map(|e| e.0))
            .collect()
    }

    /// A read at offset 0 needs granules `missing`: when readahead would follow it (a
    /// network store, readahead on, more of the file after them, the reader not yet seen),
    /// queue them on a new stream instead of fetching them with a ranged request. The
    /// caller's fill then joins them.
    pub(crate) fn stream_from_start(self: &Arc<Self>, core: &Arc<AgentCore>, missing: &[u64]) {
        if core.opts.readahead == 0 || self.remote.runs_inline() {
            return;
        }
        let Some(&last) = missing.last() else {
            return;
        };
        {
            let s = lock(&self.state);
            let fresh = s.seq_next == 0 && s.stream.is_none();
            if !fresh || s.resident.fetch_range(last).end >= s.resident.floor() {
                return;
            }
        }
        self.stream_ahead(core, missing);
    }

    /// Claim the missing granules of `todo` as pieces of at most `max_request_size`,
    /// each in flight with a fill readers can join.
    fn claim_pieces(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        s: &mut StubState,
        todo: &[u64],
    ) -> Vec<Piece> {
        let per_piece = (core.opts.max_request_size >> s.resident.granule_shift()).max(1);
        let mut runs: Vec<Range<u64>> = Vec::new();
        for &g in todo {
            if s.resident.is_resident(g) || s.inflight.contains_key(&g) {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.end == g && r.end - r.start < per_piece => r.end += 1,
                _ => runs.push(g..g + 1),
            }
        }
        runs.into_iter()
            .filter_map(|run| {
                let bytes = s.resident.granule_range(run.start).start
                    ..s.resident.fetch_range(run.end - 1).end;
                if bytes.is_empty() {
                    return None;
                }
                let (tx, fill) = crate::stub::completed_by_sender("readahead stream ended");
                for g in run.clone() {
                    s.inflight.insert(g, fill.clone());
                }
                Metrics::inc(&core.metrics.fills);
                Metrics::inc(&core.metrics.readahead_fills);
                core.fills_running.fetch_add(1, Ordering::SeqCst);
                Some(Piece {
                    run,
                    bytes,
                    stub: Arc::downgrade(self),
                    core: Arc::downgrade(core),
                    tx: Some(tx),
                })
            })
            .collect()
    }

    /// The stream's task: fill its pieces in order from one request, until it idles, is
    /// replaced, or breaks. It holds the stub only while it has a piece: an idle stream
    /// keeps no stub from eviction.
    async fn run_stream(
        weak: Weak<Stub>,
        core: &Arc<AgentCore>,
        id: u64,
        mut rx: mpsc::UnboundedReceiver<Piece>,
        _permit: OwnedSemaphorePermit,
    ) {
        let mut reader = StreamReader::default();
        let writes = Arc::new(tokio::sync::Semaphore::new(WRITES_AHEAD));
        loop {
            let piece = match tokio::time::timeout(STREAM_IDLE, rx.recv()).await {
                Ok(Some(p)) => p,
                // Replaced by a newer stream, and the queue is done.
                Ok(None) => return,
                Err(_) => {
                    // Idle: leave the state under its lock, unless a piece arrived.
                    let Some(this) = weak.upgrade() else {
                        return;
                    };
                    let mut s = lock(&this.state);
                    match rx.try_recv() {
                        Ok(p) => p,
                        Err(_) => {
                            detach(&mut s, id);
                            return;
                        }
                    }
                }
            };
            // Gone (evicted from the cache, its file closed): the piece fails quietly.
            let Some(this) = weak.upgrade() else {
                return;
            };
            match this.stream_piece(core, &mut reader, &piece).await {
                Ok(data) => {
                    // Written while the body goes on arriving; at most WRITES_AHEAD at
                    // once (each holds a piece in memory).
                    let Ok(permit) = writes.clone().acquire_owned().await else {
                        unreachable!("never closed");
                    };
                    let (stub, core2) = (this.clone(), core.clone());
                    tokio::spawn(async move {
                        let at = piece.bytes.start;
                        let result = stub.write_part(&core2, at, Body::Bytes(data)).await;
                        piece.complete(result);
                        drop(permit);
                    });
                    if reader.off >= this.meta.remote_size {
                        // The body is all read: nothing more can join this stream.
                        this.detach(id);
                        // What was queued meanwhile (nothing should be) is filled by
                        // ranged requests.
                        rx.close();
                        let mut left = Vec::new();
                        while let Some(p) = rx.recv().await {
                            left.push(p);
                        }
                        this.fill_ranged(core, left).await;
                        return;
                    }
                }
                Err(e) => {
                    Metrics::inc(&core.metrics.stream_fallbacks);
                    debug!(path = %this.path(), error = %e, "readahead stream broke; its pieces go to ranged requests");
                    drop(reader);
                    this.detach(id);
                    // No piece arrives any more (the sender is gone): fill what is queued.
                    let mut left = vec![piece];
                    while let Some(p) = rx.recv().await {
                        left.push(p);
                    }
                    this.fill_ranged(core, left).await;
                    return;
                }
            }
        }
    }

    /// Fill `pieces` with ranged requests (all at once; fetch slots bound them).
    async fn fill_ranged(self: &Arc<Self>, core: &Arc<AgentCore>, pieces: Vec<Piece>) {
        futures::future::join_all(pieces.into_iter().map(|p| async move {
            let result = self
                .run_fill(core, p.run.clone(), core.opts.max_request_size)
                .await;
            p.complete(result);
        }))
        .await;
    }

    /// Take stream `id` out of the state, if it is still there: no piece can be queued on
    /// it after this (its sender is gone).
    fn detach(&self, id: u64) {
        detach(&mut lock(&self.state), id);
    }

    /// Read the stream up to `piece`'s end (opening it at the piece if it is not open),
    /// check what arrived, and return the piece's bytes.
    async fn stream_piece(
        self: &Arc<Self>,
        core: &Arc<AgentCore>,
        r: &mut StreamReader,
        piece: &Piece,
    ) -> Result<bytes::Bytes, ServeError> {
        if r.body.is_none() {
            let digests = self.digests(core).await?;
            let chunk = digests.as_ref().map(|(_, c)| *c);
            // Verification needs whole chunks: start at one.
            let start = chunk.map_or(piece.bytes.start, |c| piece.bytes.start / c * c);
            Metrics::inc(&core.metrics.remote_requests);
            let body = tokio::time::timeout(
                stall(core),
                self.remote
                    .get_stream(&self.meta.key, start..self.meta.remote_size, &self.expect),
            )
            .await
            .map_err(|_| self.stalled(core))??;
            *r = StreamReader {
                body: Some(body),
                off: start,
                buf: BytesMut::new(),
                checked: start,
                digests,
            };
        }
        if piece.bytes.start < r.off {
            return Err(ServeError::TaskFailed(format!(
                "readahead stream is at {} and cannot go back to {}",
                r.off, piece.bytes.start
            )));
        }
        let Some(body) = r.body.as_mut() else {
            unreachable!("opened above");
        };
        while r.checked < piece.bytes.end {
            let chunk = match tokio::time::timeout(stall(core), body.next()).await {
                Err(_) => return Err(self.stalled(core)),
                Ok(None) => {
                    return Err(RemoteError::Truncated {
                        url: self.remote.url().to_string(),
                        key: self.meta.key.clone(),
                        offset: r.off,
                        expected: self.meta.remote_size - r.off,
                        got: r.buf.len() as u64,
                    }
                    .into());
                }
                Ok(Some(chunk)) => chunk?,
            };
            if let Some(bw) = &core.bandwidth {
                bw.acquire(chunk.len() as u64).await;
            }
            Metrics::add(&core.metrics.bytes_fetched, chunk.len() as u64);
            r.buf.extend_from_slice(&chunk);
            let end = r.off + r.buf.len() as u64;
            match &r.digests {
                None => r.checked = end,
                Some((list, c)) => {
                    // Check each chunk the buffer now holds whole (the object's last one
                    // may be short).
                    while r.checked < end {
                        let chunk_end = (r.checked + c).min(self.meta.remote_size);
                        if chunk_end > end {
                            break;
                        }
                        let at = (r.checked - r.off) as usize;
                        let len = (chunk_end - r.checked) as usize;
                        self.verify(&r.buf[at..at + len], r.checked, list, *c)?;
                        r.checked = chunk_end;
                    }
                }
            }
            // Checked bytes before the piece are not needed (another fill has them).
            let drop_to = piece.bytes.start.min(r.checked);
            if drop_to > r.off {
                r.buf.advance((drop_to - r.off) as usize);
                r.off = drop_to;
            }
        }
        if piece.bytes.start > r.off {
            r.buf.advance((piece.bytes.start - r.off) as usize);
            r.off = piece.bytes.start;
        }
        let data = r
            .buf
            .split_to((piece.bytes.end - piece.bytes.start) as usize)
            .freeze();
        r.off = piece.bytes.end;
        Ok(data)
    }

    fn stalled(&self, core: &AgentCore) -> ServeError {
        RemoteError::Timeout {
            url: self.remote.url().to_string(),
            key: self.meta.key.clone(),
            after_ms: stall(core).as_millis() as u64,
        }
        .into()
    }
}

fn detach(s: &mut StubState, id: u64) {
    if s.stream.as_ref().is_some_and(|t| t.id == id) {
        s.stream = None;
    }
}

/// Can a batch of pieces starting at byte `start` join the stub's stream?
fn joins(s: &StubState, start: u64, gap: u64) -> bool {
    s.stream
        .as_ref()
        .is_some_and(|t| joins_stream(t, start, gap))
}

/// Only just ahead of what is queued: the stream reads (and drops) what lies between,
/// so a batch further ahead, or behind, gets a stream of its own.
fn joins_stream(t: &StreamTx, start: u64, gap: u64) -> bool {
    !t.tx.is_closed() && start >= t.next && start - t.next <= gap
}

/// Where a stream's body is: bytes `off..off + buf.len()` received and held, those below
/// `checked` verified against the digests (all of them, without digests).
#[derive(Default)]
struct StreamReader {
    body: Option<ByteStream>,
    off: u64,
    buf: BytesMut,
    checked: u64,
    digests: Option<(Arc<Vec<hsm_manifest::Digest>>, u64)>,
}
