//! The commands that make trees: `hsm populate`, `hsm publish` (a directory or an OCI image)
//! and `hsm runtime-spec`, and the summary they print.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hsm_config::Config;

pub(crate) fn populate(
    cfg: &Config,
    src: &str,
    dst: &std::path::Path,
    force: bool,
    json: bool,
    progress: bool,
) -> anyhow::Result<ExitCode> {
    cfg.validate(std::path::Path::new("command line"))
        .context("invalid option")?;
    let source = hsm_populate::open_source(src, &cfg.remote)?;
    let opts = hsm_populate::Options {
        min_granule_shift: cfg.populate.min_granule.0.trailing_zeros() as u8,
        jobs: cfg.populate.jobs,
        force,
        progress,
        require_served_fs: true,
    };
    let summary = hsm_populate::populate(source.as_ref(), dst, &opts)?;
    report("populate", &summary, &summary.errors, json)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn publish(
    cfg: &Config,
    src: &std::path::Path,
    url: &str,
    opts: &hsm_populate::PublishOptions,
    staging: Option<PathBuf>,
    traces: &[PathBuf],
    json: bool,
) -> anyhow::Result<ExitCode> {
    cfg.validate(std::path::Path::new("command line"))
        .context("invalid option")?;
    let src = src
        .to_str()
        .with_context(|| format!("{}: SRC must be a valid UTF-8 path", src.display()))?;
    let traces = trace_objects(url, traces)?;
    let objects: Vec<(&str, &[u8])> = traces
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    if src.starts_with("oci:") {
        return publish_image(cfg, src, url, opts, staging, &objects, json);
    }
    let summary = hsm_populate::publish_with_objects(src, url, &cfg.remote, opts, &objects)?;
    report("publish", &summary, &summary.errors, json)
}

/// The objects `hsm publish --trace FILE...` adds: each recorded trace's entries for `url`
/// as `.hsm-traces/NAME` (NAME: the file's name without `.trace`), and the index naming
/// them all. No `--trace`: none (the traces published before stay as they are).
fn trace_objects(url: &str, files: &[PathBuf]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use hsm_manifest::trace::{self, TRACES_PREFIX};
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let want = url.trim_end_matches('/');
    let mut out = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for f in files {
        let file_name = f
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: not a file name", f.display()))?;
        let name = file_name.strip_suffix(".trace").unwrap_or(file_name);
        trace::check_name(name)
            .map_err(|e| anyhow::anyhow!("{}: {e} (rename the file)", f.display()))?;
        anyhow::ensure!(
            !names.iter().any(|n| n == name),
            "{}: a trace named {name:?} is given twice",
            f.display()
        );
        let bytes = std::fs::read(f).with_context(|| format!("{}: reading", f.display()))?;
        let entries = trace::parse(&bytes).with_context(|| format!("{}", f.display()))?;
        let mut text = trace::header_line();
        let mut kept = 0usize;
        let mut others = std::collections::BTreeSet::new();
        for mut e in entries {
            match e.url.take() {
                Some(u) if u.trim_end_matches('/') == want => {
                    text.push_str(&e.line());
                    kept += 1;
                }
                Some(u) => {
                    others.insert(u);
                }
                None => anyhow::bail!(
                    "{}: an entry names no remote (a published trace, not one `hsm agent --record-trace` wrote)",
                    f.display()
                ),
            }
        }
        anyhow::ensure!(
            kept > 0,
            "{}: no entry of this trace is for {url} (it has entries for: {})",
            f.display(),
            if others.is_empty() {
                "nothing".to_string()
            } else {
                others.into_iter().collect::<Vec<_>>().join(", ")
            }
        );
        out.push((format!("{TRACES_PREFIX}{name}"), text.into_bytes()));
        names.push(name.to_string());
    }
    out.push((
        hsm_agent::prefetch::TRACE_INDEX.to_string(),
        serde_json::to_vec(&names)?,
    ));
    Ok(out)
}

/// What `hsm publish oci:...` did: the tree's summary, and which image it was.
#[derive(Debug, serde::Serialize)]
struct ImagePublishSummary {
    #[serde(flatten)]
    publish: hsm_populate::PublishSummary,
    /// The image manifest's digest (sha256:...).
    image_digest: String,
    layers: usize,
    /// Device nodes and FIFOs of the image, not published.
    skipped_devices: u64,
}

impl std::fmt::Display for ImagePublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; image {} ({} layers, {} device nodes and FIFOs not published)",
            self.publish, self.image_digest, self.layers, self.skipped_devices
        )
    }
}

/// Stage the image's root filesystem, publish it like a directory, with the image config
/// beside the manifest; the staging directory goes whatever happens.
fn publish_image(
    cfg: &Config,
    src: &str,
    url: &str,
    opts: &hsm_populate::PublishOptions,
    staging: Option<PathBuf>,
    traces: &[(&str, &[u8])],
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reference = hsm_oci::ImageRef::parse(src)?;
    let staging = staging.unwrap_or_else(hsm_oci::default_staging);
    let staged = hsm_oci::stage(&reference, &staging)?;
    let rootfs = staged.rootfs();
    let result = match rootfs.to_str() {
        Some(root) => hsm_populate::publish_with_objects(
            root,
            url,
            &cfg.remote,
            opts,
            &[(hsm_oci::IMAGE_CONFIG_KEY, staged.image.config.as_slice())]
                .into_iter()
                .chain(traces.iter().copied())
                .collect::<Vec<_>>(),
        )
        .map_err(anyhow::Error::from),
        None => Err(anyhow::anyhow!(
            "{}: the staging path must be valid UTF-8",
            rootfs.display()
        )),
    };
    let image_digest = staged.image.digest.clone();
    let layers = staged.image.layers.len();
    let skipped_devices = staged.skipped_special;
    staged.remove()?;
    let mut publish = result?;
    publish.source = reference.to_string();
    let summary = ImagePublishSummary {
        publish,
        image_digest,
        layers,
        skipped_devices,
    };
    report("publish", &summary, &summary.publish.errors, json)
}

/// Largest `.hsm-image.json` read (image configs are a few KiB).
const MAX_IMAGE_CONFIG: u64 = 16 << 20;

/// Read the image config published at `url` and write a runtime spec for `rootfs`.
pub(crate) fn runtime_spec(
    cfg: &Config,
    url: &str,
    rootfs: &std::path::Path,
    output: Option<&std::path::Path>,
    args: &[String],
) -> anyhow::Result<ExitCode> {
    if !rootfs.is_dir() {
        anyhow::bail!(
            "{}: not a directory (populate the image there first)",
            rootfs.display()
        );
    }
    let key = hsm_oci::IMAGE_CONFIG_KEY;
    let remote = hsm_remote::open_remote(url, &cfg.remote)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let config = rt
        .block_on(async {
            let info = remote.head(key).await?;
            if info.size > MAX_IMAGE_CONFIG {
                anyhow::bail!(
                    "{url}/{key}: {} bytes is too large for an image config",
                    info.size
                );
            }
            let expect = hsm_remote::Expect {
                etag: info.etag,
                version: info.version,
                size: info.size,
            };
            Ok(remote.get_range(key, 0..info.size, &expect).await?)
        })
        .with_context(|| format!("{url}: reading {key}, which `hsm publish oci:...` writes"))?;
    let args = (!args.is_empty()).then_some(args);
    let spec = hsm_oci::runtime_spec(&config, rootfs, args)?;
    let mut text = serde_json::to_string_pretty(&spec)?;
    text.push('\n');
    match output {
        Some(p) => std::fs::write(p, text).with_context(|| format!("{}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Print each entry error and the summary (as JSON on stdout with `json`); exit status 1
/// if any entry failed.
fn report(
    verb: &str,
    summary: &(impl serde::Serialize + std::fmt::Display),
    errors: &[hsm_populate::EntryError],
    json: bool,
) -> anyhow::Result<ExitCode> {
    for e in errors {
        eprintln!("hsm: {verb}: {}: {}", e.path, e.error);
    }
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        eprintln!("{summary}");
    }
    Ok(if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
