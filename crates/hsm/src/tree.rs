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
        index: cfg.populate.index,
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
    let traces = read_traces(url, traces)?;
    // The set the new one replaces, read before the index is rewritten.
    let earlier = (!traces.is_empty()).then(|| TraceSet::published(cfg, url, &traces));
    if src.starts_with("oci:") {
        return publish_image(cfg, src, url, opts, staging, &traces, earlier, json);
    }
    let traces = if traces.is_empty() {
        Vec::new()
    } else {
        trace_objects(Some(&hsm_populate::LocalSource::open(src)?), &traces)
    };
    let objects: Vec<(&str, &[u8])> = traces
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let summary = hsm_populate::publish_with_objects(src, url, &cfg.remote, opts, &objects)?;
    if let Some(earlier) = earlier.filter(|_| summary.manifest_written) {
        earlier.remove_replaced();
    }
    report("publish", &summary, &summary.errors, json)
}

/// The access traces published at a URL before a `publish --trace` replaced them, so that
/// the objects of the traces the new set no longer names can be removed once it is in
/// place (the new index, then the manifest, are written first: an agent that read the old
/// index meanwhile finds a trace gone and fetches without it).
struct TraceSet {
    url: String,
    store: Option<std::sync::Arc<dyn hsm_remote::Store>>,
    names: Vec<String>,
    /// The names of the set that replaces it.
    kept: Vec<String>,
}

impl TraceSet {
    /// The names the index at `url` lists (none if it has no index or cannot be read:
    /// then nothing is removed, and the reason is logged), to be replaced by `new`.
    fn published(cfg: &Config, url: &str, new: &[TraceToPublish]) -> Self {
        let mut set = TraceSet {
            url: url.to_string(),
            store: None,
            names: Vec::new(),
            kept: new.iter().map(|t| t.name.clone()).collect(),
        };
        let store = match hsm_remote::RemoteUrl::parse(url)
            .map_err(|e| e.to_string())
            .and_then(|u| hsm_remote::open_store(&u, &cfg.remote).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("{url}: cannot open the store to read the earlier traces: {e}");
                return set;
            }
        };
        match block_on(hsm_agent::prefetch::published_trace_names(&*store, url)) {
            Ok(Ok(names)) => set.names = names,
            Ok(Err(e)) => tracing::warn!("{e}; the earlier traces' objects are left in the store"),
            Err(e) => {
                tracing::warn!("{url}: {e}; the earlier traces' objects are left in the store")
            }
        }
        set.store = Some(store);
        set
    }

    /// Remove `.hsm-traces/NAME` and `.hsm-trace-packs/NAME` of every earlier name the new
    /// set does not keep. A failure is logged: the objects are unused, only taking room.
    fn remove_replaced(self) {
        use hsm_manifest::trace::{PACKS_PREFIX, TRACES_PREFIX};
        let Some(store) = self.store else { return };
        let url = &self.url;
        let keys: Vec<String> = self
            .names
            .iter()
            .filter(|n| !self.kept.contains(n))
            .flat_map(|n| [format!("{TRACES_PREFIX}{n}"), format!("{PACKS_PREFIX}{n}")])
            .collect();
        if keys.is_empty() {
            return;
        }
        let removed = block_on(async {
            let mut removed = 0;
            for key in &keys {
                match store.delete(key).await {
                    Ok(()) => removed += 1,
                    Err(hsm_remote::RemoteError::NotFound { .. }) => {}
                    Err(e) => tracing::warn!(
                        "{url}/{key}: cannot remove the replaced trace's object: {e}"
                    ),
                }
            }
            removed
        });
        match removed {
            Ok(0) => {}
            Ok(n) => tracing::info!("{url}: removed {n} objects of the replaced traces"),
            Err(e) => tracing::warn!("{url}: {e}; the replaced traces' objects are left"),
        }
    }
}

/// Run a store call to its end from a synchronous command.
fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for a store call")?;
    Ok(rt.block_on(f))
}

/// A recorded trace to publish: its name, the published trace's text (header and the
/// entries for the URL, without it) and those entries.
struct TraceToPublish {
    name: String,
    text: String,
    entries: Vec<hsm_manifest::trace::TraceEntry>,
}

/// Most bytes one trace's pack holds (it is built in memory); the entries after it are
/// fetched one by one.
const MAX_PACK_BYTES: u64 = 256 << 20;

/// The objects `hsm publish --trace FILE...` adds: each trace as `.hsm-traces/NAME`, its
/// pack (the bytes of its entries, read from the tree being published at `root`) as
/// `.hsm-trace-packs/NAME`, and the index naming them all (docs/MANIFEST.md, "Access
/// traces"). A pack stops, with a warning, at the first entry whose bytes the tree does
/// not have, or at [`MAX_PACK_BYTES`]; the agent checks every byte of it against the
/// manifest's digests before it uses it.
fn trace_objects(
    root: Option<&hsm_populate::LocalSource>,
    traces: &[TraceToPublish],
) -> Vec<(String, Vec<u8>)> {
    use hsm_manifest::trace::{PACKS_PREFIX, PackHeader, TRACES_PREFIX};
    if traces.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for t in traces {
        let mut bytes = Vec::new();
        let mut held = 0;
        if let Some(root) = root {
            for e in &t.entries {
                if (bytes.len() as u64) + (e.end - e.start) > MAX_PACK_BYTES {
                    eprintln!(
                        "hsm publish: trace {}: its pack stops at entry {} of {} ({} MiB); the rest are fetched one by one",
                        t.name,
                        held + 1,
                        t.entries.len(),
                        MAX_PACK_BYTES >> 20
                    );
                    break;
                }
                match read_range(root, &e.key, e.start..e.end) {
                    Ok(b) => bytes.extend_from_slice(&b),
                    Err(why) => {
                        eprintln!(
                            "hsm publish: trace {}: its pack stops at entry {} of {} ({}, bytes {}..{}: {why}); the rest are fetched one by one",
                            t.name,
                            held + 1,
                            t.entries.len(),
                            e.key,
                            e.start,
                            e.end
                        );
                        break;
                    }
                }
                held += 1;
            }
        }
        let mut pack = PackHeader::new(t.text.as_bytes(), held, bytes.len() as u64)
            .line()
            .into_bytes();
        pack.extend_from_slice(&bytes);
        out.push((
            format!("{TRACES_PREFIX}{}", t.name),
            t.text.clone().into_bytes(),
        ));
        out.push((format!("{PACKS_PREFIX}{}", t.name), pack));
    }
    let names: Vec<&str> = traces.iter().map(|t| t.name.as_str()).collect();
    out.push((
        hsm_agent::prefetch::TRACE_INDEX.to_string(),
        serde_json::to_vec(&names).unwrap_or_default(),
    ));
    out
}

/// Bytes `range` of the regular file `key` of the tree `root` (resolved beneath it, never
/// through a symlink).
fn read_range(
    root: &hsm_populate::LocalSource,
    key: &str,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    hsm_manifest::check_path(key).map_err(|e| e.to_string())?;
    let (f, st) = root
        .open_file(std::path::Path::new(key))
        .map_err(|e| e.to_string())?;
    if st.size < range.end {
        return Err(format!("the file has only {} bytes", st.size));
    }
    let mut buf = vec![0; (range.end - range.start) as usize];
    f.read_exact_at(&mut buf, range.start)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Read and check the `--trace` files: each one's entries for `url`. No `--trace`: none
/// (the traces published before stay as they are).
fn read_traces(url: &str, files: &[PathBuf]) -> anyhow::Result<Vec<TraceToPublish>> {
    use hsm_manifest::trace;
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
        let mut kept = Vec::new();
        let mut others = std::collections::BTreeSet::new();
        for mut e in entries {
            match e.url.take() {
                Some(u) if u.trim_end_matches('/') == want => {
                    text.push_str(&e.line());
                    kept.push(e);
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
            !kept.is_empty(),
            "{}: no entry of this trace is for {url} (it has entries for: {})",
            f.display(),
            if others.is_empty() {
                "nothing".to_string()
            } else {
                others.into_iter().collect::<Vec<_>>().join(", ")
            }
        );
        out.push(TraceToPublish {
            name: name.to_string(),
            text,
            entries: kept,
        });
        names.push(name.to_string());
    }
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
#[allow(clippy::too_many_arguments)]
fn publish_image(
    cfg: &Config,
    src: &str,
    url: &str,
    opts: &hsm_populate::PublishOptions,
    staging: Option<PathBuf>,
    traces: &[TraceToPublish],
    earlier: Option<TraceSet>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reference = hsm_oci::ImageRef::parse(src)?;
    let staging = staging.unwrap_or_else(hsm_oci::default_staging);
    let staged = hsm_oci::stage(&reference, &staging)?;
    let rootfs = staged.rootfs();
    let traces = match rootfs.to_str().map(hsm_populate::LocalSource::open) {
        Some(Ok(root)) if !traces.is_empty() => trace_objects(Some(&root), traces),
        _ => trace_objects(None, traces),
    };
    let traces: Vec<(&str, &[u8])> = traces
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
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
    if let Some(earlier) = earlier.filter(|_| publish.manifest_written) {
        earlier.remove_replaced();
    }
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
    let config = block_on(async {
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
    })?
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
