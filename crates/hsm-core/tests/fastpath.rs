//! The core's synchronous fast path (what event threads call) and the accesses whose range
//! alone does not say what they need (writes, truncates, shifts), against real files.
//! Needs root, like tests/core.rs.

mod common;
use common::*;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use hsm_core::{Access, AccessEvent, CoreOptions, IntentSource, Verdict};
use hsm_core::{DenyErrno, FileRange};
use hsm_remote::mock::Fault;

/// The event-thread fast path, called from a plain thread as the adapter does.
fn now(
    r: &Rig,
    f: &File,
    offset: u64,
    count: u64,
    access: Access,
) -> Result<Verdict, hsm_core::Later> {
    let core = r.core.clone();
    let fd = f.as_fd().try_clone_to_owned().expect("dup");
    std::thread::spawn(move || {
        core.try_handle_now(&AccessEvent {
            fd: fd.as_fd(),
            range: Some(FileRange { offset, count }),
            intent: IntentSource::Known(access),
        })
    })
    .join()
    .expect("thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_serves_small_reads_inline() {
    let r = rig_with(fast_opts(), true);
    let data = pattern(3 << 20, 5);
    let f = r.stub("f", "k", data.clone(), 20);
    assert_eq!(
        now(&r, &f, 4096, 4096, Access::Read).ok(),
        Some(Verdict::Allow)
    );
    assert_eq!(
        r.remote.inner().served_ranges(),
        vec![("k".to_string(), 0..(1 << 20))]
    );
    assert_bytes(&read_at(&f, 0, 1 << 20), &data[..1 << 20]);
    // Resident now: answered without another fetch.
    assert_eq!(
        now(&r, &f, 0, 8192, Access::Read).ok(),
        Some(Verdict::Allow)
    );
    assert_eq!(r.remote.inner().requests(), 1);
    assert_eq!(r.metric("events"), 2);
    assert_eq!(r.metric("events_resident"), 1);
    // Plain files are answered there too.
    let plain = r.dir.path().join("plain");
    std::fs::write(&plain, b"x").expect("write");
    let p = File::open(&plain).expect("open");
    assert_eq!(
        now(&r, &p, 0, 4096, Access::Read).ok(),
        Some(Verdict::AllowAndIgnore)
    );
    r.settle().await;
    assert!(stored_map(&f).expect("map").is_resident(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_hands_writes_and_big_ranges_to_the_async_path() {
    let r = rig_with(fast_opts(), true);
    let data = pattern(20 << 20, 6);
    let f = r.stub("f", "k", data.clone(), 20);
    // A write needs a durable map first: handed on with its intent already classified.
    let later = now(&r, &f, 0, 4096, Access::Write).expect_err("write goes later");
    assert!(
        matches!(later.0, IntentSource::Known(Access::Write)),
        "{later:?}"
    );
    let v = r
        .core
        .handle(AccessEvent {
            fd: f.as_fd(),
            range: Some(FileRange {
                offset: 0,
                count: 4096,
            }),
            intent: later.0,
        })
        .await;
    assert_eq!(v, Verdict::Allow);
    assert!(
        stored_map(&f).expect("map").is_resident(0),
        "durable before the write is allowed"
    );
    // More than max_request_size (8 MiB) of missing granules: the async path fetches them
    // in parallel parts.
    assert!(now(&r, &f, 1 << 20, 16 << 20, Access::Read).is_err());
    assert_eq!(
        r.metric("events"),
        1,
        "handed-on events are counted once, by handle()"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_denies_with_eio_when_the_object_is_gone() {
    let r = rig_with(fast_opts(), true);
    let f = r.stub("f", "gone", pattern(8192, 1), 20);
    r.remote.inner().remove("gone");
    assert_eq!(
        now(&r, &f, 0, 4096, Access::Read).ok(),
        Some(Verdict::Deny(DenyErrno::Eio))
    );
    assert_bytes(&read_at(&f, 0, 4096), &[0u8; 4096]);
    assert_eq!(r.metric("denies"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_durable_range_still_marks_the_file_modified() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(3 << 20, 2), 20);
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    r.settle().await;
    assert!(stored_map(&f).expect("map").is_resident(0));
    // Granule 0 is resident and durable; a write to it must still be seen as a write.
    assert_eq!(r.access(&f, 0, 4096, Access::Write).await, Verdict::Allow);
    let map = stored_map(&f).expect("map");
    assert!(
        map.locally_modified(),
        "the flag is durable before the write lands"
    );
    // A later fill never puts an older (pre-write) mtime back: change detection (backups,
    // make, populate) must see the write. Fills may move it forward.
    f.write_at(b"X", 10).expect("write");
    let after_write = f.metadata().expect("md").modified().expect("mtime");
    assert_eq!(r.read(&f, 1 << 20, 4096).await, Verdict::Allow);
    assert!(f.metadata().expect("md").modified().expect("mtime") >= after_write);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_aligned_truncate_fetches_nothing() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(8 << 20, 3), 20);
    // The kernel reports truncate(L) with L page aligned as offset L, count 0.
    let v = r
        .access(&f, 1 << 20, 0, Access::Truncate { length: 1 << 20 })
        .await;
    assert_eq!(v, Verdict::Allow);
    assert_eq!(
        r.remote.inner().bytes_served(),
        0,
        "nothing is fetched for bytes being cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_length_read_means_the_whole_rest_of_the_file() {
    let r = rig(fast_opts());
    let data = pattern(3 << 20, 4);
    let f = r.stub("f", "k", data.clone(), 20);
    // FICLONE of the whole file: offset 0, count 0.
    assert_eq!(r.read(&f, 0, 0).await, Verdict::Allow);
    assert_eq!(r.remote.inner().bytes_served(), 3 << 20);
    assert_bytes(&read_at(&f, 0, 3 << 20), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collapse_or_insert_range_needs_everything_after_it() {
    let r = rig(fast_opts());
    let f = r.stub("f", "k", pattern(6 << 20, 5), 20);
    let v = r.access(&f, 1 << 20, 1 << 20, Access::Shift).await;
    assert_eq!(v, Verdict::Allow);
    assert_eq!(
        r.remote.inner().bytes_served(),
        5 << 20,
        "granules 1..6 all fetched first"
    );
    let map = stored_map(&f).expect("map");
    assert!(map.locally_modified());
    assert!(!map.is_resident(0), "granule 0 is not touched by the shift");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_stubs_check_every_chunk_before_writing() {
    let r = rig(fast_opts());
    let data = pattern((2 << 20) + 100, 6);
    let f = r.verified_stub("f", "k", data.clone(), None);
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
    assert_bytes(&read_at(&f, 0, 1 << 20), &data[..1 << 20]);
    // The body is corrupted on the way: nothing written, nothing resident, EIO.
    r.remote.fail_next(1, Fault::Corrupt);
    assert_eq!(
        r.read(&f, 1 << 20, 4096).await,
        Verdict::Deny(DenyErrno::Eio)
    );
    assert_bytes(&read_at(&f, 1 << 20, 4096), &[0u8; 4096]);
    // The fault gone, the same read works and the tail chunk verifies too.
    assert_eq!(r.read(&f, 1 << 20, 8 << 20).await, Verdict::Allow);
    assert_bytes(&read_at(&f, 0, data.len() + 10), &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_is_eio_and_never_resident() {
    let r = rig(fast_opts());
    let data = pattern(1 << 20, 7);
    let f = r.verified_stub("f", "k", data, Some(5));
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    r.settle().await;
    assert_eq!(stored_map(&f).expect("map").resident_count(), 0);
    assert_bytes(&read_at(&f, 0, 8192), &[0u8; 8192]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_remote_gives_eio_after_the_read_timeout() {
    let r = rig(CoreOptions {
        read_timeout: Duration::from_millis(200),
        ..fast_opts()
    });
    let f = r.stub("f", "k", pattern(1 << 20, 8), 20);
    r.remote.pause();
    let t = std::time::Instant::now();
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Deny(DenyErrno::Eio));
    assert!(t.elapsed() < Duration::from_secs(2));
    r.remote.resume();
    // Once the remote answers, the fill that kept running completes and reads work.
    assert_eq!(r.read(&f, 0, 4096).await, Verdict::Allow);
}

/// CPU time this process has used so far (every thread).
fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_that_finds_no_slow_slot_waits_without_spinning() {
    // One fetch slot and one slot for slow requests: of two stalled requests the first
    // moves to the slow slot after 500 ms, the second finds it taken and must wait for
    // one, not poll for it in a loop that keeps a runtime thread busy (which starved
    // healthy fills on a two-core machine: fstest 039).
    let r = rig(CoreOptions {
        read_timeout: Duration::from_secs(4),
        max_concurrent_fetches: 1,
        ..fast_opts()
    });
    let a = r.stub("a", "ka", pattern(1 << 20, 1), 20);
    let b = r.stub("b", "kb", pattern(1 << 20, 2), 20);
    r.remote.pause();
    let reads = {
        let (core, fa, fb) = (
            r.core.clone(),
            a.try_clone().expect("dup"),
            b.try_clone().expect("dup"),
        );
        tokio::spawn(async move {
            let read = |f: File| {
                let core = core.clone();
                async move {
                    core.handle(AccessEvent {
                        fd: f.as_fd(),
                        range: Some(FileRange {
                            offset: 0,
                            count: 4096,
                        }),
                        intent: IntentSource::Known(Access::Read),
                    })
                    .await
                }
            };
            futures::join!(read(fa), read(fb))
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time() - before;
    assert!(
        used < Duration::from_millis(300),
        "two stalled requests used {used:?} of CPU in 1 s"
    );
    assert_eq!(r.metric("slow_requests"), 1);
    r.remote.resume();
    let (va, vb) = reads.await.expect("reads");
    assert_eq!((va, vb), (Verdict::Allow, Verdict::Allow));
    assert_bytes(&read_at(&a, 0, 4096), &pattern(1 << 20, 1)[..4096]);
    assert_bytes(&read_at(&b, 0, 4096), &pattern(1 << 20, 2)[..4096]);
}

/// An event thread sleeps instead of polling after it filled a stub inline
/// (`take_filled_inline`): the flag is set by the fill on that thread, read once, and not set
/// by an answer from resident granules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_fill_is_reported_once_to_its_thread() {
    let r = rig_with(fast_opts(), true);
    let f = r.stub("f", "k", pattern(64 << 10, 7), 20);
    let core = r.core.clone();
    let fd = f.as_fd().try_clone_to_owned().expect("dup");
    let seen = std::thread::spawn(move || {
        let ev = |offset| AccessEvent {
            fd: fd.as_fd(),
            range: Some(FileRange {
                offset,
                count: 4096,
            }),
            intent: IntentSource::Known(Access::Read),
        };
        let before = hsm_core::take_filled_inline();
        let filled = core.try_handle_now(&ev(0)).ok();
        let after_fill = (
            hsm_core::take_filled_inline(),
            hsm_core::take_filled_inline(),
        );
        let resident = core.try_handle_now(&ev(4096)).ok();
        let after_resident = hsm_core::take_filled_inline();
        (before, filled, after_fill, resident, after_resident)
    })
    .join()
    .expect("thread");
    assert_eq!(
        seen,
        (
            false,
            Some(Verdict::Allow),
            (true, false),
            Some(Verdict::Allow),
            false
        )
    );
    assert_eq!(r.remote.inner().requests(), 1);
    assert!(
        !hsm_core::take_filled_inline(),
        "another thread's fill is not this thread's"
    );
}
