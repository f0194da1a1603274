//! The marker value stored in `security.bpf.hsm`.
//!
//! Fixed 12-byte layout so BPF programs can read it into a fixed buffer:
//! magic `HSMK`, version, state, two reserved zero bytes, CRC-32.

use crate::{FORMAT_VERSION, FormatError, check_envelope, push_crc};

/// Encoded length of a [`Marker`].
pub const MARKER_LEN: usize = 12;

const MAGIC: &[u8; 4] = b"HSMK";
const WHAT: &str = "marker";

/// Lifecycle state recorded in the marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerState {
    /// Populate is still writing meta/map; the stub must not be served yet.
    Building,
    /// Meta and map are complete; reads of missing ranges go to the agent.
    Ready,
}

impl MarkerState {
    const fn to_byte(self) -> u8 {
        match self {
            MarkerState::Building => 0,
            MarkerState::Ready => 1,
        }
    }
}

/// Contents of the marker xattr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Lifecycle state.
    pub state: MarkerState,
}

impl Marker {
    /// A marker for a stub that populate is still building.
    pub fn building() -> Self {
        Self {
            state: MarkerState::Building,
        }
    }

    /// A marker for a finished stub.
    pub fn ready() -> Self {
        Self {
            state: MarkerState::Ready,
        }
    }

    /// Encodes to exactly [`MARKER_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(MARKER_LEN);
        buf.extend_from_slice(MAGIC);
        buf.push(FORMAT_VERSION);
        buf.push(self.state.to_byte());
        buf.extend_from_slice(&[0, 0]);
        push_crc(&mut buf);
        buf
    }

    /// Decodes a marker; anything but a valid 12-byte v1 marker is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() > MARKER_LEN {
            return Err(FormatError::TooLarge {
                what: WHAT,
                len: bytes.len(),
                max: MARKER_LEN,
            });
        }
        if bytes.len() < MARKER_LEN {
            return Err(FormatError::Truncated { what: WHAT });
        }
        let body = check_envelope(bytes, MAGIC, WHAT)?;
        let [state, r0, r1] = *body else {
            // Unreachable given the exact length check; still no panic.
            return Err(FormatError::Truncated { what: WHAT });
        };
        let state = match state {
            0 => MarkerState::Building,
            1 => MarkerState::Ready,
            _ => {
                return Err(FormatError::Invalid {
                    what: WHAT,
                    reason: "unknown state",
                });
            }
        };
        // Reserved bytes must be zero so a future use of them is detectable.
        if r0 != 0 || r1 != 0 {
            return Err(FormatError::Invalid {
                what: WHAT,
                reason: "reserved bytes not zero",
            });
        }
        Ok(Self { state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for m in [Marker::building(), Marker::ready()] {
            let e = m.encode();
            assert_eq!(e.len(), MARKER_LEN);
            assert_eq!(&e[..4], MAGIC);
            assert_eq!(Marker::decode(&e), Ok(m));
        }
    }

    #[test]
    fn layout_is_stable() {
        let e = Marker::ready().encode();
        assert_eq!(&e[..8], b"HSMK\x01\x01\x00\x00");
        let crc = crc32fast::hash(&e[..8]).to_le_bytes();
        assert_eq!(&e[8..], &crc);
    }

    fn reseal(mut v: Vec<u8>) -> Vec<u8> {
        v.truncate(v.len() - 4);
        push_crc(&mut v);
        v
    }

    #[test]
    fn rejects_bad_values() {
        let good = Marker::ready().encode();
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Marker::decode(&long),
            Err(FormatError::TooLarge { .. })
        ));
        assert!(matches!(
            Marker::decode(&good[..11]),
            Err(FormatError::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            Marker::decode(&reseal(bad)),
            Err(FormatError::BadMagic { .. })
        ));
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            Marker::decode(&reseal(bad)),
            Err(FormatError::UnsupportedVersion {
                what: WHAT,
                version: 2
            })
        );
        let mut bad = good.clone();
        bad[5] = 2;
        assert!(matches!(
            Marker::decode(&reseal(bad)),
            Err(FormatError::Invalid { .. })
        ));
        let mut bad = good.clone();
        bad[7] = 1;
        assert!(matches!(
            Marker::decode(&reseal(bad)),
            Err(FormatError::Invalid { .. })
        ));
        let mut bad = good.clone();
        bad[5] ^= 1;
        assert!(matches!(
            Marker::decode(&bad),
            Err(FormatError::Checksum { .. })
        ));
    }
}
