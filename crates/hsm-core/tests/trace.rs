//! Access traces: what the recorder writes for readers' first touches, and the prefetch of
//! one entry (exactly its missing granules, nothing for a stub that names another object).
//!
//! Like every core test these need root (stub xattrs); they refuse to run without it.

mod common;
use common::*;

use std::os::fd::AsFd;
use std::sync::Arc;

use hsm_core::trace::TraceRecorder;
use hsm_core::{Access, Prefetched, Verdict};
use hsm_manifest::trace::parse;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_first_touches_in_order() {
    let r = rig(fast_opts());
    let a = r.stub("a", "pkg/a", pattern(4 << 20, 1), 20);
    let b = r.stub("b", "pkg/b", pattern((2 << 20) - 5, 2), 20);
    let path = r.dir.path().join("t.trace");
    let rec = Arc::new(TraceRecorder::create(&path).expect("create the trace"));
    r.core.record_trace(rec.clone());
    assert_eq!(r.read(&a, 2 * MIB + 10, 100).await, Verdict::Allow);
    assert_eq!(r.read(&b, 0, MIB + 1).await, Verdict::Allow);
    // Already touched: nothing new.
    assert_eq!(r.read(&a, 2 * MIB, 4096).await, Verdict::Allow);
    // The next granule of the last entry's object extends that entry only while it is the
    // last one; here b's came between.
    assert_eq!(r.read(&a, 3 * MIB, 4096).await, Verdict::Allow);
    assert_eq!(r.read(&a, 3 * MIB + 4096, 4096).await, Verdict::Allow);
    // A write is not a read: not recorded.
    let _ = r.access(&a, 0, 4096, Access::Write).await;
    assert_eq!(r.read(&a, MIB, 10).await, Verdict::Allow);
    assert_eq!(r.read(&a, 0, 10).await, Verdict::Allow);
    r.core.flush_trace();
    assert_eq!(rec.entries(), 5);
    let got: Vec<(String, u64, u64, String)> = parse(&std::fs::read(&path).expect("read"))
        .expect("a valid trace")
        .into_iter()
        .map(|e| (e.key, e.start, e.end, e.url.unwrap_or_default()))
        .collect();
    let url = URL.to_string();
    assert_eq!(
        got,
        vec![
            ("pkg/a".into(), 2 * MIB, 3 * MIB, url.clone()),
            ("pkg/b".into(), 0, (2 << 20) - 5, url.clone()),
            ("pkg/a".into(), 3 * MIB, 4 * MIB, url.clone()),
            ("pkg/a".into(), MIB, 2 * MIB, url.clone()),
            ("pkg/a".into(), 0, MIB, url),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_exactly_the_missing_range() {
    let r = rig(fast_opts());
    let data = pattern(4 << 20, 3);
    let f = r.stub("f", "pkg/f", data.clone(), 20);
    // A reader first: granule 1 is resident before the prefetch.
    assert_eq!(r.read(&f, MIB, 10).await, Verdict::Allow);
    let got = r
        .core
        .prefetch(f.as_fd(), URL, "pkg/f", MIB + 5..3 * MIB)
        .await
        .expect("prefetch");
    assert_eq!(got, Prefetched::Fetched(MIB), "only granule 2 was missing");
    let ranges: Vec<_> = r
        .remote
        .inner()
        .served_ranges()
        .into_iter()
        .map(|(_, range)| range)
        .collect();
    assert_eq!(ranges, vec![MIB..2 * MIB, 2 * MIB..3 * MIB]);
    // Again: nothing left to fetch in that range.
    let again = r.core.prefetch(f.as_fd(), URL, "pkg/f", MIB..3 * MIB).await;
    assert_eq!(again.expect("prefetch"), Prefetched::Fetched(0));
    // A trace entry for another object (the file was replaced or renamed since).
    let other = r.core.prefetch(f.as_fd(), URL, "pkg/g", 0..MIB).await;
    assert_eq!(other.expect("prefetch"), Prefetched::Elsewhere);
    let other_url = r
        .core
        .prefetch(f.as_fd(), "s3://elsewhere", "pkg/f", 0..MIB)
        .await;
    assert_eq!(other_url.expect("prefetch"), Prefetched::Elsewhere);
    assert_eq!(r.remote.inner().served_ranges().len(), 2);
    // Not a stub at all.
    let plain = std::fs::File::create(r.dir.path().join("plain")).expect("create");
    let p = r.core.prefetch(plain.as_fd(), URL, "pkg/f", 0..MIB).await;
    assert_eq!(p.expect("prefetch"), Prefetched::NotStub);
    // What was prefetched reads as the object's bytes, with no further fetch.
    assert_eq!(r.read(&f, 2 * MIB, MIB).await, Verdict::Allow);
    assert_eq!(r.remote.inner().served_ranges().len(), 2);
    assert_bytes(&read_at(&f, MIB, 2 << 20), &data[1 << 20..3 << 20]);
}

#[test]
fn a_symlink_is_not_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").expect("write");
    let link = dir.path().join("t.trace");
    std::os::unix::fs::symlink(&victim, &link).expect("symlink");
    let e = TraceRecorder::create(&link).expect_err("a symlink must be refused");
    assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
    assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
}
