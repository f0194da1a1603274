//! The client side of the agent's control socket: `hsm status`, `hsm hydrate`, `hsm
//! evict`, `hsm pin` and `hsm unpin` (docs/CONTROL.md). The agent does the work; this only
//! sends the request and formats what comes back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use hsm_agent::cache::Op;
use hsm_agent::control::{Request, StatusOp, StatusReport, Summary, socket_path};

/// Connect, with the errors a user can act on.
fn connect(state_dir: &Path) -> anyhow::Result<UnixStream> {
    let sock = socket_path(state_dir);
    UnixStream::connect(&sock).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTDIR) => anyhow::anyhow!(
            "no hsm agent serves here: no control socket at {} (start one with `hsm agent DST` or systemctl start hsm-agent)",
            sock.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            anyhow::anyhow!("{}", hsm_agent::control::ROOT_ONLY)
        }
        _ => anyhow::anyhow!("connect {}: {e}", sock.display()),
    })
}

/// Send `req` and call `line` with each answer line (parsed) until the `done` line, whose
/// value is returned. An `error` line becomes the error.
fn exchange(
    state_dir: &Path,
    req: &Request,
    mut line: impl FnMut(&serde_json::Value),
) -> anyhow::Result<serde_json::Value> {
    let mut stream = connect(state_dir)?;
    stream
        .write_all(req.encode().as_bytes())
        .context("sending the request to the agent")?;
    for l in BufReader::new(stream).lines() {
        let l = l.context("reading the agent's answer")?;
        match parse_line(&l)? {
            Line::File(v) => line(&v),
            Line::Done(d) => return Ok(d),
        }
    }
    bail!("the agent closed the connection before it was done (did it stop?)")
}

/// One line of an answer.
#[derive(Debug, PartialEq)]
enum Line {
    /// `{"file": PATH, "outcome": ...}`
    File(serde_json::Value),
    /// The value of `{"done": ...}`.
    Done(serde_json::Value),
}

/// Parse an answer line; `{"error": ...}` becomes the error.
fn parse_line(l: &str) -> anyhow::Result<Line> {
    let mut v: serde_json::Value = serde_json::from_str(l)
        .with_context(|| format!("the agent answered something that is not JSON: {l:?}"))?;
    // A per-file line has a "file", a per-tree one a "tree" (a failed one carries an
    // "error" too).
    if v.get("file").is_some() || v.get("tree").is_some() {
        return Ok(Line::File(v));
    }
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("error"));
    }
    match v.get_mut("done") {
        Some(d) => Ok(Line::Done(d.take())),
        None => bail!("the agent answered a line this hsm does not know: {l}"),
    }
}

/// Paths as the agent needs them: absolute (made so against the current directory).
fn absolute(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    paths
        .iter()
        .map(|p| std::path::absolute(p).with_context(|| format!("{}", p.display())))
        .collect()
}

pub fn status(state_dir: &Path, path: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let path = match path {
        Some(p) => Some(std::path::absolute(p).with_context(|| format!("{}", p.display()))?),
        None => None,
    };
    let req = Request::Status {
        op: StatusOp::Status,
        path,
    };
    let done = exchange(state_dir, &req, |_| {})?;
    if json {
        println!("{done}");
        return Ok(ExitCode::SUCCESS);
    }
    let r: StatusReport =
        serde_json::from_value(done).context("the agent's status is not what this hsm expects")?;
    print!("{}", format_status(&r));
    Ok(ExitCode::SUCCESS)
}

fn format_status(r: &StatusReport) -> String {
    let mut out = String::new();
    let store = match r.group_store.as_str() {
        "keeper" => "keeper in use (the group outlives agent restarts)",
        "systemd" => "no keeper: systemd's fd store keeps the group",
        _ => "no keeper: the group dies with the agent",
    };
    let rows = [
        (
            "agent",
            format!("pid {}, up {}", r.pid, duration(r.uptime_secs)),
        ),
        ("group", store.to_string()),
        (
            "guard",
            if r.guard { "loaded" } else { "not loaded" }.to_string(),
        ),
        (
            "fetching",
            format!(
                "{} fills in flight, {}/s over the last minute, {} events waiting",
                r.fills_in_flight,
                bytes(r.fetch_rate as u64),
                r.events_in_flight
            ),
        ),
        (
            "errors",
            format!(
                "{} denies{} and {} failed fills in the last hour ({} denies since start)",
                r.denies_last_hour,
                if r.denies_by_errno_last_hour.is_empty() {
                    String::new()
                } else {
                    let each: Vec<String> = r
                        .denies_by_errno_last_hour
                        .iter()
                        .map(|(e, n)| format!("{e} {n}"))
                        .collect();
                    format!(" ({})", each.join(", "))
                },
                r.fill_errors_last_hour,
                r.denies_total
            ),
        ),
    ];
    for (k, v) in rows {
        out.push_str(&format!("{k:<9} {v}\n"));
    }
    if let Some(c) = &r.cache {
        out.push_str(&format!(
            "{:<9} {} of {} used (high {}, low {}), {} pinned; {} files evicted ({}), {} fills refused for room\n",
            "cache",
            bytes(c.used_bytes),
            bytes(c.max_bytes),
            bytes(c.high_bytes),
            bytes(c.low_bytes),
            bytes(c.pinned_bytes),
            c.evictions,
            bytes(c.evicted_bytes),
            c.full_denies
        ));
    }
    let head = [
        "PATH", "STUBS", "HYDRATED", "LOCAL", "RESIDENT", "REMOTE", "PINNED", "CACHE",
    ];
    let mut table: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for t in &r.trees {
        let limit = t.cache_limit.map_or("none".to_string(), bytes);
        table.push(vec![
            t.path.display().to_string(),
            t.stubs.to_string(),
            t.hydrated.to_string(),
            t.local_files.to_string(),
            bytes(t.resident_bytes),
            bytes(t.remote_bytes),
            bytes(t.pinned_bytes),
            format!("{}/{limit}", bytes(t.cache_used)),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| table.iter().map(|row| row[c].len()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let mut l = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 0 {
                l.push_str(&format!("{cell:<w$}", w = widths[c]));
            } else {
                l.push_str(&format!("  {cell:>w$}", w = widths[c]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    }
    for t in r.trees.iter().filter(|t| t.unreadable > 0) {
        out.push_str(&format!(
            "{}: {} entries could not be read\n",
            t.path.display(),
            t.unreadable
        ));
    }
    out
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

use hsm_populate::human_bytes as bytes;

/// `hsm hydrate|evict|pin|unpin PATH...`: the agent walks the paths; each file's outcome
/// streams back. Skipped and failed files are named on stderr; exit 1 if any failed.
pub fn cache(
    state_dir: &Path,
    op: Op,
    paths: &[PathBuf],
    json: bool,
    progress: bool,
) -> anyhow::Result<ExitCode> {
    let verb = format!("{op:?}").to_lowercase();
    let req = Request::Cache {
        op,
        paths: absolute(paths)?,
    };
    let pb = hsm_populate::progress_bar(
        progress && !json,
        None,
        &format!("{{spinner}} {verb} [{{elapsed_precise}}] {{pos}} files, {{msg}}"),
    );
    let mut fetched = 0u64;
    let mut files = Vec::new();
    let done = exchange(state_dir, &req, |v| {
        let file = v.get("file").and_then(|f| f.as_str()).unwrap_or("?");
        let outcome = v.get("outcome").and_then(|o| o.as_str()).unwrap_or("?");
        match outcome {
            "skipped" => pb.suspend(|| {
                eprintln!(
                    "hsm: {verb}: {file}: skipped: {}",
                    v.get("reason").and_then(|r| r.as_str()).unwrap_or("")
                )
            }),
            "failed" => pb.suspend(|| {
                eprintln!(
                    "hsm: {verb}: {file}: {}",
                    v.get("error").and_then(|r| r.as_str()).unwrap_or("failed")
                )
            }),
            _ => {}
        }
        fetched += v.get("fetched").and_then(|f| f.as_u64()).unwrap_or(0);
        pb.inc(1);
        pb.set_message(format!("{} fetched", bytes(fetched)));
        if json {
            files.push(v.clone());
        }
    });
    pb.finish_and_clear();
    let done = done?;
    let s: Summary = serde_json::from_value(done.clone())
        .context("the agent's summary is not what this hsm expects")?;
    if json {
        println!("{}", serde_json::json!({ "summary": done, "files": files }));
    } else {
        eprintln!("{}", format_summary(&verb, &s));
    }
    Ok(if s.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// After `hsm populate DST`: ask the agent serving DST, if one runs, to hydrate what pins
/// cover (files the run added below a pinned directory). Best effort: without an agent
/// nothing is said (the next `hsm pin`, or first access, fetches them); a failure is a
/// warning, never a failed populate.
pub fn hydrate_pinned(state_dir: &Path, dst: &Path) {
    if !socket_path(state_dir).exists() {
        return;
    }
    let req = match absolute(&[dst.to_path_buf()]) {
        Ok(paths) => Request::Cache {
            op: Op::Repin,
            paths,
        },
        Err(_) => return,
    };
    let mut hydrated = 0u64;
    let done = exchange(state_dir, &req, |v| {
        match v.get("outcome").and_then(|o| o.as_str()) {
            Some("hydrated") if v.get("fetched").and_then(|f| f.as_u64()).unwrap_or(0) > 0 => {
                hydrated += 1
            }
            Some("failed") => eprintln!(
                "hsm: populate: hydrating pinned {}: {}",
                hsm_populate::escape::escape_bytes(
                    v.get("file")
                        .and_then(|f| f.as_str())
                        .unwrap_or("?")
                        .as_bytes()
                ),
                hsm_populate::escape::escape_text(
                    v.get("error").and_then(|r| r.as_str()).unwrap_or("failed")
                )
            ),
            _ => {}
        }
    });
    match done {
        Ok(_) if hydrated > 0 => {
            eprintln!("hsm: populate: the agent hydrated {hydrated} pinned files")
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("hsm: populate: could not ask the agent to hydrate pinned files: {e:#}")
        }
    }
}

/// `hsm prefetch TREE...`: ask the agent to prefetch each populated tree's published
/// traces; with `wait`, until done, printing what each did.
pub fn prefetch(
    state_dir: &Path,
    paths: &[PathBuf],
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let req = Request::Prefetch {
        op: hsm_agent::control::PrefetchOp::Prefetch,
        paths: absolute(paths)?,
        wait,
    };
    let mut failed = false;
    let mut lines = Vec::new();
    exchange(state_dir, &req, |v| {
        let tree = v.get("tree").and_then(|t| t.as_str()).unwrap_or("?");
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            failed = true;
            eprintln!("hsm: prefetch: {tree}: {e}");
        } else if !json {
            match v.get("prefetch") {
                Some(serde_json::Value::Null) => {
                    eprintln!("{tree}: no published traces (or no remote recorded on its root)")
                }
                Some(p) => {
                    let n = |k: &str| p.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
                    eprintln!(
                        "{tree}: {} traces, {} entries: {} fetched, {} skipped, {} failed in {:.1} s",
                        n("traces"),
                        n("entries"),
                        hsm_populate::human_bytes(n("bytes_fetched") as u64),
                        n("skipped"),
                        n("failed"),
                        n("elapsed_secs")
                    );
                    if n("pack_refused") > 0.0 {
                        eprintln!(
                            "{tree}: {} entries fetched from their objects: the pack's bytes were not theirs (publish --trace again)",
                            n("pack_refused")
                        );
                    }
                    failed |= n("failed") > 0.0;
                }
                None => eprintln!("{tree}: prefetch started"),
            }
        } else if v
            .get("prefetch")
            .and_then(|p| p.get("failed"))
            .and_then(|f| f.as_u64())
            > Some(0)
        {
            failed = true;
        }
        lines.push(v.clone());
    })?;
    if json {
        println!("{}", serde_json::Value::Array(lines));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// After `hsm populate DST`: ask the agent serving DST, if one runs, to prefetch the traces
/// published for it (without waiting). Best effort, like [`hydrate_pinned`].
pub fn prefetch_populated(state_dir: &Path, dst: &Path) {
    if !socket_path(state_dir).exists() {
        return;
    }
    let Ok(paths) = absolute(&[dst.to_path_buf()]) else {
        return;
    };
    let req = Request::Prefetch {
        op: hsm_agent::control::PrefetchOp::Prefetch,
        paths,
        wait: false,
    };
    let done = exchange(state_dir, &req, |v| {
        // A DST outside the trees this agent serves is not its to prefetch: nothing to say.
        let not_served = v.get("not_served").and_then(|n| n.as_bool()) == Some(true);
        if let Some(e) = v
            .get("error")
            .and_then(|e| e.as_str())
            .filter(|_| !not_served)
        {
            eprintln!("hsm: populate: prefetch: {e}");
        }
    });
    if let Err(e) = done {
        eprintln!("hsm: populate: could not ask the agent to prefetch: {e:#}");
    }
}

fn format_summary(verb: &str, s: &Summary) -> String {
    let mut parts = vec![format!(
        "{} file{}",
        s.files,
        if s.files == 1 { "" } else { "s" }
    )];
    for (n, what) in [
        (s.hydrated, "hydrated"),
        (s.evicted, "evicted"),
        (s.already_stub, "already stubs"),
        (s.unpinned, "unpinned"),
        (s.skipped, "skipped"),
        (s.failed, "failed"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    if s.bytes_fetched > 0 {
        parts.push(format!("{} fetched", bytes(s.bytes_fetched)));
    }
    if s.bytes_freed > 0 {
        parts.push(format!("{} freed", bytes(s.bytes_freed)));
    }
    format!("{verb}: {} in {:.1}s", parts.join(", "), s.elapsed_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_lines() {
        let f = r#"{"file":"/t/a","outcome":"failed","error":"EIO"}"#;
        assert!(matches!(parse_line(f), Ok(Line::File(v)) if v["error"] == "EIO"));
        let d = r#"{"done":{"files":1}}"#;
        assert_eq!(
            parse_line(d).ok(),
            Some(Line::Done(serde_json::json!({"files": 1})))
        );
        let e = parse_line(r#"{"error":"the control socket is root-only: run as root"}"#);
        assert_eq!(
            e.err().map(|e| e.to_string()).as_deref(),
            Some(hsm_agent::control::ROOT_ONLY)
        );
        assert!(parse_line("not json").is_err());
        assert!(parse_line("{}").is_err());
    }

    #[test]
    fn formats_bytes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(duration(59.9), "59s");
        assert_eq!(duration(3725.0), "1h2m");
    }

    #[test]
    fn status_table_is_aligned() {
        let r = StatusReport {
            pid: 7,
            group_store: "keeper".into(),
            keeper: true,
            trees: vec![hsm_agent::control::TreeStatus {
                tree: "/t".into(),
                path: "/t".into(),
                stubs: 12,
                resident_bytes: 2048,
                cache_used: 2048,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = format_status(&r);
        assert!(text.contains("keeper in use"), "{text}");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("PATH") || l.starts_with("/t"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[1].contains("2.0 KiB/none"), "{text}");
        // Right-aligned columns end at the same place.
        assert_eq!(
            lines[0].find("STUBS").map(|i| i + 5),
            lines[1].find("12").map(|i| i + 2)
        );
    }

    #[test]
    fn summary_names_what_happened() {
        let s = Summary {
            files: 3,
            hydrated: 2,
            skipped: 1,
            bytes_fetched: 1 << 20,
            ..Default::default()
        };
        assert_eq!(
            format_summary("hydrate", &s),
            "hydrate: 3 files, 2 hydrated, 1 skipped, 1.0 MiB fetched in 0.0s"
        );
    }
}
