//! Bounded fuzzing of the three decoders, run by `cargo test` in CI.
//!
//! The stub xattrs are read by a privileged agent from files anyone may have touched with
//! root's help (a restored backup, a broken tool, a hostile admin script), so every decoder
//! must turn *any* byte string into either a value that re-encodes canonically or one of
//! the typed [`FormatError`]s, in the order docs/STUB_FORMAT.md documents (length, magic,
//! version, checksum, structure), naming the value it was decoding; never a panic, never an
//! allocation beyond the length limits. And a map that decodes must be safe to use: every
//! method, with any argument, keeps its invariants.
//!
//! The case counts are fixed (not taken from `PROPTEST_CASES`) so that CI time is bounded:
//! 2-4 s for the whole file in a debug build on 2 cores. Set `HSM_FUZZ_SCALE` (an
//! integer, default 1) to multiply them for a longer local run.

mod common;

use common::seal;
use hsm_stub::*;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// Shortest possible metadata value: magic, version, CRC (docs/STUB_FORMAT.md).
const MIN_META_LEN: usize = 4 + 1 + 4;
/// Shortest possible map: magic, version, stub_id, two one-byte varints, shift, flags,
/// kind, CRC (docs/STUB_FORMAT.md, "Resident map").
const MIN_MAP_LEN: usize = 4 + 1 + 8 + 1 + 1 + 1 + 1 + 1 + 4;

fn config(cases: u32) -> Config {
    let scale = std::env::var("HSM_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    Config {
        cases: cases.saturating_mul(scale),
        // Inputs are cheap; a failure must be reproducible from the printed seed instead of
        // from files written into the source tree by a CI run.
        failure_persistence: None,
        max_shrink_iters: 10_000,
        ..Config::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Marker,
    Meta,
    Map,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Marker => "marker",
            Kind::Meta => "meta",
            Kind::Map => "resident map",
        }
    }

    fn magic(self) -> &'static [u8; 4] {
        match self {
            Kind::Marker => b"HSMK",
            Kind::Meta => b"HSMM",
            Kind::Map => b"HSMR",
        }
    }

    fn len_limits(self) -> (usize, usize) {
        match self {
            Kind::Marker => (MARKER_LEN, MARKER_LEN),
            Kind::Meta => (MIN_META_LEN, MAX_META_LEN),
            Kind::Map => (MIN_MAP_LEN, MAX_MAP_LEN),
        }
    }
}

/// The `what` a decode error names, or `None` for variants that carry none.
fn what_of(e: &FormatError) -> Option<&'static str> {
    match e {
        FormatError::TooLarge { what, .. }
        | FormatError::Truncated { what }
        | FormatError::BadMagic { what }
        | FormatError::UnsupportedVersion { what, .. }
        | FormatError::Checksum { what }
        | FormatError::Invalid { what, .. }
        | FormatError::Mismatch { what } => Some(what),
        FormatError::UnknownCriticalField { .. } | FormatError::TooManyGranules { .. } => None,
    }
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// Decode `bytes` as `kind` and check everything the format promises about the outcome.
fn check_decode(kind: Kind, bytes: &[u8]) -> Result<(), TestCaseError> {
    let result: Result<(), FormatError> = match kind {
        Kind::Marker => Marker::decode(bytes).map(|m| {
            // Fixed layout: a marker that decodes is exactly its own encoding.
            assert_eq!(m.encode(), bytes, "marker accepted in a non-canonical form");
        }),
        Kind::Meta => Meta::decode(bytes).map(|m| {
            let again = m.encode().expect("a decoded meta re-encodes");
            assert!(again.len() <= MAX_META_LEN);
            assert_eq!(Meta::decode(&again).as_ref(), Ok(&m), "meta round trip");
        }),
        Kind::Map => ResidentMap::decode(bytes).map(|m| {
            let again = m.encode();
            assert!(again.len() <= ResidentMap::max_encoded_len(m.granule_count()));
            assert_eq!(
                ResidentMap::decode(&again).as_ref(),
                Ok(&m),
                "map round trip"
            );
            map_invariants(&m);
        }),
    };
    let Err(e) = result else { return Ok(()) };

    // Typed, and about the value being decoded.
    let allowed = match &e {
        FormatError::UnknownCriticalField { .. } => kind == Kind::Meta,
        FormatError::TooManyGranules { .. } => kind == Kind::Map,
        // Pairing a map with its meta is ResidentMap::check_meta's business, not decode's.
        FormatError::Mismatch { .. } => false,
        _ => true,
    };
    prop_assert!(allowed, "{:?} decoder returned {:?}", kind, e);
    if let Some(what) = what_of(&e) {
        prop_assert_eq!(what, kind.what());
    }
    prop_assert!(!e.to_string().is_empty());

    // The documented order: length, magic, version, checksum, then structure.
    let (min, max) = kind.len_limits();
    let expected_first = if bytes.len() > max {
        Some("TooLarge")
    } else if bytes.len() < min {
        Some("Truncated")
    } else if &bytes[..4] != kind.magic() {
        Some("BadMagic")
    } else if bytes[4] != 1 {
        Some("UnsupportedVersion")
    } else {
        let (covered, crc) = bytes.split_at(bytes.len() - 4);
        (crc32fast::hash(covered).to_le_bytes() != crc).then_some("Checksum")
    };
    let got = match &e {
        FormatError::TooLarge { .. } => "TooLarge",
        FormatError::Truncated { .. } => "Truncated",
        FormatError::BadMagic { .. } => "BadMagic",
        FormatError::UnsupportedVersion { .. } => "UnsupportedVersion",
        FormatError::Checksum { .. } => "Checksum",
        _ => "structure",
    };
    match expected_first {
        Some(want) => prop_assert_eq!(got, want, "for {} bytes", bytes.len()),
        // Past the envelope only structural errors remain (Truncated: a field runs past
        // the end of the body).
        None => prop_assert!(
            matches!(
                e,
                FormatError::Invalid { .. }
                    | FormatError::Truncated { .. }
                    | FormatError::UnknownCriticalField { .. }
                    | FormatError::TooManyGranules { .. }
            ),
            "{:?}",
            e
        ),
    }
    Ok(())
}

/// What any map, decoded or built, must satisfy.
fn map_invariants(m: &ResidentMap) {
    let count = m.granule_count();
    assert!(count <= MAX_GRANULES);
    assert!((MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(&m.granule_shift()));
    assert!(m.floor() <= m.remote_size());
    assert!(m.resident_count() <= count);
    let below_floor = m.floor().div_ceil(m.granule_size());
    let mut prev = None;
    for g in m.missing(0..u64::MAX) {
        assert!(g < count && g < below_floor && !m.is_resident(g));
        assert!(prev.is_none_or(|p| p < g), "missing() ascending");
        prev = Some(g);
    }
    assert_eq!(m.is_complete(), prev.is_none());
    assert!(m.is_resident(count) && m.is_resident(u64::MAX));
}

// ---------- generators ----------

/// Bytes that look like `kind` to a varying degree: raw noise, right magic, right magic and
/// version, or fully sealed (valid CRC) around a random body, at any length up to past the
/// limit.
fn shaped(kind: Kind) -> impl Strategy<Value = Vec<u8>> {
    let (_, max) = kind.len_limits();
    let noise = proptest::collection::vec(any::<u8>(), 0..max + 64);
    (0u8..4, noise, any::<u8>()).prop_map(move |(how, noise, version)| {
        let magic = kind.magic();
        match how {
            0 => noise,
            1 => [&magic[..], &noise].concat(),
            2 => [&magic[..], &[version], &noise].concat(),
            _ => seal(magic, &noise),
        }
    })
}

/// A value that stresses a shift: in range, at its edges, and far outside.
fn shift() -> impl Strategy<Value = u8> {
    prop_oneof![
        MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT,
        Just(MIN_GRANULE_SHIFT - 1),
        Just(MAX_GRANULE_SHIFT + 1),
        Just(0u8),
        Just(63u8),
        Just(64u8),
        any::<u8>(),
    ]
}

/// A size near the interesting edges: tiny, granule multiples, the 2^54 limit, u64::MAX.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..5000,
        (0u64..20, 12u32..41).prop_map(|(k, s)| (k << s).wrapping_sub(1)),
        (0u64..20, 12u32..41).prop_map(|(k, s)| k << s),
        ((1u64 << 54) - 2..=(1u64 << 54) + 2),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

/// A map body field by field: header values near their limits, then a runs or bitmap
/// payload that may or may not agree with the header.
fn map_body() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u64>(),
        size(),
        prop_oneof![Just(None), Just(Some(0u64)), any::<u64>().prop_map(Some)],
        shift(),
        prop_oneof![Just(0u8), Just(1u8), any::<u8>()],
        prop_oneof![Just(0u8), Just(1u8), any::<u8>()],
        proptest::collection::vec((0u64..70, 0u64..70), 0..12),
        proptest::collection::vec(any::<u8>(), 0..2100),
        any::<bool>(),
    )
        .prop_map(
            |(stub_id, size, floor, shift, flags, kind, runs, bitmap, exact_bitmap)| {
                let mut b = stub_id.to_le_bytes().to_vec();
                b.extend(varint(size));
                b.extend(varint(floor.map_or(size, |f| f % size.saturating_add(2))));
                b.extend([shift, flags, kind]);
                if kind == 0 {
                    for (gap, len) in runs {
                        b.extend(varint(gap));
                        b.extend(varint(len));
                    }
                } else {
                    let mut bitmap = bitmap;
                    if exact_bitmap && shift < 64 {
                        let count = size.div_ceil(1u64 << shift);
                        bitmap.resize(count.div_ceil(8).min(2100) as usize, 0xff);
                    }
                    b.extend(bitmap);
                }
                b
            },
        )
}

/// One metadata field: mostly well-formed values of the known tags, sometimes values of
/// the wrong shape, unknown tags (critical or not).
fn meta_field() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        // stub_id: 8 bytes, or another length
        6 => any::<u64>().prop_map(|v| (1u8, v.to_le_bytes().to_vec())),
        1 => proptest::collection::vec(any::<u8>(), 0..12).prop_map(|v| (1u8, v)),
        // remote_size: canonical, with a trailing byte, over-long, overflowing
        6 => size().prop_map(|s| (2u8, varint(s))),
        1 => size().prop_map(|s| (2u8, [varint(s), vec![0]].concat())),
        1 => Just((2u8, vec![0x80, 0x00])),
        1 => Just((2u8, vec![0xff; 11])),
        // URL and key: printable, non-UTF-8, with NUL, empty
        6 => "[a-z]{1,6}://[!-~]{0,40}".prop_map(|s| (3u8, s.into_bytes())),
        6 => "[!-~ ]{1,60}".prop_map(|s| (4u8, s.into_bytes())),
        1 => Just((4u8, b"a\0b".to_vec())),
        1 => Just((4u8, vec![])),
        1 => Just((3u8, vec![])),
        1 => proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| (4u8, v)),
        2 => proptest::collection::vec(any::<u8>(), 0..20).prop_map(|v| (5u8, v)),
        2 => "[!-~]{0,30}".prop_map(|s| (5u8, s.into_bytes())),
        2 => "[!-~]{0,30}".prop_map(|s| (6u8, s.into_bytes())),
        // integrity: algorithm, chunk shift at and past its limits, digest, manifest key
        3 => (
            prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
            prop_oneof![Just(11u8), Just(12u8), Just(20u8), Just(30u8), Just(31u8), any::<u8>()],
            prop_oneof![4 => Just(32usize), 1 => 0usize..40],
            "[!-~]{0,12}",
        )
            .prop_map(|(alg, shift, n, key)| {
                let mut v = vec![alg, shift];
                v.extend(std::iter::repeat_n(0xa5, n));
                v.extend(key.into_bytes());
                (0x87u8, v)
            }),
        // unknown tags, critical or not
        3 => (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..20)),
    ]
}

/// A metadata body: usually the four required fields, in any order, plus some others; now
/// and then one missing or duplicated, or a length prefix that lies.
fn meta_body() -> impl Strategy<Value = Vec<u8>> {
    let required = (
        any::<u64>(),
        size(),
        "[a-z]{1,6}://[!-~]{0,40}",
        "[!-~ ]{1,60}",
    )
        .prop_map(|(id, size, url, key)| {
            vec![
                (1u8, id.to_le_bytes().to_vec()),
                (2u8, varint(size)),
                (3u8, url.into_bytes()),
                (4u8, key.into_bytes()),
            ]
        });
    (
        required,
        proptest::collection::vec(meta_field(), 0..5),
        prop_oneof![6 => Just(None), 1 => (0usize..4).prop_map(Some)],
        // Occasionally a length prefix that claims more than follows.
        prop_oneof![8 => Just(None), 1 => any::<u64>().prop_map(Some), 1 => Just(Some(u64::MAX))],
    )
        .prop_flat_map(|(required, others, drop, lie)| {
            let mut fields = required;
            if let Some(i) = drop {
                fields.remove(i);
            }
            fields.extend(others);
            (Just(fields).prop_shuffle(), Just(lie))
        })
        .prop_map(|(fields, lie)| {
            let mut b = Vec::new();
            for (tag, v) in &fields {
                b.push(*tag);
                b.extend(varint(v.len() as u64));
                b.extend(v);
            }
            if let Some(len) = lie {
                b.push(6);
                b.extend(varint(len));
                b.extend(b"short");
            }
            b
        })
}

/// The sealed bytes of a well-formed map, written by hand in either payload kind (the
/// encoder only writes the smaller one), with its header.
fn wellformed_map() -> impl Strategy<Value = (Vec<u8>, u64, u64, u8)> {
    (MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT)
        .prop_flat_map(|shift| {
            (
                any::<u64>(),
                Just(shift),
                prop_oneof![0..=(70u64 << shift), 0..=(MAX_GRANULES << shift)],
                any::<u64>(),
                0u8..2,
                any::<bool>(),
                proptest::collection::vec((0u64..40, 1u64..40), 0..10),
                proptest::collection::vec(any::<u8>(), 2048),
            )
        })
        .prop_map(|(id, shift, size, floor, flags, runs_kind, runs, bits)| {
            let floor = floor % (size + 1);
            let count = size.div_ceil(1u64 << shift);
            let mut b = id.to_le_bytes().to_vec();
            b.extend(varint(size));
            b.extend(varint(floor));
            b.extend([shift, flags]);
            if runs_kind {
                b.push(0);
                let mut pos = 0u64;
                for (i, (gap, len)) in runs.into_iter().enumerate() {
                    // Runs must not touch: only the first may start right at its position.
                    let gap = if i == 0 { gap } else { gap.max(1) };
                    if pos + gap + len > count {
                        break;
                    }
                    b.extend(varint(gap));
                    b.extend(varint(len));
                    pos += gap + len;
                }
            } else {
                b.push(1);
                let mut bitmap = bits[..count.div_ceil(8) as usize].to_vec();
                if count % 8 != 0 {
                    if let Some(last) = bitmap.last_mut() {
                        *last &= (1u8 << (count % 8)) - 1; // padding bits must be zero
                    }
                }
                b.extend(bitmap);
            }
            (seal(b"HSMR", &b), id, size, shift)
        })
}

/// A well-formed map built from arbitrary operations, for the API checks.
fn built_map() -> impl Strategy<Value = ResidentMap> {
    (MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT)
        .prop_flat_map(|shift| {
            (
                any::<u64>(),
                Just(shift),
                prop_oneof![0..=(3u64 << shift), 0..=(MAX_GRANULES << shift)],
                proptest::collection::vec(any::<u64>(), 0..20),
            )
        })
        .prop_map(|(id, shift, size, bits)| {
            let mut m = ResidentMap::new(id, size, shift).expect("valid geometry");
            let count = m.granule_count().max(1);
            for b in bits {
                m.set_range_resident(b % count..(b % count) + (b >> 58));
            }
            m
        })
}

// ---------- properties ----------

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn any_bytes_are_a_typed_error_or_a_canonical_value(
        kind in prop_oneof![Just(Kind::Marker), Just(Kind::Meta), Just(Kind::Map)],
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2200),
            shaped(Kind::Marker),
            shaped(Kind::Meta),
            shaped(Kind::Map),
        ],
    ) {
        // Every decoder sees every shape: a map fed a sealed meta must fail cleanly too.
        check_decode(kind, &bytes)?;
    }
}

proptest! {
    #![proptest_config(config(5_000))]

    #[test]
    fn sealed_marker_bodies(
        body in prop_oneof![
            (prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0u8..2, 0u8..2).prop_map(|(s, a, b)| vec![s, a, b]),
            proptest::collection::vec(any::<u8>(), 0..6),
        ],
    ) {
        check_decode(Kind::Marker, &seal(b"HSMK", &body))?;
    }

    #[test]
    fn sealed_map_fields(body in map_body()) {
        check_decode(Kind::Map, &seal(b"HSMR", &body))?;
    }

    #[test]
    fn wellformed_maps_decode_in_either_payload_kind((bytes, id, size, shift) in wellformed_map()) {
        let m = ResidentMap::decode(&bytes);
        prop_assert!(m.is_ok(), "{:?}", m);
        let m = m.expect("checked");
        prop_assert_eq!((m.stub_id(), m.remote_size(), m.granule_shift()), (id, size, shift));
        check_decode(Kind::Map, &bytes)?;
    }

    #[test]
    fn sealed_meta_fields(body in meta_body()) {
        check_decode(Kind::Meta, &seal(b"HSMM", &body))?;
    }

    #[test]
    fn map_methods_take_any_argument(
        m in prop_oneof![
            built_map(),
            wellformed_map().prop_map(|(b, ..)| ResidentMap::decode(&b).expect("well-formed map")),
        ],
        args in proptest::collection::vec(
            prop_oneof![any::<u64>(), Just(0u64), Just(u64::MAX), Just(u64::MAX - 1), 0u64..20_000],
            8,
        ),
    ) {
        let mut m = m;
        let (a, b, c, d) = (args[0], args[1], args[2], args[3]);
        let count = m.granule_count();
        let _ = m.is_resident(a);
        let r = m.granule_range(a);
        prop_assert!(r.start <= r.end && r.end <= m.remote_size());
        let f = m.fetch_range(b);
        prop_assert!(f.start <= f.end && f.end <= m.floor());
        let g = m.granules_for(a..b);
        prop_assert!(g.start <= g.end && g.end <= count);
        prop_assert!(m.missing(c..d).all(|g| g < count && g >= c && g < d));
        let before = m.resident_count();
        m.set_range_resident(c..d);
        m.set_resident(args[4]);
        prop_assert!(m.resident_count() >= before);
        let floor = m.floor();
        m.lower_floor(args[5]);
        prop_assert_eq!(m.floor(), floor.min(args[5]));
        if args[6] & 1 == 1 {
            m.set_locally_modified();
            prop_assert!(m.locally_modified());
        }
        let other = ResidentMap::new(m.stub_id(), m.remote_size(), m.granule_shift()).expect("same geometry");
        prop_assert!(m.union_with(&other).is_ok());
        let stranger = ResidentMap::new(m.stub_id() ^ args[7].max(1), m.remote_size(), m.granule_shift())
            .expect("same geometry");
        let is_mismatch = matches!(m.union_with(&stranger), Err(FormatError::Mismatch { .. }));
        prop_assert!(is_mismatch);
        map_invariants(&m);
        let e = m.encode();
        prop_assert_eq!(ResidentMap::decode(&e), Ok(m));
    }
}
