//! The agent's counters. Names are defined here once and documented in docs/METRICS.md.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $field:ident = $name:literal ),* $(,)?) => {
        /// Counters, updated with relaxed atomics on the event path.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $field: AtomicU64, )*
        }

        impl Metrics {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( ($name, self.$field.load(Ordering::Relaxed)), )* ]
            }
        }
    };
}

metrics! {
    /// Pre-content events received.
    events = "events",
    /// Events raised by the agent's own threads (allowed at once).
    events_own = "events_own",
    /// Events for files that are not stubs (allowed, then ignore-marked).
    events_not_stub = "events_not_stub",
    /// Events for stubs still being built by populate (allowed).
    events_building = "events_building",
    /// Events for stubs.
    events_stub = "events_stub",
    /// Open permission events (`FAN_OPEN_PERM`, `FAN_OPEN_EXEC_PERM`).
    events_open = "events_open",
    /// Opens that had the whole file fetched before they could proceed (through overlayfs).
    open_hydrations = "open_hydrations",
    /// Stub events answered without fetching (range already resident or beyond the floor).
    events_resident = "events_resident",
    /// Events answered with a deny.
    denies = "denies",
    /// Ignore marks placed.
    ignore_marks = "ignore_marks",
    /// Fill tasks started (one per run of granules).
    fills = "fills",
    /// Times an event waited on a fill another event had already started.
    fill_joins = "fill_joins",
    /// Fill tasks started by readahead rather than by a waiting reader.
    readahead_fills = "readahead_fills",
    /// Ranged reads sent to remotes.
    remote_requests = "remote_requests",
    /// Requests still running after 500 ms that moved to a slot for slow requests.
    slow_requests = "slow_requests",
    /// Queue overflow events from the kernel (accesses allowed unserved; never expected
    /// with the unlimited queue the agent asks for).
    queue_overflows = "queue_overflows",
    /// Times the event threads stopped reading because open descriptors neared the limit
    /// (events then wait in the kernel's queue).
    reads_paused = "reads_paused",
    /// Bytes received from remotes.
    bytes_fetched = "bytes_fetched",
    /// Bytes written into stubs (zero pages are skipped and not counted).
    bytes_written = "bytes_written",
    /// Failed fills.
    fill_errors = "fill_errors",
    /// Resident maps made durable (fdatasync, then xattr).
    persists = "persists",
    /// Flushes forced by a local write before it was allowed.
    write_flushes = "write_flushes",
    /// Truncations of stubs observed.
    truncates = "truncates",
    /// Stubs that became ordinary files.
    hydrated = "hydrated",
    /// Stub states loaded into the cache.
    stub_loads = "stub_loads",
    /// Stubs whose metadata could not be read or decoded.
    bad_stubs = "bad_stubs",

}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The snapshot as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/METRICS.md documents every counter, and only counters that exist.
    #[test]
    fn metrics_doc_lists_every_counter() {
        let doc = include_str!("../../../docs/METRICS.md");
        let names: Vec<&str> = Metrics::default()
            .snapshot()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for n in &names {
            assert!(
                doc.contains(&format!("| `{n}` |")),
                "docs/METRICS.md does not document {n}"
            );
        }
        for line in doc.lines().filter(|l| l.starts_with("| `")) {
            let name = line
                .trim_start_matches("| `")
                .split('`')
                .next()
                .unwrap_or("");
            assert!(
                names.contains(&name),
                "docs/METRICS.md documents unknown counter {name}"
            );
        }
    }
}
