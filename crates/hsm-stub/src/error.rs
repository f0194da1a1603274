//! The single error type for every codec in this crate.

/// Why a value could not be encoded or decoded.
///
/// `what` names the value or field concerned (e.g. `"meta"`, `"resident map"`)
/// so messages are useful without further context.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The value is longer than its limit (checked before anything is allocated).
    #[error("{what} is too large: {len} bytes, limit {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The input ended before the value was complete.
    #[error("{what} is truncated")]
    Truncated {
        /// What was being decoded.
        what: &'static str,
    },
    /// The first four bytes are not this kind of value's magic.
    #[error("{what} has bad magic")]
    BadMagic {
        /// What was being decoded.
        what: &'static str,
    },
    /// Written by a format version this implementation does not understand.
    #[error("{what} has unsupported format version {version}")]
    UnsupportedVersion {
        /// What was being decoded.
        what: &'static str,
        /// The version byte found.
        version: u8,
    },
    /// The trailing CRC-32 does not match the contents.
    #[error("{what} checksum mismatch")]
    Checksum {
        /// What was being decoded.
        what: &'static str,
    },
    /// Structurally wrong (bad field value, duplicate field, non-canonical encoding, ...).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being decoded or encoded.
        what: &'static str,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// The metadata carries a field marked critical (tag bit 0x80) that this
    /// version does not understand, so it must not be interpreted.
    #[error("unknown critical metadata field with tag {tag:#04x}")]
    UnknownCriticalField {
        /// The tag found.
        tag: u8,
    },
    /// The object would need more than [`MAX_GRANULES`](crate::MAX_GRANULES)
    /// granules at the requested granule size.
    #[error("{count} granules exceed the limit of {max}")]
    TooManyGranules {
        /// Granules the object would need.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// Two values that must describe the same stub do not.
    #[error("{what} does not match")]
    Mismatch {
        /// Which field differs.
        what: &'static str,
    },
}
