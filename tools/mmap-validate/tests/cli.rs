//! Runs the built `mmap-validate` binary against files in a temp dir.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_mmap-validate");
const GIB: u64 = 1 << 30;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run mmap-validate")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_status(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn create(path: &Path, size: &str) {
    let o = run(&["create", path_str(path), "--size", size]);
    assert_status(&o, 0);
}

/// Validates with the mapping flags the temp dir allows (tmp may be noexec).
fn validate(path: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["validate", path_str(path)];
    args.extend_from_slice(extra);
    let o = run(&args);
    if o.status.code() == Some(2) && stderr(&o).contains("--no-exec") {
        args.push("--no-exec");
        return run(&args);
    }
    o
}

#[test]
fn create_and_validate_1mib() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("one-mib");
    let o = run(&["create", path_str(&f)]);
    assert_status(&o, 0);
    assert_eq!(std::fs::metadata(&f).expect("stat").len(), 1 << 20);
    let data = std::fs::read(&f).expect("read");
    assert!(data[..4096].iter().all(|&b| b == b'a'));
    assert!(data[4096..8192].iter().all(|&b| b == b'b'));
    assert!(data[25 * 4096..26 * 4096].iter().all(|&b| b == b'z'));
    assert!(data[26 * 4096..27 * 4096].iter().all(|&b| b == b'a'));

    let o = validate(&f, &["--seed", "42"]);
    assert_status(&o, 0);
    let out = stdout(&o);
    assert_eq!(
        out,
        format!(
            "validate: {} ok (1048576 bytes, 256 pages, 64 preads, 64 ranges, seed 42)\n",
            f.display()
        )
    );
    // Default sizes via --size too, and a random (printed) seed.
    let o = validate(&f, &["--size", "1M"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains(" ok (1048576 bytes, 256 pages, 64 preads, 64 ranges, seed "));
}

#[test]
fn create_and_validate_unaligned_sizes() {
    let dir = TempDir::new().expect("tempdir");
    for (size, pages) in [(1_048_576 + 1234, 257), (100, 1), (4097, 2), (1, 1)] {
        let f = dir.path().join(format!("odd-{size}"));
        create(&f, &size.to_string());
        assert_eq!(std::fs::metadata(&f).expect("stat").len(), size);
        let o = validate(&f, &["--seed", "7", "--size", &size.to_string()]);
        assert_status(&o, 0);
        assert!(
            stdout(&o).contains(&format!(
                " ok ({size} bytes, {pages} pages, 64 preads, 64 ranges, seed 7)"
            )),
            "{}",
            stdout(&o)
        );
    }
}

#[test]
fn create_and_validate_5mib_with_suffix_and_page_size() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("five");
    create(&f, "5M");
    assert_eq!(std::fs::metadata(&f).expect("stat").len(), 5 << 20);
    let o = validate(&f, &["--reads", "200", "--ranges", "200"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains(" ok (5242880 bytes, 1280 pages, 200 preads, 200 ranges, seed "));

    // Another page size, and --sync; validating with the wrong page size fails.
    let g = dir.path().join("five-64k");
    let o = run(&[
        "create",
        path_str(&g),
        "--size",
        "5M",
        "--page-size",
        "64K",
        "--sync",
    ]);
    assert_status(&o, 0);
    let o = validate(&g, &["--page-size", "65536"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("(5242880 bytes, 80 pages,"));
    let o = validate(&g, &["--reads", "0", "--ranges", "0"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains("MISMATCH in phase mmap-full at offset 4096 "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn no_exec_mapping() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("noexec");
    create(&f, "300K");
    let o = run(&["validate", path_str(&f), "--no-exec", "--seed", "3"]);
    assert_status(&o, 0);
    assert!(stdout(&o).contains("ok (307200 bytes, 75 pages, 64 preads, 64 ranges, seed 3)"));
}

#[test]
fn empty_file_skips_mapping() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("empty");
    create(&f, "0");
    assert_eq!(std::fs::metadata(&f).expect("stat").len(), 0);
    let o = validate(&f, &["--seed", "1"]);
    assert_status(&o, 0);
    assert!(
        stderr(&o).contains("skipping the mmap phases"),
        "{}",
        stderr(&o)
    );
    assert!(
        stdout(&o).contains("ok (0 bytes, 0 pages, 0 preads, 0 ranges, seed 1)"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn create_truncates_existing_file() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("trunc");
    std::fs::write(&f, vec![b'#'; 100_000]).expect("write");
    create(&f, "5000");
    assert_eq!(std::fs::metadata(&f).expect("stat").len(), 5000);
    assert_status(&validate(&f, &[]), 0);
}

/// A sparse file larger than 4 GiB: holes read as zeros, which never match,
/// so validate must report a mismatch (exit 1) with a hex dump, stopping at
/// the first mismatch instead of reading 4 GiB.
#[test]
fn sparse_file_beyond_4gib_reports_mismatch() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("sparse");
    let size = 4 * GIB + 8192;
    File::create(&f)
        .expect("create")
        .set_len(size)
        .expect("set_len");
    let size_arg = size.to_string();

    // pread phase.
    let o = validate(
        &f,
        &[
            "--reads", "4", "--ranges", "4", "--seed", "11", "--size", &size_arg,
        ],
    );
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("MISMATCH in phase pread at offset "), "{err}");
    assert!(err.contains("actual 0x00"), "{err}");
    assert!(err.contains("expected bytes at offset 0x"), "{err}");
    assert!(err.contains("actual bytes at offset 0x"), "{err}");
    assert!(err.contains("|................|"), "{err}");
    assert!(stdout(&o).is_empty());

    // mmap phase: the whole > 4 GiB file is mapped, the first random range
    // hits a hole.
    let o = validate(&f, &["--reads", "0", "--ranges", "4", "--seed", "11"]);
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("MISMATCH in phase mmap-random at offset "),
        "{err}"
    );
    assert!(err.contains("actual 0x00"), "{err}");

    // Write the correct pattern for the two pages beyond 4 GiB: still a
    // mismatch (the holes before), found by the full scan at offset 0.
    let mut tail = vec![0u8; 8192];
    for (i, b) in tail.iter_mut().enumerate() {
        // Page 1_048_576 % 26 = 22 -> 'w', then 'x'.
        *b = if i < 4096 { b'w' } else { b'x' };
    }
    OpenOptions::new()
        .write(true)
        .open(&f)
        .expect("open")
        .write_all_at(&tail, 4 * GIB)
        .expect("write tail");
    let o = validate(&f, &["--reads", "0", "--ranges", "0"]);
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains(
            "MISMATCH in phase mmap-full at offset 0 (0x0, page 0): expected 0x61 'a', actual 0x00"
        ),
        "{err}"
    );
    assert!(err.contains("\n00000000  00 00 00 00"), "{err}");
}

#[test]
fn corrupted_byte_is_reported_at_exact_offset() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("corrupt");
    create(&f, "1M");
    let bad: u64 = 500_001; // page 122 -> 122 % 26 = 18 -> 's'
    OpenOptions::new()
        .write(true)
        .open(&f)
        .expect("open")
        .write_all_at(b"#", bad)
        .expect("corrupt");

    // Whichever phase sees it first, the offset is exact.
    let o = validate(&f, &["--seed", "5"]);
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "at offset {bad} (0x7a121, page 122): expected 0x73 's', actual 0x23 '#'"
        )),
        "{err}"
    );
    assert!(stdout(&o).is_empty());

    // Force the full mmap scan.
    let o = validate(&f, &["--reads", "0", "--ranges", "0"]);
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("MISMATCH in phase mmap-full at offset {bad} ")),
        "{err}"
    );
    // Dump starts at the containing 16-byte-aligned offset, 4 lines of 16.
    assert!(
        err.contains("actual bytes at offset 0x7a120:\n0007a120  73 23 73 73 73 73 73 73  73 73 73 73 73 73 73 73  |s#ssssssssssssss|\n"),
        "{err}"
    );
    assert!(err.contains("\n0007a150  73 73"), "{err}");
    assert!(!err.contains("\n0007a160"), "{err}");
    assert!(
        err.contains("expected bytes at offset 0x7a120:\n0007a120  73 73 73 73 73 73 73 73  73 73 73 73 73 73 73 73  |ssssssssssssssss|\n"),
        "{err}"
    );

    // Many preads over a 1 MiB file: found in the pread phase.
    let o = validate(&f, &["--reads", "100000", "--seed", "9"]);
    assert_status(&o, 1);
    assert!(
        stderr(&o).contains(&format!("MISMATCH in phase pread at offset {bad} ")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_file_is_an_error() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("does-not-exist");
    let o = run(&["validate", path_str(&f)]);
    assert_status(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("does-not-exist"), "{err}");
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn size_mismatch_is_exit_1() {
    let dir = TempDir::new().expect("tempdir");
    let f = dir.path().join("sized");
    create(&f, "1M");
    let o = validate(&f, &["--size", "2M"]);
    assert_status(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("size mismatch: expected 2097152 bytes (--size), file has 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_exit_2() {
    assert_status(&run(&["validate"]), 2);
    assert_status(&run(&["create", "x", "--size", "12Q"]), 2);
    assert_status(&run(&["create", "x", "--page-size", "0"]), 2);
    let dir = TempDir::new().expect("tempdir");
    // A directory is not a regular file.
    assert_status(&run(&["validate", path_str(dir.path())]), 2);
    // Creating in a missing directory.
    let o = run(&["create", path_str(&dir.path().join("no/such/dir"))]);
    assert_status(&o, 2);
    assert!(stderr(&o).contains("no/such/dir"));
}

#[test]
fn help_documents_pattern_and_exit_codes() {
    for args in [
        &["--help"][..],
        &["validate", "--help"],
        &["create", "--help"],
    ] {
        let o = run(args);
        assert_status(&o, 0);
        let out = stdout(&o);
        assert!(out.contains("b'a' + (i % 26)"), "{out}");
        assert!(out.contains("0  ok"), "{out}");
        assert!(out.contains("1  mismatch"), "{out}");
        assert!(out.contains("2  error"), "{out}");
        assert!(out.contains("SIGBUS"), "{out}");
    }
}
