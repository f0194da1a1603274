//! The agent core of hsm: given an access to a file, decide what to fetch, fetch it once
//! however many readers wait, write it through the event's descriptor, keep the resident
//! map durable, and answer. The fanotify adapter (`hsm-agent`) is a thin translation layer
//! over [`AgentCore::handle`]; this crate is where the policy lives and where the tests aim.

pub mod agent;
mod api;
pub mod budget;
pub mod error;
mod fill;
pub mod index;
mod integrity;
pub mod metrics;
mod persist;
mod serve;
mod stream;
mod stub;
pub mod stubio;
mod supply;
pub mod trace;
mod truncate;

pub use agent::{
    Access, AccessEvent, AgentCore, CoreOptions, DenyErrno, FileRange, IntentProbe, IntentSource,
    Later, MarkSink, NoThreads, Prefetched, ProcReopener, RemoteOpener, Reopener, UrlRemotes,
    Verdict,
};
pub use budget::{Budget, BudgetStatus, CacheLimits, EvictOutcome, Evictor, FileKey};
pub use error::{LocalError, ServeError, deny_errno};
pub use metrics::Metrics;
pub use serve::take_filled_inline;
