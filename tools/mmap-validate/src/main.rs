//! `mmap-validate`: writes files with a known page pattern and checks that
//! pread and mmap (PROT_READ|PROT_EXEC, MAP_PRIVATE) return exactly that
//! pattern. Compatible with the reference harness used to test hsm stubs,
//! whose bytes are fetched on demand via fanotify pre-content events.

// Needed for the one libc::mmap/munmap wrapper in `mapping` (memmap2 cannot
// map PROT_READ|PROT_EXEC with MAP_PRIVATE) and for memmap2's unsafe map API.
#![allow(unsafe_code)]

mod create;
mod hexdump;
mod mapping;
mod pattern;
mod size;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::size::{parse_page_size, parse_size};
use crate::validate::Failure;

const PATTERN_HELP: &str = "\
Pattern:
  Page i of the file (pages of --page-size bytes, default 4096) is filled
  entirely with the byte b'a' + (i % 26): page 0 is all 'a', page 1 all 'b',
  ..., page 25 all 'z', page 26 all 'a' again. The last page may be partial.
  Holes and zero-filled pages therefore never match.

Sizes accept plain bytes or a K/M/G/T suffix (powers of 1024), e.g. 5M, 6G.";

const EXIT_HELP: &str = "\
Exit status:
  0  ok: every byte checked matched the pattern
  1  mismatch: a byte differs from the pattern, or the file size differs
     from --size (a size mismatch is reported as a mismatch, not an error)
  2  error: bad arguments, or open/fstat/pread/mmap/write failed (e.g. ENOENT,
     EIO); the message names the file and the failing offset/length

An I/O error while touching the mapping (e.g. a failed on-demand fetch)
is delivered by the kernel as SIGBUS, which kills the process (shell
status 135) instead of exiting with 2.";

#[derive(Debug, Parser)]
#[command(
    name = "mmap-validate",
    version,
    about = "Write and check files with a known page pattern through pread and mmap",
    after_help = format!("{PATTERN_HELP}\n\n{EXIT_HELP}"),
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create (or truncate) FILE and fill it with the page pattern.
    #[command(after_help = format!("{PATTERN_HELP}\n\n{EXIT_HELP}"))]
    Create {
        /// File to write.
        file: PathBuf,
        /// File size in bytes (K/M/G/T suffixes allowed).
        #[arg(long, default_value = "1048576", value_parser = parse_size)]
        size: u64,
        /// Pattern page size in bytes.
        #[arg(long, default_value = "4096", value_parser = parse_page_size)]
        page_size: u64,
        /// fsync the file before exiting.
        #[arg(long)]
        sync: bool,
    },
    /// Check FILE against the page pattern: random preads, then a whole-file
    /// mmap (PROT_READ|PROT_EXEC, MAP_PRIVATE) checked at random ranges and
    /// then page by page. Stops at the first mismatch.
    #[command(after_help = format!(
        "Phases (the first mismatch stops the run and is reported on stderr with its\n\
         phase, file offset, expected and actual byte, and hex dumps):\n  \
         pread        --reads preads at random offsets, 1 byte .. 256 KiB each\n  \
         mmap-random  --ranges random ranges of the mapping, 1 byte .. 256 KiB each\n  \
         mmap-full    every page of the mapping, in order\n\
         A zero-length file skips the mmap phases.\n\n\
         On success prints: validate: FILE ok (SIZE bytes, P pages, R preads, M ranges, seed S)\n\n\
         {PATTERN_HELP}\n\n{EXIT_HELP}"
    ))]
    Validate {
        /// File to check.
        file: PathBuf,
        /// Expected size in bytes (K/M/G/T suffixes allowed); the file's size
        /// must equal it (else exit 1). Default: the file's size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Pattern page size in bytes.
        #[arg(long, default_value = "4096", value_parser = parse_page_size)]
        page_size: u64,
        /// RNG seed for the random offsets (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Number of random preads.
        #[arg(long, default_value_t = 64)]
        reads: u64,
        /// Number of random ranges checked in the mapping.
        #[arg(long, default_value_t = 64)]
        ranges: u64,
        /// Map with PROT_READ only (for noexec mounts) instead of
        /// PROT_READ|PROT_EXEC.
        #[arg(long)]
        no_exec: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Create {
            file,
            size,
            page_size,
            sync,
        } => create::create(&file, size, page_size, sync).map_err(Failure::Error),
        Command::Validate {
            file,
            size,
            page_size,
            seed,
            reads,
            ranges,
            no_exec,
        } => validate::validate(&validate::Options {
            path: &file,
            size,
            page_size,
            seed,
            reads,
            ranges,
            exec: !no_exec,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Mismatch(report)) => {
            eprint!("{report}");
            if !report.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(1)
        }
        Err(Failure::Error(e)) => {
            eprintln!("mmap-validate: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
