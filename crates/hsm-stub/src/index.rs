//! The tree index: a stub's metadata kept outside its inode (docs/STUB_FORMAT.md, "Tree
//! index").
//!
//! On ext4 with its default 256-byte inodes, marker and map fit inside the inode but the
//! metadata (URL, key, ETag, digests) does not, and costs every stub an xattr block. A stub
//! made with `hsm populate --index` has no `trusted.hsm.meta`: its metadata is a record in
//! one append-only file per tree, found by the high 32 bits of the map's `stub_id` (the
//! tree's tag). This module is the file's byte format; reading and appending it is in
//! `hsm-core`.
//!
//! Layout: a 16-byte header (magic `HSMI`, version, three zero bytes, the tag as u32 LE,
//! CRC-32 of bytes 0..12), then records. A record is `len` (u32 LE), `stub_id` (u64 LE)
//! and `len` bytes of metadata encoded as in `trusted.hsm.meta` (with its own CRC).

use crate::{FORMAT_VERSION, FormatError, MAX_META_LEN, Meta};

/// On the root directory of a tree whose stubs are indexed: the tree's tag, u32 LE.
pub const INDEX_XATTR: &str = "trusted.hsm.index";
/// Length of the file header.
pub const INDEX_HEADER_LEN: usize = 16;
/// Length of a record's header (`len`, `stub_id`).
pub const RECORD_HEADER_LEN: usize = 12;

const MAGIC: &[u8; 4] = b"HSMI";
const WHAT: &str = "tree index";

/// The file name of the index of the tree tagged `tag`, in the index directory.
pub fn index_file_name(tag: u32) -> String {
    format!("{tag:08x}.hsmi")
}

/// The tree tag a stub id belongs to (its high 32 bits).
pub fn tag_of(stub_id: u64) -> u32 {
    (stub_id >> 32) as u32
}

/// The stub id of the `seq`th stub of the tree tagged `tag`.
pub fn indexed_stub_id(tag: u32, seq: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(seq)
}

/// The file header for `tag`.
pub fn encode_header(tag: u32) -> [u8; INDEX_HEADER_LEN] {
    let mut h = [0u8; INDEX_HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = FORMAT_VERSION;
    h[8..12].copy_from_slice(&tag.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The tag a file header names, after checking magic, version, reserved bytes and CRC.
pub fn decode_header(bytes: &[u8]) -> Result<u32, FormatError> {
    let h = bytes
        .first_chunk::<INDEX_HEADER_LEN>()
        .ok_or(FormatError::Truncated { what: WHAT })?;
    if &h[..4] != MAGIC {
        return Err(FormatError::BadMagic { what: WHAT });
    }
    if h[4] != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what: WHAT,
            version: h[4],
        });
    }
    if crc32fast::hash(&h[..12]) != u32::from_le_bytes([h[12], h[13], h[14], h[15]]) {
        return Err(FormatError::Checksum { what: WHAT });
    }
    if h[5..8] != [0, 0, 0] {
        return Err(FormatError::Invalid {
            what: WHAT,
            reason: "reserved header bytes are not zero",
        });
    }
    Ok(u32::from_le_bytes([h[8], h[9], h[10], h[11]]))
}

/// One record: the stub's encoded metadata, framed.
pub fn encode_record(stub_id: u64, meta: &[u8]) -> Result<Vec<u8>, FormatError> {
    if meta.len() > MAX_META_LEN {
        return Err(FormatError::TooLarge {
            what: WHAT,
            len: meta.len(),
            max: MAX_META_LEN,
        });
    }
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + meta.len());
    r.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    r.extend_from_slice(&stub_id.to_le_bytes());
    r.extend_from_slice(meta);
    Ok(r)
}

/// Where each record of `bytes` (records only, no file header) starts, with its stub id,
/// up to the first record that is incomplete (a write cut short). Returns the records and
/// the length of the complete prefix. A record whose length is over the metadata limit is
/// an error: records after it cannot be found.
pub fn scan_records(bytes: &[u8]) -> Result<(Vec<(u64, usize)>, usize), FormatError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(head) = bytes[at..].first_chunk::<RECORD_HEADER_LEN>() {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_META_LEN {
            return Err(FormatError::TooLarge {
                what: WHAT,
                len,
                max: MAX_META_LEN,
            });
        }
        let end = at + RECORD_HEADER_LEN + len;
        if end > bytes.len() {
            break;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&head[4..12]);
        out.push((u64::from_le_bytes(id), at));
        at = end;
    }
    Ok((out, at))
}

/// Decode the record at the start of `bytes` (which may run past it) as the metadata of
/// `stub_id`: the record must name that stub, and so must the metadata.
pub fn decode_record(bytes: &[u8], stub_id: u64) -> Result<Meta, FormatError> {
    let head = bytes
        .first_chunk::<RECORD_HEADER_LEN>()
        .ok_or(FormatError::Truncated { what: WHAT })?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[4..12]);
    if u64::from_le_bytes(id) != stub_id {
        return Err(FormatError::Mismatch {
            what: "tree index record's stub_id",
        });
    }
    let body = bytes
        .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len)
        .ok_or(FormatError::Truncated { what: WHAT })?;
    let meta = Meta::decode(body)?;
    if meta.stub_id != stub_id {
        return Err(FormatError::Mismatch {
            what: "tree index metadata's stub_id",
        });
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64) -> Meta {
        Meta {
            stub_id: id,
            remote_size: 10,
            remote_url: "file:///srv".into(),
            key: "a/b".into(),
            etag: None,
            version: None,
            integrity: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = encode_header(0xdead_beef);
        assert_eq!(decode_header(&h), Ok(0xdead_beef));
        assert_eq!(
            &h[..],
            &[
                0x48, 0x53, 0x4d, 0x49, 1, 0, 0, 0, 0xef, 0xbe, 0xad, 0xde, 0x95, 0x3a, 0x27, 0x42
            ]
        );
        for i in 0..INDEX_HEADER_LEN {
            let mut bad = h;
            bad[i] ^= 0x01;
            assert!(decode_header(&bad).is_err(), "flipped byte {i}");
        }
        assert!(decode_header(&h[..15]).is_err());
    }

    #[test]
    fn records_scan_and_decode() {
        let id1 = indexed_stub_id(7, 1);
        let id2 = indexed_stub_id(7, 2);
        assert_eq!(tag_of(id2), 7);
        let mut file = encode_record(id1, &meta(id1).encode().expect("encode")).expect("rec");
        let second = file.len();
        file.extend(encode_record(id2, &meta(id2).encode().expect("encode")).expect("rec"));
        let whole = file.len();
        let (recs, done) = scan_records(&file).expect("scan");
        assert_eq!(recs, vec![(id1, 0), (id2, second)]);
        assert_eq!(done, whole);
        assert_eq!(decode_record(&file[second..], id2), Ok(meta(id2)));
        // Asked for another stub, or a record whose metadata names another: refused.
        assert!(decode_record(&file[second..], id1).is_err());
        let mut swapped = file.clone();
        swapped[4..12].copy_from_slice(&id2.to_le_bytes());
        assert!(decode_record(&swapped, id2).is_err());
        // A record cut short is not returned, and the complete prefix ends before it.
        let (recs, done) = scan_records(&file[..whole - 1]).expect("scan");
        assert_eq!(recs, vec![(id1, 0)]);
        assert_eq!(done, second);
        // A damaged metadata body fails its CRC.
        let mut bad = file.clone();
        bad[second + RECORD_HEADER_LEN + 6] ^= 1;
        assert!(decode_record(&bad[second..], id2).is_err());
    }

    #[test]
    fn oversized_records_are_refused() {
        assert!(encode_record(1, &vec![0; MAX_META_LEN + 1]).is_err());
        let mut r = vec![0u8; RECORD_HEADER_LEN];
        r[..4].copy_from_slice(&((MAX_META_LEN + 1) as u32).to_le_bytes());
        assert!(scan_records(&r).is_err());
    }
}
