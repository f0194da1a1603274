//! The rig the core tests share: a core over the mock remote, stubs made from real files
//! with real xattrs, and byte checks. Each test binary uses a different part of it.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_core::FileRange;
use hsm_core::metrics::Metrics;
use hsm_core::{
    Access, AccessEvent, AgentCore, CoreOptions, IntentSource, MarkSink, RemoteOpener, Verdict,
};
use hsm_kernel::xattr::{self, SetMode};
use hsm_remote::mock::{FaultRemote, MockRemote};
use hsm_remote::{Remote, RemoteError};
use hsm_stub::{MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, Meta, ResidentMap};

pub const URL: &str = "mock://bucket";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "hsm-core tests write security.* and trusted.* xattrs, which need CAP_SYS_ADMIN: run them as root"
    );
}

/// Hands out the fault-injecting wrapper (async path only), or the bare mock, whose I/O
/// runs inline (so the event-thread fast path can serve it).
#[derive(Debug)]
pub struct OneRemote {
    pub faulty: Arc<FaultRemote<Arc<MockRemote>>>,
    pub inline: bool,
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
pub struct Marks(pub Mutex<Vec<u64>>);

impl MarkSink for Marks {
    fn ignore(&self, fd: BorrowedFd<'_>) {
        let ino = hsm_kernel::stat::fstatx(fd).expect("stat").ino;
        self.0.lock().expect("lock").push(ino);
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub remote: Arc<FaultRemote<Arc<MockRemote>>>,
    pub marks: Arc<Marks>,
    pub metrics: Arc<Metrics>,
    pub core: Arc<AgentCore>,
}

pub fn rig(opts: CoreOptions) -> Rig {
    rig_with(opts, false)
}

pub fn rig_with(opts: CoreOptions, inline: bool) -> Rig {
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
        Arc::new(hsm_core::NoThreads),
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

pub fn fast_opts() -> CoreOptions {
    CoreOptions {
        persist_interval: Duration::from_millis(1),
        readahead: 0,
        ..Default::default()
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

impl Rig {
    /// A stub of object `key` (put into the mock with `data`), as populate would make it.
    pub fn stub(&self, name: &str, key: &str, data: Vec<u8>, shift: u8) -> File {
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
    pub fn verified_stub(
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

    pub async fn access(&self, f: &File, offset: u64, count: u64, access: Access) -> Verdict {
        self.core
            .handle(AccessEvent {
                fd: f.as_fd(),
                range: Some(FileRange { offset, count }),
                intent: IntentSource::Known(access),
            })
            .await
    }

    pub async fn read(&self, f: &File, offset: u64, count: u64) -> Verdict {
        self.access(f, offset, count, Access::Read).await
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.metrics
            .snapshot()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("metric exists")
    }

    pub async fn settle(&self) {
        // Let the persister run (interval 1 ms).
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.core.flush_all().await == 0 {
                break;
            }
        }
    }
}

pub fn read_at(f: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, offset).expect("read");
    buf.truncate(n);
    buf
}

/// Compare byte buffers, reporting the first difference instead of dumping megabytes.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8]) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "bytes differ at offset {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
    assert_eq!(got.len(), want.len(), "lengths differ");
}

pub fn stored_map(f: &File) -> Option<ResidentMap> {
    let mut buf = Vec::new();
    xattr::fget(f.as_fd(), MAP_XATTR, &mut buf)
        .expect("get")
        .then(|| ResidentMap::decode(&buf).expect("decode"))
}

pub fn has_marker(f: &File) -> bool {
    let mut buf = Vec::new();
    xattr::fget(f.as_fd(), MARKER_XATTR, &mut buf).expect("get")
}
