//! The test pattern: page `i` of a file is filled entirely with the byte
//! `b'a' + (i % 26)`, so the byte at offset `o` is `b'a' + ((o / page_size) % 26)`.

/// Number of distinct page bytes (`a` ..= `z`).
const LETTERS: u64 = 26;

/// Largest run of expected bytes kept per letter. Comparisons are done in
/// slices of at most this many bytes, so huge page sizes do not need huge
/// tables.
const MAX_BLOCK: usize = 64 * 1024;

/// The expected byte at `offset` for the given page size.
pub fn byte_at(offset: u64, page_size: u64) -> u8 {
    // The remainder is < 26, so the cast cannot truncate.
    b'a' + ((offset / page_size) % LETTERS) as u8
}

/// Expected contents of a file, with pre-built runs of each page byte so
/// that data can be checked with slice equality instead of byte by byte.
#[derive(Debug)]
pub struct Pattern {
    page_size: u64,
    /// Length of each run in `table`: `min(page_size, MAX_BLOCK)`.
    block: usize,
    /// 26 runs of `block` bytes: `a` repeated, then `b` repeated, ...
    table: Vec<u8>,
}

impl Pattern {
    /// Builds the pattern for `page_size` (must be non-zero).
    pub fn new(page_size: u64) -> Self {
        assert!(page_size > 0, "page size must be non-zero");
        let block = usize::try_from(page_size).map_or(MAX_BLOCK, |p| p.min(MAX_BLOCK));
        let mut table = Vec::with_capacity(block * LETTERS as usize);
        for letter in b'a'..=b'z' {
            table.resize(table.len() + block, letter);
        }
        Self {
            page_size,
            block,
            table,
        }
    }

    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// The expected byte at `offset`.
    pub fn byte_at(&self, offset: u64) -> u8 {
        byte_at(offset, self.page_size)
    }

    /// Length of the run starting at `offset` that stays inside one page and
    /// inside one table block, capped at `max`.
    fn run_len(&self, offset: u64, max: usize) -> usize {
        let to_page_end = self.page_size - offset % self.page_size;
        let cap = max.min(self.block);
        usize::try_from(to_page_end).map_or(cap, |n| n.min(cap))
    }

    /// The pre-built expected bytes for `len` bytes starting at `offset`;
    /// `len` must not exceed `run_len(offset, ..)`.
    fn expected_run(&self, offset: u64, len: usize) -> &[u8] {
        let idx = ((offset / self.page_size) % LETTERS) as usize;
        let start = idx * self.block;
        &self.table[start..start + len]
    }

    /// Fills `buf` with the pattern bytes for file offsets `offset..offset + buf.len()`.
    pub fn fill(&self, buf: &mut [u8], offset: u64) {
        let mut pos = 0;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let to_page_end = self.page_size - off % self.page_size;
            let len =
                usize::try_from(to_page_end).map_or(buf.len() - pos, |n| n.min(buf.len() - pos));
            buf[pos..pos + len].fill(self.byte_at(off));
            pos += len;
        }
    }

    /// Checks `data`, which holds the file bytes starting at file offset
    /// `base`, against the pattern. Returns the file offset of the first
    /// byte that differs, or `None` if everything matches.
    ///
    /// The hot loop compares whole page runs with slice equality; only a
    /// run that differs is scanned byte by byte.
    pub fn first_mismatch(&self, data: &[u8], base: u64) -> Option<u64> {
        let mut pos = 0;
        while pos < data.len() {
            let off = base + pos as u64;
            let len = self.run_len(off, data.len() - pos);
            let actual = &data[pos..pos + len];
            let expected = self.expected_run(off, len);
            if actual != expected {
                let i = actual
                    .iter()
                    .zip(expected)
                    .position(|(a, e)| a != e)
                    .unwrap_or(0);
                return Some(off + i as u64);
            }
            pos += len;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn byte_at_follows_pages() {
        assert_eq!(byte_at(0, 4096), b'a');
        assert_eq!(byte_at(4095, 4096), b'a');
        assert_eq!(byte_at(4096, 4096), b'b');
        assert_eq!(byte_at(25 * 4096, 4096), b'z');
        assert_eq!(byte_at(26 * 4096, 4096), b'a');
        assert_eq!(byte_at(27 * 4096 + 17, 4096), b'b');
        assert_eq!(byte_at(3, 1), b'd');
        assert_eq!(byte_at(100, 512), b'a');
        assert_eq!(byte_at(512, 512), b'b');
    }

    #[test]
    fn byte_at_beyond_4gib() {
        // 4 GiB / 4096 = 1_048_576 pages; 1_048_576 % 26 = 22 -> 'w'.
        assert_eq!(byte_at(4 * GIB, 4096), b'w');
        assert_eq!(byte_at(4 * GIB + 4095, 4096), b'w');
        assert_eq!(byte_at(4 * GIB + 4096, 4096), b'x');
        assert_eq!(byte_at(4 * GIB + 4 * 4096, 4096), b'a');
        // Far beyond: 40 TiB.
        let off = 40 << 40;
        assert_eq!(byte_at(off, 4096), b'a' + ((off / 4096) % 26) as u8);
    }

    #[test]
    fn fill_matches_byte_at() {
        for page_size in [1u64, 7, 512, 4096, 100_000] {
            let p = Pattern::new(page_size);
            for base in [0u64, 1, 4095, 4096, 4 * GIB + 123] {
                let mut buf = vec![0u8; 30_000];
                p.fill(&mut buf, base);
                for (i, b) in buf.iter().enumerate() {
                    assert_eq!(
                        *b,
                        byte_at(base + i as u64, page_size),
                        "ps {page_size} off {base}+{i}"
                    );
                }
                assert_eq!(p.first_mismatch(&buf, base), None);
            }
        }
    }

    #[test]
    fn first_mismatch_finds_exact_offset() {
        let p = Pattern::new(4096);
        let base = 4 * GIB + 1000;
        let mut buf = vec![0u8; 200_000];
        p.fill(&mut buf, base);
        assert_eq!(p.first_mismatch(&buf, base), None);
        buf[150_001] ^= 0x20;
        assert_eq!(p.first_mismatch(&buf, base), Some(base + 150_001));
        buf[7] = 0;
        assert_eq!(p.first_mismatch(&buf, base), Some(base + 7));
        // Checking the same bytes as if they were at another offset fails
        // at the very first byte.
        assert_eq!(p.first_mismatch(&buf, base + 4096), Some(base + 4096));
    }

    #[test]
    fn holes_do_not_match() {
        let p = Pattern::new(4096);
        let zeros = vec![0u8; 8192];
        assert_eq!(p.first_mismatch(&zeros, 4 * GIB), Some(4 * GIB));
        assert_eq!(p.first_mismatch(&[], 0), None);
    }

    #[test]
    fn large_page_size_uses_small_table() {
        let p = Pattern::new(1 << 30);
        assert_eq!(p.table.len(), 26 * MAX_BLOCK);
        let mut buf = vec![0u8; 3 * MAX_BLOCK];
        p.fill(&mut buf, (1 << 30) - MAX_BLOCK as u64);
        assert_eq!(p.first_mismatch(&buf, (1 << 30) - MAX_BLOCK as u64), None);
        assert_eq!(buf[MAX_BLOCK - 1], b'a');
        assert_eq!(buf[MAX_BLOCK], b'b');
    }
}
