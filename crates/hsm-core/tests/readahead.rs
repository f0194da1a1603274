//! Readahead: the growing window, the requests it makes from local and network stores,
//! and the streamed request a sequential reader of a network store is served from.
//!
//! Like every core test these need root (stub xattrs); they refuse to run without it.

mod common;
use common::*;

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use hsm_core::{CoreOptions, Verdict};
use hsm_remote::mock::Fault;

/// 1 MiB requests and pieces, a 2 MiB first window that may grow to 16 MiB.
fn window_opts() -> CoreOptions {
    CoreOptions {
        persist_interval: Duration::from_millis(1),
        max_request_size: 1 << 20,
        readahead: 2 << 20,
        readahead_max: 16 << 20,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_fetch_ahead() {
    let r = rig(CoreOptions {
        persist_interval: Duration::from_millis(1),
        readahead: 4 << 20,
        ..Default::default()
    });
    let data = pattern(16 << 20, 2);
    let f = r.stub("f", "k", data.clone(), 20);
    for i in 0..4u64 {
        assert_eq!(r.read(&f, i << 17, 1 << 17).await, Verdict::Allow);
    }
    for _ in 0..100 {
        if r.remote.inner().bytes_served() >= 4 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(r.metric("readahead_fills") > 0);
    assert!(r.remote.inner().bytes_served() >= 4 << 20);
    assert!(r.core.wait_fills(Duration::from_secs(5)).await);
    assert_bytes(&read_at(&f, 0, 4 << 20), &data[..4 << 20]);
}

/// Read the first `len` bytes of `f` in 256 KiB steps, as a streaming reader does, and
/// wait for its readahead: every range the remote served, and the largest.
async fn stream(r: &Rig, f: &File, len: u64) -> (Vec<(String, std::ops::Range<u64>)>, u64) {
    let mut off = 0u64;
    while off < len {
        assert_eq!(r.read(f, off, 256 << 10).await, Verdict::Allow);
        off += 256 << 10;
    }
    assert!(r.core.wait_fills(Duration::from_secs(10)).await);
    let ranges = r.remote.inner().served_ranges();
    let largest = ranges
        .iter()
        .map(|(_, g)| g.end - g.start)
        .max()
        .unwrap_or(0);
    (ranges, largest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_streams_a_sequential_reader_gets_a_growing_window_of_larger_requests() {
    // Streams off (or every stream slot taken): 1 MiB requests, a 2 MiB first window that may grow to 16 MiB: reading 64 MiB in
    // 256 KiB steps must end in requests as large as half the largest window, and in
    // far fewer requests than a fixed window of 1 MiB requests would make (64).
    let r = rig(CoreOptions {
        readahead_streams: 0,
        ..window_opts()
    });
    let data = pattern(64 << 20, 3);
    let f = r.stub("f", "k", data.clone(), 20);
    let (ranges, largest) = stream(&r, &f, 64 << 20).await;
    assert_eq!(largest, 8 << 20, "requests: {ranges:?}");
    assert!(ranges.len() < 24, "{} requests: {ranges:?}", ranges.len());
    assert_bytes(&read_at(&f, 0, 64 << 20), &data);

    // A read elsewhere starts the window over: the next readahead is 2 MiB again.
    let g = r.stub("g", "kg", pattern(64 << 20, 4), 20);
    for i in 0..40u64 {
        assert_eq!(r.read(&g, i << 18, 1 << 18).await, Verdict::Allow);
    }
    assert_eq!(r.read(&g, 40 << 20, 4096).await, Verdict::Allow);
    assert_eq!(r.read(&g, (40 << 20) + 4096, 4096).await, Verdict::Allow);
    assert!(r.core.wait_fills(Duration::from_secs(10)).await);
    let after: Vec<_> = r
        .remote
        .inner()
        .served_ranges()
        .into_iter()
        .filter(|(k, g)| k == "kg" && g.start > 40 << 20)
        .collect();
    let end = after.iter().map(|(_, g)| g.end).max().unwrap_or(0);
    assert!(
        end <= (40 << 20) + (4 << 20),
        "after a jump the window is small again: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_from_local_files_keeps_its_requests_small() {
    // A request costs nothing from local files, and a reader waits for the whole request
    // its next granule is in: there the window grows but the requests stay at
    // max_request_size.
    let r = rig_with(window_opts(), true);
    let data = pattern(32 << 20, 5);
    let f = r.stub("f", "k", data.clone(), 20);
    let (ranges, largest) = stream(&r, &f, 32 << 20).await;
    assert_eq!(largest, 1 << 20, "requests: {ranges:?}");
    assert_bytes(&read_at(&f, 0, 32 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_of_a_network_store_is_served_by_one_streamed_request() {
    // The read at offset 0 opens a stream to the object's end; readahead extends it a
    // window at a time: the whole file costs one request.
    let r = rig(window_opts());
    let data = pattern(64 << 20, 3);
    let f = r.stub("f", "k", data.clone(), 20);
    let (ranges, _) = stream(&r, &f, 64 << 20).await;
    assert_eq!(ranges, vec![("k".to_string(), 0..64 << 20)]);
    assert_eq!(r.metric("readahead_streams"), 1);
    assert_eq!(r.metric("stream_fallbacks"), 0);
    assert_eq!(r.metric("fill_errors"), 0);
    assert_bytes(&read_at(&f, 0, 64 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_ends_and_frees_its_slot() {
    // One stream slot. A reader stops a quarter into f: its stream holds the slot, so
    // g's reader is served by ranged requests (and right); once f's stream has idled
    // out (2 s without a piece), h's reader gets a stream.
    let r = rig(CoreOptions {
        readahead_streams: 1,
        ..window_opts()
    });
    let f = r.stub("f", "kf", pattern(16 << 20, 1), 20);
    let g = r.stub("g", "kg", pattern(16 << 20, 2), 20);
    let h = r.stub("h", "kh", pattern(16 << 20, 3), 20);
    stream(&r, &f, 4 << 20).await;
    assert_eq!(r.metric("readahead_streams"), 1);
    stream(&r, &g, 16 << 20).await;
    assert_eq!(r.metric("readahead_streams"), 1);
    assert_bytes(&read_at(&g, 0, 16 << 20), &pattern(16 << 20, 2));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stream(&r, &h, 4 << 20).await;
    assert_eq!(r.metric("readahead_streams"), 2);
    assert_bytes(&read_at(&h, 0, 4 << 20), &pattern(16 << 20, 3)[..4 << 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_reaches_the_end_frees_its_slot_at_once() {
    let r = rig(CoreOptions {
        readahead_streams: 1,
        ..window_opts()
    });
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        let f = r.stub(name, name, pattern(8 << 20, i as u8), 20);
        stream(&r, &f, 8 << 20).await;
        assert_eq!(r.metric("readahead_streams"), i as u64 + 1);
        assert_eq!(r.remote.inner().requests(), i as u64 + 1);
        assert_bytes(&read_at(&f, 0, 8 << 20), &pattern(8 << 20, i as u8));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_stream_hands_its_pieces_to_ranged_requests() {
    // The stream's connection breaks after 3 MiB of its body: the reader never sees it.
    let r = rig(window_opts());
    let data = pattern(32 << 20, 5);
    let f = r.stub("f", "k", data.clone(), 20);
    r.remote.fail_next(1, Fault::Break(3 << 20));
    stream(&r, &f, 32 << 20).await;
    assert_eq!(r.metric("stream_fallbacks"), 1);
    assert_eq!(r.metric("fill_errors"), 0);
    assert_bytes(&read_at(&f, 0, 32 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_checked_against_the_digests() {
    // A corrupt stream is caught by the digests and its pieces fetched again by ranged
    // requests; a chunk whose digest is wrong in the manifest fails only the reads of
    // its granule.
    let r = rig(window_opts());
    let data = pattern(16 << 20, 6);
    let f = r.verified_stub("f", "k", data.clone(), None);
    // The manifest's read, then the stream.
    r.remote.fail_next(1, Fault::Delay(Duration::ZERO));
    r.remote.fail_next(1, Fault::Corrupt);
    stream(&r, &f, 16 << 20).await;
    assert_eq!(r.metric("stream_fallbacks"), 1);
    assert_eq!(r.metric("fill_errors"), 0);
    assert_bytes(&read_at(&f, 0, 16 << 20), &data);

    let bad_granule = 5u64;
    let g = r.verified_stub("g", "kg", data.clone(), Some((5 << 8) + 3));
    let mut denied = Vec::new();
    for off in (0..16u64 << 20).step_by(256 << 10) {
        if r.read(&g, off, 256 << 10).await != Verdict::Allow {
            denied.push(off >> 20);
        }
    }
    assert!(r.core.wait_fills(Duration::from_secs(10)).await);
    denied.dedup();
    assert_eq!(denied, vec![bad_granule]);
    for gr in (0..16u64).filter(|&g| g != bad_granule) {
        let at = (gr << 20) as usize;
        assert_bytes(&read_at(&g, gr << 20, 1 << 20), &data[at..at + (1 << 20)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sequential_readers_of_one_file_get_every_byte_right() {
    // Two readers streaming different halves of one file at once: each one's reads
    // break the other's sequence, so streams start, are replaced and skip ahead.
    let r = Arc::new(rig(window_opts()));
    let data = Arc::new(pattern(64 << 20, 9));
    let f = Arc::new(r.stub("f", "k", data.to_vec(), 20));
    let mut tasks = Vec::new();
    for half in 0..2u64 {
        let (r, f) = (r.clone(), f.clone());
        tasks.push(tokio::spawn(async move {
            let base = half * (32 << 20);
            for off in (base..base + (32 << 20)).step_by(256 << 10) {
                assert_eq!(r.read(&f, off, 256 << 10).await, Verdict::Allow, "at {off}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("reader");
    }
    assert!(r.core.wait_fills(Duration::from_secs(10)).await);
    assert_eq!(r.metric("fill_errors"), 0);
    assert_bytes(&read_at(&f, 0, 64 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_keeps_no_stub_from_eviction() {
    // A reader stops a quarter into the file: its stream waits (up to 2 s) for more, but
    // holding nothing of the stub, so the stub can be released for an eviction at once.
    let r = rig(window_opts());
    let f = r.stub("f", "k", pattern(16 << 20, 4), 20);
    stream(&r, &f, 4 << 20).await;
    r.settle().await;
    let st = hsm_kernel::stat::fstatx(std::os::fd::AsFd::as_fd(&f)).expect("statx");
    assert!(r.core.release_for_evict(&st).await.expect("release"));
}
