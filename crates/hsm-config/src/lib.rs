//! hsm's configuration: one serde tree with defaults for every key.
//!
//! `hsm agent DST...` needs no file at all; `--config FILE` reads TOML into [`Config`].
//! Unknown keys are errors (a typo must not silently fall back to a default), and
//! `config/hsm.toml` in the repository lists every key with its default; a test parses it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentConfig,
    pub populate: PopulateConfig,
    pub remote: RemoteConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub cache: CacheConfig,
    pub prefetch: PrefetchConfig,
    pub index: IndexConfig,
}

/// Where the agent places its fanotify mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkKind {
    /// One mark on the whole filesystem holding each tree (sees every access on it).
    #[default]
    Filesystem,
    /// One mark on the mount holding each tree (bind mounts elsewhere are not covered).
    Mount,
}

/// Why a value given on the command line does not parse; names the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{value:?}: expected {expected}")]
    Expected {
        value: String,
        expected: &'static str,
    },
    #[error("{0:?} is not a size (examples: 4096, \"8 MiB\", \"512K\")")]
    NotASize(String),
    #[error("{value:?}: unknown unit {unit:?}")]
    UnknownUnit { value: String, unit: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

fn expected(value: &str, expected: &'static str) -> ValueError {
    ValueError::Expected {
        value: value.to_string(),
        expected,
    }
}

impl FromStr for MarkKind {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "filesystem" => Ok(MarkKind::Filesystem),
            "mount" => Ok(MarkKind::Mount),
            other => Err(expected(other, "\"filesystem\" or \"mount\"")),
        }
    }
}

/// Whether the agent installs the BPF LSM stub guard (docs/BPF.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardMode {
    /// Install it when the kernel allows; otherwise say so once and serve without it.
    #[default]
    Auto,
    /// Refuse to start unless the guard is installed.
    Require,
    /// Neither install nor register with it (an installed guard then fails stub reads).
    Off,
}

impl FromStr for GuardMode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "auto" => Ok(GuardMode::Auto),
            "require" => Ok(GuardMode::Require),
            "off" => Ok(GuardMode::Off),
            other => Err(expected(other, "\"auto\", \"require\" or \"off\"")),
        }
    }
}

/// `[agent]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Stub trees to serve, in addition to those given on the command line.
    pub trees: Vec<PathBuf>,
    pub mark: MarkKind,
    /// Threads reading fanotify events. They answer most events on the spot (files that
    /// are not stubs, resident ranges, small fills from local remotes); the rest go to the
    /// async core.
    pub event_threads: usize,
    /// Ranged reads in flight at once, over all files.
    pub max_concurrent_fetches: usize,
    /// The largest single ranged read; bigger granules are fetched in parallel parts.
    pub max_request_size: ByteSize,
    /// After a sequential pattern, fetch this far ahead of the reader (0 disables).
    pub readahead: ByteSize,
    /// While the reader stays sequential the window doubles, up to this; its requests
    /// grow with it (half a window each, held in memory until written). Never below
    /// `readahead`.
    pub readahead_max: ByteSize,
    /// How long a filled range may wait before its resident map is persisted (batched
    /// fdatasync + xattr write). Writes never wait for this: they flush first.
    pub persist_interval: HumanDuration,
    /// Stub states kept in memory (each holds one open descriptor).
    pub cache_entries: usize,
    /// Fetch bandwidth cap in bytes per second (0 = unlimited).
    pub max_bandwidth: ByteSize,
    /// On SIGTERM, how long to wait for fills in flight before denying them.
    pub shutdown_timeout: HumanDuration,
    /// A file created once the marks are in place (for scripts; systemd gets READY=1).
    pub ready_file: Option<PathBuf>,
    /// Metrics as JSON, rewritten every `stats_interval` and at exit.
    pub stats_file: Option<PathBuf>,
    pub stats_interval: HumanDuration,
    /// The BPF LSM stub guard: "auto", "require" or "off".
    pub guard: GuardMode,
    /// Load the fanotify fastpath handler when the running kernel has the hook.
    pub fastpath: bool,
    /// Keep the fanotify group alive across agent restarts: "auto" hands it to systemd's
    /// fd store under systemd, otherwise to an `hsm keeper` process; "off" lets it die
    /// with the agent (readers waiting then get zeros, see docs/SEMANTICS.md).
    pub keeper: KeeperMode,
    /// Where the keeper's socket and the event journal live (a tmpfs such as /run).
    pub state_dir: PathBuf,
    /// How long the keeper holds the group with no agent connected before it answers
    /// every waiting reader with EIO and releases it.
    pub keeper_grace: HumanDuration,
    /// Record an access trace here: every reader's first touch of each stub granule, in
    /// order (docs/SEMANTICS.md, "Access traces and prefetch"). Unset: no recording.
    pub record_trace: Option<PathBuf>,
}

/// See [`AgentConfig::keeper`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeeperMode {
    #[default]
    Auto,
    Off,
}

impl FromStr for KeeperMode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s {
            "auto" => Ok(KeeperMode::Auto),
            "off" => Ok(KeeperMode::Off),
            other => Err(expected(other, "\"auto\" or \"off\"")),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            trees: Vec::new(),
            mark: MarkKind::Filesystem,
            event_threads: 4,
            max_concurrent_fetches: 16,
            max_request_size: ByteSize(8 << 20),
            readahead: ByteSize(32 << 20),
            readahead_max: ByteSize(128 << 20),
            persist_interval: HumanDuration(Duration::from_millis(200)),
            cache_entries: 8192,
            max_bandwidth: ByteSize(0),
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
            ready_file: None,
            stats_file: None,
            stats_interval: HumanDuration(Duration::from_secs(5)),
            guard: GuardMode::Auto,
            fastpath: true,
            keeper: KeeperMode::Auto,
            state_dir: PathBuf::from("/run/hsm"),
            keeper_grace: HumanDuration(Duration::from_secs(300)),
            record_trace: None,
        }
    }
}

/// `[populate]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopulateConfig {
    /// Smallest granule (unit of fetch and of the resident map); grows for files over
    /// 16384 granules. A power of two between 4 KiB and 1 TiB.
    pub min_granule: ByteSize,
    /// Worker threads creating stubs (0 = one per CPU).
    pub jobs: usize,
    /// Keep new stubs' metadata in the tree's index under `[index] dir` instead of an
    /// xattr on each stub (saves ext4 an xattr block a stub).
    pub index: bool,
}

impl Default for PopulateConfig {
    fn default() -> Self {
        PopulateConfig {
            min_granule: ByteSize(1 << 20),
            jobs: 0,
            index: false,
        }
    }
}

/// `[index]`: where tree indexes live (docs/STUB_FORMAT.md, "Tree index").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// The directory of the tree indexes: populate appends to them, the agent and every
    /// command read them. It must be a directory only root can change.
    pub dir: PathBuf,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            dir: PathBuf::from("/var/lib/hsm/index"),
        }
    }
}

/// `[remote]`: how to reach object stores.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// A reader waits at most this long for a fetch; then it gets EIO (0 = no limit).
    pub read_timeout: HumanDuration,
    /// One HTTP request, from sending to the last byte of the response.
    pub request_timeout: HumanDuration,
    pub connect_timeout: HumanDuration,
    /// Retries of a failed request (transient errors only), with exponential backoff.
    pub max_retries: usize,
    /// No retry starts after this long since the first attempt.
    pub retry_timeout: HumanDuration,
    pub backoff_initial: HumanDuration,
    pub backoff_max: HumanDuration,
    /// object_store options per URL prefix (the longest matching prefix wins), e.g.
    /// `[remote.options."s3://bucket"] aws_endpoint = "http://127.0.0.1:9000"`. Keys are
    /// object_store's (`aws_region`, `azure_storage_account_name`, `google_service_account`,
    /// `allow_http`, ...); AWS_*, AZURE_* and GOOGLE_* environment variables also apply.
    pub options: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            read_timeout: HumanDuration(Duration::from_secs(60)),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            max_retries: 5,
            retry_timeout: HumanDuration(Duration::from_secs(60)),
            backoff_initial: HumanDuration(Duration::from_millis(100)),
            backoff_max: HumanDuration(Duration::from_secs(10)),
            options: std::collections::BTreeMap::new(),
        }
    }
}

impl RemoteConfig {
    /// The options for `url`: those of the longest configured prefix it starts with.
    pub fn options_for(&self, url: &str) -> Vec<(String, String)> {
        self.options
            .iter()
            .filter(|(prefix, _)| {
                let p = prefix.trim_end_matches('/');
                url == p || url.starts_with(&format!("{p}/"))
            })
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, o)| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}

impl fmt::Debug for RemoteConfig {
    // Option values can be secrets (keys, tokens, SAS): never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted: std::collections::BTreeMap<&String, Vec<&String>> = self
            .options
            .iter()
            .map(|(u, o)| (u, o.keys().collect()))
            .collect();
        f.debug_struct("RemoteConfig")
            .field("read_timeout", &self.read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("options (keys only)", &redacted)
            .finish()
    }
}

/// `[metrics]`: the Prometheus endpoint (docs/METRICS.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `GET /metrics` on this address ("127.0.0.1:9464", "[::1]:9464"); unset (the
    /// default) serves nothing. No authentication: keep it on loopback or a private network.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[prefetch]`: fetching a populated tree's published access traces ahead of its readers
/// (docs/SEMANTICS.md, "Access traces and prefetch").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Prefetch each served tree's traces when the agent starts, and a tree's that
    /// `hsm populate` has just made (`hsm prefetch TREE` works either way).
    pub enabled: bool,
    /// Trace entries fetched at once per tree (readers never wait for these: they have
    /// the other `max_concurrent_fetches` slots).
    pub jobs: usize,
    /// Most bytes per second prefetch fetches, per tree (0 = unlimited).
    pub bandwidth: ByteSize,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            jobs: 2,
            bandwidth: ByteSize(256 << 20),
        }
    }
}

/// `[cache]`: the bounded cache (docs/SEMANTICS.md, "The bounded cache").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// The most remote data the served trees may hold locally: a size ("64 MiB") or a
    /// percentage of the filesystem holding the first tree ("20%"). "0" (the default):
    /// no limit.
    pub max_size: CacheSize,
    /// Eviction starts when use would pass this share of `max_size`.
    pub high_watermark: Percent,
    /// ... and stops once use is down to this share.
    pub low_watermark: Percent,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_size: CacheSize::Bytes(0),
            high_watermark: Percent(95),
            low_watermark: Percent(85),
        }
    }
}

/// `max_size`: bytes, or a percentage of a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    Bytes(u64),
    /// Hundredths of a percent ("12.5%" is 1250).
    Percent(u32),
}

impl CacheSize {
    /// The limit in bytes for a filesystem of `fs_bytes` (0: no limit).
    pub fn bytes(self, fs_bytes: u64) -> u64 {
        match self {
            CacheSize::Bytes(b) => b,
            CacheSize::Percent(p) => (fs_bytes as u128 * p as u128 / 10_000) as u64,
        }
    }
}

impl FromStr for CacheSize {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        match t.strip_suffix('%') {
            Some(p) => {
                let v: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| expected(s, "a size (\"64 MiB\") or a percentage (\"20%\")"))?;
                if !(v > 0.0 && v <= 100.0) {
                    return Err(expected(s, "a percentage above 0 and at most 100"));
                }
                Ok(CacheSize::Percent((v * 100.0).round() as u32))
            }
            None => t.parse::<ByteSize>().map(|b| CacheSize::Bytes(b.0)),
        }
    }
}

impl fmt::Display for CacheSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheSize::Bytes(b) => ByteSize(*b).fmt(f),
            CacheSize::Percent(p) if p % 100 == 0 => write!(f, "{}%", p / 100),
            CacheSize::Percent(p) => write!(f, "{}.{:02}%", p / 100, p % 100),
        }
    }
}

impl Serialize for CacheSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CacheSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_parsed(d, CacheSize::Bytes)
    }
}

/// A whole percentage, written "90%".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let n: u8 = t
            .strip_suffix('%')
            .unwrap_or(t)
            .trim()
            .parse()
            .map_err(|_| expected(s, "a whole percentage such as \"90%\""))?;
        if !(1..=100).contains(&n) {
            return Err(expected(s, "a percentage from 1% to 100%"));
        }
        Ok(Percent(n))
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}%", self.0))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as "info" or "hsm_core=debug"; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            filter: "info".to_string(),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

impl Config {
    /// Read and validate a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Check values serde cannot check.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let bad = |key, message: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            key,
            message,
        };
        let a = &self.agent;
        if !(1..=64).contains(&a.event_threads) {
            return Err(bad(
                "agent.event_threads",
                "must be between 1 and 64".into(),
            ));
        }
        if a.max_concurrent_fetches == 0 {
            return Err(bad(
                "agent.max_concurrent_fetches",
                "must be at least 1".into(),
            ));
        }
        if a.max_request_size.0 < 4096 {
            return Err(bad(
                "agent.max_request_size",
                "must be at least 4 KiB".into(),
            ));
        }
        if a.readahead_max.0 < a.readahead.0 {
            return Err(bad(
                "agent.readahead_max",
                format!("must be at least agent.readahead ({} bytes)", a.readahead.0),
            ));
        }
        if a.cache_entries < 16 {
            return Err(bad("agent.cache_entries", "must be at least 16".into()));
        }
        if !(1..=64).contains(&self.prefetch.jobs) {
            return Err(bad("prefetch.jobs", "must be between 1 and 64".into()));
        }
        if self.prefetch.jobs >= a.max_concurrent_fetches {
            return Err(bad(
                "prefetch.jobs",
                format!(
                    "must be below agent.max_concurrent_fetches ({}): readers need slots of their own",
                    a.max_concurrent_fetches
                ),
            ));
        }
        let c = &self.cache;
        if c.low_watermark >= c.high_watermark {
            return Err(bad(
                "cache.low_watermark",
                format!(
                    "{}% must be below cache.high_watermark ({}%)",
                    c.low_watermark.0, c.high_watermark.0
                ),
            ));
        }
        let g = self.populate.min_granule.0;
        if !g.is_power_of_two() || !(4096..=1 << 40).contains(&g) {
            return Err(bad(
                "populate.min_granule",
                format!(
                    "{} is not a power of two between 4 KiB and 1 TiB",
                    self.populate.min_granule
                ),
            ));
        }
        Ok(())
    }
}

/// A byte count written as an integer or as "8 MiB", "512K", "1G" (powers of 1024).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| ValueError::NotASize(s.to_string()))?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            other => {
                return Err(ValueError::UnknownUnit {
                    value: s.to_string(),
                    unit: other.to_string(),
                });
            }
        };
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| ValueError::TooLarge(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if v >= 1 << shift && v % (1 << shift) == 0 {
                return write!(f, "{} {unit}", v >> shift);
            }
        }
        write!(f, "{v}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        int_or_parsed(d, ByteSize)
    }
}

/// A value written either as a bare integer (`from_int`) or as a string `T` parses.
fn int_or_parsed<'de, D, T>(d: D, from_int: fn(u64) -> T) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = ValueError>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(from_int(n)),
        Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

/// A duration written as "10ms", "30s", "2m".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("{s:?}: {e} (examples: \"10ms\", \"30s\")"))
            })
    }
}

#[cfg(test)]
mod tests;
