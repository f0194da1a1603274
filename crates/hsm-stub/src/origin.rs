//! The origin record of a fully fetched file ([`crate::ORIGIN_XATTR`]): what the file was a
//! stub of, and a digest of the bytes it held when it stopped being one. `hsm evict` turns
//! the file back into a stub only when its bytes still have that digest, so a file written
//! locally after it was fetched is never evicted.
//!
//! Layout: version (1 byte, [`Origin::VERSION`]), granule shift of the stub's map, chunk
//! shift of the digest, the 32-byte digest, then the stub's [`Meta`] encoding.

use crate::error::FormatError;
use crate::meta::Meta;

/// Where a fully fetched file came from, and how to check it is still that copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The granule shift the stub's map had (a re-made stub keeps it).
    pub granule_shift: u8,
    /// log2 of the chunk size `digest` was computed over.
    pub chunk_shift: u8,
    /// BLAKE3 of the BLAKE3 digests of the file's chunks, concatenated (for a stub with
    /// manifest digests this is the metadata's list hash).
    pub digest: [u8; 32],
    /// The stub's metadata.
    pub meta: Meta,
}

impl Origin {
    /// The layout version this implementation writes and reads.
    pub const VERSION: u8 = 1;
    const HEAD: usize = 3 + 32;

    /// Encode for the xattr.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let meta = self.meta.encode()?;
        let mut buf = Vec::with_capacity(Self::HEAD + meta.len());
        buf.push(Self::VERSION);
        buf.push(self.granule_shift);
        buf.push(self.chunk_shift);
        buf.extend_from_slice(&self.digest);
        buf.extend_from_slice(&meta);
        Ok(buf)
    }

    /// Decode an xattr value.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "origin record";
        if bytes.len() < Self::HEAD {
            return Err(FormatError::Truncated { what: WHAT });
        }
        if bytes[0] != Self::VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT,
                version: bytes[0],
            });
        }
        let (granule_shift, chunk_shift) = (bytes[1], bytes[2]);
        for (reason, shift) in [
            ("granule shift out of range", granule_shift),
            ("chunk shift out of range", chunk_shift),
        ] {
            if !(crate::MIN_GRANULE_SHIFT..=crate::MAX_GRANULE_SHIFT).contains(&shift) {
                return Err(FormatError::Invalid { what: WHAT, reason });
            }
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[3..Self::HEAD]);
        Ok(Origin {
            granule_shift,
            chunk_shift,
            digest,
            meta: Meta::decode(&bytes[Self::HEAD..])?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            stub_id: 7,
            remote_size: 123,
            remote_url: "file:///srv".into(),
            key: "a/b".into(),
            etag: Some("e".into()),
            version: None,
            integrity: None,
            extra: Vec::new(),
        }
    }

    #[test]
    fn round_trips() {
        let o = Origin {
            granule_shift: 20,
            chunk_shift: 20,
            digest: [9; 32],
            meta: meta(),
        };
        assert_eq!(
            Origin::decode(&o.encode().expect("test setup")).expect("test setup"),
            o
        );
    }

    #[test]
    fn refuses_bad_input() {
        let good = Origin {
            granule_shift: 20,
            chunk_shift: 12,
            digest: [1; 32],
            meta: meta(),
        }
        .encode()
        .expect("test setup");
        assert!(matches!(
            Origin::decode(&good[..10]),
            Err(FormatError::Truncated { .. })
        ));
        let mut v = good.clone();
        v[0] = 2;
        assert!(matches!(
            Origin::decode(&v),
            Err(FormatError::UnsupportedVersion { .. })
        ));
        let mut s = good.clone();
        s[2] = 2;
        assert!(matches!(
            Origin::decode(&s),
            Err(FormatError::Invalid { .. })
        ));
        let mut m = good;
        let n = m.len();
        m[n - 1] ^= 0xff;
        assert!(Origin::decode(&m).is_err());
    }
}
