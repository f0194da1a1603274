//! `mmap-validate create`: write a pattern file.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::pattern::Pattern;

/// Target write size.
const CHUNK: u64 = 8 << 20;

/// Chunk length for a page size. When 26 pages fit in [`CHUNK`], the chunk
/// is a multiple of the 26-page period, so every chunk starts with page `a`
/// and one buffer can be filled once and written over and over.
fn chunk_len(page_size: u64) -> u64 {
    let period = page_size.saturating_mul(26);
    if period <= CHUNK {
        CHUNK / period * period
    } else {
        CHUNK
    }
}

/// Creates or truncates `path` and writes `size` bytes of the pattern.
pub fn create(path: &Path, size: u64, page_size: u64, sync: bool) -> Result<()> {
    let name = path.display();
    let pattern = Pattern::new(page_size);
    let mut file = File::create(path).with_context(|| format!("{name}: create"))?;

    let chunk = chunk_len(page_size);
    let periodic = chunk % page_size.saturating_mul(26) == 0;
    let mut buf = vec![0u8; usize::try_from(chunk.min(size)).context("chunk size")?];
    pattern.fill(&mut buf, 0);

    let mut offset = 0u64;
    while offset < size {
        let len = chunk.min(size - offset) as usize;
        if !periodic && offset != 0 {
            pattern.fill(&mut buf[..len], offset);
        }
        file.write_all(&buf[..len])
            .with_context(|| format!("{name}: write of {len} bytes at offset {offset}"))?;
        offset += len as u64;
    }
    if sync {
        file.sync_all().with_context(|| format!("{name}: fsync"))?;
    }
    println!(
        "create: {name} ok ({size} bytes, {} pages, page size {page_size})",
        size.div_ceil(page_size)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_is_period_multiple_when_possible() {
        let c = chunk_len(4096);
        assert_eq!(c % (26 * 4096), 0);
        assert!(c <= CHUNK && c > CHUNK - 26 * 4096);
        assert_eq!(chunk_len(1 << 20), CHUNK);
        assert_eq!(chunk_len(u64::MAX), CHUNK);
    }

    #[test]
    fn writes_pattern() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (size, page_size) in [
            (0u64, 4096u64),
            (10, 4096),
            (100_000, 4096),
            (3 << 20, 1 << 20),
            (20 << 20, 1 << 20),
            (9_000_001, 4096),
        ] {
            let path = dir.path().join(format!("f-{size}-{page_size}"));
            create(&path, size, page_size, false).expect("create");
            let data = std::fs::read(&path).expect("read");
            assert_eq!(data.len() as u64, size);
            assert_eq!(Pattern::new(page_size).first_mismatch(&data, 0), None);
        }
    }
}
