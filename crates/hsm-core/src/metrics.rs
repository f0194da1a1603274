//! The agent's counters and its fill-duration histogram. Names are defined here once (the
//! stats file's and the Prometheus endpoint's) and documented in docs/METRICS.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Each counter: its doc comment (also its Prometheus `# HELP`), its field, its name in the
/// stats file, and its Prometheus name. One list, so the two outputs cannot drift apart.
macro_rules! metrics {
    ($( $(#[doc = $doc:literal])* $field:ident = $name:literal => $prom:literal ),* $(,)?) => {
        /// Counters, updated with relaxed atomics on the event path.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[doc = $doc])* pub $field: AtomicU64, )*
            /// How long fills took, from start to end (successful or not).
            pub fill_duration: Histogram,
        }

        impl Metrics {
            /// Every counter with its name, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( ($name, self.$field.load(Ordering::Relaxed)), )* ]
            }

            /// Every counter as (Prometheus name, help, value), in declaration order.
            pub fn prometheus_counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![ $( ($prom, concat!($($doc),*), self.$field.load(Ordering::Relaxed)), )* ]
            }
        }
    };
}

metrics! {
    /// Pre-content events received.
    events = "events" => "hsm_events_total",
    /// Events raised by the agent's own threads (allowed at once).
    events_own = "events_own" => "hsm_events_own_total",
    /// Events for files that are not stubs (allowed, then ignore-marked).
    events_not_stub = "events_not_stub" => "hsm_events_not_stub_total",
    /// Events for stubs still being built by populate (allowed).
    events_building = "events_building" => "hsm_events_building_total",
    /// Events for stubs.
    events_stub = "events_stub" => "hsm_events_stub_total",
    /// Open permission events (`FAN_OPEN_PERM`, `FAN_OPEN_EXEC_PERM`).
    events_open = "events_open" => "hsm_events_open_total",
    /// Opens that had the whole file fetched before they could proceed (through overlayfs).
    open_hydrations = "open_hydrations" => "hsm_open_hydrations_total",
    /// Stub events answered without fetching (range already resident or beyond the floor).
    events_resident = "events_resident" => "hsm_events_resident_total",
    /// Events answered with a deny.
    denies = "denies" => "hsm_denies_total",
    /// Ignore marks placed.
    ignore_marks = "ignore_marks" => "hsm_ignore_marks_total",
    /// Fill tasks started (one per run of granules).
    fills = "fills" => "hsm_fills_total",
    /// Times an event waited on a fill another event had already started.
    fill_joins = "fill_joins" => "hsm_fill_joins_total",
    /// Fill tasks started by readahead rather than by a waiting reader.
    readahead_fills = "readahead_fills" => "hsm_readahead_fills_total",
    /// Streamed requests readahead opened (one request whose body fills run after run).
    readahead_streams = "readahead_streams" => "hsm_readahead_streams_total",
    /// Readahead streams that broke (an error, a short body, a stall) and handed their
    /// queued runs to ranged requests.
    stream_fallbacks = "stream_fallbacks" => "hsm_stream_fallbacks_total",
    /// Requests sent to remotes (ranged reads and streams).
    remote_requests = "remote_requests" => "hsm_remote_requests_total",
    /// Requests still running after 500 ms that moved to a slot for slow requests.
    slow_requests = "slow_requests" => "hsm_slow_requests_total",
    /// Queue overflow events from the kernel (accesses allowed unserved; never expected
    /// with the unlimited queue the agent asks for).
    queue_overflows = "queue_overflows" => "hsm_queue_overflows_total",
    /// Times the event threads stopped reading because open descriptors neared the limit
    /// (events then wait in the kernel's queue).
    reads_paused = "reads_paused" => "hsm_reads_paused_total",
    /// Bytes received from remotes.
    bytes_fetched = "bytes_fetched" => "hsm_fetched_bytes_total",
    /// Bytes written into stubs (zero pages are skipped and not counted).
    bytes_written = "bytes_written" => "hsm_written_bytes_total",
    /// Failed fills.
    fill_errors = "fill_errors" => "hsm_fill_errors_total",
    /// Resident maps made durable (fdatasync, then xattr).
    persists = "persists" => "hsm_persists_total",
    /// Flushes forced by a local write before it was allowed.
    write_flushes = "write_flushes" => "hsm_write_flushes_total",
    /// Truncations of stubs observed.
    truncates = "truncates" => "hsm_truncates_total",
    /// Stubs that became ordinary files.
    hydrated = "hydrated" => "hsm_hydrated_total",
    /// Stub states loaded into the cache.
    stub_loads = "stub_loads" => "hsm_stub_loads_total",
    /// Stubs whose metadata could not be read or decoded.
    bad_stubs = "bad_stubs" => "hsm_bad_stubs_total",
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

    /// Every counter, the gauges and the histogram in the Prometheus text exposition
    /// format, version 0.0.4 (`# HELP`, `# TYPE`, one sample per line).
    pub fn render_prometheus(&self, gauges: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        for (name, help, value) in self.prometheus_counters() {
            family(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {value}");
        }
        for (name, help, value) in gauges.series() {
            family(&mut out, name, help, "gauge");
            let _ = writeln!(out, "{name} {}", float(value));
        }
        for (name, help, kind, value) in gauges.cache_series() {
            family(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {}", float(value));
        }
        let h = self.fill_duration.snapshot();
        family(&mut out, FILL_DURATION, FILL_DURATION_HELP, "histogram");
        let mut cumulative = 0;
        for (le, n) in FILL_BUCKETS.iter().zip(&h.buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "{FILL_DURATION}_bucket{{le=\"{}\"}} {cumulative}",
                float(*le)
            );
        }
        let count = cumulative + h.buckets[FILL_BUCKETS.len()];
        let _ = writeln!(out, "{FILL_DURATION}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{FILL_DURATION}_sum {}", float(h.sum.as_secs_f64()));
        let _ = writeln!(out, "{FILL_DURATION}_count {count}");
        out
    }

    /// The names of every series family the Prometheus endpoint exposes.
    pub fn prometheus_families() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Metrics::default()
            .prometheus_counters()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        names.extend(Gauges::default().series().into_iter().map(|(n, _, _)| n));
        names.extend(
            Gauges::default()
                .cache_series()
                .into_iter()
                .map(|(n, _, _, _)| n),
        );
        names.push(FILL_DURATION);
        names
    }
}

/// The Prometheus content type of [`Metrics::render_prometheus`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const FILL_DURATION: &str = "hsm_fill_duration_seconds";
const FILL_DURATION_HELP: &str = "How long fills took, from start to end (successful or not).";

/// Upper bounds of the fill-duration buckets, in seconds (+Inf is implied): from a small
/// local fill (well under a millisecond) to one that reaches a minute's read timeout.
pub const FILL_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// A latency histogram with fixed buckets ([`FILL_BUCKETS`]), updated with relaxed atomics:
/// an observation is two `fetch_add`s, so fills never wait on a scrape.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is the +Inf overflow.
    buckets: [AtomicU64; FILL_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A histogram's values at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket (not cumulative); the last is the +Inf overflow.
    pub buckets: Vec<u64>,
    pub sum: Duration,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = FILL_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(FILL_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: Duration::from_nanos(self.sum_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Values the agent knows and the core does not, exposed as Prometheus gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gauges {
    pub uptime_secs: f64,
    pub cached_stubs: u64,
    pub events_in_flight: u64,
    /// The bounded cache (all zero without `[cache] max_size`).
    pub cache: crate::budget::BudgetStatus,
}

impl Gauges {
    /// (name, help, type, value) of the bounded cache's series.
    fn cache_series(&self) -> [(&'static str, &'static str, &'static str, f64); 6] {
        let c = &self.cache;
        [
            (
                "hsm_cache_limit_bytes",
                "The bounded cache's max_size in bytes (0: no limit).",
                "gauge",
                c.max_bytes as f64,
            ),
            (
                "hsm_cache_used_bytes",
                "Bytes of remote data the served trees hold, as the bounded cache counts them (0 without a limit).",
                "gauge",
                c.used_bytes as f64,
            ),
            (
                "hsm_cache_pinned_bytes",
                "Of those, bytes of files found pinned (never evicted).",
                "gauge",
                c.pinned_bytes as f64,
            ),
            (
                "hsm_cache_evictions_total",
                "Files the bounded cache (or hsm evict) turned back into stubs.",
                "counter",
                c.evictions as f64,
            ),
            (
                "hsm_cache_evicted_bytes_total",
                "Bytes those evictions gave back.",
                "counter",
                c.evicted_bytes as f64,
            ),
            (
                "hsm_cache_full_denies_total",
                "Fills refused with ENOSPC because the bounded cache could not make room.",
                "counter",
                c.full_denies as f64,
            ),
        ]
    }

    /// (name, help, value) of each gauge.
    fn series(&self) -> [(&'static str, &'static str, f64); 3] {
        [
            (
                "hsm_uptime_seconds",
                "Seconds since the agent started serving.",
                self.uptime_secs,
            ),
            (
                "hsm_cached_stubs",
                "Stub states in memory.",
                self.cached_stubs as f64,
            ),
            (
                "hsm_events_in_flight",
                "Events registered and not yet answered.",
                self.events_in_flight as f64,
            ),
        ]
    }
}

/// `# HELP` and `# TYPE` of one family; the help on one line, escaped as 0.0.4 asks.
fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A sample value as Prometheus reads it (Go's float syntax; integers print without ".0").
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/METRICS.md documents every counter and every Prometheus series family, and
    /// only ones that exist.
    #[test]
    fn metrics_doc_lists_every_counter() {
        let doc = include_str!("../../../docs/METRICS.md");
        let names: Vec<&str> = Metrics::default()
            .snapshot()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let families = Metrics::prometheus_families();
        for n in names.iter().chain(&families) {
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
            if name.starts_with("hsm_") {
                assert!(
                    families.contains(&name),
                    "docs/METRICS.md documents unknown series {name}"
                );
            } else {
                assert!(
                    names.contains(&name),
                    "docs/METRICS.md documents unknown counter {name}"
                );
            }
        }
    }

    /// Prometheus naming: a valid metric name, the `hsm_` prefix, counters end in `_total`,
    /// nothing exposed twice, and every counter has help text.
    #[test]
    fn prometheus_names_follow_the_conventions() {
        let valid = |n: &str| {
            n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit()))
        };
        let families = Metrics::prometheus_families();
        for n in &families {
            assert!(valid(n) && n.starts_with("hsm_"), "{n}");
        }
        let mut unique = families.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), families.len(), "a name is exposed twice");
        for (name, help, _) in Metrics::default().prometheus_counters() {
            assert!(name.ends_with("_total"), "{name}");
            assert!(!help.trim().is_empty(), "{name} has no help");
        }
        assert!(families.contains(&"hsm_events_total"));
        assert!(families.contains(&"hsm_fetched_bytes_total"));
    }

    /// Parse the exposition back: sample name (with labels) -> value; checks that every
    /// sample follows its family's `# HELP` and `# TYPE` lines.
    fn parse(text: &str) -> Vec<(String, String, f64)> {
        let mut types = std::collections::HashMap::new();
        let mut helped = std::collections::HashSet::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("help text");
                assert!(!help.is_empty() && !help.contains('\n'));
                helped.insert(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type");
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(types.insert(name.to_string(), kind.to_string()).is_none());
            } else {
                let (series, value) = line.rsplit_once(' ').expect("sample");
                let base = series.split('{').next().expect("name");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| base.strip_suffix(s).filter(|f| types.contains_key(*f)))
                    .unwrap_or(base);
                let kind = types
                    .get(family)
                    .unwrap_or_else(|| panic!("no TYPE for {line}"));
                let v = if value == "+Inf" {
                    f64::INFINITY
                } else {
                    value.parse().expect("value")
                };
                samples.push((series.to_string(), kind.clone(), v));
            }
        }
        samples
    }

    #[test]
    fn prometheus_text_has_every_family_with_its_type_and_value() {
        let m = Metrics::default();
        Metrics::add(&m.events, 7);
        Metrics::add(&m.bytes_fetched, 1 << 20);
        m.fill_duration.observe(Duration::from_micros(300));
        m.fill_duration.observe(Duration::from_millis(3));
        m.fill_duration.observe(Duration::from_secs(120));
        let text = m.render_prometheus(&Gauges {
            uptime_secs: 1.5,
            cached_stubs: 4,
            events_in_flight: 2,
            ..Gauges::default()
        });
        assert!(text.ends_with('\n'));
        let samples = parse(&text);
        let get = |s: &str| {
            samples
                .iter()
                .find(|(n, _, _)| n == s)
                .unwrap_or_else(|| panic!("no sample {s} in\n{text}"))
                .clone()
        };
        assert_eq!(
            get("hsm_events_total"),
            ("hsm_events_total".into(), "counter".into(), 7.0)
        );
        assert_eq!(get("hsm_fetched_bytes_total").2, (1 << 20) as f64);
        assert_eq!(get("hsm_fills_total").2, 0.0);
        assert_eq!(get("hsm_uptime_seconds").1, "gauge");
        assert_eq!(get("hsm_uptime_seconds").2, 1.5);
        assert_eq!(get("hsm_cached_stubs").2, 4.0);
        assert_eq!(get("hsm_events_in_flight").2, 2.0);
        let h = "hsm_fill_duration_seconds";
        assert_eq!(get(&format!("{h}_bucket{{le=\"0.0005\"}}")).1, "histogram");
        assert_eq!(get(&format!("{h}_bucket{{le=\"0.0005\"}}")).2, 1.0);
        assert_eq!(get(&format!("{h}_bucket{{le=\"0.001\"}}")).2, 1.0);
        assert_eq!(get(&format!("{h}_bucket{{le=\"0.005\"}}")).2, 2.0);
        assert_eq!(get(&format!("{h}_bucket{{le=\"60\"}}")).2, 2.0);
        assert_eq!(get(&format!("{h}_bucket{{le=\"+Inf\"}}")).2, 3.0);
        assert_eq!(get(&format!("{h}_count")).2, 3.0);
        assert!((get(&format!("{h}_sum")).2 - 120.0033).abs() < 1e-9);
        // Buckets are cumulative and ascending, +Inf last.
        let les: Vec<f64> = samples
            .iter()
            .filter(|(n, _, _)| n.starts_with(&format!("{h}_bucket")))
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(les.len(), FILL_BUCKETS.len() + 1);
        assert!(les.windows(2).all(|w| w[0] <= w[1]));
        // Every family once, in the stated order of HELP then TYPE.
        for f in Metrics::prometheus_families() {
            assert_eq!(text.matches(&format!("# TYPE {f} ")).count(), 1, "{f}");
        }
    }

    #[test]
    fn help_is_one_line_from_the_doc_comment() {
        let counters = Metrics::default().prometheus_counters();
        let (_, help, _) = counters
            .iter()
            .find(|(n, _, _)| *n == "hsm_queue_overflows_total")
            .expect("counter");
        // A doc comment over two lines becomes one line of help.
        let m = Metrics::default();
        let text = m.render_prometheus(&Gauges::default());
        let line = text
            .lines()
            .find(|l| l.starts_with("# HELP hsm_queue_overflows_total "))
            .expect("help line");
        assert!(help.contains("never expected"));
        assert!(line.contains("(accesses allowed unserved; never expected with the unlimited"));
        let mut s = String::new();
        family(&mut s, "x", "a\\b", "gauge");
        assert_eq!(s, "# HELP x a\\\\b\n# TYPE x gauge\n");
    }
}
