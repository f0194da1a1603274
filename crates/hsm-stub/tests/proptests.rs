//! Property tests over the public API: round trips, robustness of decoding
//! hostile input, and the granule/floor invariants.

mod common;

use common::seal;
use hsm_stub::*;
use proptest::prelude::*;

// ---------- strategies ----------

fn marker() -> impl Strategy<Value = Marker> {
    prop_oneof![Just(Marker::building()), Just(Marker::ready())]
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        any::<u64>(),
        any::<u64>(),
        "\\PC{1,120}",
        "[^\u{0}]{1,300}",
        proptest::option::of("\\PC{0,64}"),
        proptest::option::of("\\PC{0,64}"),
        // Unknown, non-critical tags only, unique by construction.
        proptest::collection::btree_map(
            (7u8..0x80).prop_filter("not known", |t| !tags::is_known(*t)),
            proptest::collection::vec(any::<u8>(), 0..40),
            0..4,
        ),
    )
        .prop_map(
            |(stub_id, remote_size, remote_url, key, etag, version, extra)| Meta {
                stub_id,
                remote_size,
                remote_url,
                key,
                etag,
                version,
                integrity: (stub_id % 3 == 0).then(|| hsm_stub::Integrity {
                    algorithm: hsm_stub::DigestAlgorithm::Blake3,
                    chunk_shift: 20,
                    manifest_key: ".hsm-manifest".into(),
                    list_hash: [(stub_id % 251) as u8; 32],
                }),
                extra: extra
                    .into_iter()
                    .map(|(tag, value)| ExtraField { tag, value })
                    .collect(),
            },
        )
}

/// Inputs for building a map: geometry plus residency operations, which are
/// reduced modulo the granule count once it is known.
#[derive(Debug, Clone)]
struct MapSpec {
    stub_id: u64,
    shift: u8,
    remote_size: u64,
    ranges: Vec<(u64, u64)>,
    bits: Vec<u64>,
    floor: Option<u64>,
    modified: bool,
}

fn map_spec() -> impl Strategy<Value = MapSpec> {
    (MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT)
        .prop_flat_map(|shift| {
            let max = MAX_GRANULES << shift;
            (
                any::<u64>(),
                Just(shift),
                // Mix tiny, mid-size and up-to-limit objects.
                prop_oneof![0..=(3u64 << shift), 0..=(200u64 << shift), 0..=max],
                proptest::collection::vec((any::<u64>(), 0u64..3000), 0..6),
                proptest::collection::vec(any::<u64>(), 0..40),
                proptest::option::of(any::<u64>()),
                any::<bool>(),
            )
        })
        .prop_map(
            |(stub_id, shift, remote_size, ranges, bits, floor, modified)| MapSpec {
                stub_id,
                shift,
                remote_size,
                ranges,
                bits,
                floor,
                modified,
            },
        )
}

/// Builds the map and a naive model of its resident set.
fn build(spec: &MapSpec) -> (ResidentMap, Vec<bool>) {
    let mut m =
        ResidentMap::new(spec.stub_id, spec.remote_size, spec.shift).expect("valid geometry");
    let count = m.granule_count();
    let mut model = vec![false; count as usize];
    if count > 0 {
        for &(start, len) in &spec.ranges {
            let start = start % count;
            m.set_range_resident(start..start + len);
            for g in start..(start + len).min(count) {
                model[g as usize] = true;
            }
        }
        for &b in &spec.bits {
            let g = b % count;
            m.set_resident(g);
            model[g as usize] = true;
        }
    }
    if let Some(f) = spec.floor {
        m.lower_floor(f % (spec.remote_size + 1));
    }
    if spec.modified {
        m.set_locally_modified();
    }
    (m, model)
}

/// Flips bits of one byte; CRC-32 detects every such error.
fn flip(mut v: Vec<u8>, idx: usize, xor: u8) -> Vec<u8> {
    let i = idx % v.len();
    v[i] ^= xor;
    v
}

// ---------- properties ----------

proptest! {
    #[test]
    fn marker_round_trip(m in marker()) {
        let e = m.encode();
        prop_assert_eq!(e.len(), MARKER_LEN);
        prop_assert_eq!(Marker::decode(&e), Ok(m));
    }

    #[test]
    fn meta_round_trip(m in meta()) {
        match m.encode() {
            Ok(e) => {
                prop_assert_eq!(e.len(), m.encoded_len());
                prop_assert!(e.len() <= MAX_META_LEN);
                prop_assert_eq!(Meta::decode(&e), Ok(m));
            }
            Err(err) => {
                prop_assert!(m.encoded_len() > MAX_META_LEN);
                let is_too_large = matches!(err, FormatError::TooLarge { .. });
                prop_assert!(is_too_large, "{:?}", err);
            }
        }
    }

    #[test]
    fn map_round_trip_and_model(spec in map_spec()) {
        let (m, model) = build(&spec);
        let count = m.granule_count();
        let e = m.encode();
        prop_assert!(e.len() <= ResidentMap::max_encoded_len(count));
        prop_assert!(e.len() <= MAX_MAP_LEN);
        prop_assert_eq!(ResidentMap::decode(&e), Ok(m.clone()));

        prop_assert_eq!(m.resident_count(), model.iter().filter(|&&b| b).count() as u64);
        let floor_granules = m.floor().div_ceil(m.granule_size());
        let expect: Vec<u64> = (0..count)
            .filter(|&g| !model[g as usize] && g < floor_granules)
            .collect();
        let got: Vec<u64> = m.missing(0..u64::MAX).collect();
        prop_assert_eq!(&got, &expect);
        prop_assert_eq!(m.is_complete(), expect.is_empty());
        for &g in &got {
            // Missing granules always start below the floor.
            prop_assert!(m.granule_range(g).start < m.floor());
            prop_assert!(!m.fetch_range(g).is_empty());
        }
        for g in 0..count.min(300) {
            prop_assert_eq!(m.is_resident(g), model[g as usize]);
        }
        prop_assert!(m.is_resident(count));
    }

    #[test]
    fn missing_subrange(spec in map_spec(), a in any::<u64>(), b in any::<u64>()) {
        let (m, _) = build(&spec);
        let count = m.granule_count().max(1);
        let (a, b) = (a % (count + 2), b % (count + 2));
        let all: Vec<u64> = m.missing(0..u64::MAX).filter(|g| (a..b).contains(g)).collect();
        prop_assert_eq!(m.missing(a..b).collect::<Vec<_>>(), all);
    }

    #[test]
    fn floor_zero_is_complete(spec in map_spec()) {
        let (mut m, _) = build(&spec);
        m.lower_floor(0);
        prop_assert!(m.is_complete());
        prop_assert_eq!(m.missing(0..u64::MAX).count(), 0);
    }

    #[test]
    fn granule_geometry(spec in map_spec(), a in any::<u64>(), b in any::<u64>()) {
        let (m, _) = build(&spec);
        let count = m.granule_count();
        let size = m.remote_size();
        prop_assert!(count <= MAX_GRANULES);
        prop_assert_eq!(count, size.div_ceil(m.granule_size()));
        if count > 0 {
            let last = m.granule_range(count - 1);
            prop_assert_eq!(last.end, size);
            prop_assert!(!last.is_empty() && last.end - last.start <= m.granule_size());
            let g = a % count;
            let r = m.granule_range(g);
            prop_assert_eq!(r.start, g << m.granule_shift());
            if g + 1 < count {
                prop_assert_eq!(r.end, m.granule_range(g + 1).start);
            }
        }
        prop_assert!(m.granule_range(count).is_empty());

        // granules_for returns exactly the granules intersecting the clamped range.
        let span = size.saturating_add(size / 4).max(1);
        let (lo, hi) = (a % span, b % span);
        let gr = m.granules_for(lo..hi);
        let (clo, chi) = (lo.min(size), hi.min(size));
        if clo >= chi {
            prop_assert!(gr.is_empty());
        } else {
            prop_assert!(gr.end <= count && !gr.is_empty());
            for g in [gr.start, gr.end - 1] {
                let r = m.granule_range(g);
                prop_assert!(r.start < chi && clo < r.end);
            }
            if gr.start > 0 {
                prop_assert!(m.granule_range(gr.start - 1).end <= clo);
            }
            if gr.end < count {
                prop_assert!(m.granule_range(gr.end).start >= chi);
            }
        }
    }

    #[test]
    fn union_is_bitwise_or(a in map_spec(), bits in proptest::collection::vec(any::<u64>(), 0..40)) {
        let (mut m, mut model) = build(&a);
        let mut other = ResidentMap::new(a.stub_id, a.remote_size, a.shift).expect("valid");
        let count = m.granule_count();
        if count > 0 {
            for b in bits {
                other.set_resident(b % count);
                model[(b % count) as usize] = true;
            }
        }
        let floor = m.floor();
        m.union_with(&other).expect("same stub");
        prop_assert_eq!(m.floor(), floor);
        prop_assert_eq!(m.resident_count(), model.iter().filter(|&&b| b).count() as u64);
        let wrong = ResidentMap::new(a.stub_id ^ 1, a.remote_size, a.shift).expect("valid");
        let is_mismatch = matches!(m.union_with(&wrong), Err(FormatError::Mismatch { .. }));
        prop_assert!(is_mismatch);
    }

    #[test]
    fn shift_choice(size in any::<u64>(), other in any::<u64>(), min in any::<u8>()) {
        let shift = choose_granule_shift(size, min);
        let lo = min.clamp(MIN_GRANULE_SHIFT, MAX_GRANULE_SHIFT);
        prop_assert!((lo..=MAX_GRANULE_SHIFT).contains(&shift));
        let count = |s: u8| size.div_ceil(1u64 << s);
        if size <= MAX_GRANULES << MAX_GRANULE_SHIFT {
            prop_assert!(count(shift) <= MAX_GRANULES);
            prop_assert!(ResidentMap::new(0, size, shift).is_ok());
        }
        // Smallest such shift.
        if shift > lo {
            prop_assert!(count(shift - 1) > MAX_GRANULES);
        }
        // Monotone in size.
        let (small, big) = (size.min(other), size.max(other));
        prop_assert!(choose_granule_shift(small, min) <= choose_granule_shift(big, min));
    }

    // ----- hostile input -----

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2200)) {
        let _ = Marker::decode(&bytes);
        let _ = Meta::decode(&bytes);
        let _ = ResidentMap::decode(&bytes);
        let _ = index::decode_header(&bytes);
        let _ = index::decode_record(&bytes, 7);
        if let Ok((records, done)) = index::scan_records(&bytes) {
            // Every record found lies inside the complete prefix, in order.
            prop_assert!(done <= bytes.len());
            prop_assert!(records.windows(2).all(|w| w[0].1 < w[1].1));
            prop_assert!(records.iter().all(|&(_, at)| at < done));
        }
    }

    #[test]
    fn index_records_round_trip(metas in proptest::collection::vec(meta(), 1..6)) {
        let mut file = Vec::new();
        for m in &metas {
            file.extend(index::encode_record(m.stub_id, &m.encode().expect("encode")).expect("record"));
        }
        let (records, done) = index::scan_records(&file).expect("scan");
        prop_assert_eq!(done, file.len());
        prop_assert_eq!(records.len(), metas.len());
        for (m, (id, at)) in metas.iter().zip(records) {
            prop_assert_eq!(id, m.stub_id);
            prop_assert_eq!(&index::decode_record(&file[at..], id).expect("decode"), m);
        }
    }

    #[test]
    fn sealed_garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2100)) {
        // Valid magic, version and CRC, so decoding reaches the structural checks.
        let _ = Marker::decode(&seal(b"HSMK", &body));
        if let Ok(m) = Meta::decode(&seal(b"HSMM", &body)) {
            // Anything accepted must re-encode and decode to the same value.
            prop_assert_eq!(Meta::decode(&m.encode().expect("re-encode")), Ok(m));
        }
        if let Ok(m) = ResidentMap::decode(&seal(b"HSMR", &body)) {
            prop_assert_eq!(ResidentMap::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn meta_field_soup_never_panics(
        fields in proptest::collection::vec(
            (
                prop_oneof![1u8..=6, Just(0u8), 7u8..0x80, 0x80u8..=0xff],
                proptest::collection::vec(any::<u8>(), 0..12),
            ),
            0..8,
        ),
    ) {
        // Well-formed TLV framing with random tags and values exercises the
        // field-level checks rather than the framing.
        let mut body = Vec::new();
        for (tag, value) in &fields {
            body.push(*tag);
            body.push(value.len() as u8);
            body.extend_from_slice(value);
        }
        if let Ok(m) = Meta::decode(&seal(b"HSMM", &body)) {
            prop_assert_eq!(Meta::decode(&m.encode().expect("re-encode")), Ok(m));
        }
    }

    #[test]
    fn mutated_marker_fails(m in marker(), idx in any::<usize>(), xor in 1u8..) {
        prop_assert!(Marker::decode(&flip(m.encode(), idx, xor)).is_err());
    }

    #[test]
    fn mutated_meta_fails(m in meta(), idx in any::<usize>(), xor in 1u8..) {
        if let Ok(e) = m.encode() {
            prop_assert!(Meta::decode(&flip(e, idx, xor)).is_err());
        }
    }

    #[test]
    fn mutated_map_fails(spec in map_spec(), idx in any::<usize>(), xor in 1u8..) {
        let (m, _) = build(&spec);
        prop_assert!(ResidentMap::decode(&flip(m.encode(), idx, xor)).is_err());
    }

    #[test]
    fn edited_encodings_never_panic(
        spec in map_spec(),
        meta in meta(),
        cut in any::<usize>(),
        extra in proptest::collection::vec(any::<u8>(), 0..8),
    ) {
        let (m, _) = build(&spec);
        let mut encodings = vec![m.encode(), Marker::ready().encode()];
        if let Ok(e) = meta.encode() {
            encodings.push(e);
        }
        for e in encodings {
            let mut truncated = e.clone();
            truncated.truncate(cut % (e.len() + 1));
            let mut extended = e.clone();
            extended.extend_from_slice(&extra);
            for v in [truncated, extended] {
                let _ = Marker::decode(&v);
                let _ = Meta::decode(&v);
                let _ = ResidentMap::decode(&v);
            }
        }
    }
}

// ---------- fixed cases ----------

#[test]
fn worst_case_xattrs_fit_budget() {
    const { assert!(MAX_META_LEN + MAX_MAP_LEN + MARKER_LEN <= XATTR_BUDGET) };

    let meta = Meta {
        stub_id: u64::MAX,
        remote_size: MAX_GRANULES << MAX_GRANULE_SHIFT,
        remote_url: format!("s3://{}/{}", "b".repeat(63), "p".repeat(180)),
        key: "k".repeat(1024),
        etag: Some(format!("\"{}-10000\"", "e".repeat(32))),
        version: Some("v".repeat(64)),
        integrity: None,
        extra: vec![],
    };
    let meta = meta.encode().expect("worst-case meta fits MAX_META_LEN");

    // Worst-case map: maximal header varints, incompressible bitmap.
    let size = MAX_GRANULES << MAX_GRANULE_SHIFT;
    let mut map = ResidentMap::new(u64::MAX, size, MAX_GRANULE_SHIFT).expect("valid");
    for g in (0..MAX_GRANULES).step_by(2) {
        map.set_resident(g);
    }
    map.set_locally_modified();
    let map = map.encode();
    assert_eq!(map.len(), MAX_MAP_LEN);

    let marker = Marker::ready().encode();
    assert!(meta.len() + map.len() + marker.len() <= XATTR_BUDGET);
}

#[test]
fn documented_granule_sizes() {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;
    let cases = [
        (0, 20),
        (4096, 20),
        (100 * MIB, 20),
        (16 * GIB, 20),
        (16 * GIB + 1, 21),
        (100 * GIB, 23),
        (TIB, 26),
        (16 * TIB, 30),
        (1 << 54, 40),
    ];
    for (size, shift) in cases {
        assert_eq!(
            choose_granule_shift(size, DEFAULT_MIN_GRANULE_SHIFT),
            shift,
            "{size}"
        );
    }
}

#[test]
fn xattr_names() {
    assert_eq!(MARKER_XATTR, "security.bpf.hsm");
    assert_eq!(META_XATTR, "trusted.hsm.meta");
    assert_eq!(MAP_XATTR, "trusted.hsm.map");
}
