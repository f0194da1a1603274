//! Staging images built here: layers in order, whiteouts, links, modes, owners, xattrs;
//! and every refusal. These tests run as root (owners and security.* xattrs need it).

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use hsm_oci::{BlobRole, EntryProblem, OciError};
use serde_json::json;
use tar::EntryType;

/// A v2 file capability granting cap_net_raw (13), effective.
fn cap_net_raw() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 13).to_le_bytes());
    v.extend_from_slice(&[0; 12]);
    v
}

fn xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let f = std::fs::File::open(path).expect("open");
    let mut buf = Vec::new();
    hsm_kernel::xattr::fget(f.as_fd(), name, &mut buf)
        .expect("getxattr")
        .then_some(buf)
}

#[test]
fn layers_apply_in_order_with_whiteouts_links_modes_and_xattrs() {
    let l1 = tar(&[
        E::dir("./").mtime(1000),
        E::dir("bin/"),
        E::file("bin/a", b"one"),
        E::file("bin/b", b"bee"),
        E::dir("opt/"),
        E::dir("opt/old/"),
        E::file("opt/old/x", b"x"),
        E::file("opt/keep", b"k"),
        E::symlink("lnk", "bin/a"),
        E::dir("dev/"),
        E::special("dev/null", EntryType::Char),
        E::special("dev/fifo", EntryType::Fifo),
    ]);
    let l2 = tar(&[
        E::file("bin/a", b"two"),
        E::file("bin/.wh.b", b""),
        E::dir("opt/"),
        E::file("opt/new", b"n"),
        E::file("opt/.wh..wh..opq", b""),
        E::file("usr/bin/su", b"su").mode(0o4755),
        E::file("usr/bin/ping", b"ping")
            .mode(0o755)
            .xattr("security.capability", &cap_net_raw())
            .xattr("user.note", b"hi"),
        E::file("home/app/f", b"f")
            .owner(1000, 1001)
            .mode(0o640)
            .mtime(1_234_567_890),
    ]);
    let l3 = tar(&[
        E::hardlink("bin/a2", "bin/a"),
        E::dir("bin/").mtime(1_500_000_000),
    ]);
    let oci = one_image(&[(l1, TAR), (gzip(&l2), TAR_GZ), (zstd(&l3), TAR_ZST)]);
    let (parent, staged) = stage(&oci);
    let staged = staged.expect("stage");
    let root = staged.rootfs();

    // Staging: a private directory of root's.
    let staging = root.parent().expect("parent");
    let md = std::fs::metadata(staging).expect("stat");
    assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    assert_eq!(md.uid(), 0);

    assert_eq!(staged.image.layers.len(), 3);
    assert!(staged.image.digest.starts_with("sha256:"));
    // Later layers win; whiteouts remove; an opaque directory keeps only its own layer.
    assert_eq!(std::fs::read(root.join("bin/a")).expect("a"), b"two");
    assert!(!root.join("bin/b").exists());
    assert!(root.join("opt/new").exists());
    assert!(!root.join("opt/keep").exists());
    assert!(!root.join("opt/old").exists());
    // Hard link within the image.
    let a = std::fs::metadata(root.join("bin/a")).expect("a");
    let a2 = std::fs::metadata(root.join("bin/a2")).expect("a2");
    assert_eq!(a.ino(), a2.ino());
    assert_eq!(a.nlink(), 2);
    // Symlink kept verbatim.
    assert_eq!(
        std::fs::read_link(root.join("lnk")).expect("readlink"),
        std::path::Path::new("bin/a")
    );
    // Modes with setuid, owners, times, xattrs.
    let su = std::fs::metadata(root.join("usr/bin/su")).expect("su");
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let f = std::fs::metadata(root.join("home/app/f")).expect("f");
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1001, 0o640));
    assert_eq!(f.mtime(), 1_234_567_890);
    assert_eq!(
        xattr(&root.join("usr/bin/ping"), "security.capability"),
        Some(cap_net_raw())
    );
    assert_eq!(
        xattr(&root.join("usr/bin/ping"), "user.note"),
        Some(b"hi".to_vec())
    );
    // Directory times are set after their children changed them.
    assert_eq!(
        std::fs::metadata(root.join("bin")).expect("bin").mtime(),
        1_500_000_000
    );
    assert_eq!(std::fs::metadata(&root).expect("root").mtime(), 1000);
    // Devices and FIFOs are skipped and counted.
    assert!(!root.join("dev/null").exists());
    assert!(!root.join("dev/fifo").exists());
    assert_eq!(staged.skipped_special, 2);

    staged.remove().expect("remove");
    assert!(is_empty_dir(parent.path()));
}

#[test]
fn docker_gzip_layers_are_accepted() {
    let oci = one_image(&[(gzip(&tar(&[E::file("hello", b"hi")])), DOCKER_GZ)]);
    let (_parent, staged) = stage(&oci);
    let staged = staged.expect("stage");
    assert_eq!(
        std::fs::read(staged.rootfs().join("hello")).expect("read"),
        b"hi"
    );
}

/// Stage `oci`, expect an error, and check the staging parent was left empty.
fn refused(oci: &Oci) -> OciError {
    let (parent, r) = stage(oci);
    let e = r.expect_err("must be refused");
    assert!(is_empty_dir(parent.path()), "staging left behind after {e}");
    e
}

#[test]
fn a_layer_whose_digest_does_not_match_is_refused_naming_it() {
    let l1 = tar(&[E::file("a", b"1")]);
    let l2 = gzip(&tar(&[E::file("b", b"2")]));
    let oci = Oci::new();
    let config = oci.blob(&serde_json::to_vec(&config()).expect("json"), CONFIG);
    let d1 = oci.blob(&l1, TAR);
    let d2 = oci.blob(&l2, TAR_GZ);
    // Same size, one byte changed inside the gzip stream's data.
    let path = oci.blob_file(&d2);
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, bytes).expect("write");
    let m = oci.manifest(config, vec![d1, d2.clone()]);
    oci.index(vec![m]);
    let e = refused(&oci);
    match &e {
        OciError::DigestMismatch { role, digest, .. } => {
            assert_eq!(*role, BlobRole::Layer(2));
            assert_eq!(digest, d2["digest"].as_str().expect("digest"));
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(e.to_string().contains("layer 2"), "{e}");
}

#[test]
fn a_blob_of_the_wrong_size_is_refused() {
    let oci = Oci::new();
    let config = oci.blob(&serde_json::to_vec(&config()).expect("json"), CONFIG);
    let mut d = oci.blob(&tar(&[E::file("a", b"1")]), TAR);
    d["size"] = json!(10);
    let m = oci.manifest(config, vec![d]);
    oci.index(vec![m]);
    assert!(matches!(
        refused(&oci),
        OciError::SizeMismatch {
            role: BlobRole::Layer(1),
            want: 10,
            ..
        }
    ));
}

#[test]
fn a_manifest_whose_digest_does_not_match_is_refused() {
    let oci = Oci::new();
    let m = oci.image(&[(tar(&[E::file("a", b"1")]), TAR)], &config());
    let path = oci.blob_file(&m);
    let mut bytes = std::fs::read(&path).expect("read");
    // Same size, other content: a space instead of the closing brace's neighbour.
    let n = bytes.len();
    bytes[n - 1] = b' ';
    std::fs::write(&path, bytes).expect("write");
    oci.index(vec![m]);
    assert!(matches!(
        refused(&oci),
        OciError::DigestMismatch {
            role: BlobRole::Manifest,
            ..
        }
    ));
}

#[test]
fn an_unknown_media_type_is_refused_naming_it() {
    let oci = one_image(&[(tar(&[E::file("a", b"1")]), "application/x-tar")]);
    let e = refused(&oci);
    assert!(
        matches!(&e, OciError::UnknownMediaType { role: BlobRole::Layer(1), media_type, .. } if media_type == "application/x-tar"),
        "{e}"
    );
    assert!(e.to_string().contains("application/x-tar"));
}

fn entry_problem(e: OciError) -> (usize, String, EntryProblem) {
    match e {
        OciError::Entry {
            layer,
            entry,
            problem,
            ..
        } => (layer, entry, problem),
        other => panic!("expected an entry refusal, got {other}"),
    }
}

#[test]
fn paths_escaping_the_root_are_refused() {
    let oci = one_image(&[
        (tar(&[E::file("ok", b"1")]), TAR),
        (tar(&[E::file("../x", b"evil")]), TAR),
    ]);
    assert_eq!(
        entry_problem(refused(&oci)),
        (2, "../x".into(), EntryProblem::Escapes)
    );
    let oci = one_image(&[(tar(&[E::file("a/../../x", b"evil")]), TAR)]);
    assert_eq!(entry_problem(refused(&oci)).2, EntryProblem::Escapes);
    let oci = one_image(&[(tar(&[E::file("/abs", b"evil")]), TAR)]);
    assert_eq!(
        entry_problem(refused(&oci)),
        (1, "/abs".into(), EntryProblem::Absolute)
    );
}

#[test]
fn entries_under_a_symlinked_parent_are_refused() {
    let outside = tempfile::tempdir().expect("tmp");
    let target = outside.path().to_str().expect("utf8").to_string();
    let oci = one_image(&[
        (tar(&[E::symlink("etc", &target)]), TAR),
        (tar(&[E::file("etc/passwd", b"evil")]), TAR),
    ]);
    let (layer, entry, problem) = entry_problem(refused(&oci));
    assert_eq!((layer, entry.as_str()), (2, "etc/passwd"));
    assert_eq!(
        problem,
        EntryProblem::SymlinkParent {
            parent: "etc".into()
        }
    );
    assert!(is_empty_dir(outside.path()), "wrote through the symlink");
    // A relative symlink inside the image is refused all the same.
    let oci = one_image(&[(
        tar(&[
            E::dir("real/"),
            E::symlink("l", "real"),
            E::file("l/x", b"1"),
        ]),
        TAR,
    )]);
    assert!(matches!(
        entry_problem(refused(&oci)).2,
        EntryProblem::SymlinkParent { .. }
    ));
    // So is a whiteout under one.
    let oci = one_image(&[(
        tar(&[E::symlink("l", &target), E::file("l/.wh.x", b"")]),
        TAR,
    )]);
    assert!(matches!(
        entry_problem(refused(&oci)).2,
        EntryProblem::SymlinkParent { .. }
    ));
}

#[test]
fn hard_links_outside_the_image_are_refused() {
    let oci = one_image(&[(tar(&[E::hardlink("x", "../../etc/passwd")]), TAR)]);
    assert_eq!(
        entry_problem(refused(&oci)).2,
        EntryProblem::HardLinkOutside {
            target: "../../etc/passwd".into()
        }
    );
    let oci = one_image(&[(tar(&[E::hardlink("x", "/etc/passwd")]), TAR)]);
    assert!(matches!(
        entry_problem(refused(&oci)).2,
        EntryProblem::HardLinkOutside { .. }
    ));
    let oci = one_image(&[(tar(&[E::hardlink("x", "nothere")]), TAR)]);
    assert!(matches!(
        entry_problem(refused(&oci)).2,
        EntryProblem::HardLinkMissing { .. }
    ));
}

#[test]
fn a_corrupt_layout_is_refused() {
    let oci = one_image(&[(tar(&[E::file("a", b"1")]), TAR)]);
    std::fs::remove_file(oci.path().join("oci-layout")).expect("rm");
    let e = refused(&oci);
    assert!(matches!(e, OciError::NotLayout { .. }), "{e}");
    assert!(e.to_string().contains("oci-layout"), "{e}");

    std::fs::write(
        oci.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .expect("write");
    assert!(matches!(refused(&oci), OciError::NotLayout { .. }));

    std::fs::write(
        oci.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("write");
    std::fs::write(oci.path().join("index.json"), b"{\"manifests\": [").expect("write");
    let e = refused(&oci);
    assert!(
        matches!(&e, OciError::BadJson { file, .. } if file.ends_with("index.json")),
        "{e}"
    );
}

#[test]
fn tags_choose_the_image() {
    let oci = Oci::new();
    let a = oci.image(&[(tar(&[E::file("which", b"a")]), TAR)], &config());
    let b = oci.image(&[(tar(&[E::file("which", b"b")]), TAR)], &config());
    oci.index(vec![tagged(a, "a"), tagged(b, "b")]);
    let parent = tempfile::tempdir().expect("tmp");
    let staged = hsm_oci::stage(&oci.reference(Some("b")), parent.path()).expect("stage b");
    assert_eq!(
        std::fs::read(staged.rootfs().join("which")).expect("read"),
        b"b"
    );
    drop(staged);

    let e = hsm_oci::stage(&oci.reference(Some("c")), parent.path()).expect_err("no c");
    match &e {
        OciError::TagNotFound { tag, found, .. } => {
            assert_eq!(tag, "c");
            assert_eq!(found, "a, b");
        }
        other => panic!("expected TagNotFound, got {other}"),
    }
    let e = hsm_oci::stage(&oci.reference(None), parent.path()).expect_err("ambiguous");
    assert!(
        matches!(&e, OciError::Ambiguous { count: 2, found, .. } if found == "a, b"),
        "{e}"
    );
    assert!(is_empty_dir(parent.path()));
}

#[test]
fn a_nested_index_resolves_to_linux_amd64() {
    let oci = Oci::new();
    let arm = oci.image(&[(tar(&[E::file("arch", b"arm64")]), TAR)], &config());
    let amd = oci.image(&[(tar(&[E::file("arch", b"amd64")]), TAR)], &config());
    let mut arm = arm;
    arm["platform"] = json!({"os": "linux", "architecture": "arm64"});
    let mut amd = amd;
    amd["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let nested = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [arm, amd.clone()]});
    let nested = oci.blob(&serde_json::to_vec(&nested).expect("json"), INDEX);
    oci.index(vec![tagged(nested, "multi")]);
    let (_parent, staged) = stage(&oci);
    let staged = staged.expect("stage");
    assert_eq!(
        std::fs::read(staged.rootfs().join("arch")).expect("read"),
        b"amd64"
    );
    assert_eq!(staged.image.digest, amd["digest"].as_str().expect("digest"));
}
