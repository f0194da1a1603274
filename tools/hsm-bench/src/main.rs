//! hsm-bench: hsm's speed goals, each measured as a ratio against a baseline taken in the
//! same run on the same loop-device filesystems. See docs/BENCHMARKS.md.
//!
//! Ratios, not absolute times: these machines are shared and noisy, so each side is
//! repeated (alternating order) and the medians are compared.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clap::Parser;

mod cache;
mod rig;
use cache::{bench_evict, bench_zipf};
use rand::{Rng, SeedableRng};
use rig::*;

#[derive(Debug, Parser)]
#[command(
    name = "hsm-bench",
    about = "hsm against same-run baselines (needs root)"
)]
struct Args {
    /// Directory for the loop images and trees.
    #[arg(long, default_value = "/var/tmp/hsm-bench")]
    work: PathBuf,
    /// Directory with the hsm binary (a release build).
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Size of the sequential-read file, in MiB.
    #[arg(long, default_value_t = 1024)]
    seq_mib: u64,
    /// Small files for the first-byte latency test.
    #[arg(long, default_value_t = 1000)]
    small_files: usize,
    /// Files for the populate test.
    #[arg(long, default_value_t = 100_000)]
    populate_files: usize,
    /// Repetitions of each timed side (median taken).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Hydrated files the eviction test evicts.
    #[arg(long, default_value_t = 10_000)]
    evict_files: usize,
    /// Files of the Zipf cache test (256 KiB each; the cache limit is a quarter of them).
    #[arg(long, default_value_t = 400)]
    zipf_files: usize,
    /// Whole-file reads in the Zipf trace (the first half warms the cache up).
    #[arg(long, default_value_t = 4000)]
    zipf_reads: usize,
    /// Size of the object of the S3 cold-read test, in MiB.
    #[arg(long, default_value_t = 1024)]
    s3_mib: u64,
    /// The script that runs the S3 cold-read test (moto, curl).
    #[arg(long, default_value = "tools/bench-s3")]
    s3_script: PathBuf,
    /// Run only these tests: seq, reread, latency, populate, container, evict, zipf, s3,
    /// disk, kbuild (comma separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also print the results as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Filesystem for both loop devices: ext4, ext4-i512 (512-byte inodes), xfs or btrfs.
    #[arg(long, default_value = "ext4")]
    fs: String,
    /// Start the agent with this configuration file (for experiments; defaults otherwise).
    #[arg(long)]
    agent_config: Option<PathBuf>,
    /// The script that runs the container-start test (podman, moto, the cached test image).
    #[arg(long, default_value = "tools/bench-container")]
    container_script: PathBuf,
    /// The script that runs the kernel-build test (Debian's linux-source, make).
    #[arg(long, default_value = "tools/bench-kbuild")]
    kbuild_script: PathBuf,
    /// Populate indexed stubs (`hsm populate --index`), their index in WORK/index: every
    /// hsm the bench and its scripts run gets HSM_POPULATE_INDEX and HSM_INDEX_DIR.
    #[arg(long)]
    index: bool,
    /// The local filesystem's loop device reads and writes its image with direct I/O
    /// (`losetup --direct-io=on`): a cold read then reaches the machine's disk instead of
    /// the page cache that holds the image file. The remote's stays cached.
    #[arg(long)]
    direct_io: bool,
}

/// Cold sequential read of a stub vs cp of the source + read of the copy, both + sync.
fn bench_seq(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let size = a.seq_mib << 20;
    let srcdir = src.mnt.join("seq");
    std::fs::create_dir_all(&srcdir)?;
    let srcfile = srcdir.join("big.bin");
    if std::fs::metadata(&srcfile).map(|m| m.len()).ok() != Some(size) {
        eprintln!("bench: writing {} MiB source file", a.seq_mib);
        write_random(&srcfile, size, 1)?;
    }
    let stubdir = dst.mnt.join("seq-stub");
    let copy = dst.mnt.join("seq-copy.bin");
    let (mut hsm_t, mut base_t) = (Vec::new(), Vec::new());
    let (mut hsm_sync, mut base_sync) = (Vec::new(), Vec::new());
    for round in 0..a.repeat {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                // Baseline: no agent anywhere.
                let _ = std::fs::remove_file(&copy);
                drop_caches()?;
                let t = Instant::now();
                sh(
                    "cp",
                    &[
                        srcfile.to_str().context("utf8")?,
                        copy.to_str().context("utf8")?,
                    ],
                )?;
                ensure!(read_all(&copy)? == size, "short read of the copy");
                let ts = Instant::now();
                nix::unistd::sync();
                base_sync.push(ts.elapsed().as_secs_f64());
                base_t.push(t.elapsed().as_secs_f64());
            } else {
                let _ = std::fs::remove_dir_all(&stubdir);
                populate(&a.bin, &srcdir, &stubdir)?;
                let agent = Agent::start(a, &stubdir)?;
                drop_caches()?;
                let t = Instant::now();
                ensure!(
                    read_all(&stubdir.join("big.bin"))? == size,
                    "short read of the stub"
                );
                let ts = Instant::now();
                nix::unistd::sync();
                hsm_sync.push(ts.elapsed().as_secs_f64());
                hsm_t.push(t.elapsed().as_secs_f64());
                drop(agent);
            }
        }
    }
    let (h, b) = (median(&mut hsm_t), median(&mut base_t));
    let mut lines = vec![Line {
        name: "cold sequential read (vs cp + read + sync)",
        hsm: h,
        base: b,
        unit: "s",
        ratio: h / b,
        goal: 0.7,
        at_most: true,
        detail: format!(
            "{} MiB, {} runs each, medians; final sync {:.3} s vs {:.3} s",
            a.seq_mib,
            a.repeat,
            median(&mut hsm_sync),
            median(&mut base_sync)
        ),
        info: false,
    }];
    lines.extend(bench_reread(a, &stubdir, &copy)?);
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_dir_all(&stubdir);
    Ok(lines)
}

/// Re-read, page cache warm: the hydrated stub `stubdir/big.bin` vs the plain `copy`.
fn bench_reread(a: &Args, stubdir: &Path, copy: &Path) -> Result<Vec<Line>> {
    // Re-read, page cache warm: the hydrated stub vs a plain file of the same bytes, both on
    // the filesystem the agent serves (the question is whether a hydrated file reads like a
    // plain one). With the agent running, the kernel runs its fanotify hook on every read of
    // every file there; the plain file read with no agent at all is printed for information.
    let stub = stubdir.join("big.bin");
    ensure!(
        !has_marker(&stub),
        "the stub is not hydrated after a full read"
    );
    let (mut hsm_r, mut base_r, mut bare_r) = (Vec::new(), Vec::new(), Vec::new());
    let agent = Agent::start(a, stubdir)?;
    read_all(&stub)?;
    read_all(copy)?;
    for round in 0..(a.repeat * 3) {
        for side in [round % 2, 1 - round % 2] {
            let (path, out) = if side == 0 {
                (copy, &mut base_r)
            } else {
                (stub.as_path(), &mut hsm_r)
            };
            let t = Instant::now();
            for _ in 0..REREADS {
                read_all(path)?;
            }
            out.push(t.elapsed().as_secs_f64());
        }
    }
    drop(agent);
    read_all(copy)?;
    for _ in 0..(a.repeat * 3) {
        let t = Instant::now();
        for _ in 0..REREADS {
            read_all(copy)?;
        }
        bare_r.push(t.elapsed().as_secs_f64());
    }
    let (h, b, bare) = (median(&mut hsm_r), median(&mut base_r), median(&mut bare_r));
    let mut lines = Vec::new();
    let detail = format!(
        "{} MiB, {} samples of {REREADS} reads each, medians",
        a.seq_mib,
        a.repeat * 3
    );
    lines.push(Line {
        name: "warm re-read of a hydrated file (vs plain)",
        hsm: h,
        base: b,
        unit: "s",
        ratio: h / b,
        goal: 1.02,
        at_most: true,
        detail: detail.clone(),
        info: false,
    });
    lines.push(Line {
        name: "  (vs a plain file with no agent running)",
        hsm: h,
        base: bare,
        unit: "s",
        ratio: h / bare,
        goal: 1.02,
        at_most: true,
        detail: format!("{detail}; includes the kernel's per-read fanotify hook"),
        info: true,
    });
    Ok(lines)
}

/// Reads of the whole file per re-read sample (one read of 1 GiB from page cache is ~40 ms,
/// too short to time alone on a shared machine).
const REREADS: usize = 3;

fn has_marker(p: &Path) -> bool {
    Command::new("getfattr")
        .args(["--absolute-names", "-n", "security.bpf.hsm"])
        .arg(p)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn first_byte(path: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut f = File::open(path)?;
    let mut b = [0u8; 1];
    let n = f.read(&mut b)?;
    let e = t.elapsed().as_secs_f64() * 1e3;
    ensure!(n == 1, "empty read from {}", path.display());
    Ok(e)
}

/// First-byte latency over many cold small stubs vs the same plain files.
///
/// "Cold" means the local filesystem holding the stubs (or the plain files) was just
/// mounted: none of its inodes, xattrs or data are cached. The remote's own cache is warm,
/// so the ratio is hsm's overhead rather than the remote disk's latency; a second pair of
/// lines, with every cache dropped, is printed for information.
fn bench_latency(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let srcdir = src.mnt.join("small");
    let n = a.small_files;
    if std::fs::read_dir(&srcdir).map(|d| d.count()).unwrap_or(0) != n {
        let _ = std::fs::remove_dir_all(&srcdir);
        std::fs::create_dir_all(&srcdir)?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
        for i in 0..n {
            let len = rng.random_range(1024..64 * 1024);
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            std::fs::write(srcdir.join(format!("f{i:05}")), &buf)?;
        }
    }
    let plain = dst.mnt.join("small-plain");
    let stubs = dst.mnt.join("small-stub");
    let names: Vec<String> = (0..n).map(|i| format!("f{i:05}")).collect();
    let mut out = Vec::new();
    for all_cold in [false, true] {
        let (mut hsm_ms, mut base_ms) = (Vec::new(), Vec::new());
        for round in 0..a.repeat.max(1) {
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let _ = std::fs::remove_dir_all(&plain);
                    sh(
                        "cp",
                        &[
                            "-a",
                            srcdir.to_str().context("utf8")?,
                            plain.to_str().context("utf8")?,
                        ],
                    )?;
                } else {
                    let _ = std::fs::remove_dir_all(&stubs);
                    populate(&a.bin, &srcdir, &stubs)?;
                }
                dst.remount()?;
                if all_cold {
                    drop_caches()?;
                } else {
                    for name in &names {
                        read_all(&srcdir.join(name))?;
                    }
                }
                if side == 0 {
                    for name in &names {
                        base_ms.push(first_byte(&plain.join(name))?);
                    }
                } else {
                    let agent = Agent::start(a, &stubs)?;
                    for name in &names {
                        hsm_ms.push(first_byte(&stubs.join(name))?);
                    }
                    drop(agent);
                }
            }
        }
        let detail = format!(
            "{n} files x {} rounds{}",
            a.repeat.max(1),
            if all_cold {
                "; remote cold too (information only)"
            } else {
                "; remote warm"
            }
        );
        let (h50, b50) = (percentile(&mut hsm_ms, 0.5), percentile(&mut base_ms, 0.5));
        let (h99, b99) = (
            percentile(&mut hsm_ms, 0.99),
            percentile(&mut base_ms, 0.99),
        );
        let (n50, n99) = if all_cold {
            (
                "  (all caches cold) first-byte p50",
                "  (all caches cold) first-byte p99",
            )
        } else {
            (
                "cold first-byte latency p50 (vs plain)",
                "cold first-byte latency p99 (vs plain)",
            )
        };
        // The all-cold variant has no goal of its own; show it against the same goal.
        out.push(Line {
            name: n50,
            hsm: h50,
            base: b50,
            unit: "ms",
            ratio: h50 / b50,
            goal: 1.3,
            at_most: true,
            detail: detail.clone(),
            info: all_cold,
        });
        out.push(Line {
            name: n99,
            hsm: h99,
            base: b99,
            unit: "ms",
            ratio: h99 / b99,
            goal: 1.5,
            at_most: true,
            detail: detail.clone(),
            info: all_cold,
        });
        if !all_cold {
            // The slowest first reads: stalls too rare for p99 (a few per 1,000) show here,
            // such as a descriptor-table growth on an event thread (docs/KERNEL.md).
            let (hmax, bmax) = (percentile(&mut hsm_ms, 1.0), percentile(&mut base_ms, 1.0));
            out.push(Line {
                name: "  first-byte slowest (information only)",
                hsm: hmax,
                base: bmax,
                unit: "ms",
                ratio: hmax / bmax,
                goal: 1.5,
                at_most: true,
                detail,
                info: true,
            });
        }
    }
    let _ = std::fs::remove_dir_all(&plain);
    let _ = std::fs::remove_dir_all(&stubs);
    Ok(out)
}

/// How idle CPUs wait, which the first-byte lines depend on: on a VM whose idle vCPUs halt
/// at once, each wake-up across CPUs costs a VM exit (docs/BENCHMARKS.md, "2026-12-05
/// (sixth)"; tools/probes/wakeups.sh).
fn idle_cpus() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver");
    let poll = read("/sys/module/haltpoll/parameters/guest_halt_poll_ns");
    match (driver, poll) {
        (Some(d), Some(p)) if p == "0" => format!(
            "cpuidle {d}, guest_halt_poll_ns 0: idle vCPUs halt at once, so first-byte p50 \
             depends on whether reader and agent share a CPU (docs/BENCHMARKS.md)"
        ),
        (Some(d), Some(p)) => format!("cpuidle {d}, guest_halt_poll_ns {p}"),
        (Some(d), None) => format!("cpuidle {d}"),
        (None, _) => "cpuidle: none reported".to_string(),
    }
}

/// Populate of many files vs cp -a --attributes-only, as a rate ratio.
fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

/// Run `hsm ARGS` against the running agent (its default state directory).
fn hsm_cmd(a: &Args, args: &[&str]) -> Result<()> {
    let out = Command::new(a.bin.join("hsm"))
        .args(args)
        .stdout(Stdio::null())
        .output()
        .with_context(|| format!("running hsm {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "hsm {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn bench_populate(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let srcdir = src.mnt.join("many");
    let n = a.populate_files;
    let per_dir = 1000;
    let marker = srcdir.join(format!(".complete-{n}"));
    if !marker.exists() {
        eprintln!("bench: creating {n} source files");
        let _ = std::fs::remove_dir_all(&srcdir);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
        let mut buf = vec![0u8; 64 << 10];
        rng.fill(&mut buf[..]);
        for i in 0..n {
            let d = srcdir.join(format!("d{:03}", i / per_dir));
            if i % per_dir == 0 {
                std::fs::create_dir_all(&d)?;
            }
            let len = rng.random_range(1..buf.len());
            std::fs::write(d.join(format!("f{i:06}")), &buf[..len])?;
        }
        File::create(&marker)?;
    }
    let cp_dst = dst.mnt.join("many-cp");
    let hsm_dst = dst.mnt.join("many-stub");
    let (mut hsm_t, mut base_t) = (Vec::new(), Vec::new());
    // The same runs with the sync that makes them durable (the blocks each stub writes).
    let (mut hsm_ts, mut base_ts) = (Vec::new(), Vec::new());
    for round in 0..a.repeat {
        for side in [round % 2, 1 - round % 2] {
            let target = if side == 0 { &cp_dst } else { &hsm_dst };
            let _ = std::fs::remove_dir_all(target);
            nix::unistd::sync();
            // Warm source metadata for both sides alike.
            sh("find", &[srcdir.to_str().context("utf8")?, "-printf", ""])?;
            if side == 0 {
                let t = Instant::now();
                sh(
                    "cp",
                    &[
                        "-a",
                        "--attributes-only",
                        srcdir.to_str().context("utf8")?,
                        target.to_str().context("utf8")?,
                    ],
                )?;
                base_t.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                nix::unistd::sync();
                base_ts.push(base_t[base_t.len() - 1] + t.elapsed().as_secs_f64());
            } else {
                hsm_t.push(populate(&a.bin, &srcdir, target)?.as_secs_f64());
                let t = Instant::now();
                nix::unistd::sync();
                hsm_ts.push(hsm_t[hsm_t.len() - 1] + t.elapsed().as_secs_f64());
            }
        }
    }
    let files = std::fs::read_dir(hsm_dst.join("d000"))?.count();
    ensure!(
        files == per_dir.min(n),
        "populate made {files} files in d000"
    );
    let _ = std::fs::remove_dir_all(&cp_dst);
    let _ = std::fs::remove_dir_all(&hsm_dst);
    let (h, b) = (median(&mut hsm_t), median(&mut base_t));
    let (hs, bs) = (median(&mut hsm_ts), median(&mut base_ts));
    Ok(vec![
        Line {
            name: "populate rate (vs cp -a --attributes-only)",
            hsm: h,
            base: b,
            unit: "s",
            ratio: b / h,
            goal: 0.5,
            at_most: false,
            detail: format!(
                "{n} files, {} runs each, medians; ratio = cp time / populate time",
                a.repeat
            ),
            info: false,
        },
        Line {
            name: "populate rate, both + sync",
            hsm: hs,
            base: bs,
            unit: "s",
            ratio: bs / hs,
            goal: 0.5,
            at_most: false,
            detail: format!(
                "the same runs, each timed to the end of a sync after it; {} runs each, medians",
                a.repeat
            ),
            info: false,
        },
    ])
}

/// Container start from stubs vs pulling the whole image first, both from S3 (moto on
/// loopback), and the bytes the stub start fetched against what the start itself read.
/// tools/bench-container does the work (podman, moto, the image) and prints JSON.
/// Run one of the benchmark scripts (`--hsm BIN --work DIR --repeat N` plus `extra`),
/// which prints one JSON object; returns a lookup of its numbers by key.
fn run_script(
    a: &Args,
    script: &Path,
    work: &Path,
    extra: &[&str],
) -> Result<impl Fn(&str) -> Result<f64> + use<>> {
    let out = Command::new(script)
        .arg("--hsm")
        .arg(a.bin.join("hsm"))
        .arg("--work")
        .arg(work)
        .arg("--repeat")
        .arg(a.repeat.to_string())
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        out.status
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", script.display()))?;
    let shown = script.display().to_string();
    Ok(move |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("{k} missing from the output of {shown}"))
    })
}

/// A cold sequential read of one object on S3 (moto on loopback) through the agent vs one
/// direct GET of it written to the same filesystem (tools/bench-s3).
fn bench_s3(a: &Args, dst: &LoopFs) -> Result<Vec<Line>> {
    let mib = a.s3_mib.to_string();
    let num = run_script(
        a,
        &a.s3_script,
        &dst.mnt.join("s3"),
        &["--mib", mib.as_str()],
    )?;
    let (h, b) = (num("hsm_s")?, num("get_s")?);
    Ok(vec![Line {
        name: "S3 cold read (vs one direct GET to disk)",
        hsm: h,
        base: b,
        unit: "s",
        ratio: b / h,
        goal: 0.9,
        at_most: false,
        detail: format!(
            "{} MiB object on moto, cat of the stub + sync vs curl GET + sync; {} runs each, medians; ratio = GET time / hsm time",
            a.s3_mib, a.repeat
        ),
        info: false,
    }])
}

fn bench_container(a: &Args, dst: &LoopFs) -> Result<Vec<Line>> {
    let num = run_script(a, &a.container_script, &dst.mnt.join("container"), &[])?;
    let (stub, base) = (num("stub_s")?, num("base_s")?);
    let (fetched, read, image) = (
        num("fetched_bytes")?,
        num("read_bytes")?,
        num("image_bytes")?,
    );
    let (warm, cold, local, entries) = (
        num("warm_s")?,
        num("cold_s")?,
        num("local_s")?,
        num("trace_entries")?,
    );
    let mib = |b: f64| b / f64::from(1u32 << 20);
    Ok(vec![
        Line {
            name: "container start (vs pull whole, then start)",
            hsm: stub,
            base,
            unit: "s",
            ratio: base / stub,
            goal: 5.0,
            at_most: false,
            detail: format!(
                "{:.0} MiB image on S3 (moto), podman --rootfs DIR:O, python3 + numpy; {} runs each, medians; ratio = pull time / stub time",
                mib(image),
                a.repeat
            ),
            info: false,
        },
        Line {
            name: "  fetched for the start (vs read by it)",
            hsm: mib(fetched),
            base: mib(read),
            unit: "MiB",
            ratio: fetched / read,
            goal: 1.5,
            at_most: true,
            detail: format!(
                "{:.1}% of the image fetched; read = page cache of a plain tree after a cold start (fincore)",
                100.0 * fetched / image
            ),
            info: false,
        },
        Line {
            name: "container start, trace prefetch (vs local)",
            hsm: warm,
            base: local,
            unit: "s",
            ratio: warm / local,
            goal: 1.3,
            at_most: true,
            detail: format!(
                "podman run to first line, caches dropped: stubs with the agent prefetching a published trace ({entries:.0} entries) vs the image's plain tree, no agent; {} runs each, medians",
                a.repeat
            ),
            info: false,
        },
        Line {
            name: "  trace prefetch (vs none)",
            hsm: warm,
            base: cold,
            unit: "s",
            ratio: warm / cold,
            goal: 1.0,
            at_most: true,
            detail: format!(
                "the same start from stubs with hsm agent --no-prefetch; must be faster; {:.1} MiB fetched with prefetch",
                mib(num("warm_fetched_bytes")?)
            ),
            info: false,
        },
    ])
}

/// A tinyconfig kernel build in a stub tree of Debian's linux-source through the agent vs
/// the same build in a plain copy, then the stub tree's disk use after `make mrproper`
/// against the plain tree's (tools/bench-kbuild).
fn bench_kbuild(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let remote = src.mnt.join("kbuild");
    let num = run_script(
        a,
        &a.kbuild_script,
        &dst.mnt.join("kbuild"),
        &["--remote", path_str(&remote)?],
    )?;
    let (h, b) = (num("hsm_s")?, num("plain_s")?);
    let (after, before, full) = (
        num("stub_after_bytes")?,
        num("stub_before_bytes")?,
        num("plain_after_bytes")?,
    );
    let files = num("files")?;
    let mb = |b: f64| b / 1e6;
    Ok(vec![
        Line {
            name: "kernel build through the agent (vs plain)",
            hsm: h,
            base: b,
            unit: "s",
            ratio: h / b,
            goal: 1.02,
            at_most: true,
            detail: format!(
                "Debian linux-source ({files:.0} files), make tinyconfig + make -j, caches dropped; {} runs each, medians; vmlinux compared",
                a.repeat
            ),
            info: false,
        },
        Line {
            name: "  disk after build + mrproper (vs full tree)",
            hsm: mb(after),
            base: mb(full),
            unit: "MB",
            ratio: after / full,
            goal: 0.08,
            at_most: true,
            detail: "disk use of the stub tree vs the plain tree (du, shared blocks once), both after make mrproper".into(),
            info: false,
        },
        Line {
            name: "  stub tree before the build (vs full tree)",
            hsm: mb(before),
            base: mb(full),
            unit: "MB",
            ratio: before / full,
            goal: 0.05,
            at_most: true,
            detail: format!(
                "disk use right after populate: {:.0} bytes a stub; populate took {:.1} s",
                before / files,
                num("populate_s")?
            ),
            info: true,
        },
    ])
}

/// Disk use of a tree in bytes: `du` (allocated blocks, each hard-linked file once), with
/// every block several of its files share counted once (`tools/disk-use`; `du` would count
/// a shared data marker once per stub).
fn du_bytes(p: &Path) -> Result<f64> {
    let out = sh("tools/disk-use", &[path_str(p)?])?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("tools/disk-use printed {out:?}"))
}

/// Disk use of a stub tree before any read vs the same tree copied whole: the test image's
/// root filesystem (fstests/common/image: Debian minbase with python3 and numpy). Two
/// what-if lines (information) take the stubs apart to show where the bytes are: without
/// their data-marker pages, then also without the metadata and map xattrs (only the
/// marker left, which fits in any inode).
fn bench_disk(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let img = sh("fstests/common/image", &[]).context("building the test image")?;
    let rootfs = Path::new(&img).join("rootfs");
    let srcdir = src.mnt.join("disk-src");
    let (plain, stubs) = (dst.mnt.join("disk-plain"), dst.mnt.join("disk-stub"));
    for d in [&srcdir, &plain, &stubs] {
        let _ = std::fs::remove_dir_all(d);
    }
    sh("cp", &["-a", path_str(&rootfs)?, path_str(&srcdir)?])?;
    sh("cp", &["-a", path_str(&srcdir)?, path_str(&plain)?])?;
    // Populate reports the image's device nodes as skipped; the files are what is measured.
    let _ = Command::new(a.bin.join("hsm"))
        .args(["populate", "--no-progress"])
        .arg(&srcdir)
        .arg(&stubs)
        .env("RUST_LOG", "error")
        .stderr(Stdio::null())
        .status()?;
    nix::unistd::sync();
    let (full, stub) = (du_bytes(&plain)?, du_bytes(&stubs)?);
    let count = |d: &Path| -> Result<String> {
        sh(
            "sh",
            &["-c", &format!("find '{}' -type f | wc -l", path_str(d)?)],
        )
    };
    let files = count(&stubs)?;
    ensure!(
        files == count(&srcdir)?,
        "populate made {files} files of the image's {}",
        count(&srcdir)?
    );
    // What-ifs: punch every stub's data out, then remove its metadata and map.
    let strip = |xattrs: bool| -> Result<f64> {
        sh(
            "python3",
            &[
                "-c",
                r#"
import os, sys
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
for d, _, names in os.walk(sys.argv[1]):
    for n in names:
        p = os.path.join(d, n)
        if os.path.islink(p) or not os.path.isfile(p):
            continue
        try:
            os.getxattr(p, "security.bpf.hsm")
        except OSError:
            continue
        if sys.argv[2] == "0":
            fd = os.open(p, os.O_RDWR)
            # Whole blocks: a punch frees only blocks it covers entirely (past EOF is fine).
            end = (os.fstat(fd).st_size + 65535) // 65536 * 65536
            if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, end):
                sys.exit(f"{p}: punch failed: errno {ctypes.get_errno()}")
            os.close(fd)
        else:
            for x in ("trusted.hsm.meta", "trusted.hsm.map"):
                try:
                    os.removexattr(p, x)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != 61:  # ENODATA: another name of a file already done
                        raise
"#,
                path_str(&stubs)?,
                if xattrs { "1" } else { "0" },
            ],
        )?;
        nix::unistd::sync();
        du_bytes(&stubs)
    };
    let no_pages = strip(false)?;
    let marker_only = strip(true)?;
    let _ = std::fs::remove_dir_all(&plain);
    let _ = std::fs::remove_dir_all(&stubs);
    let _ = std::fs::remove_dir_all(&srcdir);
    let mb = |b: f64| b / 1e6;
    let n: f64 = files.trim().parse().unwrap_or(1.0);
    let line = |name, hsm: f64, goal, info, detail: String| Line {
        name,
        hsm: mb(hsm),
        base: mb(full),
        unit: "MB",
        ratio: hsm / full,
        goal,
        at_most: true,
        detail,
        info,
    };
    Ok(vec![
        line(
            "stub tree on disk before reads (vs full tree)",
            stub,
            0.05,
            false,
            format!(
                "the test image's rootfs ({n:.0} files), disk use (du, shared blocks once) after populate + sync vs of cp -a; {:.0} bytes a stub",
                (stub - marker_only) / n
            ),
        ),
        line(
            "  what if: no data-marker pages",
            no_pages,
            0.05,
            true,
            "the same stubs with their data punched out (hole-skipping copiers would then copy zeros)".into(),
        ),
        line(
            "  what if: and only the marker xattr",
            marker_only,
            0.05,
            true,
            "also without trusted.hsm.meta and .map (what a per-tree index would leave)".into(),
        ),
    ])
}

/// Print a bench's lines as they come and keep them for the summary.
fn report(lines: &mut Vec<Line>, new: Vec<Line>) {
    for l in new {
        print_line(&l);
        lines.push(l);
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "hsm-bench needs root (loop devices, mounts, drop_caches, fanotify)"
    );
    ensure!(
        a.bin.join("hsm").exists(),
        "{}/hsm not found: build it with cargo build --release",
        a.bin.display()
    );
    let a = Args {
        bin: std::fs::canonicalize(&a.bin)?,
        s3_script: std::fs::canonicalize(&a.s3_script).unwrap_or(a.s3_script.clone()),
        kbuild_script: std::fs::canonicalize(&a.kbuild_script).unwrap_or(a.kbuild_script.clone()),
        ..a
    };
    let a = Args {
        agent_config: a
            .agent_config
            .as_deref()
            .map(std::fs::canonicalize)
            .transpose()?,
        ..a
    };
    std::fs::create_dir_all(&a.work)?;
    if a.index && std::env::var_os("HSM_POPULATE_INDEX").is_none() {
        // Every hsm the bench and its scripts start must see these: run the bench again
        // with them in its environment (this crate has no unsafe for set_var).
        let dir = std::fs::canonicalize(&a.work)?.join("index");
        let status = Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env("HSM_POPULATE_INDEX", "1")
            .env("HSM_INDEX_DIR", &dir)
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let want = |t: &str| a.only.is_empty() || a.only.iter().any(|o| o == t);
    let src_size = format!("{}M", a.seq_mib * 2 + 4096);
    let src = LoopFs::new(&a.work, "remote", &src_size, &a.fs, false)?;
    let dst = LoopFs::new(&a.work, "local", &src_size, &a.fs, a.direct_io)?;
    println!(
        "hsm-bench: {}{}{} on loop devices, {} CPUs, kernel {}; ratio = hsm / baseline from this run",
        a.fs,
        if a.index {
            ", indexed stubs (populate --index)"
        } else {
            ""
        },
        if a.direct_io {
            ", the local one with direct I/O"
        } else {
            ""
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        sh("uname", &["-r"])?
    );
    println!("hsm-bench: {}", idle_cpus());
    let mut lines = Vec::new();
    if want("seq") || want("reread") {
        report(&mut lines, bench_seq(&a, &src, &dst)?);
    }
    if want("latency") {
        report(&mut lines, bench_latency(&a, &src, &dst)?);
    }
    if want("populate") {
        report(&mut lines, bench_populate(&a, &src, &dst)?);
    }
    if want("evict") {
        report(&mut lines, bench_evict(&a, &src, &dst)?);
    }
    if want("zipf") {
        report(&mut lines, bench_zipf(&a, &src, &dst)?);
    }
    if want("s3") {
        for l in bench_s3(&a, &dst)? {
            print_line(&l);
            lines.push(l);
        }
    }
    if want("container") {
        report(&mut lines, bench_container(&a, &dst)?);
    }
    if want("disk") {
        report(&mut lines, bench_disk(&a, &src, &dst)?);
    }
    if want("kbuild") {
        report(&mut lines, bench_kbuild(&a, &src, &dst)?);
    }
    let goals: Vec<&Line> = lines.iter().filter(|l| !l.info).collect();
    let met = goals.iter().filter(|l| l.met()).count();
    println!("hsm-bench: {met}/{} goals met", goals.len());
    if a.json {
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| {
                serde_json::json!({"name": l.name, "hsm": l.hsm, "baseline": l.base, "unit": l.unit,
                    "ratio": l.ratio, "goal": l.goal, "at_most": l.at_most, "met": l.met(), "info": l.info})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    }
    Ok(())
}
