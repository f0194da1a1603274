//! The metadata value stored in `trusted.hsm.meta`: where a stub's bytes live.
//!
//! Layout: magic `HSMM`, version, a sequence of tag-length-value fields, CRC-32.
//! Each field is `tag: u8`, `len: varint`, `value: [u8; len]`. New fields can be
//! added by newer writers without a version bump: unknown tags are carried in
//! [`Meta::extra`] and re-emitted, unless the tag has the critical bit set, in
//! which case the reader must refuse the value.

use crate::varint::{self, Reader};
use crate::{FORMAT_VERSION, FormatError, MAX_META_LEN, check_envelope, push_crc};

const MAGIC: &[u8; 4] = b"HSMM";
const WHAT: &str = "meta";
/// Magic + version + CRC.
const ENVELOPE_LEN: usize = 4 + 1 + 4;

/// Tag numbers of the metadata fields understood by this version.
pub mod tags {
    /// `stub_id`: 8 bytes, little-endian u64. Required.
    pub const STUB_ID: u8 = 0x01;
    /// `remote_size`: canonical LEB128 varint filling the value. Required.
    pub const REMOTE_SIZE: u8 = 0x02;
    /// `remote_url`: non-empty UTF-8. Required.
    pub const REMOTE_URL: u8 = 0x03;
    /// `key`: non-empty UTF-8 without NUL. Required.
    pub const KEY: u8 = 0x04;
    /// `etag`: UTF-8. Optional.
    pub const ETAG: u8 = 0x05;
    /// `version`: UTF-8. Optional.
    pub const VERSION: u8 = 0x06;
    /// `integrity`: how fetched chunks are verified (see [`super::Integrity`]). Optional,
    /// and critical: a reader that cannot verify must not serve the stub at all.
    pub const INTEGRITY: u8 = 0x87;
    /// Tags with this bit set are critical: a reader that does not know the
    /// tag must reject the whole value instead of ignoring the field.
    pub const CRITICAL: u8 = 0x80;

    /// True for the tags this version interprets itself.
    pub const fn is_known(tag: u8) -> bool {
        matches!(tag, STUB_ID..=VERSION | INTEGRITY)
    }
}

/// Contents of the metadata xattr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Random per stub; also stored in the map so a map can't be paired with
    /// another stub's meta.
    pub stub_id: u64,
    /// Object size in bytes.
    pub remote_size: u64,
    /// Base URL of the remote, e.g. `file:///srv/src` or `s3://bucket/prefix`.
    pub remote_url: String,
    /// Object key relative to `remote_url`, e.g. `dir/file.bin`.
    pub key: String,
    /// ETag recorded at populate time.
    pub etag: Option<String>,
    /// Object version id, if the store has one.
    pub version: Option<String>,
    /// How fetched bytes are verified, when a manifest with digests described the object.
    pub integrity: Option<Integrity>,
    /// Fields from newer writers that this version does not understand but
    /// must round-trip.
    pub extra: Vec<ExtraField>,
}

/// Digest algorithms for [`Integrity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigestAlgorithm {
    /// BLAKE3, 32-byte digests.
    Blake3,
}

impl DigestAlgorithm {
    fn code(self) -> u8 {
        match self {
            DigestAlgorithm::Blake3 => 1,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(DigestAlgorithm::Blake3),
            _ => None,
        }
    }
}

/// Where the digests that verify a stub's fetched bytes are, and how they were cut: one
/// digest per `1 << chunk_shift` bytes of the object, listed in the manifest at
/// `manifest_key` (relative to the stub's remote URL). `list_hash` pins which digests: the
/// BLAKE3 of the object's digests concatenated, as the manifest listed them at populate
/// time. Any later manifest that lists the same digests for the key serves (republishing
/// other files does not disturb this stub); one that lists others means the object was
/// republished and the stub is stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Integrity {
    /// How chunks are hashed.
    pub algorithm: DigestAlgorithm,
    /// log2 of the chunk size the digests were computed over.
    pub chunk_shift: u8,
    /// The manifest's key, relative to the stub's remote URL.
    pub manifest_key: String,
    /// BLAKE3 of the object's chunk digests, concatenated.
    pub list_hash: [u8; 32],
}

impl Integrity {
    fn encoded_len(&self) -> usize {
        2 + self.list_hash.len() + self.manifest_key.len()
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        buf.push(self.algorithm.code());
        buf.push(self.chunk_shift);
        buf.extend_from_slice(&self.list_hash);
        buf.extend_from_slice(self.manifest_key.as_bytes());
    }

    fn decode(value: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader::new(value, WHAT);
        let algorithm =
            DigestAlgorithm::from_code(r.u8()?).ok_or(invalid("unknown digest algorithm"))?;
        let chunk_shift = r.u8()?;
        if !(12..=30).contains(&chunk_shift) {
            return Err(invalid("chunk size out of range"));
        }
        let mut list_hash = [0u8; 32];
        list_hash.copy_from_slice(r.bytes(32)?);
        let key = utf8(r.rest())?;
        check_key(&key)?;
        Ok(Integrity {
            algorithm,
            chunk_shift,
            manifest_key: key,
            list_hash,
        })
    }
}

/// An unknown, non-critical metadata field kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraField {
    /// Field tag: not one of [`tags`]' known tags and without the critical bit.
    pub tag: u8,
    /// Raw value bytes.
    pub value: Vec<u8>,
}

fn invalid(reason: &'static str) -> FormatError {
    FormatError::Invalid { what: WHAT, reason }
}

fn field_len(value_len: usize) -> usize {
    1 + varint::len(value_len as u64) + value_len
}

fn push_field(buf: &mut Vec<u8>, tag: u8, value: &[u8]) {
    buf.push(tag);
    varint::push(buf, value.len() as u64);
    buf.extend_from_slice(value);
}

fn check_url(url: &str) -> Result<(), FormatError> {
    if url.is_empty() {
        return Err(invalid("empty remote_url"));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), FormatError> {
    if key.is_empty() {
        return Err(invalid("empty key"));
    }
    if key.contains('\0') {
        return Err(invalid("key contains NUL"));
    }
    Ok(())
}

fn utf8(value: &[u8]) -> Result<String, FormatError> {
    std::str::from_utf8(value)
        .map(str::to_owned)
        .map_err(|_| invalid("string field is not UTF-8"))
}

impl Meta {
    /// Exact length [`Meta::encode`] would produce (valid or not, any size),
    /// without allocating; useful for budget checks before encoding.
    pub fn encoded_len(&self) -> usize {
        let mut n = ENVELOPE_LEN;
        n += field_len(8);
        n += field_len(varint::len(self.remote_size));
        n += field_len(self.remote_url.len());
        n += field_len(self.key.len());
        n += self.etag.as_ref().map_or(0, |s| field_len(s.len()));
        n += self.version.as_ref().map_or(0, |s| field_len(s.len()));
        n += self
            .integrity
            .as_ref()
            .map_or(0, |i| field_len(i.encoded_len()));
        n += self
            .extra
            .iter()
            .map(|f| field_len(f.value.len()))
            .sum::<usize>();
        n
    }

    /// Rejects anything [`Meta::decode`] would not accept back.
    fn validate(&self) -> Result<(), FormatError> {
        check_url(&self.remote_url)?;
        check_key(&self.key)?;
        let mut seen = [false; 256];
        for f in &self.extra {
            if tags::is_known(f.tag) {
                return Err(invalid("extra field uses a known tag"));
            }
            // Decode never yields these, and writing one would make the value
            // unreadable by this very version.
            if f.tag & tags::CRITICAL != 0 {
                return Err(invalid("extra field uses a critical tag"));
            }
            let slot = &mut seen[usize::from(f.tag)];
            if *slot {
                return Err(invalid("duplicate extra field tag"));
            }
            *slot = true;
        }
        Ok(())
    }

    /// Encodes the metadata. Known fields come first in tag order, then
    /// `extra` in its order.
    ///
    /// Errors: [`FormatError::Invalid`] for values decode would reject (empty
    /// URL or key, NUL in key, bad or duplicate extra tags);
    /// [`FormatError::TooLarge`] above [`MAX_META_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        let len = self.encoded_len();
        if len > MAX_META_LEN {
            return Err(FormatError::TooLarge {
                what: WHAT,
                len,
                max: MAX_META_LEN,
            });
        }
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(MAGIC);
        buf.push(FORMAT_VERSION);
        push_field(&mut buf, tags::STUB_ID, &self.stub_id.to_le_bytes());
        let mut size = Vec::with_capacity(varint::MAX_LEN);
        varint::push(&mut size, self.remote_size);
        push_field(&mut buf, tags::REMOTE_SIZE, &size);
        push_field(&mut buf, tags::REMOTE_URL, self.remote_url.as_bytes());
        push_field(&mut buf, tags::KEY, self.key.as_bytes());
        if let Some(etag) = &self.etag {
            push_field(&mut buf, tags::ETAG, etag.as_bytes());
        }
        if let Some(version) = &self.version {
            push_field(&mut buf, tags::VERSION, version.as_bytes());
        }
        if let Some(integrity) = &self.integrity {
            let mut v = Vec::with_capacity(integrity.encoded_len());
            integrity.encode(&mut v);
            push_field(&mut buf, tags::INTEGRITY, &v);
        }
        for f in &self.extra {
            push_field(&mut buf, f.tag, &f.value);
        }
        push_crc(&mut buf);
        Ok(buf)
    }

    /// Decodes and validates metadata. Input longer than [`MAX_META_LEN`] is
    /// refused before anything is allocated.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() > MAX_META_LEN {
            return Err(FormatError::TooLarge {
                what: WHAT,
                len: bytes.len(),
                max: MAX_META_LEN,
            });
        }
        if bytes.len() < ENVELOPE_LEN {
            return Err(FormatError::Truncated { what: WHAT });
        }
        let body = check_envelope(bytes, MAGIC, WHAT)?;

        let mut r = Reader::new(body, WHAT);
        let mut seen = [false; 256];
        let mut stub_id = None;
        let mut remote_size = None;
        let mut remote_url = None;
        let mut key = None;
        let mut etag = None;
        let mut version = None;
        let mut integrity = None;
        let mut extra = Vec::new();
        while !r.is_empty() {
            let tag = r.u8()?;
            let len = r.varint()?;
            // A length beyond the input is truncation; never trust it for allocation.
            let len = usize::try_from(len).map_err(|_| FormatError::Truncated { what: WHAT })?;
            let value = r.bytes(len)?;
            let slot = &mut seen[usize::from(tag)];
            if *slot {
                return Err(invalid("duplicate field"));
            }
            *slot = true;
            match tag {
                tags::STUB_ID => {
                    let v: [u8; 8] = value
                        .try_into()
                        .map_err(|_| invalid("stub_id is not 8 bytes"))?;
                    stub_id = Some(u64::from_le_bytes(v));
                }
                tags::REMOTE_SIZE => {
                    let mut vr = Reader::new(value, WHAT);
                    let v = vr.varint()?;
                    if !vr.is_empty() {
                        return Err(invalid("trailing bytes after remote_size"));
                    }
                    remote_size = Some(v);
                }
                tags::REMOTE_URL => remote_url = Some(utf8(value)?),
                tags::KEY => key = Some(utf8(value)?),
                tags::ETAG => etag = Some(utf8(value)?),
                tags::VERSION => version = Some(utf8(value)?),
                tags::INTEGRITY => integrity = Some(Integrity::decode(value)?),
                t if t & tags::CRITICAL != 0 => {
                    return Err(FormatError::UnknownCriticalField { tag: t });
                }
                t => extra.push(ExtraField {
                    tag: t,
                    value: value.to_vec(),
                }),
            }
        }
        let meta = Meta {
            stub_id: stub_id.ok_or(invalid("missing stub_id"))?,
            remote_size: remote_size.ok_or(invalid("missing remote_size"))?,
            remote_url: remote_url.ok_or(invalid("missing remote_url"))?,
            key: key.ok_or(invalid("missing key"))?,
            etag,
            version,
            integrity,
            extra,
        };
        check_url(&meta.remote_url)?;
        check_key(&meta.key)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Meta {
        Meta {
            stub_id: 0x0123_4567_89ab_cdef,
            remote_size: 1 << 40,
            remote_url: "s3://bucket/prefix".into(),
            key: "dir/file.bin".into(),
            etag: Some("\"d41d8cd98f00b204e9800998ecf8427e\"".into()),
            version: None,
            integrity: None,
            extra: vec![],
        }
    }

    /// Builds a sealed value from raw TLV fields.
    fn raw(fields: &[(u8, &[u8])]) -> Vec<u8> {
        let mut buf = MAGIC.to_vec();
        buf.push(FORMAT_VERSION);
        for (tag, v) in fields {
            push_field(&mut buf, *tag, v);
        }
        push_crc(&mut buf);
        buf
    }

    fn required() -> Vec<(u8, &'static [u8])> {
        vec![
            (tags::STUB_ID, &[1, 0, 0, 0, 0, 0, 0, 0]),
            (tags::REMOTE_SIZE, &[5]),
            (tags::REMOTE_URL, b"file:///srv"),
            (tags::KEY, b"k"),
        ]
    }

    #[test]
    fn integrity_round_trips_and_is_critical() {
        let mut m = sample();
        m.integrity = Some(Integrity {
            algorithm: DigestAlgorithm::Blake3,
            chunk_shift: 20,
            manifest_key: ".hsm-manifest".into(),
            list_hash: [7; 32],
        });
        let e = m.encode().expect("encode");
        assert_eq!(e.len(), m.encoded_len());
        assert_eq!(Meta::decode(&e), Ok(m));
        // A bad algorithm code fails the whole value: unverifiable stubs are not served.
        let bad = raw(&[
            (tags::STUB_ID, &[1, 0, 0, 0, 0, 0, 0, 0]),
            (tags::REMOTE_SIZE, &[5]),
            (tags::REMOTE_URL, b"s3://b"),
            (tags::KEY, b"k"),
            (tags::INTEGRITY, &[9, 20, 0, b'm']),
        ]);
        assert!(Meta::decode(&bad).is_err());
    }

    #[test]
    fn round_trip_and_len() {
        let m = sample();
        let e = m.encode().expect("encode");
        assert_eq!(e.len(), m.encoded_len());
        assert_eq!(Meta::decode(&e), Ok(m));
    }

    #[test]
    fn fields_in_any_order_decode() {
        let mut f = required();
        f.reverse();
        let m = Meta::decode(&raw(&f)).expect("decode");
        assert_eq!(m.stub_id, 1);
        assert_eq!(m.remote_size, 5);
        assert_eq!(m.key, "k");
    }

    #[test]
    fn unknown_fields() {
        let mut f = required();
        f.push((0x42, b"future"));
        let m = Meta::decode(&raw(&f)).expect("decode");
        assert_eq!(
            m.extra,
            vec![ExtraField {
                tag: 0x42,
                value: b"future".to_vec()
            }]
        );
        // Re-emitted on encode.
        assert_eq!(Meta::decode(&m.encode().expect("encode")), Ok(m));

        let mut f = required();
        f.push((0xc2, b"must understand"));
        assert_eq!(
            Meta::decode(&raw(&f)),
            Err(FormatError::UnknownCriticalField { tag: 0xc2 })
        );
    }

    #[test]
    fn structural_errors() {
        for drop in 0..4 {
            let mut f = required();
            f.remove(drop);
            assert!(matches!(
                Meta::decode(&raw(&f)),
                Err(FormatError::Invalid { .. })
            ));
        }
        let cases: Vec<Vec<(u8, &[u8])>> = vec![
            {
                let mut f = required();
                f.push((tags::KEY, b"again"));
                f
            },
            {
                let mut f = required();
                f.push((0x30, b""));
                f.push((0x30, b""));
                f
            },
            {
                let mut f = required();
                f[0].1 = &[1, 2, 3];
                f
            },
            {
                let mut f = required();
                f[1].1 = &[5, 0];
                f
            },
            {
                let mut f = required();
                f[1].1 = &[0x85, 0x00];
                f
            },
            {
                let mut f = required();
                f[3].1 = b"";
                f
            },
            {
                let mut f = required();
                f[3].1 = b"a\0b";
                f
            },
            {
                let mut f = required();
                f[2].1 = b"";
                f
            },
            {
                let mut f = required();
                f[2].1 = &[0xff, 0xfe];
                f
            },
        ];
        for f in cases {
            assert!(
                matches!(Meta::decode(&raw(&f)), Err(FormatError::Invalid { .. })),
                "{f:?}"
            );
        }
    }

    #[test]
    fn length_beyond_input_is_truncated() {
        let mut buf = MAGIC.to_vec();
        buf.push(FORMAT_VERSION);
        buf.push(tags::KEY);
        varint::push(&mut buf, u64::MAX);
        push_crc(&mut buf);
        assert_eq!(
            Meta::decode(&buf),
            Err(FormatError::Truncated { what: WHAT })
        );
    }

    #[test]
    fn encode_rejects_what_decode_would() {
        let mut m = sample();
        m.key = String::new();
        assert!(m.encode().is_err());
        let mut m = sample();
        m.key = "a\0".into();
        assert!(m.encode().is_err());
        let mut m = sample();
        m.remote_url = String::new();
        assert!(m.encode().is_err());
        for tag in [tags::KEY, 0x81] {
            let mut m = sample();
            m.extra.push(ExtraField { tag, value: vec![] });
            assert!(m.encode().is_err(), "{tag}");
        }
        let mut m = sample();
        m.extra.push(ExtraField {
            tag: 0x10,
            value: vec![],
        });
        m.extra.push(ExtraField {
            tag: 0x10,
            value: vec![1],
        });
        assert!(m.encode().is_err());
    }

    #[test]
    fn too_large() {
        let mut m = sample();
        m.key = "k".repeat(MAX_META_LEN);
        assert!(matches!(m.encode(), Err(FormatError::TooLarge { .. })));
        assert!(matches!(
            Meta::decode(&vec![0; MAX_META_LEN + 1]),
            Err(FormatError::TooLarge { .. })
        ));
    }

    /// Pins the claim in docs/STUB_FORMAT.md: with a 1024-byte key, a
    /// 66-byte ETag and a 64-byte version id, a 295-byte URL still fits.
    #[test]
    fn documented_url_headroom() {
        let mut m = Meta {
            stub_id: u64::MAX,
            remote_size: 1 << 54,
            remote_url: "u".repeat(295),
            key: "k".repeat(1024),
            etag: Some("e".repeat(66)),
            version: Some("v".repeat(64)),
            integrity: None,
            extra: vec![],
        };
        assert_eq!(m.encode().map(|e| e.len()), Ok(MAX_META_LEN));
        m.remote_url.push('u');
        assert!(matches!(m.encode(), Err(FormatError::TooLarge { .. })));
    }

    #[test]
    fn worst_case_fits() {
        let m = Meta {
            stub_id: u64::MAX,
            remote_size: 1 << 54,
            remote_url: format!("s3://{}/{}", "b".repeat(63), "p".repeat(180)),
            key: "k".repeat(1024),
            etag: Some(format!("\"{}-10000\"", "e".repeat(32))),
            version: Some("v".repeat(64)),
            integrity: None,
            extra: vec![],
        };
        let e = m.encode().expect("worst case must encode");
        assert!(e.len() <= MAX_META_LEN);
        assert!(
            e.len() + crate::MAX_MAP_LEN + crate::MARKER_LEN <= crate::XATTR_BUDGET,
            "{}",
            e.len()
        );
    }
}
