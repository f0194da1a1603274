//! Every event answered exactly once.
//!
//! The kernel matches a response to its event by fd number only, and an event whose group
//! goes away is answered ALLOW (the reader then sees zeros). So each event lives in an
//! [`EventSlot`] registered until answered: the normal path answers it once, a panicking
//! task answers it EIO from `Drop`, and shutdown can deny whatever is still pending. The fd
//! is closed only after its response is written.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hsm_kernel::fanotify::{DenyErrno, FileRange, Group, Response};
use tracing::{error, warn};

use crate::journal::Journal;

/// One event awaiting its answer.
#[derive(Debug)]
pub struct EventSlot {
    fd: OwnedFd,
    answered: AtomicBool,
}

impl EventSlot {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The events in flight.
#[derive(Debug)]
pub struct Pending {
    group: Arc<Group>,
    slots: Mutex<HashMap<RawFd, Arc<EventSlot>>>,
    /// With a keeper, every event is journaled from read to answer (docs/SEMANTICS.md).
    journal: Option<Arc<Journal>>,
    journal_failed: AtomicBool,
    /// Events answered with a deny, per errno (in [`DENY_ERRNOS`] order): every deny the
    /// agent writes, also those of a shutdown or a failed task, which the core's `denies`
    /// counter does not see. For `hsm status`.
    denied: [AtomicU64; DENY_ERRNOS.len()],
}

/// The errnos a deny can carry, in the order [`Pending::denied`] reports them.
pub const DENY_ERRNOS: [DenyErrno; 7] = [
    DenyErrno::Eio,
    DenyErrno::Eperm,
    DenyErrno::Ebusy,
    DenyErrno::Etxtbsy,
    DenyErrno::Eagain,
    DenyErrno::Enospc,
    DenyErrno::Edquot,
];

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pending {
    pub fn new(group: Arc<Group>, journal: Option<Arc<Journal>>) -> Self {
        Pending {
            group,
            slots: Mutex::new(HashMap::new()),
            journal,
            journal_failed: AtomicBool::new(false),
            denied: Default::default(),
        }
    }

    /// Register an event (journaling it first, with a keeper); the returned guard answers
    /// it EIO if dropped unanswered.
    pub fn register(
        self: &Arc<Self>,
        fd: OwnedFd,
        tid: i32,
        range: Option<FileRange>,
    ) -> EventGuard {
        if let Some(j) = &self.journal {
            let handle = hsm_kernel::fdio::handle_of(fd.as_fd()).ok();
            let written = j.begin(
                fd.as_raw_fd(),
                tid,
                range,
                handle.as_ref().map(|(h, m)| (h, *m)),
            );
            if let Err(e) = written {
                if !self.journal_failed.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot journal events: a restart after a crash would answer them EIO");
                }
            }
        }
        let slot = Arc::new(EventSlot {
            fd,
            answered: AtomicBool::new(false),
        });
        lock(&self.slots).insert(slot.fd.as_raw_fd(), slot.clone());
        EventGuard {
            pending: self.clone(),
            slot: Some(slot),
        }
    }

    /// Answer `slot` unless someone already did. Returns whether this call answered it.
    fn answer(&self, slot: &EventSlot, response: Response) -> bool {
        if slot.answered.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Response::Deny(errno) = response {
            if let Some(i) = DENY_ERRNOS.iter().position(|&e| e == errno) {
                self.denied[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(e) = self.group.respond(slot.fd.as_fd(), response) {
            error!(fd = slot.fd.as_raw_fd(), error = %e, "could not answer a fanotify event");
        }
        // Before the fd can close: a stale slot must never outlive its number's event.
        if let Some(j) = &self.journal {
            j.end(slot.fd.as_raw_fd());
        }
        true
    }

    /// Deny every event still waiting (shutdown after the timeout). Returns how many.
    pub fn deny_all(&self, errno: DenyErrno) -> usize {
        let slots: Vec<Arc<EventSlot>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter(|s| self.answer(s, Response::Deny(errno)))
            .count()
    }

    /// Bring the journal's high-water mark down to the events in flight now.
    pub fn refresh_journal_high_water(&self) {
        if let Some(j) = &self.journal {
            let max = lock(&self.slots).keys().copied().max().unwrap_or(-1);
            j.reset_high_water(max);
        }
    }

    /// The journal, when there is one (with a keeper or an fd store).
    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.as_ref()
    }

    /// Events denied so far, per errno, in [`DENY_ERRNOS`] order.
    pub fn denied(&self) -> [u64; DENY_ERRNOS.len()] {
        std::array::from_fn(|i| self.denied[i].load(Ordering::Relaxed))
    }

    /// Events registered and not yet finished.
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Owns one event until it is answered.
#[derive(Debug)]
pub struct EventGuard {
    pending: Arc<Pending>,
    slot: Option<Arc<EventSlot>>,
}

impl EventGuard {
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.slot {
            Some(s) => s.fd(),
            // The slot is only taken by `respond`, which consumes the guard.
            None => unreachable!("event guard used after respond"),
        }
    }

    /// Answer and release the event.
    pub fn respond(mut self, response: Response) {
        if let Some(slot) = self.slot.take() {
            self.finish(slot, response);
        }
    }

    fn finish(&self, slot: Arc<EventSlot>, response: Response) {
        self.pending.answer(&slot, response);
        lock(&self.pending.slots).remove(&slot.fd.as_raw_fd());
        // The fd closes when the last Arc goes, always after the response was written.
    }
}

impl Drop for EventGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            error!(
                fd = slot.fd.as_raw_fd(),
                "event dropped unanswered (task failed); denying with EIO"
            );
            self.finish(slot, Response::Deny(DenyErrno::Eio));
        }
    }
}
