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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_that_completes_a_file_finalises_it_without_the_persister() {
    // A long persist interval: only the prefetch itself can finalise the file.
    let mut opts = fast_opts();
    opts.persist_interval = std::time::Duration::from_secs(3600);
    let r = rig(opts);
    let data = pattern((3 << 20) + 7, 4);
    let f = r.stub("f", "pkg/f", data.clone(), 20);
    let part = r.core.prefetch(f.as_fd(), URL, "pkg/f", 0..MIB).await;
    assert_eq!(part.expect("prefetch"), Prefetched::Fetched(MIB));
    assert!(has_marker(&f), "a partly fetched file stays a stub");
    let rest = r
        .core
        .prefetch(f.as_fd(), URL, "pkg/f", 0..data.len() as u64)
        .await;
    assert_eq!(
        rest.expect("prefetch"),
        Prefetched::Fetched(data.len() as u64 - MIB)
    );
    become_ordinary(&f).await;
    assert!(stored_map(&f).is_none(), "and so is the map");
    assert_eq!(r.metric("hydrated"), 1);
    assert_bytes(&read_at(&f, 0, data.len() + 10), &data);
    let before = r.remote.inner().requests();
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::AllowAndIgnore);
    assert_eq!(r.remote.inner().requests(), before);
}

/// Wait (5 s at most) for the stub `f` to become an ordinary file.
async fn become_ordinary(f: &std::fs::File) {
    for _ in 0..500 {
        if !has_marker(f) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("still a stub 5 s after the prefetch completed it");
}

/// The ranges of `key` the mock remote served.
fn ranges_of(r: &Rig, key: &str) -> Vec<std::ops::Range<u64>> {
    r.remote
        .inner()
        .served_ranges()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, range)| range)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplied_bytes_are_written_only_when_every_chunk_matches() {
    let mut opts = fast_opts();
    opts.persist_interval = std::time::Duration::from_secs(3600);
    let r = rig(opts);
    let data = pattern((3 << 20) + 100, 5);
    let len = data.len() as u64;
    let f = r.verified_stub("f", "pkg/f", data.clone(), None);
    let bytes = |range: std::ops::Range<u64>| {
        bytes::Bytes::copy_from_slice(&data[range.start as usize..range.end as usize])
    };
    let supply =
        |start: u64, b: bytes::Bytes| r.core.prefetch_supplied(f.as_fd(), URL, "pkg/f", start, b);
    // The first granule, whole and right: written without a request for the object.
    assert_eq!(
        supply(0, bytes(0..MIB)).await.expect("supply"),
        Prefetched::Fetched(MIB)
    );
    assert!(ranges_of(&r, "pkg/f").is_empty(), "nothing fetched");
    // One wrong byte in the second: nothing of it is written.
    let mut bad = data[MIB as usize..2 * MIB as usize].to_vec();
    bad[70_000] ^= 0x40;
    let got = supply(MIB, bytes::Bytes::from(bad)).await.expect("supply");
    assert_eq!(got, Prefetched::Unverified);
    // Not on a chunk boundary, or past the object's end: not used either.
    let got = supply(MIB + 5, bytes(MIB + 5..2 * MIB))
        .await
        .expect("supply");
    assert_eq!(got, Prefetched::Unverified);
    let mut long = data[2 * MIB as usize..].to_vec();
    long.extend_from_slice(&[0; 4096]);
    let got = supply(2 * MIB, bytes::Bytes::from(long))
        .await
        .expect("supply");
    assert_eq!(got, Prefetched::Unverified);
    // The second granule is still missing: a reader fetches it from the remote.
    assert_eq!(r.read(&f, MIB + 10, 10).await, Verdict::Allow);
    assert_eq!(ranges_of(&r, "pkg/f"), vec![MIB..2 * MIB]);
    // Bytes covering a granule only in part leave it alone.
    let got = supply(2 * MIB, bytes(2 * MIB..3 * MIB - 4096))
        .await
        .expect("supply");
    assert_eq!(got, Prefetched::Fetched(0));
    // The rest, to the object's (unaligned) end: the file is complete and ordinary at once.
    let got = supply(2 * MIB, bytes(2 * MIB..len)).await.expect("supply");
    assert_eq!(got, Prefetched::Fetched(len - 2 * MIB));
    become_ordinary(&f).await;
    assert_eq!(ranges_of(&r, "pkg/f"), vec![MIB..2 * MIB]);
    assert_bytes(&read_at(&f, 0, data.len() + 10), &data);
    // A stub without digests cannot check supplied bytes.
    let g = r.stub("g", "pkg/g", pattern(MIB as usize, 6), 20);
    let got = r
        .core
        .prefetch_supplied(
            g.as_fd(),
            URL,
            "pkg/g",
            0,
            bytes::Bytes::from(pattern(MIB as usize, 6)),
        )
        .await
        .expect("supply");
    assert_eq!(got, Prefetched::Unverified);
    assert!(has_marker(&g));
}
