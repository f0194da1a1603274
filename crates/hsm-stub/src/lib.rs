//! On-disk stub format: codecs for the three extended attributes that turn a
//! sparse regular file into an HSM stub.
//!
//! * [`MARKER_XATTR`] (`security.bpf.hsm`) holds a [`Marker`]: "this inode may
//!   have unfetched bytes". BPF programs key off its presence.
//! * [`META_XATTR`] (`trusted.hsm.meta`) holds a [`Meta`]: where the bytes live.
//! * [`MAP_XATTR`] (`trusted.hsm.map`) holds a [`ResidentMap`]: which granules
//!   are already on local disk.
//!
//! This crate is a pure codec: no I/O, no `unsafe`, and decoding arbitrary bytes
//! returns an error rather than panicking or allocating more than the (small)
//! length limits allow. The byte layouts are documented in `docs/STUB_FORMAT.md`.
#![warn(missing_docs)]

mod error;
pub mod index;
mod map;
mod marker;
mod meta;
mod origin;
mod varint;

pub use error::FormatError;
pub use index::INDEX_XATTR;
pub use map::{MissingGranules, ResidentMap, choose_granule_shift};
pub use marker::{MARKER_LEN, Marker, MarkerState};
pub use meta::{DigestAlgorithm, ExtraField, Integrity, Meta, tags};
pub use origin::Origin;

/// Name of the marker xattr. Only CAP_SYS_ADMIN may set `security.*` attributes.
pub const MARKER_XATTR: &str = "security.bpf.hsm";
/// Name of the metadata xattr (`trusted.*`: CAP_SYS_ADMIN to read or write).
pub const META_XATTR: &str = "trusted.hsm.meta";
/// Name of the resident-map xattr (`trusted.*`: CAP_SYS_ADMIN to read or write).
pub const MAP_XATTR: &str = "trusted.hsm.map";
/// Name of the origin xattr of a fully fetched file that is still a copy of its remote
/// object (what `hsm evict` needs to make it a stub again).
pub const ORIGIN_XATTR: &str = "trusted.hsm.origin";
/// Name of the pin xattr, on a file or a directory (covering everything below it): pinned
/// files are kept whole and never evicted. Its value is empty.
pub const PIN_XATTR: &str = "trusted.hsm.pin";
/// Name of the tree xattr on the root directory of a populated tree: the remote URL it was
/// populated from (UTF-8), where the agent finds the tree's published access traces.
pub const TREE_XATTR: &str = "trusted.hsm.tree";

/// Upper bound on granules per file, so the bitmap stays at 2048 bytes.
pub const MAX_GRANULES: u64 = 16384;
/// Default minimum granule size: 1 MiB.
pub const DEFAULT_MIN_GRANULE_SHIFT: u8 = 20;
/// Smallest granule size allowed: 4 KiB (one page).
pub const MIN_GRANULE_SHIFT: u8 = 12;
/// Largest granule size allowed: 1 TiB. With [`MAX_GRANULES`] this caps the
/// object size at 2^54 bytes (16 PiB).
pub const MAX_GRANULE_SHIFT: u8 = 40;

/// Combined budget populate checks against (ext4's one-block limit minus
/// headroom for entry headers and other xattrs).
pub const XATTR_BUDGET: usize = 3584;

/// Largest encoded [`ResidentMap`]: worst-case header, a full 2048-byte bitmap
/// and the CRC. The encoder never emits a run list longer than the bitmap.
pub const MAX_MAP_LEN: usize = ResidentMap::max_encoded_len(MAX_GRANULES);

/// Largest encoded [`Meta`]; [`Meta::encode`] refuses to produce more and
/// [`Meta::decode`] refuses longer input.
///
/// Derived from the budget rather than fixed, so that marker + worst-case meta
/// + worst-case map can never exceed [`XATTR_BUDGET`] (it comes to 1488 bytes).
pub const MAX_META_LEN: usize = XATTR_BUDGET - MAX_MAP_LEN - MARKER_LEN;

// The whole point of the limits: a stub's xattrs always fit the budget.
const _: () = assert!(MARKER_LEN + MAX_META_LEN + MAX_MAP_LEN <= XATTR_BUDGET);
// Leave room for a 1024-byte key (S3's maximum) plus URL, ETag and version.
const _: () = assert!(MAX_META_LEN >= 1400);

/// Version byte written by this implementation for all three encodings.
pub(crate) const FORMAT_VERSION: u8 = 1;

/// Appends the CRC-32 of `buf` to `buf`.
pub(crate) fn push_crc(buf: &mut Vec<u8>) {
    let crc = crc32fast::hash(buf);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// Checks magic, version and trailing CRC of a value whose length has already
/// been checked to be at least `magic.len() + 1 + 4`. Returns the bytes between
/// the version byte and the CRC.
pub(crate) fn check_envelope<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    what: &'static str,
) -> Result<&'a [u8], FormatError> {
    let (covered, crc) = bytes
        .split_last_chunk::<4>()
        .ok_or(FormatError::Truncated { what })?;
    let (head, body) = covered
        .split_first_chunk::<5>()
        .ok_or(FormatError::Truncated { what })?;
    if &head[..4] != magic {
        return Err(FormatError::BadMagic { what });
    }
    if head[4] != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion {
            what,
            version: head[4],
        });
    }
    if crc32fast::hash(covered) != u32::from_le_bytes(*crc) {
        return Err(FormatError::Checksum { what });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_budget() {
        const { assert!(MAX_META_LEN + MAX_MAP_LEN + MARKER_LEN <= XATTR_BUDGET) };
        assert_eq!(MAX_MAP_LEN, 2084);
        assert_eq!(MAX_META_LEN, 1488);
        assert_eq!(Marker::ready().encode().len(), MARKER_LEN);
    }

    #[test]
    fn envelope_rejects_short_input() {
        for len in 0..9 {
            let v = vec![0u8; len];
            assert!(check_envelope(&v, b"HSMK", "x").is_err());
        }
    }
}
