//! The agent core against real files with real xattrs and the mock remote.
//!
//! Stub xattrs live in `security.*` and `trusted.*`, which need CAP_SYS_ADMIN: these tests
//! refuse to run without root instead of passing vacuously.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_core::metrics::Metrics;
use hsm_core::{
    AccessEvent, AgentCore, CoreOptions, IntentSource, MarkSink, RemoteOpener, Verdict,
};
use hsm_core::{DenyErrno, FileRange};
use hsm_kernel::intent::Access;
use hsm_kernel::xattr::{self, SetMode};
use hsm_remote::mock::{Fault, FaultRemote, MockRemote};
use hsm_remote::{Remote, RemoteError};
use hsm_stub::{MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, Meta, ResidentMap};
use std::sync::atomic::Ordering;

const URL: &str = "mock://bucket";

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "hsm-core tests write security.* and trusted.* xattrs, which need CAP_SYS_ADMIN: run them as root"
    );
}

/// Hands out the fault-injecting wrapper (async path only), or the bare mock, whose I/O
/// runs inline (so the event-thread fast path can serve it).
#[derive(Debug)]
struct OneRemote {
    faulty: Arc<FaultRemote<Arc<MockRemote>>>,
    inline: bool,
}

impl RemoteOpener for OneRemote {
    fn open(&self, url: &str) -> Result<Arc<dyn Remote>, RemoteError> {
        assert_eq!(url, URL);
        if self.inline {
            Ok(Arc::new(self.faulty.inner().clone()))
        } else {
            Ok(self.faulty.clone())
        }
    }
}

#[derive(Debug, Default)]
struct Marks(Mutex<Vec<u64>>);

impl MarkSink for Marks {
    fn ignore(&self, fd: BorrowedFd<'_>) {
        let ino = hsm_kernel::stat::fstatx(fd).expect("stat").ino;
        self.0.lock().expect("lock").push(ino);
    }
}

struct Rig {
    dir: tempfile::TempDir,
    remote: Arc<FaultRemote<Arc<MockRemote>>>,
    marks: Arc<Marks>,
    metrics: Arc<Metrics>,
    core: Arc<AgentCore>,
}

fn rig(opts: CoreOptions) -> Rig {
    rig_with(opts, false)
}

fn rig_with(opts: CoreOptions, inline: bool) -> Rig {
    require_root();
    let remote = Arc::new(FaultRemote::new(Arc::new(MockRemote::new(URL))));
    let marks = Arc::new(Marks::default());
    let metrics = Arc::new(Metrics::default());
    let core = AgentCore::new(
        opts,
        Arc::new(OneRemote {
            faulty: remote.clone(),
            inline,
        }),
        marks.clone(),
        Arc::new(hsm_core::ProcReopener),
        metrics.clone(),
    );
    Rig {
        dir: tempfile::tempdir().expect("tempdir"),
        remote,
        marks,
        metrics,
        core,
    }
}

fn fast_opts() -> CoreOptions {
    CoreOptions {
        persist_interval: Duration::from_millis(1),
        readahead: 0,
        ..Default::default()
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

impl Rig {
    /// A stub of object `key` (put into the mock with `data`), as populate would make it.
    fn stub(&self, name: &str, key: &str, data: Vec<u8>, shift: u8) -> File {
        let info = self.remote.inner().put(key, data);
        let path = self.dir.path().join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        f.set_len(info.size).expect("size");
        let meta = Meta {
            stub_id: 42,
            remote_size: info.size,
            remote_url: URL.to_string(),
            key: key.to_string(),
            etag: info.etag.clone(),
            version: None,
            integrity: None,
            extra: vec![],
        };
        let map = ResidentMap::new(42, info.size, shift).expect("map");
        xattr::fset(
            f.as_fd(),
            META_XATTR,
            &meta.encode().expect("meta"),
            SetMode::Create,
        )
        .expect("meta xattr");
        xattr::fset(f.as_fd(), MAP_XATTR, &map.encode(), SetMode::Create).expect("map xattr");
        xattr::fset(
            f.as_fd(),
            MARKER_XATTR,
            &Marker::ready().encode(),
            SetMode::Create,
        )
        .expect("marker");
        f
    }

    /// A stub whose metadata names a manifest with chunk digests (4 KiB chunks). With
    /// `wrong_chunk`, the manifest's digest for that chunk is wrong.
    fn verified_stub(
        &self,
        name: &str,
        key: &str,
        data: Vec<u8>,
        wrong_chunk: Option<usize>,
    ) -> File {
        let chunk = 4096u64;
        let mut digests = hsm_manifest::chunk_digests(&data, chunk);
        if let Some(i) = wrong_chunk {
            digests[i][0] ^= 1;
        }
        let list_hash = hsm_manifest::list_hash(&digests);
        let attrs = hsm_manifest::Attrs {
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            atime: (0, 0),
        };
        let info = self.remote.inner().put(key, data.clone());
        let manifest = hsm_manifest::Manifest {
            chunk_size: chunk,
            entries: vec![
                hsm_manifest::Entry {
                    path: "".into(),
                    kind: hsm_manifest::Kind::Dir,
                    attrs,
                },
                hsm_manifest::Entry {
                    path: key.into(),
                    kind: hsm_manifest::Kind::File(hsm_manifest::FileObject {
                        size: data.len() as u64,
                        key: key.into(),
                        etag: info.etag.clone(),
                        version: None,
                        digests,
                    }),
                    attrs,
                },
            ],
        };
        self.remote.inner().put(
            hsm_manifest::MANIFEST_KEY,
            manifest.encode().expect("manifest"),
        );
        let f = self.stub(name, key, data, 20);
        // stub() re-put the object; keep the ETag the manifest names and add the integrity.
        let mut buf = Vec::new();
        xattr::fget(f.as_fd(), META_XATTR, &mut buf).expect("meta");
        let mut meta = Meta::decode(&buf).expect("decode");
        meta.etag = self.remote.inner().expect_for(key).and_then(|e| e.etag);
        meta.integrity = Some(hsm_stub::Integrity {
            algorithm: hsm_stub::DigestAlgorithm::Blake3,
            chunk_shift: 12,
            manifest_key: hsm_manifest::MANIFEST_KEY.into(),
            list_hash,
        });
        xattr::fset(
            f.as_fd(),
            META_XATTR,
            &meta.encode().expect("meta"),
            SetMode::Replace,
        )
        .expect("set");
        let _ = info;
        f
    }

    async fn access(&self, f: &File, offset: u64, count: u64, access: Access) -> Verdict {
        self.core
            .handle(AccessEvent {
                fd: f.as_fd(),
                range: Some(FileRange { offset, count }),
                intent: IntentSource::Known(access),
            })
            .await
    }

    async fn read(&self, f: &File, offset: u64, count: u64) -> Verdict {
        self.access(f, offset, count, Access::Read).await
    }

    fn metric(&self, name: &str) -> u64 {
        self.metrics
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("metric exists")
    }

    async fn settle(&self) {
        // Let the persister run (interval 1 ms).
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.core.flush_all().await == 0 {
                break;
            }
        }
    }
}

fn read_at(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset).expect("read");
    buf.truncate(n);
    buf
}

/// Compare byte buffers, reporting the first difference instead of dumping megabytes.
#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8]) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "bytes differ at offset {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "lengths differ");
}

fn stored_map(f: &File) -> Option<ResidentMap> {
    let mut buf = Vec::new();
    xattr::fget(f.as_fd(), MAP_XATTR, &mut buf)
        .expect("get")
        .then(|| ResidentMap::decode(&buf).expect("decode"))
}

fn has_marker(f: &File) -> bool {
    let mut buf = Vec::new();
    xattr::fget(f.as_fd(), MARKER_XATTR, &mut buf).expect("get")
}

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
