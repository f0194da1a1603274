//! `hsm`: make a directory tree look complete while its bytes live in an object store.

mod control;
mod doctor;
mod guard;
mod tree;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hsm_config::{ByteSize, Config, LogFormat, MarkKind};

#[derive(Debug, Parser)]
#[command(
    name = "hsm",
    version,
    about = "Hierarchical storage: stub trees whose bytes are fetched on first access"
)]
struct Cli {
    /// TOML configuration (every key is optional; see config/hsm.toml).
    #[arg(long, global = true, env = "HSM_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the tree indexes (default: [index] dir).
    #[arg(long, global = true, env = "HSM_INDEX_DIR", value_name = "DIR")]
    index_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update a stub tree at DST mirroring SRC.
    Populate {
        /// Source: a local directory, or a URL (file://, s3://, az://, gs://, http(s)://)
        /// holding a published tree (.hsm-manifest) or, for object stores, any objects.
        src: String,
        /// Destination directory (created if missing) on ext4, xfs or btrfs.
        dst: PathBuf,
        /// Replace or remove local files that are not stubs.
        #[arg(long)]
        force: bool,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Worker threads (default: [populate] jobs, 0 = one per CPU).
        #[arg(long)]
        jobs: Option<usize>,
        /// Smallest granule, a power of two (default: [populate] min_granule).
        #[arg(long)]
        min_granule: Option<ByteSize>,
        /// Never draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Keep new stubs' metadata in the tree's index instead of an xattr on each stub:
        /// `--index`, or `--index=false` to keep it on the stubs whatever the
        /// environment and [populate] index say (default: HSM_POPULATE_INDEX, then
        /// [populate] index).
        #[arg(
            long,
            env = "HSM_POPULATE_INDEX",
            value_name = "BOOL",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "true",
            value_parser = clap::builder::BoolishValueParser::new()
        )]
        index: Option<bool>,
        /// A running agent serving DST is asked to hydrate what this run added below
        /// pinned directories (docs/SEMANTICS.md, "Eviction and pins").
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Upload a local tree or a container image to a store and write its manifest (re-runs
    /// skip unchanged files).
    Publish {
        /// The local directory to publish, or an OCI image layout: oci:DIR or oci:DIR:TAG
        /// (its root filesystem is published, and its config as .hsm-image.json).
        src: PathBuf,
        /// Where: file://, s3://, az://, gs:// or http(s):// (WebDAV) URL with a prefix.
        url: String,
        /// Files uploaded at once.
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        /// Bytes per digest chunk, a power of two from 4 KiB to 1 GiB; it is also the
        /// smallest granule of stubs populated from this manifest.
        #[arg(long, default_value = "1MiB")]
        chunk_size: ByteSize,
        /// Write the manifest even if some entries failed (they are left out of it).
        #[arg(long)]
        allow_errors: bool,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Never draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Where an image's layers are applied before upload (a private directory is made
        /// there and removed afterwards; default: $TMPDIR, else /var/tmp).
        #[arg(long)]
        staging: Option<PathBuf>,
        /// An access trace `hsm agent --record-trace` wrote, stored beside the manifest as
        /// .hsm-traces/NAME (NAME: the file's name without .trace) for the agent to
        /// prefetch; repeat for several entry points. The traces given replace those
        /// published before; without --trace they stay.
        #[arg(long, value_name = "FILE")]
        trace: Vec<PathBuf>,
    },
    /// Write an OCI runtime spec (config.json for runc or crun) for an image published
    /// with `hsm publish oci:...` and populated at --rootfs.
    RuntimeSpec {
        /// The store URL the image was published to.
        url: String,
        /// The populated root filesystem (root.path of the spec, read-only).
        #[arg(long)]
        rootfs: PathBuf,
        /// Write the spec here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Arguments after `--` replace the image's Cmd (its Entrypoint stays).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Report what this kernel and its filesystems can do, and what the agent will use.
    /// Exits 1 when the agent cannot serve stubs here, 2 when not run as root (the
    /// probes that decide it need root).
    Doctor,
    /// Inspect, install or remove the BPF LSM stub guard (pinned in /sys/fs/bpf/hsm).
    Guard {
        #[command(subcommand)]
        action: guard::GuardAction,
    },
    /// Hold the agent's fanotify group across agent restarts. The agent starts it; it does
    /// nothing else (docs/SEMANTICS.md, "Agent restarts").
    Keeper {
        /// The unix socket agents connect to (default: [agent] state_dir/keeper.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// With no agent connected this long, answer waiting readers EIO and exit.
        #[arg(long)]
        #[arg(value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
    /// Serve stub trees: fetch bytes on first access (runs until SIGTERM; a second agent
    /// started on the same state directory takes over from the first without a gap).
    Agent(AgentArgs),
    /// Show the running agent's state and, per served tree, what is stub, local, pinned
    /// and cached (the agent walks the trees; big ones take a while).
    Status {
        /// Only this file or directory (inside a served tree).
        path: Option<PathBuf>,
        /// Print one JSON object (docs/CONTROL.md).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Fetch what the access traces published for populated trees name (`hsm publish
    /// --trace`), in trace order, ahead of readers. The agent does this by itself at start
    /// and after `hsm populate` unless [prefetch] enabled = false.
    Prefetch {
        /// Roots of populated trees the agent serves.
        #[arg(required = true)]
        trees: Vec<PathBuf>,
        /// Wait until done and say what was fetched (default: return once started).
        #[arg(long)]
        wait: bool,
        /// Print the agent's answer lines as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Fetch every byte of the stubs under PATHs now, so they read without the remote.
    /// Always waits until done.
    Hydrate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print the summary and each file's outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Wait until every file is done (what hydrate always does; accepted for scripts).
        #[arg(long)]
        wait: bool,
        /// Never draw a progress bar.
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Give back the local bytes of files under PATHs that are still copies of their
    /// remote objects (they become stubs again); pinned, modified and busy files are skipped.
    Evict {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print the summary and each file's outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Pin PATHs: fetch them whole and never evict them.
    Pin {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print the summary and each file's outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Remove the pins of PATHs.
    Unpin {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Print the summary and each file's outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
}

/// `hsm agent`'s options; each overrides its configuration key.
#[derive(Debug, Args)]
struct AgentArgs {
    /// Stub trees to serve (added to [agent] trees).
    dst: Vec<PathBuf>,
    /// "filesystem" or "mount" (default: [agent] mark).
    #[arg(long)]
    mark: Option<MarkKind>,
    /// Create this file once the marks are placed.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Write metrics as JSON here periodically and at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
    /// Keeper socket and event journal directory (default: [agent] state_dir).
    #[arg(long, env = "HSM_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// "auto" or "off" (default: [agent] keeper).
    #[arg(long, env = "HSM_KEEPER")]
    keeper: Option<hsm_config::KeeperMode>,
    /// Serve Prometheus metrics at http://ADDR/metrics (default: [metrics] listen).
    #[arg(long, env = "HSM_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Bound the remote data held locally: a size ("64 MiB") or a percentage of the
    /// filesystem ("20%"); "0" for no limit (default: [cache] max_size).
    #[arg(long, env = "HSM_CACHE_MAX_SIZE", value_name = "SIZE")]
    cache_max_size: Option<hsm_config::CacheSize>,
    /// Record every reader's first touch of each stub range, in order, to FILE (for
    /// `hsm publish --trace`; default: [agent] record_trace).
    #[arg(long, env = "HSM_RECORD_TRACE", value_name = "FILE")]
    record_trace: Option<PathBuf>,
    /// Do not prefetch published access traces (default: [prefetch] enabled).
    #[arg(long, env = "HSM_NO_PREFETCH", value_parser = clap::builder::BoolishValueParser::new())]
    no_prefetch: bool,
    /// Most bytes per second prefetch fetches per tree, "0" for no limit (default:
    /// [prefetch] bandwidth).
    #[arg(long, env = "HSM_PREFETCH_BANDWIDTH", value_name = "SIZE")]
    prefetch_bandwidth: Option<ByteSize>,
}

/// Which agent a command talks to.
#[derive(Debug, Args)]
struct AgentSocket {
    /// The agent's state directory, holding control.sock (default: [agent] state_dir).
    #[arg(long, env = "HSM_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl AgentSocket {
    fn dir(&self, cfg: &Config) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| cfg.agent.state_dir.clone())
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match &cli.config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("hsm: {e}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    init_logging(&cfg);
    if let Some(d) = cli.index_dir {
        cfg.index.dir = d;
    }
    hsm_core::index::set_dir(cfg.index.dir.clone());
    let result = match cli.command {
        Command::Populate {
            src,
            dst,
            force,
            json,
            jobs,
            min_granule,
            no_progress,
            index,
            agent,
        } => {
            if let Some(index) = index {
                cfg.populate.index = index;
            }
            if let Some(j) = jobs {
                cfg.populate.jobs = j;
            }
            if let Some(g) = min_granule {
                cfg.populate.min_granule = g;
            }
            let code = tree::populate(&cfg, &src, &dst, force, json, !no_progress);
            if matches!(code, Ok(ExitCode::SUCCESS)) {
                control::hydrate_pinned(&agent.dir(&cfg), &dst);
                if cfg.prefetch.enabled {
                    control::prefetch_populated(&agent.dir(&cfg), &dst);
                }
            }
            code
        }
        Command::Publish {
            src,
            url,
            jobs,
            chunk_size,
            allow_errors,
            json,
            no_progress,
            staging,
            trace,
        } => tree::publish(
            &cfg,
            &src,
            &url,
            &hsm_populate::PublishOptions {
                jobs,
                chunk_size: chunk_size.0,
                progress: !no_progress,
                allow_errors,
                ..Default::default()
            },
            staging,
            &trace,
            json,
        ),
        Command::RuntimeSpec {
            url,
            rootfs,
            output,
            args,
        } => tree::runtime_spec(&cfg, &url, &rootfs, output.as_deref(), &args),
        Command::Doctor => doctor::run(),
        Command::Guard { action } => guard::run(action),
        Command::Keeper { socket, grace } => keeper(&mut cfg, socket, grace),
        Command::Agent(args) => agent(cfg, args),
        Command::Status { path, json, agent } => {
            control::status(&agent.dir(&cfg), path.as_deref(), json)
        }
        Command::Prefetch {
            trees,
            wait,
            json,
            agent,
        } => control::prefetch(&agent.dir(&cfg), &trees, wait, json),
        Command::Hydrate {
            paths,
            json,
            wait: _,
            no_progress,
            agent,
        } => control::cache(
            &agent.dir(&cfg),
            hsm_agent::cache::Op::Hydrate,
            &paths,
            json,
            !no_progress,
        ),
        Command::Evict { paths, json, agent } => control::cache(
            &agent.dir(&cfg),
            hsm_agent::cache::Op::Evict,
            &paths,
            json,
            false,
        ),
        Command::Pin { paths, json, agent } => control::cache(
            &agent.dir(&cfg),
            hsm_agent::cache::Op::Pin,
            &paths,
            json,
            false,
        ),
        Command::Unpin { paths, json, agent } => control::cache(
            &agent.dir(&cfg),
            hsm_agent::cache::Op::Unpin,
            &paths,
            json,
            false,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hsm: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `hsm keeper`: hold the agent's fanotify group across restarts until told to stop.
fn keeper(
    cfg: &mut Config,
    socket: Option<PathBuf>,
    grace: Option<std::time::Duration>,
) -> anyhow::Result<ExitCode> {
    if let Ok(d) = std::env::var("HSM_STATE_DIR") {
        cfg.agent.state_dir = PathBuf::from(d);
    }
    let socket = socket.unwrap_or_else(|| hsm_agent::keeper::socket_path(&cfg.agent.state_dir));
    let grace = grace.unwrap_or(cfg.agent.keeper_grace.0);
    hsm_agent::keeper::run(&socket, grace)
        .map(|()| ExitCode::SUCCESS)
        .with_context(|| format!("keeper on {}", socket.display()))
}

/// `hsm agent`: the command line over the configuration, then serve until stopped.
fn agent(mut cfg: Config, a: AgentArgs) -> anyhow::Result<ExitCode> {
    if let Some(c) = a.cache_max_size {
        cfg.cache.max_size = c;
    }
    if a.metrics_listen.is_some() {
        cfg.metrics.listen = a.metrics_listen;
    }
    if let Some(d) = a.state_dir {
        cfg.agent.state_dir = d;
    }
    if let Some(k) = a.keeper {
        cfg.agent.keeper = k;
    }
    if let Some(m) = a.mark {
        cfg.agent.mark = m;
    }
    if a.ready_file.is_some() {
        cfg.agent.ready_file = a.ready_file;
    }
    if a.stats_file.is_some() {
        cfg.agent.stats_file = a.stats_file;
    }
    if a.record_trace.is_some() {
        cfg.agent.record_trace = a.record_trace;
    }
    if a.no_prefetch {
        cfg.prefetch.enabled = false;
    }
    if let Some(b) = a.prefetch_bandwidth {
        cfg.prefetch.bandwidth = b;
    }
    hsm_agent::run(hsm_agent::AgentOptions {
        trees: a.dst,
        config: cfg.agent,
        remote: cfg.remote,
        metrics_listen: cfg.metrics.listen,
        cache: cfg.cache,
        prefetch: cfg.prefetch,
    })
    .map(|()| ExitCode::SUCCESS)
    .map_err(anyhow::Error::from)
}

/// An error and its causes on one line, each cause once: library errors often name their
/// source in their own message already, and `{:#}` would print it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}
