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
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    #[test]
    fn shift_choice() {
        assert_eq!(choose_granule_shift(TIB, 20), 26);
        assert_eq!(choose_granule_shift(16 * GIB, 20), 20);
        assert_eq!(choose_granule_shift(16 * GIB + 1, 20), 21);
        assert_eq!(choose_granule_shift(0, 20), 20);
        assert_eq!(choose_granule_shift(0, 0), MIN_GRANULE_SHIFT);
        assert_eq!(choose_granule_shift(0, 99), MAX_GRANULE_SHIFT);
        assert_eq!(choose_granule_shift(u64::MAX, 20), MAX_GRANULE_SHIFT);
        assert!(matches!(
            ResidentMap::new(1, u64::MAX, MAX_GRANULE_SHIFT),
            Err(FormatError::TooManyGranules { .. })
        ));
        let m = ResidentMap::new(1, TIB, choose_granule_shift(TIB, 20)).expect("new");
        assert_eq!(m.granule_size(), 64 * MIB);
        assert_eq!(m.granule_count(), MAX_GRANULES);
    }

    #[test]
    fn new_rejects_bad_shift() {
        assert!(ResidentMap::new(1, 10, 11).is_err());
        assert!(ResidentMap::new(1, 10, 41).is_err());
        assert!(ResidentMap::new(1, 10, 12).is_ok());
    }

    #[test]
    fn geometry() {
        let m = ResidentMap::new(7, 5 * MIB / 2, 20).expect("new");
        assert_eq!(m.granule_count(), 3);
        assert_eq!(m.granule_range(0), 0..MIB);
        assert_eq!(m.granule_range(2), 2 * MIB..5 * MIB / 2);
        assert_eq!(m.granule_range(3), 5 * MIB / 2..5 * MIB / 2);
        assert_eq!(m.granule_range(u64::MAX), 5 * MIB / 2..5 * MIB / 2);
        assert_eq!(m.granules_for(0..1), 0..1);
        assert_eq!(m.granules_for(MIB - 1..MIB + 1), 0..2);
        assert_eq!(m.granules_for(MIB..2 * MIB), 1..2);
        assert_eq!(m.granules_for(0..u64::MAX), 0..3);
        assert!(m.granules_for(5..5).is_empty());
        let (hi, lo) = (9, 3);
        assert!(m.granules_for(hi..lo).is_empty());
        assert!(m.granules_for(10 * MIB..11 * MIB).is_empty());
    }

    #[test]
    fn empty_object() {
        let m = ResidentMap::new(1, 0, 20).expect("new");
        assert_eq!(m.granule_count(), 0);
        assert!(m.is_complete());
        assert_eq!(m.missing(0..10).count(), 0);
        assert!(m.is_resident(0));
        assert!(m.granules_for(0..100).is_empty());
        let e = m.encode();
        assert_eq!(ResidentMap::decode(&e), Ok(m));
    }

    #[test]
    fn residency_and_missing() {
        let mut m = ResidentMap::new(1, 200 * MIB, 20).expect("new");
        assert_eq!(m.granule_count(), 200);
        assert_eq!(m.missing(0..200).count(), 200);
        m.set_range_resident(3..130);
        m.set_resident(199);
        m.set_resident(500);
        assert_eq!(m.resident_count(), 128);
        assert!(m.is_resident(3) && m.is_resident(129) && !m.is_resident(130));
        assert!(!m.is_resident(2) && m.is_resident(1000));
        let missing: Vec<u64> = m.missing(0..200).collect();
        let expect: Vec<u64> = (0..3).chain(130..199).collect();
        assert_eq!(missing, expect);
        assert_eq!(
            m.missing(100..135).collect::<Vec<_>>(),
            vec![130, 131, 132, 133, 134]
        );
        assert!(!m.is_complete());
        m.set_range_resident(0..u64::MAX);
        assert!(m.is_complete());
        assert_eq!(m.resident_count(), 200);
    }

    #[test]
    fn floor_semantics() {
        let mut m = ResidentMap::new(1, 10 * MIB, 20).expect("new");
        assert_eq!(m.floor(), 10 * MIB);
        m.lower_floor(20 * MIB);
        assert_eq!(m.floor(), 10 * MIB);
        m.lower_floor(3 * MIB + 1);
        assert_eq!(m.floor(), 3 * MIB + 1);
        // Granule 3 starts below the floor, so it is still needed, but only
        // its first byte comes from the remote.
        assert_eq!(m.missing(0..10).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(m.fetch_range(3), 3 * MIB..3 * MIB + 1);
        assert_eq!(m.fetch_range(5), 3 * MIB + 1..3 * MIB + 1);
        m.lower_floor(3 * MIB);
        assert_eq!(m.missing(0..10).collect::<Vec<_>>(), vec![0, 1, 2]);
        m.lower_floor(0);
        assert!(m.is_complete());
        assert_eq!(m.missing(0..10).count(), 0);
    }

    #[test]
    fn union() {
        let mut a = ResidentMap::new(1, 100 * MIB, 20).expect("new");
        let mut b = a.clone();
        a.set_range_resident(0..10);
        b.set_range_resident(50..70);
        b.lower_floor(5);
        a.union_with(&b).expect("same stub");
        assert_eq!(a.resident_count(), 30);
        assert_eq!(a.floor(), 100 * MIB);
        let other = ResidentMap::new(2, 100 * MIB, 20).expect("new");
        assert!(a.union_with(&other).is_err());
        let other = ResidentMap::new(1, 100 * MIB, 21).expect("new");
        assert!(a.union_with(&other).is_err());
        let other = ResidentMap::new(1, 100 * MIB + 1, 20).expect("new");
        assert!(a.union_with(&other).is_err());
    }

    #[test]
    fn encodings_round_trip() {
        let mut m = ResidentMap::new(42, 16 * GIB, 20).expect("new");
        // All missing: run list is empty, so it wins.
        let e = m.encode();
        assert_eq!(ResidentMap::decode(&e), Ok(m.clone()));
        assert!(e.len() < 40);
        // Alternating bits: bitmap wins.
        for g in (0..m.granule_count()).step_by(2) {
            m.set_resident(g);
        }
        m.set_locally_modified();
        m.lower_floor(GIB);
        let e = m.encode();
        assert!(e.len() <= ResidentMap::max_encoded_len(m.granule_count()));
        assert!(e.len() <= MAX_MAP_LEN);
        let d = ResidentMap::decode(&e).expect("decode");
        assert!(d.locally_modified());
        assert_eq!(d.floor(), GIB);
        assert_eq!(d, m);
    }

    #[test]
    fn check_meta() {
        let meta = Meta {
            stub_id: 9,
            remote_size: 100,
            remote_url: "file:///x".into(),
            key: "k".into(),
            etag: None,
            version: None,
            integrity: None,
            extra: vec![],
        };
        assert!(
            ResidentMap::new(9, 100, 20)
                .expect("new")
                .check_meta(&meta)
                .is_ok()
        );
        assert!(
            ResidentMap::new(8, 100, 20)
                .expect("new")
                .check_meta(&meta)
                .is_err()
        );
        assert!(
            ResidentMap::new(9, 101, 20)
                .expect("new")
                .check_meta(&meta)
                .is_err()
        );
    }

    /// Builds a sealed map value from raw header fields and payload.
    fn raw(
        remote_size: u64,
        floor: u64,
        shift: u8,
        flags: u8,
        kind: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut buf = MAGIC.to_vec();
        buf.push(FORMAT_VERSION);
        buf.extend_from_slice(&1u64.to_le_bytes());
        varint::push(&mut buf, remote_size);
        varint::push(&mut buf, floor);
        buf.extend_from_slice(&[shift, flags, kind]);
        buf.extend_from_slice(payload);
        push_crc(&mut buf);
        buf
    }

    #[test]
    fn decode_validation() {
        let ok = |b: Vec<u8>| ResidentMap::decode(&b).expect("valid");
        let bad = |b: Vec<u8>| {
            let r = ResidentMap::decode(&b);
            assert!(r.is_err(), "{r:?}");
        };
        // 20 granules of 4 KiB.
        let size = 20 << 12;
        let m = ok(raw(size, size, 12, 0, KIND_RUNS, &[1, 2, 3, 4]));
        assert_eq!(
            m.missing(0..20).collect::<Vec<_>>(),
            vec![0, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
        );
        ok(raw(size, size, 12, 0, KIND_RUNS, &[0, 20]));
        bad(raw(size, size, 12, 0, KIND_RUNS, &[0, 21])); // past count
        bad(raw(size, size, 12, 0, KIND_RUNS, &[1, 0])); // empty run
        bad(raw(size, size, 12, 0, KIND_RUNS, &[0, 2, 0, 2])); // adjacent
        bad(raw(size, size, 12, 0, KIND_RUNS, &[0])); // truncated pair
        bad(raw(
            size,
            size,
            12,
            0,
            KIND_RUNS,
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1,
            ],
        ));
        ok(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x0f]));
        bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x1f])); // padding
        bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00])); // short
        bad(raw(size, size, 12, 0, KIND_BITMAP, &[0xff, 0x00, 0x0f, 0])); // long
        bad(raw(size, size, 12, 0, 2, &[])); // unknown kind
        bad(raw(size, size, 12, 2, KIND_RUNS, &[])); // unknown flag
        bad(raw(size, size + 1, 12, 0, KIND_RUNS, &[])); // floor above size
        bad(raw(size, size, 11, 0, KIND_RUNS, &[])); // shift too small
        bad(raw(size, size, 41, 0, KIND_RUNS, &[])); // shift too large
        bad(raw(MAX_GRANULES * 4096 + 1, 0, 12, 0, KIND_RUNS, &[])); // too many granules
        ok(raw(MAX_GRANULES * 4096, 0, 12, 0, KIND_RUNS, &[]));
        assert!(matches!(
            ResidentMap::decode(&vec![0; MAX_MAP_LEN + 1]),
            Err(FormatError::TooLarge { .. })
        ));
        let mut e = raw(size, size, 12, 0, KIND_RUNS, &[]);
        e[4] = 2;
        assert!(matches!(
            ResidentMap::decode(&e),
            Err(FormatError::UnsupportedVersion { version: 2, .. })
        ));
        e[4] = 1;
        e[6] ^= 1;
        assert!(matches!(
            ResidentMap::decode(&e),
            Err(FormatError::Checksum { .. })
        ));
    }
}
