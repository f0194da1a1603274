//! Access traces (docs/MANIFEST.md, "Traces"): the order in which a workload first touched
//! each range of each object. `hsm agent --record-trace FILE` writes one, `hsm publish
//! --trace FILE` stores it beside the manifest as `.hsm-traces/NAME`, and the agent
//! prefetches a populated tree's objects in that order.
//!
//! JSON Lines: a header `{"format":"hsm-trace","version":1}`, then one entry per line,
//! `{"url":"s3://b/p","key":"usr/bin/python3","start":0,"end":1048576}`. A recorded trace
//! names each entry's remote (`url`); a published one is relative to the prefix it is
//! stored under and leaves `url` out.

use serde::{Deserialize, Serialize};

/// The `format` of a trace's header line.
pub const TRACE_FORMAT: &str = "hsm-trace";
/// The only version this code reads and writes.
pub const TRACE_VERSION: u32 = 1;
/// Where published traces live, relative to the tree's prefix.
pub const TRACES_PREFIX: &str = ".hsm-traces/";
/// Most entries a trace may have (a trace of every granule of a large tree is still far
/// below it); a longer one is refused, not truncated.
pub const MAX_TRACE_ENTRIES: usize = 4_000_000;

/// One range of one object, in the order the workload first touched it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceEntry {
    /// The remote's base URL (recorded traces only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Object key relative to the remote's URL.
    pub key: String,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
}

/// Why a trace cannot be read. Each names the line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("not an hsm trace: the first line must be {{\"format\":\"hsm-trace\",\"version\":1}}")]
    NotATrace,
    #[error("trace version {0} is not supported (this hsm reads version {TRACE_VERSION})")]
    Unsupported(u32),
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("more than {MAX_TRACE_ENTRIES} entries")]
    TooLong,
}

/// The header line, newline included.
pub fn header_line() -> String {
    let mut s = serde_json::to_string(&Header {
        format: TRACE_FORMAT.into(),
        version: TRACE_VERSION,
    })
    .unwrap_or_default();
    s.push('\n');
    s
}

impl TraceEntry {
    /// The entry as one line, newline included.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Parse a whole trace. Entries must have a non-empty key and `start < end`; blank lines
/// are not allowed (a trace is written by a program, so one is a sign of damage). A last
/// line without its newline is accepted: a recording agent that was killed may leave one,
/// and it is still a whole JSON object or it fails to parse.
pub fn parse(bytes: &[u8]) -> Result<Vec<TraceEntry>, TraceError> {
    let text = std::str::from_utf8(bytes).map_err(|e| TraceError::Line {
        line: 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        why: "not UTF-8".into(),
    })?;
    let mut lines = text.lines();
    let header: Header = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or(TraceError::NotATrace)?;
    if header.format != TRACE_FORMAT {
        return Err(TraceError::NotATrace);
    }
    if header.version != TRACE_VERSION {
        return Err(TraceError::Unsupported(header.version));
    }
    let mut out = Vec::new();
    for (i, l) in lines.enumerate() {
        let line = i + 2;
        let e: TraceEntry = serde_json::from_str(l).map_err(|e| TraceError::Line {
            line,
            why: e.to_string(),
        })?;
        if e.key.is_empty() || e.key.contains('\0') {
            return Err(TraceError::Line {
                line,
                why: "empty key, or a NUL in it".into(),
            });
        }
        if e.start >= e.end {
            return Err(TraceError::Line {
                line,
                why: format!("empty range {}..{}", e.start, e.end),
            });
        }
        if out.len() == MAX_TRACE_ENTRIES {
            return Err(TraceError::TooLong);
        }
        out.push(e);
    }
    Ok(out)
}

/// A published trace's name (the part after [`TRACES_PREFIX`]): 1 to 128 of
/// `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a trace name: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// Interleave several traces (one per entry point of a package) into one order: the
/// first entry of each, then the second of each, and so on, each (key, range) once.
pub fn interleave(traces: &[Vec<TraceEntry>]) -> Vec<TraceEntry> {
    let mut seen = std::collections::HashSet::new();
    let longest = traces.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..longest {
        for t in traces {
            if let Some(e) = t.get(i) {
                if seen.insert((e.key.clone(), e.start, e.end)) {
                    out.push(e.clone());
                }
            }
        }
    }
    out
}

/// Where published traces' packs live, relative to the tree's prefix: the pack of
/// `.hsm-traces/NAME` is `.hsm-trace-packs/NAME`.
pub const PACKS_PREFIX: &str = ".hsm-trace-packs/";
/// The `format` of a pack's header line.
pub const PACK_FORMAT: &str = "hsm-trace-pack";
/// Longest pack header line accepted, newline included.
pub const MAX_PACK_HEADER: usize = 1024;

/// The header line of a trace pack: which trace it belongs to, and how many of its first
/// entries the bytes after the line hold (each entry's `end - start` bytes, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackHeader {
    pub format: String,
    pub version: u32,
    /// BLAKE3 of the published trace object's bytes, lowercase hex: a pack is used only
    /// with the very trace it was made for.
    pub trace: String,
    /// The trace's first `entries` entries are in the pack.
    pub entries: usize,
    /// Bytes after the header line.
    pub bytes: u64,
}

impl PackHeader {
    /// The header of a pack for the published trace `trace` (its object's bytes).
    pub fn new(trace: &[u8], entries: usize, bytes: u64) -> Self {
        PackHeader {
            format: PACK_FORMAT.into(),
            version: TRACE_VERSION,
            trace: blake3::hash(trace).to_hex().to_string(),
            entries,
            bytes,
        }
    }

    /// The header as its line, newline included.
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Parse a header line (without its newline) and check that it belongs to the
    /// published trace `trace` (its object's bytes) of `entries` entries.
    pub fn parse_for(line: &[u8], trace: &[u8], entries: usize) -> Result<Self, String> {
        let h: PackHeader =
            serde_json::from_slice(line).map_err(|e| format!("not a trace pack header: {e}"))?;
        if h.format != PACK_FORMAT {
            return Err(format!("format {:?} is not {PACK_FORMAT:?}", h.format));
        }
        if h.version != TRACE_VERSION {
            return Err(format!("pack version {} is not supported", h.version));
        }
        if h.trace != blake3::hash(trace).to_hex().as_str() {
            return Err("made for another version of the trace".into());
        }
        if h.entries > entries {
            return Err(format!(
                "claims {} entries of a trace of {entries}",
                h.entries
            ));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pack_header_names_its_trace() {
        let trace = b"{\"format\":\"hsm-trace\",\"version\":1}\n";
        let h = PackHeader::new(trace, 2, 10);
        let line = h.line();
        assert!(line.ends_with('\n') && line.len() < MAX_PACK_HEADER);
        let body = line.trim_end().as_bytes();
        assert_eq!(PackHeader::parse_for(body, trace, 2), Ok(h.clone()));
        assert_eq!(PackHeader::parse_for(body, trace, 5), Ok(h));
        assert!(PackHeader::parse_for(body, b"other", 2).is_err());
        assert!(PackHeader::parse_for(body, trace, 1).is_err());
        assert!(PackHeader::parse_for(b"{}", trace, 2).is_err());
    }

    fn entry(url: Option<&str>, key: &str, start: u64, end: u64) -> TraceEntry {
        TraceEntry {
            url: url.map(str::to_string),
            key: key.into(),
            start,
            end,
        }
    }

    #[test]
    fn round_trip_with_and_without_url() {
        let a = entry(Some("s3://b/p"), "usr/bin/x", 0, 4096);
        let b = entry(None, "lib/y.so", 1 << 20, 3 << 20);
        let text = header_line() + &a.line() + &b.line();
        assert_eq!(
            text.lines().nth(1).expect("line 2"),
            r#"{"url":"s3://b/p","key":"usr/bin/x","start":0,"end":4096}"#
        );
        assert_eq!(
            text.lines().nth(2).expect("line 3"),
            r#"{"key":"lib/y.so","start":1048576,"end":3145728}"#
        );
        assert_eq!(parse(text.as_bytes()).expect("a valid trace"), vec![a, b]);
    }

    #[test]
    fn refuses_damage_and_names_the_line() {
        assert_eq!(parse(b""), Err(TraceError::NotATrace));
        assert_eq!(
            parse(b"{\"format\":\"hsm-manifest\",\"version\":1}\n"),
            Err(TraceError::NotATrace)
        );
        assert_eq!(
            parse(b"{\"format\":\"hsm-trace\",\"version\":2}\n"),
            Err(TraceError::Unsupported(2))
        );
        let h = header_line();
        for (bad, line) in [
            (format!("{h}{{\"key\":\"a\",\"start\":5,\"end\":5}}\n"), 2),
            (
                format!(
                    "{h}{{\"key\":\"a\",\"start\":0,\"end\":1}}\n{{\"key\":\"\",\"start\":0,\"end\":1}}\n"
                ),
                3,
            ),
            (format!("{h}{{\"key\":\"a\",\"start\":0}}\n"), 2),
            (
                format!("{h}{{\"key\":\"a\",\"start\":0,\"end\":1,\"x\":1}}\n"),
                2,
            ),
            (format!("{h}\n"), 2),
            (format!("{h}{{\"key\":\"a\",\"sta"), 2),
        ] {
            match parse(bad.as_bytes()) {
                Err(TraceError::Line { line: l, .. }) => assert_eq!(l, line, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        // A last line without its newline is still a whole entry.
        assert_eq!(
            parse(format!("{h}{{\"key\":\"a\",\"start\":0,\"end\":1}}").as_bytes())
                .expect("a whole last line")
                .len(),
            1
        );
    }

    #[test]
    fn names() {
        for ok in ["start", "python-import.v2", "a_b"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interleave_takes_turns_and_drops_repeats() {
        let t1 = vec![entry(None, "a", 0, 1), entry(None, "b", 0, 1)];
        let t2 = vec![
            entry(None, "c", 0, 1),
            entry(None, "a", 0, 1),
            entry(None, "d", 0, 1),
        ];
        let keys: Vec<String> = interleave(&[t1, t2]).into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["a", "c", "b", "d"]);
    }
}
