use super::*;
use std::os::unix::fs::MetadataExt;

fn local(dir: &std::path::Path) -> ObjectStoreRemote {
    ObjectStoreRemote::open(
        &RemoteUrl::parse(dir.to_str().expect("utf8")).expect("url"),
        &RemoteConfig::default(),
    )
    .expect("open")
}

#[tokio::test]
async fn local_ranges_etag_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir(dir.path().join("sub dir")).expect("mkdir");
    let file = dir.path().join("sub dir/f%1#?.bin");
    std::fs::write(&file, &data).expect("write");
    let md = std::fs::metadata(&file).expect("stat");
    let etag = local_etag(md.ino(), md.size(), md.mtime(), md.mtime_nsec() as u32);
    let r = local(dir.path());
    let key = "sub dir/f%1#?.bin";
    let info = r.head(key).await.expect("head");
    assert_eq!(
        info.etag.as_deref(),
        Some(etag.as_str()),
        "local_etag drifted from object_store"
    );
    assert_eq!(info.size, 100_000);
    let expect = Expect {
        etag: Some(etag.clone()),
        version: None,
        size: 100_000,
    };
    let got = r.get_range(key, 4096..70_000, &expect).await.expect("get");
    assert_eq!(&got[..], &data[4096..70_000]);
    // The local backend hands back its open file for kernel-side copies.
    match r.get_body(key, 4096..70_000, &expect).await.expect("body") {
        Body::File { file, range } => {
            assert_eq!(range, 4096..70_000);
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 100];
            file.read_exact_at(&mut buf, 4096).expect("read");
            assert_eq!(&buf[..], &data[4096..4196]);
        }
        Body::Bytes(_) => panic!("local backend should give its file"),
    }

    // A stale ETag is a change, not mixed bytes.
    let stale = Expect {
        etag: Some("\"1-2-3\"".into()),
        ..expect.clone()
    };
    let e = r.get_range(key, 0..10, &stale).await.expect_err("stale");
    assert!(matches!(e, RemoteError::Changed { .. }), "{e:?}");
    assert!(e.to_string().contains("hsm populate"), "{e}");

    let e = r
        .get_range("missing", 0..10, &expect)
        .await
        .expect_err("missing");
    assert!(matches!(e, RemoteError::NotFound { .. }), "{e:?}");

    // Outside a runtime the local backend completes on the calling thread.
    assert!(r.runs_inline());
    let inline = std::thread::spawn({
        let key = key.to_string();
        let expect = expect.clone();
        let dir = dir.path().to_path_buf();
        move || {
            let r = local(&dir);
            let fut = r.get_range(&key, 0..100, &expect);
            futures::executor::block_on(fut).map(|b| b.len())
        }
    })
    .join()
    .expect("thread");
    assert_eq!(inline.expect("inline get"), 100);

    // Rewriting the file changes its ETag.
    std::fs::write(&file, &data[..50_000]).expect("rewrite");
    let e = r.get_range(key, 0..10, &expect).await.expect_err("changed");
    assert!(matches!(e, RemoteError::Changed { .. }), "{e:?}");
}

/// A local store never follows a symlink in a key and never opens anything but a regular
/// file: a user who can write under the store's root cannot make the agent read a file
/// outside it, nor park it in `open()` of a FIFO (both would run on its event threads).
#[test]
fn local_store_refuses_symlinks_and_fifos_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(root.join("user")).expect("mkdir");
    std::fs::create_dir(&secret).expect("mkdir");
    std::fs::write(secret.join("f"), b"root only").expect("write");
    std::fs::write(root.join("user/ok"), b"fine").expect("write");
    std::os::unix::fs::symlink(&secret, root.join("user/dirlink")).expect("symlink");
    std::os::unix::fs::symlink(secret.join("f"), root.join("user/filelink")).expect("symlink");
    nix::unistd::mkfifo(&root.join("user/fifo"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let md = std::fs::metadata(secret.join("f")).expect("stat");
    let any = Expect {
        etag: None,
        version: None,
        size: md.size(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // On a thread of its own (with no runtime: the inline path the event threads take),
    // so that a blocking open fails the test by the timeout instead of hanging it.
    std::thread::spawn(move || {
        let r = local(&root);
        use futures::executor::block_on as run;
        let mut out = Vec::new();
        for key in ["user/dirlink/f", "user/filelink", "user/fifo"] {
            let got = run(r.get_range(key, 0..4, &any)).map(|b| b.len() as u64);
            out.push((key, "get_range", got));
            let body = run(r.get_body(key, 0..4, &any)).map(|b| b.len());
            out.push((key, "get_body", body));
            let head = run(r.head(key)).map(|i| i.size);
            out.push((key, "head", head));
            let whole = run(r.get(key)).map(|b| b.len() as u64);
            out.push((key, "get", whole));
        }
        let ok = run(r.get("user/ok")).map(|b| b.len());
        tx.send((out, ok)).expect("send");
    });
    let (out, ok) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a local store blocked on a symlink or a FIFO");
    assert_eq!(ok.expect("an ordinary object reads"), 4);
    for (key, op, got) in out {
        let e = got.expect_err(&format!("{op} {key} must be refused"));
        let text = e.to_string();
        assert!(text.contains(key), "{op} {key}: {text}");
        if key.ends_with("fifo") {
            assert!(matches!(e, RemoteError::Failed { .. }), "{op} {key}: {e:?}");
            assert!(text.contains("not a regular file but a fifo"), "{text}");
        } else {
            assert!(
                matches!(e, RemoteError::PermissionDenied { .. }),
                "{op} {key}: {e:?}"
            );
            assert!(text.contains("symbolic link"), "{text}");
        }
    }
}

#[tokio::test]
async fn local_store_puts_uploads_lists_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = RemoteUrl::parse(dir.path().to_str().expect("utf8")).expect("url");
    let store = open_store(&url, &RemoteConfig::default()).expect("open");
    let put = store
        .put("a/x %1.txt", Bytes::from_static(b"hello"))
        .await
        .expect("put");
    assert!(put.etag.is_some());
    assert_eq!(
        std::fs::read(dir.path().join("a/x %1.txt")).expect("file"),
        b"hello"
    );
    let mut up = store
        .start_upload("big", 5 << 20)
        .await
        .expect("start")
        .expect("the local backend uploads in parts");
    up.put(Bytes::from(vec![1u8; 6 << 20]));
    up.wait_for_capacity(2).await.expect("capacity");
    up.put(Bytes::from(vec![2u8; 100]));
    let done = up.finish().await.expect("finish");
    let list = store.list().await.expect("list");
    let got: Vec<_> = list.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(got, [("a/x %1.txt", 5), ("big", (6 << 20) + 100)]);
    assert_eq!(list[1].etag, done.etag);
    assert_eq!(
        store.get("a/x %1.txt").await.expect("get"),
        Bytes::from_static(b"hello")
    );
    store.delete("big").await.expect("delete");
    store.delete("big").await.expect("deleting nothing is fine");
    assert!(matches!(
        store.get("big").await,
        Err(RemoteError::NotFound { .. })
    ));
}

fn cfg_with(prefix: &str, options: &[(&str, &str)]) -> RemoteConfig {
    let mut cfg = RemoteConfig::default();
    cfg.options.insert(
        prefix.to_string(),
        options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cfg
}

// No GCS emulator available here returns ETags, so the GCS backend is covered up to the
// point of talking to a server: URL, options, credentials. Nothing here opens a socket.
#[test]
fn gcs_builds_from_configured_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("adc.json");
    std::fs::write(
        &creds,
        r#"{"type":"authorized_user","client_id":"id","client_secret":"s","refresh_token":"r"}"#,
    )
    .expect("write");
    let url = RemoteUrl::parse("gs://my-bucket/packages/v1").expect("url");
    let cfg = cfg_with(
        "gs://my-bucket",
        &[(
            "google_application_credentials",
            creds.to_str().expect("utf8"),
        )],
    );
    let store = build_object_store(&url, &cfg).expect("gcs store builds");
    assert!(store.to_string().contains("packages/v1"), "{store}");
    let bucket = RemoteUrl::parse("gs://my-bucket").expect("url");
    let store = build_object_store(&bucket, &cfg).expect("gcs store builds");
    assert!(store.to_string().contains("my-bucket"), "{store}");
    let remote = ObjectStoreRemote::open(&url, &cfg).expect("remote");
    assert_eq!(remote.url(), "gs://my-bucket/packages/v1");
    assert!(!remote.runs_inline());
}

#[test]
fn gcs_options_errors_name_the_key_but_never_the_secret() {
    let url = RemoteUrl::parse("gs://b/p").expect("url");
    let e = build_object_store(&url, &cfg_with("gs://b", &[("google_no_such_option", "x")]))
        .expect_err("unknown option");
    assert!(e.to_string().contains("google_no_such_option"), "{e}");

    let secret = "-----BEGIN PRIVATE KEY-----SECRET-MATERIAL-----END PRIVATE KEY-----";
    let key = format!(
        r#"{{"type":"service_account","client_email":"a@b","private_key":"{secret}","private_key_id":"1"}}"#
    );
    let e = build_object_store(
        &url,
        &cfg_with("gs://b", &[("google_service_account_key", key.as_str())]),
    )
    .expect_err("a key that is not a key");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("SECRET-MATERIAL"), "secret leaked: {text}");
    assert!(text.contains("gs://b/p"), "{text}");
}

#[test]
fn options_apply_by_longest_prefix_for_every_scheme() {
    // A wrong value under the longest prefix must be the one that fails.
    let mut cfg = cfg_with("s3://bkt", &[("aws_region", "eu-west-1")]);
    cfg.options.insert(
        "s3://bkt/special".into(),
        [("aws_no_such_key".to_string(), "x".to_string())].into(),
    );
    let plain = RemoteUrl::parse("s3://bkt/other").expect("url");
    build_object_store(&plain, &cfg).expect("only the shorter prefix applies");
    let special = RemoteUrl::parse("s3://bkt/special/pkg").expect("url");
    let e = build_object_store(&special, &cfg).expect_err("longest prefix applies");
    assert!(e.to_string().contains("aws_no_such_key"), "{e}");
    for url in ["az://c/p", "http://127.0.0.1:1/p"] {
        let parsed = RemoteUrl::parse(url).expect("url");
        let e = build_object_store(&parsed, &cfg_with(url, &[("no_such_option", "1")]))
            .expect_err("unknown option");
        assert!(e.to_string().contains("no_such_option"), "{url}: {e}");
    }
}
