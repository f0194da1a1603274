//! The agent core against real files with real xattrs and the mock remote.
//!
//! Stub xattrs live in `security.*` and `trusted.*`, which need CAP_SYS_ADMIN: these tests
//! refuse to run without root instead of passing vacuously.

mod common;
use common::*;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hsm_core::{Access, AccessEvent, CoreOptions, IntentSource, Verdict};
use hsm_core::{DenyErrno, FileRange};
use hsm_kernel::xattr::{self, SetMode};
use hsm_remote::RemoteError;
use hsm_remote::mock::Fault;
use hsm_stub::{MAP_XATTR, MARKER_XATTR, META_XATTR, Marker};
use std::sync::atomic::Ordering;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_files_are_allowed_and_ignored() {
    let r = rig(fast_opts());
    let path = r.dir.path().join("plain");
    std::fs::write(&path, b"hello").expect("write");
    let f = File::open(&path).expect("open");
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::AllowAndIgnore);
    assert_eq!(r.metric("events_not_stub"), 1);
    assert_eq!(r.remote.inner().requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_fills_exactly_the_granules_touched() {
    let r = rig(fast_opts());
    let data = pattern(5 << 20, 3); // 5 granules of 1 MiB
    let f = r.stub("f", "dir/f", data.clone(), 20);
    assert_eq!(r.read(&f, (2 << 20) + 4096, 8192).await, Verdict::Allow);
    assert_eq!(
        r.remote.inner().served_ranges(),
        vec![("dir/f".to_string(), (2 << 20)..(3 << 20))]
    );
    assert_bytes(&read_at(&f, 2 << 20, 1 << 20), &data[2 << 20..3 << 20]);
    // Untouched granules are still holes.
    assert_eq!(read_at(&f, 0, 4096), vec![0u8; 4096]);
    // Same range again: nothing fetched.
    assert_eq!(r.read(&f, (2 << 20) + 4096, 8192).await, Verdict::Allow);
    assert_eq!(r.remote.inner().requests(), 1);
    r.settle().await;
    let map = stored_map(&f).expect("map");
    assert!(map.is_resident(2) && !map.is_resident(1) && !map.is_resident(3));
    assert!(has_marker(&f));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_share_one_fetch() {
    let r = rig(fast_opts());
    r.remote.pause();
    let data = pattern(3 << 20, 5);
    let f = Arc::new(r.stub("f", "k", data.clone(), 20));
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let core = r.core.clone();
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            core.handle(AccessEvent {
                fd: f.as_fd(),
                range: Some(FileRange {
                    offset: (i % 3) << 20,
                    count: 3 << 20,
                }),
                intent: IntentSource::Known(Access::Read),
            })
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.remote.resume();
    for t in tasks {
        assert_eq!(t.await.expect("join"), Verdict::Allow);
    }
    assert_eq!(
        r.remote.inner().bytes_served(),
        3 << 20,
        "each byte fetched once"
    );
    assert!(r.metric("fill_joins") > 0);
    assert_bytes(&read_at(&f, 0, 3 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_failure_is_eio_and_nothing_is_marked() {
    let r = rig(fast_opts());
    let data = pattern(1 << 20, 7);
    let f = r.stub("f", "k", data.clone(), 20);
    r.remote.fail_next(
        1,
        Fault::Error(RemoteError::Failed {
            url: URL.into(),
            key: "k".into(),
            detail: "injected reset".into(),
        }),
    );
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    assert_eq!(read_at(&f, 0, 4096), vec![0u8; 4096]);
    r.settle().await;
    assert_eq!(stored_map(&f).expect("map").resident_count(), 0);
    // Once the fault clears, the same read works.
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    assert_bytes(&read_at(&f, 0, 1 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_body_is_eio_not_a_partial_granule() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(1 << 20, 1), 20);
    r.remote.fail_next(1, Fault::Truncate);
    // The mock returns one byte less; the core must not accept it as the granule.
    let v = r.read(&f, 0, 4096).await;
    r.settle().await;
    let map = stored_map(&f).expect("map");
    if v == Verdict::Allow {
        panic!(
            "a truncated body was accepted (map resident={})",
            map.resident_count()
        );
    }
    assert_eq!(v, Verdict::Deny(DenyErrno::Eio));
    assert_eq!(map.resident_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_or_missing_object_is_eio() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(1 << 20, 2), 20);
    r.remote.inner().put("k", pattern(1 << 20, 9)); // new ETag
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    assert_eq!(read_at(&f, 0, 4096), vec![0u8; 4096]);
    let g = r.stub("g", "gone", pattern(8192, 2), 20);
    r.remote.inner().remove("gone");
    assert_eq!(r.read(&g, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_read_turns_the_stub_into_an_ordinary_file() {
    let r = rig(fast_opts());
    let data = pattern((3 << 20) + 1234, 4);
    let f = r.stub("f", "k", data.clone(), 20);
    let mtime_before = f.metadata().expect("md").mtime();
    assert_eq!(r.read(&f, 0, 8 << 20).await, Verdict::Allow);
    r.settle().await;
    assert!(!has_marker(&f), "marker removed");
    assert!(stored_map(&f).is_none(), "map removed");
    let ino = f.metadata().expect("md").ino();
    assert_eq!(*r.marks.0.lock().expect("lock"), vec![ino]);
    assert_bytes(&read_at(&f, 0, data.len() + 10), &data);
    assert_eq!(
        f.metadata().expect("md").mtime(),
        mtime_before,
        "fills do not change mtime"
    );
    assert_eq!(r.metric("hydrated"), 1);
    // Later events for it are allowed without fetching.
    let before = r.remote.inner().requests();
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::AllowAndIgnore);
    assert_eq!(r.remote.inner().requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_allowed_only_after_the_map_is_durable() {
    let r = rig(CoreOptions {
        persist_interval: Duration::from_secs(3600), // the batch never runs in this test
        readahead: 0,
        ..Default::default()
    });
    let data = pattern(2 << 20, 6);
    let f = r.stub("f", "k", data.clone(), 20);
    assert_eq!(
        r.access(&f, 4096, 4096, Access::Write).await,
        Verdict::Allow
    );
    let map = stored_map(&f).expect("map");
    assert!(
        map.is_resident(0),
        "the filled granule is durable before the write is allowed"
    );
    assert!(map.locally_modified());
    // The user's write lands after the answer; a later read never refetches over it.
    f.write_at(b"LOCAL", 5000).expect("write");
    assert_eq!(r.read(&f, 0, 1 << 20).await, Verdict::Allow);
    let mut expect = data[..1 << 20].to_vec();
    expect[5000..5005].copy_from_slice(b"LOCAL");
    assert_bytes(&read_at(&f, 0, 1 << 20), &expect);
    assert_eq!(r.remote.inner().requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclassified_access_is_guarded_like_a_write_but_keeps_the_mtime() {
    let r = rig(CoreOptions {
        persist_interval: Duration::from_secs(3600), // the batch never runs in this test
        readahead: 0,
        ..Default::default()
    });
    let data = pattern(3 << 20, 7);
    let f = r.stub("f", "k", data.clone(), 20);
    let mtime_before = f.metadata().expect("md").modified().expect("mtime");
    // A thread still running when the agent gave up waiting (a loaded machine).
    assert_eq!(
        r.access(&f, 4096, 4096, Access::Unknown).await,
        Verdict::Allow
    );
    let map = stored_map(&f).expect("map");
    assert!(
        map.is_resident(0),
        "durable before it is allowed, as for a write"
    );
    assert!(
        map.locally_modified(),
        "flagged, so eviction and re-populate leave it alone"
    );
    // It was a read: later fills keep putting the mtime back.
    assert_eq!(r.read(&f, 1 << 20, 4096).await, Verdict::Allow);
    assert_eq!(
        f.metadata().expect("md").modified().expect("mtime"),
        mtime_before,
        "no fill after an unclassified read changes the mtime"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclassified_write_is_noticed_by_the_next_fill() {
    let r = rig(CoreOptions {
        persist_interval: Duration::from_secs(3600),
        readahead: 0,
        ..Default::default()
    });
    let data = pattern(3 << 20, 8);
    let f = r.stub("f", "k", data.clone(), 20);
    let mtime_before = f.metadata().expect("md").modified().expect("mtime");
    assert_eq!(
        r.access(&f, 4096, 4096, Access::Unknown).await,
        Verdict::Allow
    );
    // It was a write: it lands after the answer and moves the mtime.
    f.write_at(b"LOCAL", 5000).expect("write");
    let written = f.metadata().expect("md").modified().expect("mtime");
    assert_ne!(written, mtime_before);
    // The next fill sees an mtime it did not put back and leaves it to the writer.
    assert_eq!(r.read(&f, 2 << 20, 4096).await, Verdict::Allow);
    let after = f.metadata().expect("md").modified().expect("mtime");
    assert!(
        after >= written,
        "the write's mtime is never put back to the old one"
    );
    let mut expect = data[..1 << 20].to_vec();
    expect[5000..5005].copy_from_slice(b"LOCAL");
    assert_bytes(&read_at(&f, 0, 1 << 20), &expect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_keeps_remote_bytes_out_of_the_cut() {
    let r = rig(fast_opts());
    let data = pattern(3 << 20, 8);
    let f = r.stub("f", "k", data.clone(), 20);
    let cut = (1 << 20) + 100_000;
    // The truncate event (range around the new size) fills that granule first.
    let v = r
        .access(&f, cut & !4095, 4096, Access::Truncate { length: cut })
        .await;
    assert_eq!(v, Verdict::Allow);
    f.set_len(cut).expect("truncate"); // what the kernel does after we allow
    // Grow it back: the kernel raises an event before the extending truncate, and the new
    // tail must then read as zeros, never as remote bytes.
    let v = r
        .access(
            &f,
            (3 << 20) - 4096,
            4096,
            Access::Truncate { length: 3 << 20 },
        )
        .await;
    assert_eq!(v, Verdict::Allow);
    f.set_len(3 << 20).expect("extend");
    assert_eq!(r.read(&f, 0, 3 << 20).await, Verdict::Allow);
    let back = read_at(&f, 0, 3 << 20);
    assert_eq!(&back[..cut as usize], &data[..cut as usize]);
    assert!(
        back[cut as usize..].iter().all(|&b| b == 0),
        "tail must be zeros"
    );
    r.settle().await;
    assert!(
        !has_marker(&f),
        "everything below the floor is resident: ordinary file"
    );
    assert_eq!(
        r.remote.inner().bytes_served(),
        2 << 20,
        "granule 2 never fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_trunc_seen_through_the_size_makes_everything_local() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(2 << 20, 9), 20);
    f.set_len(0).expect("truncate like O_TRUNC");
    assert_eq!(r.access(&f, 0, 4096, Access::Write).await, Verdict::Allow);
    r.settle().await;
    assert_eq!(r.remote.inner().requests(), 0);
    assert!(!has_marker(&f));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_objects_stay_sparse() {
    let r = rig(fast_opts());
    let mut data = vec![0u8; 4 << 20];
    data[(3 << 20) + 10] = 0x55;
    let f = r.stub("f", "k", data.clone(), 20);
    assert_eq!(r.read(&f, 0, 4 << 20).await, Verdict::Allow);
    assert_bytes(&read_at(&f, 0, 4 << 20), &data);
    let blocks = f.metadata().expect("md").blocks() * 512;
    assert!(
        blocks <= 64 * 1024,
        "only the non-zero page is allocated, got {blocks} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_metadata_is_eio_and_logged_as_a_bad_stub() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(8192, 1), 20);
    xattr::fset(f.as_fd(), META_XATTR, b"HSMMgarbage", SetMode::Replace).expect("corrupt");
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    assert_eq!(r.metric("bad_stubs"), 1);
    let g = r.stub("g", "k2", pattern(8192, 1), 20);
    xattr::fremove(g.as_fd(), MAP_XATTR).expect("remove map");
    assert_eq!(r.read(&g, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    assert_eq!(r.remote.inner().requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn building_stubs_are_allowed_without_caching() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(8192, 1), 20);
    xattr::fset(
        f.as_fd(),
        MARKER_XATTR,
        &Marker::building().encode(),
        SetMode::Replace,
    )
    .expect("building");
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    assert_eq!(r.core.cached_stubs(), 0);
    xattr::fset(
        f.as_fd(),
        MARKER_XATTR,
        &Marker::ready().encode(),
        SetMode::Replace,
    )
    .expect("ready");
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    assert_eq!(r.remote.inner().requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_granules_are_fetched_in_parallel_parts() {
    let r = rig(CoreOptions {
        max_request_size: 1 << 20,
        ..fast_opts()
    });
    let data = pattern(6 << 20, 3);
    let f = r.stub("f", "k", data.clone(), 22); // 4 MiB granules
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    let ranges = r.remote.inner().served_ranges();
    assert_eq!(ranges.len(), 4, "{ranges:?}");
    assert_bytes(&read_at(&f, 0, 4 << 20), &data[..4 << 20]);
    assert_eq!(r.metric("bytes_fetched"), 4 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_fetches_but_serves_resident_ranges() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(2 << 20, 3), 20);
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    r.core.begin_shutdown();
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    assert_eq!(
        r.read(&f, 1 << 20, 4096).await,
        Verdict::Deny(DenyErrno::Eio)
    );
    assert!(r.core.wait_fills(Duration::from_secs(1)).await);
    assert_eq!(r.core.flush_all().await, 0);
    assert!(stored_map(&f).expect("map").is_resident(0));
    let _ = Path::new("/");
    let _ = f.as_raw_fd();
    assert_eq!(r.metrics.events.load(Ordering::Relaxed), 3);
}
