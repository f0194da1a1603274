//! populate against real directories. Stub xattrs need CAP_SYS_ADMIN, and preserving
//! owners needs CAP_CHOWN: these tests refuse to run without root.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use hsm_kernel::xattr;
use hsm_populate::{LocalSource, Options, Summary, populate};
use hsm_stub::{MAP_XATTR, MARKER_XATTR, META_XATTR, Marker, MarkerState, Meta, ResidentMap};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "populate tests set trusted.* xattrs and file owners: run them as root"
    );
}

fn opts() -> Options {
    Options {
        progress: false,
        ..Options::default()
    }
}

fn run(src: &Path, dst: &Path, o: &Options) -> Summary {
    let s = LocalSource::open(src.to_str().expect("utf8")).expect("source");
    populate(&s, dst, o).expect("populate")
}

fn xattr_of(path: &Path, name: &str) -> Option<Vec<u8>> {
    let f = fs::File::open(path).expect("open");
    let mut buf = Vec::new();
    xattr::fget(f.as_fd(), name, &mut buf)
        .expect("getxattr")
        .then_some(buf)
}

fn meta_of(path: &Path) -> Meta {
    Meta::decode(&xattr_of(path, META_XATTR).expect("meta present")).expect("meta decodes")
}

struct Tree {
    _tmp: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
}

fn tree() -> Tree {
    require_root();
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir_all(src.join("a/b")).expect("mkdir");
    fs::write(src.join("top.txt"), b"top level").expect("write");
    fs::write(src.join("a/b/deep.bin"), vec![7u8; 3 << 20]).expect("write");
    fs::write(src.join("empty"), b"").expect("write");
    fs::write(src.join("odd name %#?.txt"), b"odd").expect("write");
    symlink("a/b/deep.bin", src.join("link")).expect("symlink");
    fs::hard_link(src.join("top.txt"), src.join("a/hard")).expect("hard link");
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
    fs::set_permissions(src.join("top.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    nix::unistd::chown(&src.join("top.txt"), Some(1234.into()), Some(4321.into())).expect("chown");
    fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o750)).expect("chmod dir");
    // Sparse: 8 MiB with data only in the 5th MiB.
    let sparse = fs::File::create(src.join("sparse")).expect("create");
    sparse.set_len(8 << 20).expect("len");
    sparse.write_at(&[1u8; 4096], 5 << 20).expect("write");
    sparse.sync_all().expect("sync");
    Tree {
        _tmp: tmp,
        src,
        dst,
    }
}

#[test]
fn builds_a_stub_tree() {
    let t = tree();
    let s = run(&t.src, &t.dst, &opts());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.stubs_created, 4, "{s}"); // top, deep, odd, sparse (a/hard is a link)
    assert_eq!(s.hard_links, 1, "{s}");
    assert_eq!(s.empty_files, 1, "{s}");
    assert_eq!(s.symlinks, 1, "{s}");
    assert_eq!(s.skipped_special, 1, "{s}");
    assert_eq!(s.dirs_created, 2, "{s}");

    let top = t.dst.join("top.txt");
    let md = fs::symlink_metadata(&top).expect("stat");
    assert_eq!(md.len(), 9);
    // One data-marker page (and ext4's external xattr block): no file data.
    assert!(
        md.blocks() * 512 <= 8192,
        "a stub holds no data: {} blocks",
        md.blocks()
    );
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!((md.uid(), md.gid()), (1234, 4321));
    let smd = fs::metadata(t.src.join("top.txt")).expect("src stat");
    assert_eq!(
        (md.mtime(), md.mtime_nsec()),
        (smd.mtime(), smd.mtime_nsec())
    );
    assert_eq!(
        Marker::decode(&xattr_of(&top, MARKER_XATTR).expect("marker"))
            .expect("decode")
            .state,
        MarkerState::Ready
    );
    let meta = meta_of(&top);
    // Hard-linked to a/hard in SRC: the stub names whichever path was seen first.
    assert!(
        meta.key == "top.txt" || meta.key == "a/hard",
        "{}",
        meta.key
    );
    assert_eq!(meta.remote_size, 9);
    assert!(meta.remote_url.starts_with("file:///"));
    assert!(meta.etag.is_some());
    assert_eq!(
        meta_of(&t.dst.join("odd name %#?.txt")).key,
        "odd name %#?.txt"
    );

    assert_eq!(
        fs::metadata(t.dst.join("a/hard")).expect("stat").ino(),
        md.ino(),
        "hard links stay hard links"
    );
    assert_eq!(
        fs::read_link(t.dst.join("link")).expect("readlink"),
        Path::new("a/b/deep.bin")
    );
    assert_eq!(
        fs::metadata(t.dst.join("a/b")).expect("stat").mode() & 0o7777,
        0o750
    );
    assert!(!t.dst.join("fifo").exists());
    let empty = t.dst.join("empty");
    assert_eq!(fs::metadata(&empty).expect("stat").len(), 0);
    assert!(
        xattr_of(&empty, MARKER_XATTR).is_none(),
        "empty files are plain files"
    );

    // Every granule to fetch starts with a data marker, so SEEK_DATA-driven copiers (cp,
    // tar --sparse) read it, and its event fills the granule; the rest is a hole.
    let deep = fs::File::open(t.dst.join("a/b/deep.bin")).expect("open");
    use nix::unistd::{Whence, lseek};
    for g in 0..3i64 {
        assert_eq!(
            lseek(&deep, g << 20, Whence::SeekData).expect("seek data"),
            g << 20
        );
        assert_eq!(
            lseek(&deep, g << 20, Whence::SeekHole).expect("seek hole"),
            (g << 20) + 4096
        );
    }
    assert!(
        fs::metadata(t.dst.join("a/b/deep.bin"))
            .expect("stat")
            .blocks()
            * 512
            <= 4 * 4096
    );

    // Holes of the source start resident: only the granule with data needs fetching.
    let map = ResidentMap::decode(&xattr_of(&t.dst.join("sparse"), MAP_XATTR).expect("map"))
        .expect("map");
    let missing: Vec<u64> = map.missing(0..map.granule_count()).collect();
    assert_eq!(missing, vec![5], "only the data granule is missing");
}

#[test]
fn rerun_is_idempotent_and_tracks_changes() {
    let t = tree();
    let first = run(&t.src, &t.dst, &opts());
    assert!(first.errors.is_empty());
    let ino_before = fs::metadata(t.dst.join("a/b/deep.bin"))
        .expect("stat")
        .ino();

    let again = run(&t.src, &t.dst, &opts());
    assert!(again.errors.is_empty(), "{:?}", again.errors);
    assert_eq!(again.stubs_created + again.stubs_replaced, 0, "{again}");
    assert_eq!(again.stubs_unchanged, 4, "{again}");
    assert_eq!(again.removed, 0, "{again}");
    assert_eq!(
        fs::metadata(t.dst.join("a/b/deep.bin"))
            .expect("stat")
            .ino(),
        ino_before
    );

    // Change, add and remove entries in SRC; put a local file in DST.
    fs::write(t.src.join("top.txt"), b"changed content").expect("write");
    fs::write(t.src.join("new.txt"), b"new").expect("write");
    fs::remove_file(t.src.join("odd name %#?.txt")).expect("rm");
    fs::remove_file(t.src.join("link")).expect("rm");
    fs::write(t.dst.join("mine.txt"), b"user data").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.stubs_created, 1, "{s}");
    assert_eq!(s.stubs_replaced, 1, "{s}");
    assert_eq!(s.removed, 2, "{s}");
    assert_eq!(s.kept_local, 1, "{s}");
    assert_eq!(meta_of(&t.dst.join("top.txt")).remote_size, 15);
    assert_eq!(
        fs::read(t.dst.join("mine.txt")).expect("read"),
        b"user data"
    );
    assert!(!t.dst.join("odd name %#?.txt").exists());
    assert!(fs::symlink_metadata(t.dst.join("link")).is_err());
    // The hard link follows the replaced primary.
    assert_eq!(
        fs::metadata(t.dst.join("a/hard")).expect("stat").ino(),
        fs::metadata(t.dst.join("top.txt")).expect("stat").ino()
    );
}

#[test]
fn local_files_are_only_replaced_with_force() {
    let t = tree();
    run(&t.src, &t.dst, &opts());
    // A local file where a stub was: not a stub, different from SRC.
    fs::remove_file(t.dst.join("top.txt")).expect("rm");
    fs::write(t.dst.join("top.txt"), b"local edit!").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert_eq!(s.kept_local, 1, "{s}");
    assert_eq!(
        fs::read(t.dst.join("top.txt")).expect("read"),
        b"local edit!"
    );
    let s = run(
        &t.src,
        &t.dst,
        &Options {
            force: true,
            ..opts()
        },
    );
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    // top.txt is hard-linked to a/hard in SRC: its stub names either path.
    let key = meta_of(&t.dst.join("top.txt")).key;
    assert!(key == "top.txt" || key == "a/hard", "{key}");
    assert_eq!(
        fs::metadata(t.dst.join("a/hard")).expect("stat").ino(),
        fs::metadata(t.dst.join("top.txt")).expect("stat").ino()
    );
}

#[test]
fn hydrated_files_count_as_unchanged() {
    let t = tree();
    run(&t.src, &t.dst, &opts());
    // What the agent leaves behind once every byte is fetched: an ordinary file with the
    // source's size and mtime.
    let p = t.dst.join("top.txt");
    let f = fs::OpenOptions::new().write(true).open(&p).expect("open");
    f.write_at(b"top level", 0).expect("write");
    for n in [MARKER_XATTR, META_XATTR, MAP_XATTR] {
        xattr::fremove(f.as_fd(), n).expect("remove");
    }
    let smd = fs::metadata(t.src.join("top.txt")).expect("stat");
    let ts = nix::sys::time::TimeSpec::new(smd.mtime(), smd.mtime_nsec());
    nix::sys::stat::futimens(f.as_fd(), &ts, &ts).expect("times");
    let s = run(&t.src, &t.dst, &opts());
    assert_eq!(s.files_unchanged, 2, "top.txt and the empty file: {s}");
    assert_eq!(s.kept_local, 0, "{s}");
}

#[test]
fn never_follows_symlinks_planted_in_dst() {
    let t = tree();
    let outside = t.src.parent().expect("parent").join("outside");
    fs::create_dir(&outside).expect("mkdir");
    fs::create_dir_all(&t.dst).expect("mkdir");
    // DST/a points outside DST; SRC/a is a directory with files.
    symlink(&outside, t.dst.join("a")).expect("symlink");
    let s = run(&t.src, &t.dst, &opts());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(
        fs::read_dir(&outside).expect("read").count(),
        0,
        "nothing created outside DST"
    );
    assert!(
        fs::symlink_metadata(t.dst.join("a"))
            .expect("stat")
            .is_dir()
    );
    assert!(t.dst.join("a/b/deep.bin").exists());
}

#[test]
fn refuses_overlap_and_unservable_filesystems() {
    let t = tree();
    let s = LocalSource::open(t.src.to_str().expect("utf8")).expect("source");
    let e = populate(&s, &t.src.join("inside"), &opts()).expect_err("overlap");
    assert!(e.to_string().contains("overlap"), "{e}");
    let shm = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
    let e = populate(&s, shm.path(), &opts()).expect_err("tmpfs");
    assert!(e.to_string().contains("ext4, xfs or btrfs"), "{e}");
}

#[test]
fn unaddressable_names_are_errors_that_name_the_path() {
    let t = tree();
    use std::os::unix::ffi::OsStrExt;
    let bad = t.src.join(std::ffi::OsStr::from_bytes(b"bad\xffname"));
    fs::write(&bad, b"x").expect("write");
    fs::write(t.src.join("new\nline"), b"x").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
    assert!(
        s.errors.iter().any(|e| e.error.contains("UTF-8")),
        "{:?}",
        s.errors
    );
    assert!(
        s.errors
            .iter()
            .any(|e| e.error.contains("control character")),
        "{:?}",
        s.errors
    );
    assert_eq!(s.stubs_created, 4, "the rest is still populated");
}

fn mark_locally_modified(path: &Path) {
    let f = fs::File::open(path).expect("open");
    let mut map = ResidentMap::decode(&xattr_of(path, MAP_XATTR).expect("map")).expect("decode");
    map.set_locally_modified();
    xattr::fset(f.as_fd(), MAP_XATTR, &map.encode(), xattr::SetMode::Replace).expect("set");
}

#[test]
fn stubs_written_locally_are_kept_like_local_files() {
    let t = tree();
    run(&t.src, &t.dst, &opts());
    mark_locally_modified(&t.dst.join("odd name %#?.txt"));
    fs::write(t.src.join("odd name %#?.txt"), b"new source content").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert_eq!(s.kept_local, 1, "{s}");
    assert_eq!(
        meta_of(&t.dst.join("odd name %#?.txt")).remote_size,
        3,
        "old stub kept"
    );
    // Removed from SRC: still kept without --force.
    fs::remove_file(t.src.join("odd name %#?.txt")).expect("rm");
    let s = run(&t.src, &t.dst, &opts());
    assert!(t.dst.join("odd name %#?.txt").exists(), "{s}");
    let s = run(
        &t.src,
        &t.dst,
        &Options {
            force: true,
            ..opts()
        },
    );
    assert!(!t.dst.join("odd name %#?.txt").exists(), "{s}");
}

#[test]
fn files_named_like_our_temporaries_are_not_ours_to_remove() {
    let t = tree();
    run(&t.src, &t.dst, &opts());
    fs::write(t.dst.join(".hsm-tmp-mine"), b"user data").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert_eq!(
        fs::read(t.dst.join(".hsm-tmp-mine")).expect("kept"),
        b"user data",
        "{s}"
    );
}

#[test]
fn hard_links_are_never_made_to_a_kept_local_file() {
    let t = tree();
    fs::create_dir_all(&t.dst).expect("mkdir");
    // SRC: top.txt and a/hard are one file. DST: a local top.txt in the way.
    fs::write(t.dst.join("top.txt"), b"local!").expect("write");
    let s = run(&t.src, &t.dst, &opts());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(fs::read(t.dst.join("top.txt")).expect("read"), b"local!");
    let hard = t.dst.join("a/hard");
    assert_ne!(
        fs::metadata(&hard).expect("stat").ino(),
        fs::metadata(t.dst.join("top.txt")).expect("stat").ino(),
        "a/hard must not be linked to the local file"
    );
    assert_eq!(
        meta_of(&hard).remote_size,
        9,
        "a/hard is a stub of the SRC file"
    );
}

/// A directory tree in DST that is not in SRC is removed however deep it is (a user could
/// make one 10,000 levels deep): no recursion, so no stack overflow, and no descriptor per
/// level.
#[test]
fn arbitrarily_deep_directories_in_dst_are_removed() {
    let t = tree();
    run(&t.src, &t.dst, &opts());
    let mut dir = fs::File::open(&t.dst).expect("open dst");
    for _ in 0..10_000 {
        nix::sys::stat::mkdirat(dir.as_fd(), "d", nix::sys::stat::Mode::S_IRWXU).expect("mkdir");
        let next = nix::fcntl::openat(
            dir.as_fd(),
            "d",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        )
        .expect("open");
        dir = fs::File::from(next);
    }
    // A stub at the bottom is removed too; a local file would be kept (and so its parents).
    drop(dir);
    let s = run(&t.src, &t.dst, &opts());
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(!t.dst.join("d").exists(), "{s}");
    assert_eq!(s.removed, 10_000, "{s}");
}

/// DST given as a symlink (to a directory populate must not touch) is refused, naming it;
/// the directory it points to keeps its mode and its entries.
#[test]
fn a_dst_that_is_a_symlink_is_refused() {
    let t = tree();
    let target = t.src.parent().expect("parent").join("rootonly");
    fs::create_dir(&target).expect("mkdir");
    fs::create_dir(target.join("emptydir")).expect("mkdir");
    symlink("x", target.join("link")).expect("symlink");
    fs::set_permissions(&target, fs::Permissions::from_mode(0o700)).expect("chmod");
    fs::set_permissions(&t.src, fs::Permissions::from_mode(0o777)).expect("chmod");
    symlink(&target, &t.dst).expect("symlink");
    let s = LocalSource::open(t.src.to_str().expect("utf8")).expect("source");
    let e = populate(&s, &t.dst, &opts()).expect_err("a symlinked DST");
    assert!(e.to_string().contains("DST is a symbolic link"), "{e}");
    assert!(e.to_string().contains("dst"), "{e}");
    // The same below a link a user may have planted: refused as well (nobody's link in a
    // directory of theirs is what fstest 081 shows; root's own links are followed).
    let mut names: Vec<_> = fs::read_dir(&target)
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["emptydir", "link"]);
    assert_eq!(
        fs::metadata(&target).expect("stat").permissions().mode() & 0o7777,
        0o700
    );
    // A missing DST is created, and a DST reached through root's own link is used.
    let real = t.src.parent().expect("parent").join("real");
    fs::create_dir(&real).expect("mkdir");
    symlink(&real, t.src.parent().expect("parent").join("via")).expect("symlink");
    let via = t.src.parent().expect("parent").join("via/new/dst");
    let summary = populate(&s, &via, &opts()).expect("populate through root's link");
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    assert!(real.join("new/dst/top.txt").exists());
    assert_eq!(
        summary.destination,
        real.join("new/dst").display().to_string()
    );
}
