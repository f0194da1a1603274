//! `mmap-validate validate`: check that pread and mmap see the pattern.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, anyhow};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::hexdump::hex_dump;
use crate::mapping::Mapping;
use crate::pattern::Pattern;

/// Longest random pread / mmap range.
pub const MAX_IO: u64 = 256 * 1024;

/// Bytes shown in each hex dump of a mismatch.
const DUMP_LEN: u64 = 64;

/// Why validation did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The contents (or size) do not match the pattern: exit status 1.
    /// The string is the complete report.
    Mismatch(String),
    /// Could not check (open, fstat, pread or mmap failed): exit status 2.
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Error(e)
    }
}

/// Options for [`validate`].
#[derive(Debug)]
pub struct Options<'a> {
    pub path: &'a Path,
    pub size: Option<u64>,
    pub page_size: u64,
    pub seed: Option<u64>,
    pub reads: u64,
    pub ranges: u64,
    pub exec: bool,
}

/// Where a mismatch was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Pread,
    MmapRandom,
    MmapFull,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pread => "pread",
            Self::MmapRandom => "mmap-random",
            Self::MmapFull => "mmap-full",
        })
    }
}

/// Runs all phases; on success prints the summary line to stdout.
pub fn validate(opts: &Options<'_>) -> Result<(), Failure> {
    let name = opts.path.display();
    let file = File::open(opts.path).with_context(|| format!("{name}: open"))?;
    let meta = file.metadata().with_context(|| format!("{name}: fstat"))?;
    if !meta.is_file() {
        return Err(anyhow!("{name}: not a regular file").into());
    }
    let file_size = meta.len();
    let size = match opts.size {
        Some(expected) if expected != file_size => {
            return Err(Failure::Mismatch(format!(
                "validate: {name}: size mismatch: expected {expected} bytes (--size), file has {file_size} bytes"
            )));
        }
        _ => file_size,
    };
    let page_size = opts.page_size;
    let seed = opts.seed.unwrap_or_else(rand::random);
    // Printed up front so that a run killed by SIGBUS can still be reproduced.
    eprintln!("validate: {name}: {size} bytes, page size {page_size}, seed {seed}");

    let pattern = Pattern::new(page_size);
    let mut rng = StdRng::seed_from_u64(seed);
    let ctx = Report {
        name: &name,
        pattern: &pattern,
        seed,
    };

    // Phase 1: random preads.
    let mut reads_done = 0u64;
    if size > 0 {
        let mut buf = vec![0u8; MAX_IO.min(size) as usize];
        for _ in 0..opts.reads {
            let (offset, len) = random_range(&mut rng, size);
            let data = &mut buf[..len];
            pread_exact(&file, data, offset).map_err(|(at, e)| {
                anyhow!("{name}: pread(offset={offset}, len={len}) failed at offset {at}: {e}")
            })?;
            if let Some(bad) = pattern.first_mismatch(data, offset) {
                let what = format!("pread offset={offset} len={len}");
                return Err(Failure::Mismatch(ctx.render(
                    Phase::Pread,
                    data,
                    offset,
                    bad,
                    &what,
                )));
            }
            reads_done += 1;
        }
    }

    // Phases 2 and 3: map the whole file.
    let mut ranges_done = 0u64;
    if size == 0 {
        eprintln!(
            "validate: {name}: empty file, skipping the mmap phases (a zero-length mmap is EINVAL)"
        );
    } else {
        let len = usize::try_from(size)
            .with_context(|| format!("{name}: {size} bytes do not fit in memory"))?;
        let flags = Mapping::describe(opts.exec);
        let map = Mapping::new(&file, len, opts.exec).map_err(|e| {
            let hint = if opts.exec && e.raw_os_error() == Some(libc::EPERM) {
                " (noexec mount? try --no-exec)"
            } else {
                ""
            };
            anyhow!("{name}: mmap(offset=0, len={size}, {flags}) failed: {e}{hint}")
        })?;
        let data = map.as_slice();

        for _ in 0..opts.ranges {
            let (offset, len) = random_range(&mut rng, size);
            // offset < size == data.len(), so it fits in usize.
            let range = &data[offset as usize..][..len];
            if let Some(bad) = pattern.first_mismatch(range, offset) {
                let what = format!("mmap range offset={offset} len={len}");
                return Err(Failure::Mismatch(ctx.render(
                    Phase::MmapRandom,
                    data,
                    0,
                    bad,
                    &what,
                )));
            }
            ranges_done += 1;
        }

        if let Some(bad) = pattern.first_mismatch(data, 0) {
            let what = format!("whole mapping, page {}", bad / page_size);
            return Err(Failure::Mismatch(ctx.render(
                Phase::MmapFull,
                data,
                0,
                bad,
                &what,
            )));
        }
    }

    println!(
        "validate: {name} ok ({size} bytes, {} pages, {reads_done} preads, {ranges_done} ranges, seed {seed})",
        size.div_ceil(page_size)
    );
    Ok(())
}

/// A random range inside a file of `size` (> 0) bytes: offset anywhere,
/// length 1 ..= [`MAX_IO`], clamped to the end of the file.
fn random_range(rng: &mut StdRng, size: u64) -> (u64, usize) {
    let offset = rng.random_range(0..size);
    let max = MAX_IO.min(size - offset);
    let len = rng.random_range(1..=max);
    (offset, len as usize)
}

/// Reads exactly `buf.len()` bytes at `offset`. On failure returns the
/// offset at which the failing read started, and the error.
fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> Result<(), (u64, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match file.read_at(&mut buf[done..], at) {
            Ok(0) => {
                return Err((
                    at,
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "unexpected end of file (file shrank?)",
                    ),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((at, e)),
        }
    }
    Ok(())
}

/// Shared context for mismatch reports.
struct Report<'a> {
    name: &'a dyn fmt::Display,
    pattern: &'a Pattern,
    seed: u64,
}

impl Report<'_> {
    /// Renders the report for a mismatch at file offset `bad`. `data` holds
    /// the bytes the phase saw, starting at file offset `base`; the dumps
    /// cover up to 64 bytes from the 16-byte-aligned offset containing
    /// `bad`, clipped to `data`.
    fn render(&self, phase: Phase, data: &[u8], base: u64, bad: u64, what: &str) -> String {
        let name = self.name;
        let actual = data[(bad - base) as usize];
        let expected = self.pattern.byte_at(bad);
        let aligned = bad - bad % 16;
        let start = aligned.max(base);
        let end = (aligned + DUMP_LEN).min(base + data.len() as u64);
        let actual_bytes = &data[(start - base) as usize..(end - base) as usize];
        let mut expected_bytes = vec![0u8; actual_bytes.len()];
        self.pattern.fill(&mut expected_bytes, start);
        format!(
            "validate: {name}: MISMATCH in phase {phase} at offset {bad} (0x{bad:x}, page {page}): \
             expected {exp}, actual {act}\n\
             validate: {name}: while checking {what} (page size {ps}, seed {seed})\n\
             expected bytes at offset 0x{start:x}:\n{exp_dump}\
             actual bytes at offset 0x{start:x}:\n{act_dump}",
            page = bad / self.pattern.page_size(),
            exp = show_byte(expected),
            act = show_byte(actual),
            ps = self.pattern.page_size(),
            seed = self.seed,
            exp_dump = hex_dump(start, &expected_bytes),
            act_dump = hex_dump(start, actual_bytes),
        )
    }
}

/// `0x61 'a'` for printable bytes, `0x00` otherwise.
fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("0x{b:02x} '{}'", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ranges_stay_inside() {
        let mut rng = StdRng::seed_from_u64(7);
        for size in [1u64, 2, 100, MAX_IO, MAX_IO + 1, 5 << 30] {
            for _ in 0..1000 {
                let (off, len) = random_range(&mut rng, size);
                assert!(len >= 1 && len as u64 <= MAX_IO);
                assert!(off + len as u64 <= size, "size {size} off {off} len {len}");
            }
        }
    }

    #[test]
    fn report_names_offset_and_dumps_both() {
        let p = Pattern::new(4096);
        let base = (4u64 << 30) + 4000;
        let mut data = vec![0u8; 300];
        p.fill(&mut data, base);
        data[150] = b'#';
        let bad = p.first_mismatch(&data, base).expect("mismatch");
        assert_eq!(bad, base + 150);
        let name = "f";
        let r = Report {
            name: &name,
            pattern: &p,
            seed: 1,
        };
        let out = r.render(Phase::Pread, &data, base, bad, "test");
        assert!(
            out.contains(&format!("phase pread at offset {bad} ")),
            "{out}"
        );
        assert!(out.contains("actual 0x23 '#'"), "{out}");
        // bad = 0x1_0000_1036 -> dump starts at 0x1_0000_1030, 64 bytes = 4 lines.
        assert!(
            out.contains("expected bytes at offset 0x100001030:\n100001030  "),
            "{out}"
        );
        assert_eq!(out.matches("\n10000106").count(), 2, "{out}");
        assert!(!out.contains("100001070"), "{out}");
    }

    #[test]
    fn report_clips_dump_to_data() {
        let p = Pattern::new(4096);
        let data = vec![0u8; 5];
        let name = "f";
        let r = Report {
            name: &name,
            pattern: &p,
            seed: 1,
        };
        // Data starts at an unaligned offset: the dump starts there too.
        let out = r.render(Phase::MmapRandom, &data, 21, 21, "test");
        assert!(
            out.contains("expected bytes at offset 0x15:\n00000010  "),
            "{out}"
        );
        assert!(out.contains("|     aaaaa|"), "{out}");
        assert!(out.contains("|     .....|"), "{out}");
    }
}
