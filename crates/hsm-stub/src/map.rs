//! The resident map stored in `trusted.hsm.map`: which granules of a stub are
//! already on local disk, plus the local floor and flags.
//!
//! Layout: magic `HSMR`, version, `stub_id` (u64 LE), `remote_size` (varint),
//! `floor` (varint), `granule_shift` (u8), `flags` (u8), encoding kind (u8),
//! payload, CRC-32. The payload is either a run list of resident granules or a
//! plain bitmap, whichever is smaller.

use std::iter::FusedIterator;
use std::ops::Range;

use crate::varint::{self, Reader};
use crate::{
    FORMAT_VERSION, FormatError, MAX_GRANULE_SHIFT, MAX_GRANULES, MAX_MAP_LEN, MIN_GRANULE_SHIFT,
    Meta, check_envelope, push_crc,
};

const MAGIC: &[u8; 4] = b"HSMR";
const WHAT: &str = "resident map";

/// Payload is `(gap, len)` varint pairs describing runs of resident granules.
const KIND_RUNS: u8 = 0;
/// Payload is one bit per granule, LSB first, `ceil(count / 8)` bytes.
const KIND_BITMAP: u8 = 1;

const FLAG_LOCALLY_MODIFIED: u8 = 1 << 0;
const KNOWN_FLAGS: u8 = FLAG_LOCALLY_MODIFIED;

/// Largest header: magic, version, stub_id, two varints of at most 8 bytes
/// (sizes never exceed `MAX_GRANULES << MAX_GRANULE_SHIFT` = 2^54), shift,
/// flags, kind.
const HEADER_MAX: usize = 4 + 1 + 8 + 8 + 8 + 1 + 1 + 1;
/// Smallest complete value: header with one-byte varints, empty payload, CRC.
const MIN_LEN: usize = 4 + 1 + 8 + 1 + 1 + 1 + 1 + 1 + 4;
const CRC_LEN: usize = 4;

// Sizes are bounded so both varints fit the 8 bytes HEADER_MAX assumes.
const _: () = assert!(varint::len(MAX_GRANULES << MAX_GRANULE_SHIFT) <= 8);

fn invalid(reason: &'static str) -> FormatError {
    FormatError::Invalid { what: WHAT, reason }
}

fn count_for(remote_size: u64, shift: u8) -> u64 {
    remote_size.div_ceil(1u64 << shift)
}

fn shift_in_range(shift: u8) -> bool {
    (MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(&shift)
}

/// Smallest shift >= `min_shift` (clamped to
/// [`MIN_GRANULE_SHIFT`]..=[`MAX_GRANULE_SHIFT`]) such that the object needs at
/// most [`MAX_GRANULES`] granules.
///
/// For objects above 2^54 bytes no shift qualifies; [`MAX_GRANULE_SHIFT`] is
/// returned and [`ResidentMap::new`] will then refuse the size.
pub fn choose_granule_shift(remote_size: u64, min_shift: u8) -> u8 {
    let mut shift = min_shift.clamp(MIN_GRANULE_SHIFT, MAX_GRANULE_SHIFT);
    while shift < MAX_GRANULE_SHIFT && count_for(remote_size, shift) > MAX_GRANULES {
        shift += 1;
    }
    shift
}

/// First granule in `from..end` whose bit equals `want`. Bits past the
/// granule count are zero, so callers must keep `end <= count` when looking
/// for clear bits.
fn scan(words: &[u64], from: u64, end: u64, want: bool) -> Option<u64> {
    let mut pos = from;
    while pos < end {
        let wi = pos / 64;
        let w = *words.get(usize::try_from(wi).ok()?)?;
        let w = if want { w } else { !w };
        // Whole words that hold nothing of interest are skipped in one step.
        let masked = w & (u64::MAX << (pos % 64));
        if masked != 0 {
            let g = wi * 64 + u64::from(masked.trailing_zeros());
            return (g < end).then_some(g);
        }
        pos = (wi + 1) * 64;
    }
    None
}

/// Granule set and header of a stub's resident map.
///
/// Granule `g` covers bytes `[g << shift, min((g + 1) << shift, remote_size))`.
/// Bits at or beyond the granule count are always zero, so derived equality is
/// semantic equality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidentMap {
    stub_id: u64,
    remote_size: u64,
    floor: u64,
    shift: u8,
    flags: u8,
    words: Vec<u64>,
}

impl ResidentMap {
    /// A map with every granule missing and the floor at `remote_size`.
    ///
    /// Errors: [`FormatError::Invalid`] if `granule_shift` is outside
    /// [`MIN_GRANULE_SHIFT`]..=[`MAX_GRANULE_SHIFT`];
    /// [`FormatError::TooManyGranules`] if the object needs more than
    /// [`MAX_GRANULES`] granules (use [`choose_granule_shift`]).
    pub fn new(stub_id: u64, remote_size: u64, granule_shift: u8) -> Result<Self, FormatError> {
        if !shift_in_range(granule_shift) {
            return Err(invalid("granule shift out of range"));
        }
        let count = count_for(remote_size, granule_shift);
        if count > MAX_GRANULES {
            return Err(FormatError::TooManyGranules {
                count,
                max: MAX_GRANULES,
            });
        }
        Ok(Self {
            stub_id,
            remote_size,
            floor: remote_size,
            shift: granule_shift,
            flags: 0,
            // count <= MAX_GRANULES, so this is at most 256 words.
            words: vec![0; count.div_ceil(64) as usize],
        })
    }

    /// Stub id; must equal [`Meta::stub_id`] of the stub's metadata.
    pub fn stub_id(&self) -> u64 {
        self.stub_id
    }

    /// Object size in bytes; must equal [`Meta::remote_size`].
    pub fn remote_size(&self) -> u64 {
        self.remote_size
    }

    /// log2 of the granule size.
    pub fn granule_shift(&self) -> u8 {
        self.shift
    }

    /// Granule size in bytes.
    pub fn granule_size(&self) -> u64 {
        1u64 << self.shift
    }

    /// `ceil(remote_size / granule_size)`; 0 for an empty object.
    pub fn granule_count(&self) -> u64 {
        count_for(self.remote_size, self.shift)
    }

    /// Byte range of granule `g`, clamped to `remote_size` (the last granule
    /// may be short). Empty, at `remote_size`, for `g >= granule_count()`.
    pub fn granule_range(&self, g: u64) -> Range<u64> {
        if g >= self.granule_count() {
            return self.remote_size..self.remote_size;
        }
        let start = g << self.shift;
        start..(start + self.granule_size()).min(self.remote_size)
    }

    /// Bytes of granule `g` that have to come from the remote: its
    /// [`granule_range`](Self::granule_range) cut at the floor, because bytes
    /// at or above the floor are local and a fill must not overwrite them.
    pub fn fetch_range(&self, g: u64) -> Range<u64> {
        let r = self.granule_range(g);
        r.start.min(self.floor)..r.end.min(self.floor)
    }

    /// Granules intersecting `bytes` (clamped to `remote_size`); empty if the
    /// clamped byte range is.
    pub fn granules_for(&self, bytes: Range<u64>) -> Range<u64> {
        let end = bytes.end.min(self.remote_size);
        let start = bytes.start.min(end);
        if start == end {
            let g = start >> self.shift;
            return g..g;
        }
        (start >> self.shift)..((end - 1) >> self.shift) + 1
    }

    /// Whether granule `g` is on local disk. Out-of-range granules count as
    /// resident: there is nothing to fetch there.
    pub fn is_resident(&self, g: u64) -> bool {
        if g >= self.granule_count() {
            return true;
        }
        self.words
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// Marks granule `g` resident; out-of-range `g` is ignored.
    pub fn set_resident(&mut self, g: u64) {
        self.set_range_resident(g..g.saturating_add(1));
    }

    /// Marks granules `granules` resident (clamped to the granule count).
    pub fn set_range_resident(&mut self, granules: Range<u64>) {
        let count = self.granule_count();
        let end = granules.end.min(count);
        let mut g = granules.start.min(end);
        while g < end {
            let bit = g % 64;
            let n = (64 - bit).min(end - g);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(w) = self.words.get_mut((g / 64) as usize) {
                *w |= mask;
            }
            g += n;
        }
    }

    /// Number of resident granules.
    pub fn resident_count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The local floor: the smallest size the local file has had since
    /// populate. Bytes at or above it are local and never fetched. Starts at
    /// `remote_size` and only ever decreases.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// `floor = min(floor, size)`; call when the local file is truncated.
    pub fn lower_floor(&mut self, size: u64) {
        self.floor = self.floor.min(size);
    }

    /// Granules in `granules` that still need fetching: not resident and
    /// starting below the floor. Skips fully resident 64-granule words at once.
    pub fn missing(&self, granules: Range<u64>) -> MissingGranules<'_> {
        let below_floor = self.floor.div_ceil(self.granule_size());
        MissingGranules {
            words: &self.words,
            pos: granules.start,
            end: granules.end.min(self.granule_count()).min(below_floor),
        }
    }

    /// Where a stub's data markers go: the start of every granule still to fetch
    /// (docs/SEMANTICS.md, "Copying stubs").
    pub fn marker_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.missing(0..self.granule_count())
            .map(|g| self.granule_range(g).start)
    }

    /// True when no granule needs fetching any more.
    pub fn is_complete(&self) -> bool {
        self.missing(0..u64::MAX).next().is_none()
    }

    /// Whether the file has been written locally since populate.
    pub fn locally_modified(&self) -> bool {
        self.flags & FLAG_LOCALLY_MODIFIED != 0
    }

    /// Records that the file has been written locally.
    pub fn set_locally_modified(&mut self) {
        self.flags |= FLAG_LOCALLY_MODIFIED;
    }

    /// ORs the resident bits of `other` into `self`; the header (floor,
    /// flags) is left alone.
    ///
    /// Errors with [`FormatError::Mismatch`] unless both maps describe the
    /// same stub with the same geometry (stub id, size, granule shift):
    /// merging bits of another stub would claim bytes that are not there.
    pub fn union_with(&mut self, other: &ResidentMap) -> Result<(), FormatError> {
        if self.stub_id != other.stub_id {
            return Err(FormatError::Mismatch { what: "stub_id" });
        }
        if self.remote_size != other.remote_size {
            return Err(FormatError::Mismatch {
                what: "remote_size",
            });
        }
        if self.shift != other.shift {
            return Err(FormatError::Mismatch {
                what: "granule_shift",
            });
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        Ok(())
    }

    /// Checks that this map belongs to `meta` (same stub id and size).
    pub fn check_meta(&self, meta: &Meta) -> Result<(), FormatError> {
        if self.stub_id != meta.stub_id {
            return Err(FormatError::Mismatch { what: "stub_id" });
        }
        if self.remote_size != meta.remote_size {
            return Err(FormatError::Mismatch {
                what: "remote_size",
            });
        }
        Ok(())
    }

    /// Runs of resident granules as `(start, len)`.
    fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let count = self.granule_count();
        let mut pos = 0;
        std::iter::from_fn(move || {
            let start = scan(&self.words, pos, count, true)?;
            let end = scan(&self.words, start, count, false).unwrap_or(count);
            pos = end;
            Some((start, end - start))
        })
    }

    fn runs_len(&self) -> usize {
        let mut prev_end = 0;
        self.runs()
            .map(|(start, len)| {
                let n = varint::len(start - prev_end) + varint::len(len);
                prev_end = start + len;
                n
            })
            .sum()
    }

    fn bitmap_len(&self) -> usize {
        // At most 2048: the count is bounded by MAX_GRANULES.
        self.granule_count().div_ceil(8) as usize
    }

    /// Encodes the map, choosing the smaller of the run-list and bitmap
    /// payloads. Never longer than
    /// [`max_encoded_len`](Self::max_encoded_len)`(granule_count())`.
    pub fn encode(&self) -> Vec<u8> {
        let bitmap_len = self.bitmap_len();
        let runs_len = self.runs_len();
        let (kind, payload_len) = if runs_len < bitmap_len {
            (KIND_RUNS, runs_len)
        } else {
            (KIND_BITMAP, bitmap_len)
        };
        let mut buf = Vec::with_capacity(HEADER_MAX + payload_len + CRC_LEN);
        buf.extend_from_slice(MAGIC);
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&self.stub_id.to_le_bytes());
        varint::push(&mut buf, self.remote_size);
        varint::push(&mut buf, self.floor);
        buf.push(self.shift);
        buf.push(self.flags);
        buf.push(kind);
        if kind == KIND_RUNS {
            let mut prev_end = 0;
            for (start, len) in self.runs() {
                varint::push(&mut buf, start - prev_end);
                varint::push(&mut buf, len);
                prev_end = start + len;
            }
        } else {
            buf.extend(
                self.words
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .take(bitmap_len),
            );
        }
        push_crc(&mut buf);
        buf
    }

    /// Upper bound on the encoded length of a map with `granule_count`
    /// granules: the largest header, a full bitmap, the CRC. (Saturates for
    /// counts above [`MAX_GRANULES`], for which no map exists.)
    pub const fn max_encoded_len(granule_count: u64) -> usize {
        let bitmap = granule_count.div_ceil(8);
        let bitmap = if bitmap > usize::MAX as u64 {
            usize::MAX
        } else {
            bitmap as usize
        };
        bitmap.saturating_add(HEADER_MAX + CRC_LEN)
    }

    /// Decodes and validates a map. Input longer than [`MAX_MAP_LEN`] is
    /// refused before anything is allocated; the bitset allocated afterwards
    /// is bounded by [`MAX_GRANULES`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        if bytes.len() > MAX_MAP_LEN {
            return Err(FormatError::TooLarge {
                what: WHAT,
                len: bytes.len(),
                max: MAX_MAP_LEN,
            });
        }
        if bytes.len() < MIN_LEN {
            return Err(FormatError::Truncated { what: WHAT });
        }
        let body = check_envelope(bytes, MAGIC, WHAT)?;
        let mut r = Reader::new(body, WHAT);
        let stub_id = r.u64_le()?;
        let remote_size = r.varint()?;
        let floor = r.varint()?;
        let shift = r.u8()?;
        let flags = r.u8()?;
        let kind = r.u8()?;
        let payload = r.rest();

        // Validates shift and granule count, and allocates the bounded bitset.
        let mut map = Self::new(stub_id, remote_size, shift)?;
        if floor > remote_size {
            return Err(invalid("floor above remote_size"));
        }
        map.floor = floor;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(invalid("unknown flag bits"));
        }
        map.flags = flags;
        let count = map.granule_count();
        match kind {
            KIND_RUNS => {
                let mut pr = Reader::new(payload, WHAT);
                let mut pos: u64 = 0;
                while !pr.is_empty() {
                    let gap = pr.varint()?;
                    let len = pr.varint()?;
                    // Runs must be maximal: touching runs would have been one.
                    if gap == 0 && pos != 0 {
                        return Err(invalid("adjacent runs"));
                    }
                    if len == 0 {
                        return Err(invalid("empty run"));
                    }
                    let end = pos
                        .checked_add(gap)
                        .and_then(|s| s.checked_add(len))
                        .filter(|&e| e <= count)
                        .ok_or(invalid("run beyond granule count"))?;
                    map.set_range_resident(end - len..end);
                    pos = end;
                }
            }
            KIND_BITMAP => {
                if payload.len() != map.bitmap_len() {
                    return Err(invalid("bitmap length does not match granule count"));
                }
                for (word, chunk) in map.words.iter_mut().zip(payload.chunks(8)) {
                    let mut le = [0u8; 8];
                    le[..chunk.len()].copy_from_slice(chunk);
                    *word = u64::from_le_bytes(le);
                }
                // Padding bits past the count must be zero (keeps equality
                // and counts exact).
                let tail = count % 64;
                if tail != 0
                    && map
                        .words
                        .last()
                        .is_some_and(|w| w & (u64::MAX << tail) != 0)
                {
                    return Err(invalid("bitmap padding bits set"));
                }
            }
            _ => return Err(invalid("unknown payload encoding")),
        }
        Ok(map)
    }
}

/// Iterator returned by [`ResidentMap::missing`]: ascending indices of
/// granules that still need fetching.
#[derive(Debug, Clone)]
pub struct MissingGranules<'a> {
    words: &'a [u64],
    pos: u64,
    end: u64,
}

impl Iterator for MissingGranules<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match scan(self.words, self.pos, self.end, false) {
            Some(g) => {
                self.pos = g + 1;
                Some(g)
            }
            None => {
                self.pos = self.end;
                None
            }
        }
    }
}

impl FusedIterator for MissingGranules<'_> {}

#[cfg(test)]
mod tests;
