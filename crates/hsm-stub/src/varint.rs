//! Unsigned LEB128 varints, canonical (shortest) form only.
//!
//! Rejecting over-long encodings keeps "one value, one encoding", so a decoded
//! value re-encodes to the same bytes.

use crate::FormatError;

/// Longest encoding of a u64.
pub(crate) const MAX_LEN: usize = 10;

/// Number of bytes `v` takes.
pub(crate) const fn len(v: u64) -> usize {
    let bits = 64 - v.leading_zeros() as usize;
    if bits == 0 { 1 } else { bits.div_ceil(7) }
}

pub(crate) fn push(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Sequential reader over a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn truncated(&self) -> FormatError {
        FormatError::Truncated { what: self.what }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, FormatError> {
        let (&b, rest) = self.buf.split_first().ok_or_else(|| self.truncated())?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn u64_le(&mut self) -> Result<u64, FormatError> {
        let (b, rest) = self
            .buf
            .split_first_chunk::<8>()
            .ok_or_else(|| self.truncated())?;
        self.buf = rest;
        Ok(u64::from_le_bytes(*b))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if n > self.buf.len() {
            return Err(self.truncated());
        }
        let (b, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut v: u64 = 0;
        for i in 0..MAX_LEN {
            let b = self.u8()?;
            let low = u64::from(b & 0x7f);
            // The 10th byte may only carry the top bit of a u64.
            if i == MAX_LEN - 1 && low > 1 {
                return Err(FormatError::Invalid {
                    what: self.what,
                    reason: "varint overflows u64",
                });
            }
            v |= low << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(FormatError::Invalid {
                        what: self.what,
                        reason: "non-canonical varint",
                    });
                }
                return Ok(v);
            }
        }
        Err(FormatError::Invalid {
            what: self.what,
            reason: "varint too long",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_edges() {
        for v in [
            0,
            1,
            127,
            128,
            16383,
            16384,
            1 << 54,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            push(&mut buf, v);
            assert_eq!(buf.len(), len(v), "{v}");
            let mut r = Reader::new(&buf, "t");
            assert_eq!(r.varint(), Ok(v));
            assert!(r.is_empty());
        }
        assert_eq!(len(1 << 54), 8);
    }

    #[test]
    fn rejects_bad_forms() {
        let cases: &[&[u8]] = &[
            &[0x80, 0x00],
            &[0x80],
            &[],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            &[0xff; 11],
        ];
        for c in cases {
            assert!(Reader::new(c, "t").varint().is_err(), "{c:?}");
        }
    }
}
