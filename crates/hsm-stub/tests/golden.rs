//! Golden byte vectors: these are the examples in docs/STUB_FORMAT.md, so a
//! change to the wire format breaks this test (and must update the document
//! and, unless compatible, the version byte).

use hsm_stub::*;

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect()
}

#[test]
fn marker_vectors() {
    let building = hex("48 53 4d 4b 01 00 00 00 94 e2 3e a9");
    let ready = hex("48 53 4d 4b 01 01 00 00 a3 88 fc a8");
    assert_eq!(Marker::building().encode(), building);
    assert_eq!(Marker::ready().encode(), ready);
    assert_eq!(Marker::decode(&ready), Ok(Marker::ready()));
}

#[test]
fn meta_vector() {
    let meta = Meta {
        stub_id: 0x0102_0304_0506_0708,
        remote_size: 1 << 34,
        remote_url: "s3://bucket".into(),
        key: "a/b.bin".into(),
        etag: Some("\"abc\"".into()),
        version: None,
        integrity: None,
        extra: vec![],
    };
    let bytes = hex(
        "48 53 4d 4d 01 01 08 08 07 06 05 04 03 02 01 02 05 80 80 80 80 40 \
         03 0b 73 33 3a 2f 2f 62 75 63 6b 65 74 04 07 61 2f 62 2e 62 69 6e \
         05 05 22 61 62 63 22 31 a6 ba d1",
    );
    assert_eq!(meta.encode(), Ok(bytes.clone()));
    assert_eq!(Meta::decode(&bytes), Ok(meta));
}

#[test]
fn map_vector() {
    let mut map = ResidentMap::new(0x0102_0304_0506_0708, 1 << 34, 20).expect("valid");
    map.set_range_resident(0..100);
    map.set_range_resident(200..300);
    let bytes = hex(
        "48 53 4d 52 01 08 07 06 05 04 03 02 01 80 80 80 80 40 80 80 80 80 40 \
         14 00 00 00 64 64 64 3d 09 a6 f6",
    );
    assert_eq!(map.encode(), bytes);
    assert_eq!(ResidentMap::decode(&bytes), Ok(map));
}
