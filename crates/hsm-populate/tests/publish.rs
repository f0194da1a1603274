//! publish to a local store and populate back from its manifest (the object-store servers
//! are exercised end to end by fstests). Needs root, like the populate tests.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;

use hsm_config::RemoteConfig;
use hsm_kernel::xattr;
use hsm_manifest::{MANIFEST_KEY, Manifest};
use hsm_populate::{
    LocalSource, Options, PublishOptions, RemoteSource, open_source, populate, publish, publish_to,
};
use hsm_remote::RemoteError;
use hsm_remote::mock::{Fault, FaultRemote, MockRemote};
use hsm_stub::{META_XATTR, Meta};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "publish tests populate stubs (trusted.* xattrs, owners): run them as root"
    );
}

fn popts() -> PublishOptions {
    PublishOptions {
        progress: false,
        chunk_size: 64 << 10,
        ..PublishOptions::default()
    }
}

fn meta_of(path: &Path) -> Meta {
    let f = fs::File::open(path).expect("open");
    let mut buf = Vec::new();
    assert!(xattr::fget(f.as_fd(), META_XATTR, &mut buf).expect("getxattr"));
    Meta::decode(&buf).expect("meta")
}

fn manifest_of(store: &Path) -> Manifest {
    Manifest::decode(&fs::read(store.join(MANIFEST_KEY)).expect("manifest")).expect("decode")
}

struct Dirs {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    store: std::path::PathBuf,
    dst: std::path::PathBuf,
}

fn dirs() -> Dirs {
    require_root();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b")).expect("mkdir");
    fs::write(src.join("top.txt"), b"top level").expect("write");
    let big: Vec<u8> = (0..(17u32 << 20)).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("a/b/big.bin"), &big).expect("write");
    fs::write(src.join("empty"), b"").expect("write");
    // Taken literally as a key: not percent-encoded into another name.
    fs::write(src.join("odd %41 ü#?.txt"), b"odd").expect("write");
    symlink("a/b/big.bin", src.join("link")).expect("symlink");
    fs::hard_link(src.join("top.txt"), src.join("a/hard")).expect("hard link");
    fs::set_permissions(src.join("top.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    let sparse = fs::File::create(src.join("sparse")).expect("create");
    sparse.set_len(1 << 20).expect("len");
    std::os::unix::fs::FileExt::write_at(&sparse, b"x", 512 << 10).expect("write");
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
    Dirs {
        store: tmp.path().join("store"),
        dst: tmp.path().join("dst"),
        src,
        _tmp: tmp,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

#[test]
fn publish_writes_objects_and_a_manifest_and_reruns_skip_unchanged_files() {
    let d = dirs();
    let cfg = RemoteConfig::default();
    let sum = publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    assert!(sum.errors.is_empty(), "{:?}", sum.errors);
    assert!(sum.manifest_written);
    assert_eq!(
        (
            sum.files,
            sum.uploaded,
            sum.hard_links,
            sum.symlinks,
            sum.skipped_special
        ),
        (5, 5, 1, 1, 1)
    );
    assert_eq!(
        fs::read(d.store.join("a/b/big.bin")).expect("object"),
        fs::read(d.src.join("a/b/big.bin")).expect("source")
    );
    let m = manifest_of(&d.store);
    assert_eq!(m.chunk_size, 64 << 10);
    let files = m.files_by_key();
    let big = files["a/b/big.bin"];
    assert_eq!(big.size, 17 << 20);
    assert_eq!(
        big.digests,
        hsm_manifest::chunk_digests(
            &fs::read(d.src.join("a/b/big.bin")).expect("read"),
            64 << 10
        )
    );
    assert!(big.etag.is_some(), "the ETag the store gave is recorded");
    assert!(m.entries.iter().any(|e| e.path == "a/hard"
        && e.kind
            == hsm_manifest::Kind::HardLink {
                to: "top.txt".into()
            }));
    assert!(!d.store.join(".hsm-manifest.partial").exists());
    assert_eq!(
        fs::read(d.store.join("odd %41 ü#?.txt")).expect("odd"),
        b"odd"
    );

    // Unchanged: nothing uploaded again.
    let again = publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    assert_eq!((again.uploaded, again.unchanged), (0, 5));

    // One file changed: only it is uploaded.
    fs::write(d.src.join("top.txt"), b"changed!!").expect("write");
    let third = publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    assert_eq!((third.uploaded, third.unchanged), (1, 4));
    assert_eq!(
        fs::read(d.store.join("top.txt")).expect("obj"),
        b"changed!!"
    );

    // An object changed behind publish's back is uploaded again, not trusted.
    fs::write(d.store.join("sparse"), b"tampered").expect("tamper");
    let fourth = publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    assert_eq!((fourth.uploaded, fourth.unchanged), (1, 4));
}

#[test]
fn publish_refuses_overlaps_bad_chunk_sizes_and_reserved_names() {
    let d = dirs();
    let cfg = RemoteConfig::default();
    let inside = d.src.join("store");
    let e = publish(s(&d.src), s(&inside), &cfg, &popts()).expect_err("overlap");
    assert!(e.to_string().contains("overlap"), "{e}");
    let bad = PublishOptions {
        chunk_size: 3000,
        ..popts()
    };
    let e = publish(s(&d.src), s(&d.store), &cfg, &bad).expect_err("chunk");
    assert!(e.to_string().contains("power of two"), "{e}");

    // A top-level .hsm-* name would collide with the manifest: an error naming it, and no
    // manifest (unless errors are allowed, when it is simply left out).
    fs::write(d.src.join(".hsm-manifest"), b"not ours").expect("write");
    let sum = publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    assert_eq!(sum.errors.len(), 1);
    assert_eq!(sum.errors[0].path, ".hsm-manifest");
    assert!(!sum.manifest_written);
    assert!(!d.store.join(MANIFEST_KEY).exists());
    assert!(
        d.store.join(".hsm-manifest.partial").exists(),
        "finished uploads are recorded for the next run"
    );
    let allowed = PublishOptions {
        allow_errors: true,
        ..popts()
    };
    let sum = publish(s(&d.src), s(&d.store), &cfg, &allowed).expect("publish");
    assert!(sum.manifest_written);
    assert_eq!(
        sum.uploaded, 0,
        "the partial manifest let the re-run skip all files"
    );
    assert_eq!(manifest_of(&d.store).files_by_key().len(), 5);
}

#[test]
fn populate_from_a_manifest_restores_metadata_and_pins_digests() {
    let d = dirs();
    let cfg = RemoteConfig::default();
    publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    let source = open_source(s(&d.store), &cfg).expect("source");
    assert!(
        source.describe().contains("manifest"),
        "{}",
        source.describe()
    );
    let o = Options {
        progress: false,
        require_served_fs: false,
        ..Options::default()
    };
    let sum = populate(source.as_ref(), &d.dst, &o).expect("populate");
    assert!(sum.errors.is_empty(), "{:?}", sum.errors);
    assert_eq!(
        (sum.stubs_created, sum.empty_files, sum.hard_links),
        (4, 1, 1)
    );
    assert!(
        !d.dst.join(MANIFEST_KEY).exists(),
        "the manifest is not part of the tree"
    );
    let top = fs::metadata(d.dst.join("top.txt")).expect("stat");
    assert_eq!(top.mode() & 0o7777, 0o640);
    assert_eq!(
        top.ino(),
        fs::metadata(d.dst.join("a/hard")).expect("stat").ino()
    );
    assert_eq!(
        fs::read_link(d.dst.join("link")).expect("link"),
        Path::new("a/b/big.bin")
    );
    let m = manifest_of(&d.store);
    let meta = meta_of(&d.dst.join("a/b/big.bin"));
    let integrity = meta.integrity.expect("integrity recorded");
    assert_eq!(integrity.chunk_shift, 16);
    assert_eq!(
        integrity.list_hash,
        hsm_manifest::list_hash(&m.files_by_key()["a/b/big.bin"].digests)
    );
    assert_eq!(meta.etag, m.files_by_key()["a/b/big.bin"].etag);
    assert!(meta.remote_url.starts_with("file:///"));

    // A populate again changes nothing.
    let source = open_source(s(&d.store), &cfg).expect("source");
    let again = populate(source.as_ref(), &d.dst, &o).expect("populate");
    assert_eq!((again.stubs_created, again.stubs_unchanged), (0, 4));
}

#[test]
fn manifest_paths_that_escape_are_refused_by_name() {
    let d = dirs();
    let cfg = RemoteConfig::default();
    publish(s(&d.src), s(&d.store), &cfg, &popts()).expect("publish");
    // Rewrite one path as "../escape" with a valid checksum: decode must refuse it.
    let text = fs::read_to_string(d.store.join(MANIFEST_KEY)).expect("read");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let i = lines
        .iter()
        .position(|l| l.contains("\"path\":\"top.txt\""))
        .expect("entry");
    lines[i] = lines[i].replace("\"path\":\"top.txt\"", "\"path\":\"../escape\"");
    let n = lines.len();
    let body: String = lines[..n - 1].iter().map(|l| format!("{l}\n")).collect();
    let trailer = format!(
        "{{\"end\":{},\"blake3\":\"{}\"}}\n",
        n - 2,
        blake3::hash(body.as_bytes()).to_hex()
    );
    fs::write(d.store.join(MANIFEST_KEY), format!("{body}{trailer}")).expect("write");
    let e = RemoteSource::open(s(&d.store), &cfg).expect_err("refused");
    assert!(e.to_string().contains("../escape"), "{e}");
    assert!(!d.dst.exists());
}

#[test]
fn publish_with_objects_puts_them_beside_the_manifest() {
    require_root();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("f"), b"f").expect("write");
    let store = tmp.path().join("store");
    let cfg = RemoteConfig::default();
    let config = br#"{"config":{"Cmd":["/bin/sh"]}}"#;
    let summary = hsm_populate::publish_with_objects(
        s(&src),
        s(&store),
        &cfg,
        &popts(),
        &[(".hsm-image.json", config.as_slice())],
    )
    .expect("publish");
    assert!(summary.manifest_written);
    assert_eq!(
        fs::read(store.join(".hsm-image.json")).expect("object"),
        config
    );
    assert_eq!(manifest_of(&store).entries.len(), 2);
    // Only .hsm- names, never the manifest's own.
    for key in ["image.json", MANIFEST_KEY] {
        assert!(
            hsm_populate::publish_with_objects(s(&src), s(&store), &cfg, &popts(), &[(key, b"x")])
                .is_err(),
            "{key}"
        );
    }
}

fn mock_store() -> Arc<FaultRemote<MockRemote>> {
    Arc::new(FaultRemote::new(MockRemote::new("mock://pkgs/app")))
}

fn injected(key: &str) -> Fault {
    Fault::Error(RemoteError::Failed {
        url: "mock://pkgs/app".into(),
        key: key.into(),
        detail: "put: injected".into(),
    })
}

#[test]
fn publish_to_a_failing_store_retries_once_then_reports_the_key() {
    let d = dirs();
    let store = mock_store();
    // The first write fails: that file is uploaded again at the end, alone, and succeeds.
    store.fail_next_writes(1, injected("first"));
    let src = LocalSource::open(s(&d.src)).expect("source");
    let sum = publish_to(src, store.clone(), &popts(), &[]).expect("publish");
    assert!(sum.errors.is_empty(), "{:?}", sum.errors);
    assert_eq!((sum.files, sum.uploaded), (5, 5));
    assert!(sum.manifest_written);
    assert_eq!(sum.destination, "mock://pkgs/app");
    let mock = store.inner();
    let m = Manifest::decode(&mock.data(MANIFEST_KEY).expect("manifest")).expect("decode");
    for f in m.files_by_key().values() {
        let expect = mock.expect_for(&f.key).expect("object stored");
        assert_eq!(
            (expect.size, expect.etag.as_ref()),
            (f.size, f.etag.as_ref())
        );
    }
    // The 17 MiB file went up in parts and arrived whole.
    assert_eq!(
        mock.data("a/b/big.bin").expect("big")[..],
        fs::read(d.src.join("a/b/big.bin")).expect("source")[..]
    );
    assert!(mock.data(".hsm-manifest.partial").is_none());

    // A write that fails again on the retry is an error naming the path, with the store's
    // error (which names the key); the manifest is left as it was.
    let manifest = mock.data(MANIFEST_KEY).expect("manifest");
    fs::write(d.src.join("top.txt"), b"changed!!").expect("write");
    store.fail_next_writes(2, injected("top.txt"));
    let src = LocalSource::open(s(&d.src)).expect("source");
    let sum = publish_to(src, store.clone(), &popts(), &[]).expect("publish");
    assert_eq!((sum.uploaded, sum.unchanged), (0, 4));
    assert_eq!(sum.errors.len(), 1, "{:?}", sum.errors);
    assert_eq!(sum.errors[0].path, "top.txt");
    assert!(
        sum.errors[0].error.contains("\"top.txt\""),
        "{:?}",
        sum.errors
    );
    assert!(!sum.manifest_written);
    assert_eq!(
        mock.data("top.txt").expect("old object")[..],
        b"top level"[..]
    );
    assert_eq!(mock.data(MANIFEST_KEY), Some(manifest));

    // Populate from the store, also when it cannot list (HEADs then).
    for can_list in [true, false] {
        mock.set_can_list(can_list);
        let source = RemoteSource::from_store(store.as_ref()).expect("source");
        assert!(source.from_manifest);
        let dst = d.dst.join(format!("list-{can_list}"));
        let o = Options {
            progress: false,
            require_served_fs: false,
            ..Options::default()
        };
        let sum = populate(&source, &dst, &o).expect("populate");
        assert!(sum.errors.is_empty(), "{:?}", sum.errors);
        assert_eq!(
            (sum.stubs_created, sum.empty_files, sum.hard_links),
            (4, 1, 1)
        );
        let meta = meta_of(&dst.join("a/b/big.bin"));
        assert_eq!(meta.remote_url, "mock://pkgs/app");
        assert_eq!(meta.etag, mock.expect_for("a/b/big.bin").expect("big").etag);
    }
}
