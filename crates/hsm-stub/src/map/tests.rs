//! Unit tests of the resident map.

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

#[test]
fn shift_choice() {
    assert_eq!(choose_granule_shift(TIB, 20), 26);
    assert_eq!(choose_granule_shift(16 * GIB, 20), 20);
    assert_eq!(choose_granule_shift(16 * GIB + 1, 20), 21);
    assert_eq!(choose_granule_shift(0, 20), 20);
    assert_eq!(choose_granule_shift(0, 0), MIN_GRANULE_SHIFT);
    assert_eq!(choose_granule_shift(0, 99), MAX_GRANULE_SHIFT);
    assert_eq!(choose_granule_shift(u64::MAX, 20), MAX_GRANULE_SHIFT);
    assert!(matches!(
        ResidentMap::new(1, u64::MAX, MAX_GRANULE_SHIFT),
        Err(FormatError::TooManyGranules { .. })
    ));
    let m = ResidentMap::new(1, TIB, choose_granule_shift(TIB, 20)).expect("new");
    assert_eq!(m.granule_size(), 64 * MIB);
    assert_eq!(m.granule_count(), MAX_GRANULES);
}

#[test]
fn new_rejects_bad_shift() {
    assert!(ResidentMap::new(1, 10, 11).is_err());
    assert!(ResidentMap::new(1, 10, 41).is_err());
    assert!(ResidentMap::new(1, 10, 12).is_ok());
}

#[test]
fn geometry() {
    let m = ResidentMap::new(7, 5 * MIB / 2, 20).expect("new");
    assert_eq!(m.granule_count(), 3);
    assert_eq!(m.granule_range(0), 0..MIB);
    assert_eq!(m.granule_range(2), 2 * MIB..5 * MIB / 2);
    assert_eq!(m.granule_range(3), 5 * MIB / 2..5 * MIB / 2);
    assert_eq!(m.granule_range(u64::MAX), 5 * MIB / 2..5 * MIB / 2);
    assert_eq!(m.granules_for(0..1), 0..1);
    assert_eq!(m.granules_for(MIB - 1..MIB + 1), 0..2);
    assert_eq!(m.granules_for(MIB..2 * MIB), 1..2);
    assert_eq!(m.granules_for(0..u64::MAX), 0..3);
    assert!(m.granules_for(5..5).is_empty());
    let (hi, lo) = (9, 3);
    assert!(m.granules_for(hi..lo).is_empty());
    assert!(m.granules_for(10 * MIB..11 * MIB).is_empty());
}

#[test]
fn empty_object() {
    let m = ResidentMap::new(1, 0, 20).expect("new");
    assert_eq!(m.granule_count(), 0);
    assert!(m.is_complete());
    assert_eq!(m.missing(0..10).count(), 0);
    assert!(m.is_resident(0));
    assert!(m.granules_for(0..100).is_empty());
    let e = m.encode();
    assert_eq!(ResidentMap::decode(&e), Ok(m));
}

#[test]
fn residency_and_missing() {
    let mut m = ResidentMap::new(1, 200 * MIB, 20).expect("new");
    assert_eq!(m.granule_count(), 200);
    assert_eq!(m.missing(0..200).count(), 200);
    m.set_range_resident(3..130);
    m.set_resident(199);
    m.set_resident(500);
    assert_eq!(m.resident_count(), 128);
    assert!(m.is_resident(3) && m.is_resident(129) && !m.is_resident(130));
    assert!(!m.is_resident(2) && m.is_resident(1000));
    let missing: Vec<u64> = m.missing(0..200).collect();
    let expect: Vec<u64> = (0..3).chain(130..199).collect();
    assert_eq!(missing, expect);
    assert_eq!(
        m.missing(100..135).collect::<Vec<_>>(),
        vec![130, 131, 132, 133, 134]
    );
    assert!(!m.is_complete());
    m.set_range_resident(0..u64::MAX);
    assert!(m.is_complete());
    assert_eq!(m.resident_count(), 200);
}

#[test]
fn floor_semantics() {
    let mut m = ResidentMap::new(1, 10 * MIB, 20).expect("new");
    assert_eq!(m.floor(), 10 * MIB);
    m.lower_floor(20 * MIB);
    assert_eq!(m.floor(), 10 * MIB);
    m.lower_floor(3 * MIB + 1);
    assert_eq!(m.floor(), 3 * MIB + 1);
    // Granule 3 starts below the floor, so it is still needed, but only
    // its first byte comes from the remote.
    assert_eq!(m.missing(0..10).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(m.fetch_range(3), 3 * MIB..3 * MIB + 1);
    assert_eq!(m.fetch_range(5), 3 * MIB + 1..3 * MIB + 1);
    m.lower_floor(3 * MIB);
    assert_eq!(m.missing(0..10).collect::<Vec<_>>(), vec![0, 1, 2]);
    m.lower_floor(0);
    assert!(m.is_complete());
    assert_eq!(m.missing(0..10).count(), 0);
}

#[test]
fn union() {
    let mut a = ResidentMap::new(1, 100 * MIB, 20).expect("new");
    let mut b = a.clone();
    a.set_range_resident(0..10);
    b.set_range_resident(50..70);
    b.lower_floor(5);
    a.union_with(&b).expect("same stub");
    assert_eq!(a.resident_count(), 30);
    assert_eq!(a.floor(), 100 * MIB);
    let other = ResidentMap::new(2, 100 * MIB, 20).expect("new");
    assert!(a.union_with(&other).is_err());
    let other = ResidentMap::new(1, 100 * MIB, 21).expect("new");
    assert!(a.union_with(&other).is_err());
    let other = ResidentMap::new(1, 100 * MIB + 1, 20).expect("new");
    assert!(a.union_with(&other).is_err());
}

#[test]
fn encodings_round_trip() {
    let mut m = ResidentMap::new(42, 16 * GIB, 20).expect("new");
    // All missing: run list is empty, so it wins.
    let e = m.encode();
    assert_eq!(ResidentMap::decode(&e), Ok(m.clone()));
    assert!(e.len() < 40);
    // Alternating bits: bitmap wins.
    for g in (0..m.granule_count()).step_by(2) {
        m.set_resident(g);
    }
    m.set_locally_modified();
    m.lower_floor(GIB);
    let e = m.encode();
    assert!(e.len() <= ResidentMap::max_encoded_len(m.granule_count()));
    assert!(e.len() <= MAX_MAP_LEN);
    let d = ResidentMap::decode(&e).expect("decode");
    assert!(d.locally_modified());
    assert_eq!(d.floor(), GIB);
    assert_eq!(d, m);
}

#[test]
fn check_meta() {
    let meta = Meta {
        stub_id: 9,
        remote_size: 100,
        remote_url: "file:///x".into(),
        key: "k".into(),
        etag: None,
        version: None,
        integrity: None,
        extra: vec![],
    };
    assert!(
        ResidentMap::new(9, 100, 20)
            .expect("new")
            .check_meta(&meta)
            .is_ok()
    );
    assert!(
        ResidentMap::new(8, 100, 20)
            .expect("new")
            .check_meta(&meta)
            .is_err()
    );
    assert!(
        ResidentMap::new(9, 101, 20)
            .expect("new")
            .check_meta(&meta)
            .is_err()
    );
}

/// Builds a sealed map value from raw header fields and payload.
fn raw(remote_size: u64, floor: u64, shift: u8, flags: u8, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut buf = MAGIC.to_vec();
    buf.push(FORMAT_VERSION);
    buf.extend_from_slice(&1u64.to_le_bytes());
    varint::push(&mut buf, remote_size);
    varint::push(&mut buf, floor);
    buf.extend_from_slice(&[shift, flags, kind]);
    buf.extend_from_slice(payload);
    push_crc(&mut buf);
    buf
}

#[test]
fn decode_validation() {
    let ok = |b: Vec<u8>| ResidentMap::decode(&b).expect("valid");
    let bad = |b: Vec<u8>| {
        let r = ResidentMap::decode(&b);
        assert!(r.is_err(), "{r:?}");
    };
    // 20 granules of 4 KiB.
    let size = 20 << 12;
    let m = ok(raw(size, size, 12, 0, KIND_RUNS, &[1, 2, 3, 4]));
    assert_eq!(
        m.missing(0..20).collect::<Vec<_>>(),
        vec![0, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    );
    ok(raw(size, size, 12, 0, KIND_RUNS, &[0, 20]));
    bad(raw(size, size, 12, 0, KIND_RUNS, &[0, 21])); // past count
    bad(raw(size, size, 12, 0, KIND_RUNS, &[1, 0])); // empty run
    bad(raw(size, size, 12, 0, KIND_RUNS, &[0, 2, 0, 2])); // adjacent
    bad(raw(size, size, 12, 0, KIND_RUNS, &[0])); // truncated pair
    bad(raw(
        size,
        size,
        12,
        0,
        KIND_RUNS,
        &[
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1,
        ],
    ));
    ok(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x0f]));
    bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x1f])); // padding
    bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00])); // short
    bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x0f, 0])); // long
    bad(raw(size, size, 12, 0, 2, &[])); // unknown kind
    bad(raw(size, size, 12, 2, KIND_RUNS, &[])); // unknown flag
    bad(raw(size, size + 1, 12, 0, KIND_RUNS, &[])); // floor above size
    bad(raw(size, size, 11, 0, KIND_RUNS, &[])); // shift too small
    bad(raw(size, size, 41, 0, KIND_RUNS, &[])); // shift too large
    bad(raw(MAX_GRANULES * 4096 + 1, 0, 12, 0, KIND_RUNS, &[])); // too many granules
    ok(raw(MAX_GRANULES * 4096, 0, 12, 0, KIND_RUNS, &[]));
    assert!(matches!(
        ResidentMap::decode(&vec![0; MAX_MAP_LEN + 1]),
        Err(FormatError::TooLarge { .. })
    ));
    let mut e = raw(size, size, 12, 0, KIND_RUNS, &[]);
    e[4] = 2;
    assert!(matches!(
        ResidentMap::decode(&e),
        Err(FormatError::UnsupportedVersion { version: 2, .. })
    ));
    e[4] = 1;
    e[6] ^= 1;
    assert!(matches!(
        ResidentMap::decode(&e),
        Err(FormatError::Checksum { .. })
    ));
}
