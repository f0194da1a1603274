//! `hsm doctor`: what this kernel and its filesystems can do, and what the agent will use.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::ExitCode;

use hsm_bpf::GuardReadiness;
use hsm_kernel::fanotify::{FAN_PRE_ACCESS, Group, GroupOptions, MarkTarget};
use hsm_kernel::sys::Mount;

/// Pseudo filesystems that never hold stubs; listing them would only bury the answer.
const PSEUDO: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "bpf",
    "pstore",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "nsfs",
    "rpc_pipefs",
    "ramfs",
];

/// Mounted filesystems that could hold stubs, one per device.
fn mounts() -> Vec<Mount> {
    let mut seen = HashSet::new();
    hsm_kernel::sys::mounts()
        .into_iter()
        .filter(|m| !PSEUDO.contains(&m.fstype.as_str()) && seen.insert(m.dev.clone()))
        .collect()
}

/// Why a filesystem cannot take pre-content marks.
#[derive(Debug)]
enum FsRefusal {
    /// The filesystem type does not support them (EOPNOTSUPP).
    Unsupported,
    /// The kernel refused the event type (EINVAL).
    NoPreAccess,
    Other(hsm_kernel::KernelError),
}

impl std::fmt::Display for FsRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsRefusal::Unsupported => f.write_str("this filesystem type does not support them"),
            FsRefusal::NoPreAccess => f.write_str("the kernel refused FAN_PRE_ACCESS"),
            FsRefusal::Other(e) => e.fmt(f),
        }
    }
}

/// Can this filesystem raise pre-content events? Probed with an inode mark on the mount
/// point directory, which raises no events for the files below it (so nothing can block
/// on this short-lived group), then removed.
fn probe_fs(group: &Group, m: &Mount) -> Result<(), FsRefusal> {
    match group.add_mark(MarkTarget::Inode, FAN_PRE_ACCESS, &m.point) {
        Ok(()) => {
            let _ = group.remove_mark(MarkTarget::Inode, FAN_PRE_ACCESS, &m.point);
            Ok(())
        }
        Err(e) => Err(match e.errno() {
            Some(libc::EOPNOTSUPP) => FsRefusal::Unsupported,
            Some(libc::EINVAL) => FsRefusal::NoPreAccess,
            _ => FsRefusal::Other(e),
        }),
    }
}

/// What `hsm doctor` found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every probe ran and the agent can serve here.
    CanServe,
    /// Every probe ran and the agent refuses to start here.
    CannotServe,
    /// Not root: the probes that decide it were not run (the report names them).
    NotProbed,
}

/// The report, and what it concluded.
pub fn report() -> (String, Verdict) {
    let mut out = String::new();
    let root = nix::unistd::geteuid().is_root();
    let new_enough = kernel_section(&mut out, root);
    let any_fs = filesystems_section(&mut out, root);
    let (guard_ok, fastpath_ok) = bpf_section(&mut out);
    if !root {
        let _ = writeln!(
            out,
            "agent will use: unknown: not root (uid {}), so these probes did not run: \
             creating a fanotify pre-content group, a pre-content mark on each filesystem \
             above, and loading the stub guard. Run `hsm doctor` as root.",
            nix::unistd::geteuid()
        );
        return (out, Verdict::NotProbed);
    }
    let can_serve = new_enough && any_fs;
    plan_section(&mut out, can_serve, new_enough, fastpath_ok, guard_ok);
    let verdict = if can_serve {
        Verdict::CanServe
    } else {
        Verdict::CannotServe
    };
    (out, verdict)
}

/// Write the kernel line (and the not-root note); whether it has pre-content events.
fn kernel_section(out: &mut String, root: bool) -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let version = hsm_kernel::sys::kernel_version();
    let new_enough = version.is_some_and(|v| v >= (6, 14));
    let _ = writeln!(
        out,
        "kernel:      {release}: {}",
        if new_enough {
            "has fanotify pre-content events (6.14 or newer)"
        } else {
            "NO fanotify pre-content events (they need Linux 6.14 or newer)"
        }
    );
    if !root {
        let _ = writeln!(
            out,
            "note:        not root: fanotify and BPF cannot be probed; this report is incomplete and exits 2"
        );
    }
    new_enough
}

/// Write the fanotify group line and one line per filesystem; whether any takes marks.
fn filesystems_section(out: &mut String, root: bool) -> bool {
    let mut any_fs = false;
    let group = if root {
        match Group::new(GroupOptions::default()) {
            Ok(g) => {
                let _ = writeln!(out, "fanotify:    pre-content group: ok");
                Some(g)
            }
            Err(e) => {
                let _ = writeln!(out, "fanotify:    pre-content group refused: {e}");
                None
            }
        }
    } else {
        None
    };
    let _ = writeln!(
        out,
        "filesystems (pre-content events per mounted filesystem):"
    );
    for m in mounts() {
        let verdict = match &group {
            Some(g) => match probe_fs(g, &m) {
                Ok(()) => {
                    any_fs = true;
                    "yes".to_string()
                }
                Err(why) => format!("no ({why})"),
            },
            None => "unknown (not probed)".into(),
        };
        let _ = writeln!(
            out,
            "  {:<28} {:<8} {:<7} {verdict}",
            m.point.display(),
            m.fstype,
            m.dev
        );
    }
    drop(group);
    any_fs
}

/// Write the BPF LSM, stub guard and fastpath lines; whether the guard and the fastpath
/// are usable.
fn bpf_section(out: &mut String) -> (bool, bool) {
    let lsm = hsm_bpf::LsmProbe::read();
    let _ = writeln!(
        out,
        "bpf lsm:     active: {}; kernel BTF: {}; bpf_get_file_xattr: {}",
        yes(lsm.bpf_lsm_active),
        yes(lsm.btf),
        yes(lsm.xattr_kfunc)
    );
    let readiness = hsm_bpf::guard_readiness();
    let guard_line = match &readiness {
        GuardReadiness::Installed => "installed (pinned at ".to_string() + hsm_bpf::PIN_DIR + ")",
        GuardReadiness::Unknown => "unknown (not root)".into(),
        GuardReadiness::Loadable => "loadable (not installed; the agent installs it)".into(),
        GuardReadiness::Unavailable(e) => format!("unavailable: {e}"),
    };
    let guard_ok = readiness.usable();
    let _ = writeln!(
        out,
        "stub guard:  {}",
        guard_line.replace('\n', "\n             ")
    );
    let fastpath = hsm_bpf::fastpath::probe();
    let _ = writeln!(
        out,
        "fastpath:    {}",
        match &fastpath {
            Ok(()) => "hook present: the agent loads the handler".to_string(),
            Err(why) => format!("absent: {why}"),
        }
    );
    (guard_ok, fastpath.is_ok())
}

/// Write what the agent will use here, or why it refuses to start.
fn plan_section(
    out: &mut String,
    can_serve: bool,
    new_enough: bool,
    fastpath_ok: bool,
    guard_ok: bool,
) {
    let _ = writeln!(out, "agent will use:");
    if can_serve {
        let _ = writeln!(
            out,
            "  - fanotify FAN_PRE_ACCESS marks on the filesystems of the trees it serves"
        );
        let _ = writeln!(
            out,
            "  - {}",
            if fastpath_ok {
                "the BPF fastpath handler, and ignore marks, for files that are not stubs"
            } else {
                "ignore marks for files that are not stubs (no fastpath hook)"
            }
        );
        let _ = writeln!(
            out,
            "  - {}",
            if guard_ok {
                "the stub guard: stubs nobody serves fail with EIO"
            } else {
                "no stub guard: a stub read while no agent runs returns zeros"
            }
        );
    } else {
        let _ = writeln!(
            out,
            "  nothing: the agent refuses to start here{}",
            if new_enough {
                " (no mounted filesystem accepts pre-content marks)"
            } else {
                " (the kernel has no pre-content events; stubs would read as zeros)"
            }
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `hsm doctor`: print the report; exit 0 when the agent can serve here, 1 when it cannot,
/// 2 when not run as root.
pub fn run() -> anyhow::Result<ExitCode> {
    let (text, verdict) = report();
    print!("{text}");
    Ok(match verdict {
        Verdict::CanServe => ExitCode::SUCCESS,
        Verdict::CannotServe => ExitCode::FAILURE,
        Verdict::NotProbed => {
            eprintln!(
                "hsm: doctor needs root: as a user it cannot probe fanotify or BPF, so it \
                 cannot tell whether the agent can serve here"
            );
            ExitCode::from(2)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_the_root_filesystem() {
        assert!(
            mounts()
                .iter()
                .any(|m| m.point == std::path::Path::new("/"))
        );
    }
}
