//! The bench's rig: shell helpers, loop-device filesystems, the agent under test,
//! populate, file helpers, statistics and the result lines every bench returns.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rand::{Rng, SeedableRng};

use crate::Args;

pub(crate) fn sh(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(crate) fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop_caches")?;
    Ok(())
}

/// A loop-mounted ext4 filesystem, unmounted and detached on drop.
pub(crate) struct LoopFs {
    pub(crate) dev: String,
    pub(crate) mnt: PathBuf,
}

impl LoopFs {
    /// With `direct_io`, the loop device reads and writes its image file with O_DIRECT, so
    /// the image's pages in this machine's cache do not make a cold read a memory copy.
    pub(crate) fn new(
        work: &Path,
        name: &str,
        size: &str,
        fs: &str,
        direct_io: bool,
    ) -> Result<Self> {
        let img = work.join(format!("{name}.img"));
        let mnt = work.join(name);
        let _ = Command::new("umount")
            .arg(&mnt)
            .stderr(Stdio::null())
            .status();
        std::fs::create_dir_all(&mnt)?;
        let _ = std::fs::remove_file(&img);
        sh("truncate", &["-s", size, img.to_str().context("utf8")?])?;
        let img_s = img.to_str().context("utf8")?;
        match fs {
            "ext4" => sh("mkfs.ext4", &["-q", "-F", img_s])?,
            // 512-byte inodes keep a stub's xattrs inside the inode (see docs/BENCHMARKS.md).
            "ext4-i512" => sh("mkfs.ext4", &["-q", "-F", "-I", "512", img_s])?,
            "xfs" => sh("mkfs.xfs", &["-q", "-f", img_s])?,
            "btrfs" => sh("mkfs.btrfs", &["-q", "-f", img_s])?,
            other => bail!("unknown filesystem {other:?} (ext4, ext4-i512, xfs or btrfs)"),
        };
        let dio = if direct_io {
            "--direct-io=on"
        } else {
            "--direct-io=off"
        };
        let dev = sh(
            "losetup",
            &["-f", "--show", dio, img.to_str().context("utf8")?],
        )?;
        sh("mount", &[&dev, mnt.to_str().context("utf8")?])?;
        Ok(LoopFs { dev, mnt })
    }
}

impl LoopFs {
    /// Unmount and mount again: nothing of this filesystem (inodes, xattrs, data) stays
    /// cached, while other filesystems' caches are untouched.
    pub(crate) fn remount(&self) -> Result<()> {
        nix::unistd::sync();
        sh("umount", &[self.mnt.to_str().context("utf8")?])?;
        sh("mount", &[&self.dev, self.mnt.to_str().context("utf8")?])?;
        Ok(())
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// The agent, stopped with SIGTERM on drop.
pub(crate) struct Agent {
    pub(crate) child: Child,
}

impl Agent {
    pub(crate) fn start(a: &Args, tree: &Path) -> Result<Self> {
        Self::start_with(a, tree, &[])
    }

    /// Start with extra environment variables (configuration by environment).
    pub(crate) fn start_with(a: &Args, tree: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let (bin, work) = (&a.bin, &a.work);
        let ready = work.join("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let log = File::create(work.join("agent.log"))?;
        let mut cmd = Command::new(bin.join("hsm"));
        if let Some(cfg) = &a.agent_config {
            cmd.arg("--config").arg(cfg);
        }
        let child = cmd
            .args(["agent", tree.to_str().context("utf8")?, "--ready-file"])
            .arg(&ready)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(log)
            .spawn()
            .context("starting hsm agent")?;
        let mut agent = Agent { child };
        for _ in 0..200 {
            if ready.exists() {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                bail!("hsm agent exited during start-up: {status}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("hsm agent not ready after 5 s")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub(crate) fn populate(bin: &Path, src: &Path, dst: &Path) -> Result<Duration> {
    let t = Instant::now();
    let status = Command::new(bin.join("hsm"))
        .args(["populate", "--no-progress"])
        .arg(src)
        .arg(dst)
        .env("RUST_LOG", "error")
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "hsm populate failed: {status}");
    Ok(t.elapsed())
}

/// Fill a file with incompressible, non-zero data (zero pages would be skipped by fills).
pub(crate) fn write_random(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut left = bytes;
    while left > 0 {
        rng.fill(&mut buf[..]);
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Read a whole file sequentially with 128 KiB reads (what cat and cp do).
pub(crate) fn read_all(path: &Path) -> Result<u64> {
    let mut f = File::open(path).with_context(|| path.display().to_string())?;
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

pub(crate) struct Line {
    pub(crate) name: &'static str,
    pub(crate) hsm: f64,
    pub(crate) base: f64,
    pub(crate) unit: &'static str,
    pub(crate) ratio: f64,
    pub(crate) goal: f64,
    pub(crate) at_most: bool,
    pub(crate) detail: String,
    /// Printed for information; not one of the goals.
    pub(crate) info: bool,
}

impl Line {
    pub(crate) fn met(&self) -> bool {
        if self.at_most {
            self.ratio <= self.goal
        } else {
            self.ratio >= self.goal
        }
    }
}

pub(crate) fn print_line(l: &Line) {
    println!(
        "{:<44} hsm {:>9.3} {:<3} baseline {:>9.3} {:<3} ratio {:>5.2}x  goal {} {:.2}x  {}   {}",
        l.name,
        l.hsm,
        l.unit,
        l.base,
        l.unit,
        l.ratio,
        if l.at_most { "<=" } else { ">=" },
        l.goal,
        if l.info {
            "info"
        } else if l.met() {
            "met"
        } else {
            "MISSED"
        },
        l.detail
    );
}
