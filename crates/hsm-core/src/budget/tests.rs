use super::*;

fn key(ino: u64) -> InodeKey {
    InodeKey {
        dev: 1,
        ino,
        btime: None,
    }
}

fn h() -> FileHandle {
    FileHandle {
        handle_type: 1,
        bytes: vec![1],
    }
}

#[test]
fn a_scan_passes_through_probation() {
    let mut l = Lru::default();
    let cap = 1000;
    // A hot file referenced twice, seconds apart.
    l.charge(key(1), Some(&h()), 100, 0);
    l.touch(&key(1), 5000, cap);
    // A scan of cold files, each touched once.
    for i in 10..20 {
        l.charge(key(i), Some(&h()), 100, 6000);
        l.touch(&key(i), 6000, cap);
    }
    let c = l.candidates();
    assert_eq!(c.last(), Some(&key(1)), "the hot file is evicted last");
    assert_eq!(
        c.first(),
        Some(&key(10)),
        "the oldest scanned file goes first"
    );
    assert_eq!(l.used, 1100);
}

#[test]
fn a_ghost_comes_back_protected() {
    let mut l = Lru::default();
    l.charge(key(1), Some(&h()), 100, 0);
    l.remove(&key(1));
    l.remember(key(1));
    assert_eq!(l.used, 0);
    l.charge(key(1), Some(&h()), 100, 10);
    assert_eq!(l.entries.get(&key(1)).map(|e| e.seg), Some(Seg::Protected));
    assert_eq!(l.protected_bytes, 100);
}

#[test]
fn protected_is_capped() {
    let mut l = Lru::default();
    for i in 0..10 {
        l.charge(key(i), Some(&h()), 100, 0);
        l.touch(&key(i), 2000, 500);
    }
    assert!(l.protected_bytes <= 500, "{}", l.protected_bytes);
    assert_eq!(l.used, 1000);
}

#[tokio::test]
async fn a_charge_that_cannot_fit_fails_without_waiting() {
    let b = Budget::new(CacheLimits {
        max: 1000,
        high: 900,
        low: 800,
    });
    let f = std::fs::File::open("/proc/self/exe").expect("open");
    let st = hsm_kernel::stat::fstatx(std::os::fd::AsFd::as_fd(&f)).expect("stat");
    let k = InodeKey::of(&st);
    let r = b.charge(std::os::fd::AsFd::as_fd(&f), k, 2000).await;
    assert!(matches!(r, Err(ServeError::CacheFull { .. })), "{r:?}");
    assert_eq!(b.status().full_denies, 1);
    b.charge(std::os::fd::AsFd::as_fd(&f), k, 500)
        .await
        .expect("fits");
    assert_eq!(b.status().used_bytes, 500);
    // Over high, no evictor: nothing can be given back, so over high but under max.
    b.charge(std::os::fd::AsFd::as_fd(&f), k, 450)
        .await
        .expect("under max");
    let r = b.charge(std::os::fd::AsFd::as_fd(&f), k, 100).await;
    assert!(matches!(r, Err(ServeError::CacheFull { .. })), "{r:?}");
    b.refund(k, 950);
    assert_eq!(b.status().used_bytes, 0);
    assert_eq!(b.status().files, 0);
}
