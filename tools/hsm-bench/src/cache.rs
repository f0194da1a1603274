//! The cache lifecycle's benchmarks: eviction cost against a bare punch, and the bounded
//! cache's hit ratio on a Zipf trace against an LRU simulation (docs/BENCHMARKS.md).

use std::fs::File;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng};

use crate::rig::*;
use crate::{Args, hsm_cmd, path_str};

/// Evicting hydrated files (`hsm evict DIR`: each file checked against its digest, made a
/// stub again durably, then punched) vs punching the same amount out of plain copies
/// (open, `fallocate(PUNCH_HOLE)`, close per file, in this process).
pub(crate) fn bench_evict(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    let n = a.evict_files;
    let srcdir = src.mnt.join("evict");
    if std::fs::read_dir(&srcdir).map(|d| d.count()).unwrap_or(0) != n {
        let _ = std::fs::remove_dir_all(&srcdir);
        std::fs::create_dir_all(&srcdir)?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
        let mut buf = vec![0u8; 16 << 10];
        for i in 0..n {
            rng.fill(&mut buf[..]);
            std::fs::write(srcdir.join(format!("f{i:05}")), &buf)?;
        }
    }
    let plain = dst.mnt.join("evict-plain");
    let stubs = dst.mnt.join("evict-stub");
    let (mut hsm_s, mut base_s) = (Vec::new(), Vec::new());
    for round in 0..a.repeat.max(1) {
        for side in [round % 2, 1 - round % 2] {
            if side == 0 {
                let _ = std::fs::remove_dir_all(&plain);
                sh("cp", &["-a", path_str(&srcdir)?, path_str(&plain)?])?;
                sh("sync", &[])?;
                let t = Instant::now();
                for e in std::fs::read_dir(&plain)? {
                    let f = std::fs::OpenOptions::new().write(true).open(e?.path())?;
                    let len = f.metadata()?.len() as i64;
                    nix::fcntl::fallocate(
                        &f,
                        nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                            | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                        0,
                        len,
                    )?;
                }
                sh("sync", &[])?;
                base_s.push(t.elapsed().as_secs_f64());
            } else {
                let _ = std::fs::remove_dir_all(&stubs);
                populate(&a.bin, &srcdir, &stubs)?;
                let agent = Agent::start(a, &stubs)?;
                hsm_cmd(a, &["hydrate", "--no-progress", path_str(&stubs)?])?;
                sh("sync", &[])?;
                let t = Instant::now();
                hsm_cmd(a, &["evict", path_str(&stubs)?])?;
                sh("sync", &[])?;
                hsm_s.push(t.elapsed().as_secs_f64());
                // Data, not blocks: on ext4 each stub's xattrs take a block of their own,
                // and a shared marker counts in full. Each 16 KiB stub (one granule) must
                // hold its data marker, the first 4 KiB, and nothing else.
                let (mut holding, mut unmarked) = (0, 0);
                for e in std::fs::read_dir(&stubs)? {
                    let f = File::open(e?.path())?;
                    use nix::unistd::{Whence, lseek};
                    match lseek(&f, 0, Whence::SeekData) {
                        Ok(0) => {}
                        _ => unmarked += 1,
                    }
                    if lseek(&f, 4096, Whence::SeekData).is_ok() {
                        holding += 1;
                    }
                }
                ensure!(
                    holding == 0 && unmarked == 0,
                    "after hsm evict {holding} stubs still hold data past their data marker and {unmarked} have no marker"
                );
                drop(agent);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&plain);
    let _ = std::fs::remove_dir_all(&stubs);
    let (h, b) = (median(&mut hsm_s), median(&mut base_s));
    Ok(vec![Line {
        name: "evict hydrated files (vs punching holes)",
        hsm: h,
        base: b,
        unit: "s",
        ratio: h / b,
        goal: 0.0,
        at_most: true,
        detail: format!("{n} files of 16 KiB x {} rounds", a.repeat.max(1)),
        info: true,
    }])
}

/// The bounded cache in steady state: a limit of a quarter of the tree, a Zipf-distributed
/// trace of whole-file reads; hit ratio and bytes fetched over the second half of the trace
/// against an LRU simulation of the same trace with the same room (the high watermark).
pub(crate) fn bench_zipf(a: &Args, src: &LoopFs, dst: &LoopFs) -> Result<Vec<Line>> {
    const SIZE: u64 = 256 << 10;
    let n = a.zipf_files.max(8);
    let srcdir = src.mnt.join("zipf");
    if std::fs::read_dir(&srcdir).map(|d| d.count()).unwrap_or(0) != n {
        let _ = std::fs::remove_dir_all(&srcdir);
        std::fs::create_dir_all(&srcdir)?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut buf = vec![0u8; SIZE as usize];
        for i in 0..n {
            rng.fill(&mut buf[..]);
            std::fs::write(srcdir.join(format!("z{i:05}")), &buf)?;
        }
    }
    // The trace: rank k is drawn with probability proportional to 1/k (s = 1), ranks
    // mapped to files at random.
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut files: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        files.swap(i, rng.random_range(0..=i));
    }
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let trace: Vec<usize> = (0..a.zipf_reads.max(2))
        .map(|_| {
            let mut x = rng.random::<f64>() * total;
            let mut k = 0;
            while k + 1 < n && x >= weights[k] {
                x -= weights[k];
                k += 1;
            }
            files[k]
        })
        .collect();
    let limit = n as u64 * SIZE / 4;
    let high = limit * 95 / 100;
    let warm = trace.len() / 2;

    // LRU over whole files with the room the agent keeps (its high watermark).
    let mut lru: Vec<usize> = Vec::new();
    let (mut sim_hits, mut sim_fetched) = (0u64, 0u64);
    for (i, &f) in trace.iter().enumerate() {
        let hit = if let Some(p) = lru.iter().position(|&x| x == f) {
            lru.remove(p);
            true
        } else {
            false
        };
        lru.push(f);
        while lru.len() as u64 * SIZE > high {
            lru.remove(0);
        }
        if i >= warm {
            if hit {
                sim_hits += 1;
            } else {
                sim_fetched += SIZE;
            }
        }
    }

    let stubs = dst.mnt.join("zipf-stub");
    let _ = std::fs::remove_dir_all(&stubs);
    populate(&a.bin, &srcdir, &stubs)?;
    let limit_arg = limit.to_string();
    let agent = Agent::start_with(a, &stubs, &[("HSM_CACHE_MAX_SIZE", limit_arg.as_str())])?;
    let t = Instant::now();
    let mut fetched_at_warm = 0;
    for (i, &f) in trace.iter().enumerate() {
        if i == warm {
            fetched_at_warm = status_u64(a, "bytes_fetched")?;
        }
        ensure!(
            read_all(&stubs.join(format!("z{f:05}")))? == SIZE,
            "short read in the Zipf trace"
        );
    }
    let fetched = status_u64(a, "bytes_fetched")? - fetched_at_warm;
    let secs = t.elapsed().as_secs_f64();
    drop(agent);
    let _ = std::fs::remove_dir_all(&stubs);
    let measured = (trace.len() - warm) as f64;
    let hsm_hits = measured - fetched as f64 / SIZE as f64;
    let (h, b) = (hsm_hits / measured, sim_hits as f64 / measured);
    let detail = format!(
        "{n} files of 256 KiB, limit {} MiB, {} reads (Zipf s=1, second half measured), {secs:.1} s",
        limit >> 20,
        trace.len()
    );
    Ok(vec![
        Line {
            name: "cache hit ratio, Zipf (vs LRU simulation)",
            hsm: h,
            base: b,
            unit: "",
            ratio: h / b,
            goal: 0.9,
            at_most: false,
            detail: detail.clone(),
            info: false,
        },
        Line {
            name: "  bytes fetched, Zipf (vs LRU simulation)",
            hsm: fetched as f64 / (1 << 20) as f64,
            base: sim_fetched as f64 / (1 << 20) as f64,
            unit: "MiB",
            ratio: fetched as f64 / sim_fetched.max(1) as f64,
            goal: 1.1,
            at_most: true,
            detail,
            info: false,
        },
    ])
}

/// A number from `hsm status --json` (the running agent).
fn status_u64(a: &Args, field: &str) -> Result<u64> {
    let out = Command::new(a.bin.join("hsm"))
        .args(["status", "--json"])
        .output()
        .context("running hsm status")?;
    ensure!(
        out.status.success(),
        "hsm status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("hsm status --json")?;
    v.get(field)
        .and_then(|x| x.as_u64())
        .with_context(|| format!("hsm status --json has no {field}"))
}
