//! hsm's BPF programs and their loader.
//!
//! - The **guard** (`src/bpf/guard.bpf.c`, BPF LSM) fails data access to a stub with EIO
//!   when no agent will serve it, instead of letting readers see the holes as zeros. It is
//!   pinned under [`PIN_DIR`] so it outlives the agent that installed it.
//! - The **fastpath** (`src/bpf/fastpath.bpf.c`) is a struct_ops handler for the fanotify
//!   fastpath interface proposed upstream in late 2024. No released kernel has it; it is
//!   loaded only when the running kernel's BTF declares the type.
//!
//! Both share one classifier (`src/bpf/hsm_classify.bpf.h`) and one header of layouts with
//! this crate (`src/bpf/hsm_shared.h`; the Rust types are generated from the programs' BTF).
//! Support is probed before loading: an unsupported kernel is an expected outcome that the
//! caller reports once and works around (see docs/BPF.md).

mod ctl;
pub mod fastpath;
pub mod guard;
mod libbpf_log;
mod pins;
mod skel;
mod verify;

use std::path::Path;

pub use guard::{
    GuardInstall, GuardReadiness, GuardRemoved, GuardStatus, HolderKind, Registration,
    install as install_guard, readiness as guard_readiness, remove as remove_guard,
    status as guard_status, try_load as try_load_guard,
};

/// Where the guard's programs and maps are pinned (a directory in bpffs).
pub const PIN_DIR: &str = "/sys/fs/bpf/hsm";

/// Why a BPF feature cannot be used here. Always an expected outcome, never a crash.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel lacks what the program needs (BPF LSM inactive, no BTF, no hook).
    #[error("{0}")]
    Unsupported(String),
    /// The kernel has it, but refused to load or attach the program.
    #[error("{what}: {source}{log}")]
    Load {
        what: String,
        #[source]
        source: libbpf_rs::Error,
        /// The last lines libbpf printed (verifier log), if any.
        log: String,
    },
    /// Something about the pins or maps in bpffs is wrong.
    #[error("{path}: {source}")]
    Pin {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_MAC_ADMIN).
    #[error("{0}")]
    Permission(String),
}

impl BpfError {
    pub(crate) fn load(what: impl Into<String>, source: libbpf_rs::Error) -> Self {
        BpfError::Load {
            what: what.into(),
            source,
            log: libbpf_log::tail(),
        }
    }

    pub(crate) fn pin(path: &Path, source: std::io::Error) -> Self {
        BpfError::Pin {
            path: path.display().to_string(),
            source,
        }
    }
}

/// What the running kernel offers for the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsmProbe {
    /// `bpf` is listed in `/sys/kernel/security/lsm`.
    pub bpf_lsm_active: bool,
    /// `/sys/kernel/btf/vmlinux` exists (CO-RE and LSM attach need it).
    pub btf: bool,
    /// The kernel has the `bpf_get_file_xattr` kfunc the classifier calls.
    pub xattr_kfunc: bool,
}

impl LsmProbe {
    /// Reads what the kernel advertises; loads nothing.
    pub fn read() -> Self {
        ensure_securityfs();
        let bpf_lsm_active = std::fs::read_to_string("/sys/kernel/security/lsm")
            .map(|s| s.trim().split(',').any(|l| l == "bpf"))
            .unwrap_or(false);
        let vmlinux = skel::vmlinux_btf();
        let btf = vmlinux.is_some();
        let xattr_kfunc = vmlinux
            .as_ref()
            .is_some_and(|b| skel::btf_has_func(b, "bpf_get_file_xattr"));
        LsmProbe {
            bpf_lsm_active,
            btf,
            xattr_kfunc,
        }
    }

    /// Why the guard cannot be loaded here, judging by what the kernel advertises.
    pub fn missing(&self) -> Option<String> {
        if !self.btf {
            return Some("the kernel has no BTF (/sys/kernel/btf/vmlinux is missing)".into());
        }
        if !self.bpf_lsm_active {
            return Some(
                "BPF LSM is not active ('bpf' is missing from /sys/kernel/security/lsm; \
                 add it to the lsm= boot parameter)"
                    .into(),
            );
        }
        if !self.xattr_kfunc {
            return Some(
                "the kernel lacks the bpf_get_file_xattr kfunc (Linux 6.8 or newer)".into(),
            );
        }
        None
    }
}

/// Mount securityfs on /sys/kernel/security if nothing is there (as systemd does at boot;
/// minimal systems and some VMs skip it), so the list of active LSMs can be read. Best
/// effort: without root it stays unmounted and the probe reports BPF LSM inactive.
fn ensure_securityfs() {
    let dir = Path::new("/sys/kernel/security");
    if dir.join("lsm").exists() || !nix::unistd::geteuid().is_root() {
        return;
    }
    let _ = nix::mount::mount(
        Some("securityfs"),
        dir,
        Some("securityfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
}

/// Is `path` on a mounted bpffs?
fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mount bpffs on /sys/fs/bpf if nothing is mounted there (as systemd does at boot).
pub(crate) fn ensure_bpffs() -> Result<(), BpfError> {
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpfError::pin(root, std::io::Error::from(e)))?;
    if is_bpffs(root) {
        Ok(())
    } else {
        Err(BpfError::Unsupported(
            "/sys/fs/bpf is not a bpffs mount and mounting one failed".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_explains_itself() {
        let p = LsmProbe::read();
        if let Some(why) = p.missing() {
            assert!(!why.is_empty());
        } else {
            assert!(p.bpf_lsm_active && p.btf && p.xattr_kfunc);
        }
    }
}
