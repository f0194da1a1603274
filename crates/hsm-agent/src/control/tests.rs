use super::*;
use crate::cache::SkipReason;

#[test]
fn requests_round_trip() {
    let s = Request::Status {
        op: StatusOp::Status,
        path: None,
    };
    assert_eq!(s.encode(), "{\"op\":\"status\",\"path\":null}\n");
    assert_eq!(Request::decode(&s.encode()).expect("decode"), s);
    let p = Request::Status {
        op: StatusOp::Status,
        path: Some("/t/a".into()),
    };
    assert_eq!(Request::decode(&p.encode()).expect("decode"), p);
    for (op, name) in [
        (Op::Hydrate, "hydrate"),
        (Op::Evict, "evict"),
        (Op::Pin, "pin"),
        (Op::Unpin, "unpin"),
    ] {
        let r = Request::Cache {
            op,
            paths: vec!["/t/a".into(), "/t/b c".into()],
        };
        let line = r.encode();
        assert_eq!(
            line,
            format!("{{\"op\":\"{name}\",\"paths\":[\"/t/a\",\"/t/b c\"]}}\n")
        );
        assert_eq!(Request::decode(&line).expect("decode"), r);
    }
    // Prefetch: `wait` may be left out (false).
    let pf = Request::Prefetch {
        op: PrefetchOp::Prefetch,
        paths: vec!["/t/pkg".into()],
        wait: true,
    };
    assert_eq!(
        pf.encode(),
        "{\"op\":\"prefetch\",\"paths\":[\"/t/pkg\"],\"wait\":true}\n"
    );
    assert_eq!(Request::decode(&pf.encode()).expect("decode"), pf);
    assert_eq!(
        Request::decode("{\"op\":\"prefetch\",\"paths\":[\"/t/pkg\"]}").expect("decode"),
        Request::Prefetch {
            op: PrefetchOp::Prefetch,
            paths: vec!["/t/pkg".into()],
            wait: false
        }
    );
    // A status request may leave out the path.
    assert_eq!(
        Request::decode("{\"op\":\"status\"}").expect("decode"),
        Request::Status {
            op: StatusOp::Status,
            path: None
        }
    );
}

#[test]
fn bad_requests_are_refused() {
    for bad in [
        "",
        "{}",
        "{\"op\":\"explode\",\"paths\":[]}",
        "{\"op\":\"hydrate\"}",
        "[1]",
    ] {
        let e = Request::decode(bad).expect_err(bad);
        assert!(matches!(e, RequestError::Malformed(_)), "{e}");
        assert!(e.to_string().starts_with("bad request"), "{e}");
    }
    // Every path must be absolute, in either kind of request.
    for (line, path) in [
        ("{\"op\":\"status\",\"path\":\"a.bin\"}", "a.bin"),
        ("{\"op\":\"evict\",\"paths\":[\"/t/a\",\"b/c\"]}", "b/c"),
        ("{\"op\":\"prefetch\",\"paths\":[\"pkg\"]}", "pkg"),
    ] {
        match Request::decode(line) {
            Err(RequestError::Relative(p)) => assert_eq!(p, Path::new(path)),
            other => panic!("{line}: {other:?}"),
        }
    }
}

#[test]
fn file_lines_carry_the_outcome() {
    let o = FileOutcome::Skipped {
        reason: SkipReason::Pinned,
    };
    let l = serde_json::to_string(&FileLine {
        file: Path::new("/t/a"),
        outcome: &o,
    })
    .expect("encode");
    assert_eq!(
        l,
        r#"{"file":"/t/a","outcome":"skipped","reason":"pinned"}"#
    );
    let o = FileOutcome::Hydrated { fetched: 5 };
    let l = serde_json::to_string(&FileLine {
        file: Path::new("/t/b"),
        outcome: &o,
    })
    .expect("encode");
    assert_eq!(l, r#"{"file":"/t/b","outcome":"hydrated","fetched":5}"#);
}

#[test]
fn summary_counts_outcomes() {
    let mut s = Summary::default();
    for o in [
        FileOutcome::Hydrated { fetched: 10 },
        FileOutcome::Hydrated { fetched: 5 },
        FileOutcome::Evicted { freed: 7 },
        FileOutcome::AlreadyStub,
        FileOutcome::Unpinned,
        FileOutcome::Skipped {
            reason: SkipReason::InUse,
        },
        FileOutcome::Failed {
            error: "EIO".into(),
        },
    ] {
        s.add(&o);
    }
    assert_eq!(
        (s.files, s.hydrated, s.evicted, s.already_stub),
        (7, 2, 1, 1)
    );
    assert_eq!((s.unpinned, s.skipped, s.failed), (1, 1, 1));
    assert_eq!((s.bytes_fetched, s.bytes_freed), (15, 7));
    let v = serde_json::json!({ "done": s }).to_string();
    let back: serde_json::Value = serde_json::from_str(&v).expect("json");
    let s2: Summary = serde_json::from_value(back["done"].clone()).expect("summary");
    assert_eq!(s, s2);
}

#[test]
fn walk_counts_files_and_pins() {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(d.path().join("sub")).expect("mkdir");
    std::fs::write(d.path().join("a"), b"hello").expect("write");
    std::fs::write(d.path().join("sub/b"), b"xy").expect("write");
    std::os::unix::fs::symlink("/etc", d.path().join("link")).expect("symlink");
    let st = walk(d.path(), d.path());
    assert_eq!((st.stubs, st.hydrated, st.local_files), (0, 0, 2));
    assert_eq!(
        (st.resident_bytes, st.remote_bytes, st.pinned_bytes),
        (0, 0, 0)
    );
    let sub = walk(d.path(), &d.path().join("sub"));
    assert_eq!(sub.local_files, 1);
    let trees = vec![d.path().to_path_buf()];
    let e = status_trees(&trees, Some(Path::new("/"))).expect_err("outside");
    assert!(
        matches!(e.cause, crate::cache::Cause::NotServed { .. }),
        "{e}"
    );
    assert!(e.to_string().starts_with("/: not in a served tree"), "{e}");
}
