//! An OCI runtime spec (`config.json` for runc or crun) from an image config: the process
//! the image says to run, in a read-only root, with the namespaces, mounts, capabilities
//! and limits `runc spec` writes by default, and no network.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::error::OciError;

/// The parts of an image config (OCI `config.json` or Docker's image JSON) a runtime spec
/// needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The capabilities `runc spec` gives a container.
pub const DEFAULT_CAPS: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    pub oci_version: String,
    pub process: Process,
    pub root: Root,
    pub hostname: String,
    pub mounts: Vec<Mount>,
    pub linux: Linux,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    pub terminal: bool,
    pub user: User,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub capabilities: Capabilities,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Root {
    pub path: String,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    pub namespaces: Vec<Namespace>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub kind: String,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Mount {
    Mount {
        destination: destination.into(),
        kind: kind.into(),
        source: source.into(),
        options: strings(options),
    }
}

/// The spec for the image whose config is `config` (the bytes of `.hsm-image.json`), with
/// its root at `rootfs` (a populated stub tree). `args` replace the image's Cmd.
pub fn runtime_spec(
    config: &[u8],
    rootfs: &Path,
    args: Option<&[String]>,
) -> Result<Spec, OciError> {
    let image = ImageConfig::parse(config).map_err(|e| OciError::BadJson {
        file: ".hsm-image.json".into(),
        what: "image config",
        detail: e.to_string(),
    })?;
    let c = image.config.unwrap_or_default();
    let root = std::path::absolute(rootfs)
        .map_err(|e| OciError::Spec(format!("{}: {e}", rootfs.display())))?;
    let root_str = root
        .to_str()
        .ok_or_else(|| OciError::Spec(format!("{}: not valid UTF-8", root.display())))?
        .to_string();

    let mut process_args = c.entrypoint.clone().unwrap_or_default();
    match args {
        Some(a) => process_args.extend(a.iter().cloned()),
        None => process_args.extend(c.cmd.clone().unwrap_or_default()),
    }
    if process_args.is_empty() {
        return Err(OciError::Spec(
            "the image has no Entrypoint or Cmd: give the command after `--`".into(),
        ));
    }
    let mut env = c.env.clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let cwd = match c.working_dir.as_deref() {
        None | Some("") => "/".to_string(),
        Some(d) if d.starts_with('/') => d.to_string(),
        Some(d) => format!("/{d}"),
    };
    let user = resolve_user(c.user.as_deref().unwrap_or(""), &root)?;
    let caps = strings(&DEFAULT_CAPS);
    Ok(Spec {
        oci_version: "1.0.2".into(),
        process: Process {
            terminal: false,
            user,
            args: process_args,
            env,
            cwd,
            capabilities: Capabilities {
                bounding: caps.clone(),
                effective: caps.clone(),
                permitted: caps,
            },
            rlimits: vec![Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 1024,
                soft: 1024,
            }],
            no_new_privileges: true,
        },
        root: Root {
            path: root_str,
            readonly: true,
        },
        hostname: "hsm".into(),
        mounts: default_mounts(),
        linux: default_linux(),
    })
}

/// The mounts every container gets: /proc, /dev and its parts, and a read-only /sys.
fn default_mounts() -> Vec<Mount> {
    vec![
        mount("/proc", "proc", "proc", &[]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
    ]
}

/// The Linux section: the namespaces to unshare and the /proc and /sys paths to hide or
/// make read-only.
fn default_linux() -> Linux {
    Linux {
        namespaces: ["pid", "network", "ipc", "uts", "mount"]
            .iter()
            .map(|k| Namespace { kind: (*k).into() })
            .collect(),
        masked_paths: strings(&[
            "/proc/acpi",
            "/proc/asound",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ]),
        readonly_paths: strings(&[
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]),
    }
}

/// Read `rel` inside `root` as if `root` were `/`: symlinks in the image resolve inside it.
/// `None` when the file does not exist.
fn read_in_root(root: &Path, rel: &str) -> Result<Option<String>, OciError> {
    let dir = std::fs::File::open(root)
        .map_err(|e| OciError::Spec(format!("{}: {e}", root.display())))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match openat2(dir.as_fd(), rel, how) {
        Ok(fd) => {
            let mut s = String::new();
            std::fs::File::from(fd)
                .read_to_string(&mut s)
                .map_err(|e| OciError::Spec(format!("{}/{rel}: {e}", root.display())))?;
            Ok(Some(s))
        }
        Err(nix::errno::Errno::ENOENT) => Ok(None),
        Err(e) => Err(OciError::Spec(format!("{}/{rel}: {e}", root.display()))),
    }
}

/// Field `field` (0-based) of the line of a passwd/group file whose field `key_field`
/// is `key`.
fn lookup(file: &str, key_field: usize, key: &str, field: usize) -> Option<String> {
    file.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.get(key_field) == Some(&key))
        .and_then(|f| f.get(field).map(|s| s.to_string()))
}

/// `USER[:GROUP]` of an image config to numeric ids; names are looked up in the image's
/// `/etc/passwd` and `/etc/group`. A user without a group gets its primary group (0 for a
/// uid the passwd file does not list).
pub fn resolve_user(spec: &str, root: &Path) -> Result<User, OciError> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd_path = root.join("etc/passwd");
    let group_path = root.join("etc/group");
    let mut passwd: Option<Option<String>> = None;
    let mut passwd = || -> Result<Option<String>, OciError> {
        if passwd.is_none() {
            passwd = Some(read_in_root(root, "etc/passwd")?);
        }
        Ok(passwd.clone().flatten())
    };
    let (uid, primary) = if u.is_empty() {
        (0, Some(0))
    } else if let Ok(uid) = u.parse::<u32>() {
        let primary = passwd()?
            .and_then(|p| lookup(&p, 2, u, 3))
            .and_then(|g| g.parse().ok());
        (uid, primary)
    } else {
        let p = passwd()?.unwrap_or_default();
        let unknown = || OciError::UnknownUser {
            name: u.to_string(),
            file: passwd_path.clone(),
        };
        let uid = lookup(&p, 0, u, 2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(unknown)?;
        let gid = lookup(&p, 0, u, 3).and_then(|s| s.parse().ok());
        (uid, gid)
    };
    let gid = match g {
        None | Some("") => primary.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let groups = read_in_root(root, "etc/group")?.unwrap_or_default();
                lookup(&groups, 0, g, 2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| OciError::UnknownGroup {
                        name: g.to_string(),
                        file: group_path.clone(),
                    })?
            }
        },
    };
    Ok(User { uid, gid })
}
