//! Installing, inspecting and removing the pinned guard, and registering the agent with it.
//!
//! Pins (all under [`PIN_DIR`]):
//! - `links/<program>`: one BPF link per LSM hook; while pinned, the program stays attached.
//! - `maps/<map>`: the maps the agent and `hsm guard status` read and write.
//!
//! Install pins into a private directory and renames it into place, so a reader of
//! [`PIN_DIR`] sees a complete guard or none.
//!
//! bpffs lets any user create directories (it is mode 1777), so nothing at [`PIN_DIR`] is
//! believed for its name: the directories must be root's and closed to others (see
//! [`crate::pins`]), and each pin must be the object it claims to be (a BPF link of an LSM
//! program of that name, a map of that name). What another user planted there is reported,
//! and removed by `install` and `remove`.

use std::collections::HashMap;
use std::mem::{MaybeUninit, offset_of, size_of};
use std::os::fd::AsFd;
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, ProgramType};

use hsm_kernel::sys::{process_alive, process_start};

pub use crate::ctl::HolderKind;
use crate::ctl::{
    Ctl, HOLDER_AGENT, HOLDER_KEEPER, Holder, MAX_HOLDERS, decode_ctl, encode_ctl, put_u64,
};
use crate::pins::{self, Found};
use crate::skel::guard::{GuardSkelBuilder, types};
use crate::verify::{verified_map, verify_link};
use crate::{BpfError, LsmProbe, PIN_DIR, ensure_bpffs, libbpf_log, skel};

/// Maps the guard pins, by the names in guard.bpf.c.
pub const MAPS: [&str; 5] = [
    "hsm_inodes",
    "hsm_ctl",
    "hsm_served",
    "hsm_files",
    "hsm_stats",
];

/// The guard's programs, each named once: the program (and skeleton link field) name, the
/// kernel's BTF name of the LSM hook it attaches to, and whether the guard needs it. The
/// last three are optional: without the xattr hooks a marker set or removed after a file was
/// first opened is noticed only once its cached verdict is gone; without the inode hook a
/// verdict can outlive its inode (and a reused inode number inherit it).
macro_rules! guard_programs {
    ($( $prog:ident => $hook:literal, $required:literal; )*) => {
        /// Programs (one pinned link each): name, hook, required.
        const PROGRAMS: &[(&str, &str, bool)] = &[ $( (stringify!($prog), $hook, $required) ),* ];

        /// Every program's link in the loaded skeleton, by program name.
        fn links_mut(
            links: &mut crate::skel::guard::GuardLinks,
        ) -> Vec<(&'static str, &mut Option<Link>)> {
            vec![ $( (stringify!($prog), &mut links.$prog) ),* ]
        }
    };
}

guard_programs! {
    hsm_file_open => "bpf_lsm_file_open", true;
    hsm_file_free => "bpf_lsm_file_free_security", true;
    hsm_file_permission => "bpf_lsm_file_permission", true;
    hsm_mmap_file => "bpf_lsm_mmap_file", true;
    hsm_file_truncate => "bpf_lsm_file_truncate", true;
    hsm_path_truncate => "bpf_lsm_path_truncate", true;
    hsm_post_setxattr => "bpf_lsm_inode_post_setxattr", false;
    hsm_post_removexattr => "bpf_lsm_inode_post_removexattr", false;
    hsm_inode_free => "bpf_lsm_inode_free_security", false;
}

/// Counters kept by the guard (`enum hsm_stat` in hsm_shared.h).
const STATS: [&str; 8] = [
    "classified",
    "stub_opens",
    "denied",
    "allowed",
    "files_table_full",
    "no_marker",
    "marker_unreadable",
    "last_marker_errno",
];

/// One of the guard's maps, opened through a checked pin directory.
fn open_map(name: &str) -> Result<MapHandle, BpfError> {
    let root = pins::bpffs()?;
    let maps = match pins::inspect(root.as_fd()) {
        Found::Trusted(d) => d.maps,
        Found::Untrusted(why) => return Err(BpfError::Unsupported(why.to_string())),
        Found::Absent => None,
    }
    .ok_or_else(|| BpfError::Unsupported(format!("{PIN_DIR}: the guard is not installed")))?;
    verified_map(maps.as_fd(), name)
        .map_err(|why| BpfError::Unsupported(format!("{PIN_DIR}/{why}")))
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardInstall {
    Installed {
        /// Optional hooks this kernel lacks (see `PROGRAMS`).
        skipped_hooks: Vec<String>,
        /// Something not the guard's was at [`PIN_DIR`] (planted by another user) and was
        /// removed first: what it was.
        replaced: Option<String>,
        /// Staging directories of installs that crashed, removed first.
        stale: Vec<String>,
    },
    AlreadyInstalled {
        /// Staging directories of installs that crashed, removed.
        stale: Vec<String>,
    },
}

/// What [`remove`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardRemoved {
    /// Pins of the guard removed.
    pub pins: usize,
    /// Something not the guard's was at [`PIN_DIR`] and was removed: what it was.
    pub planted: Option<String>,
    /// Staging directories of installs that crashed, removed too.
    pub stale: Vec<String>,
}

fn require_root(what: &str) -> Result<(), BpfError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(BpfError::Permission(format!(
            "{what} needs root (CAP_BPF, CAP_SYS_ADMIN and CAP_MAC_ADMIN)"
        )))
    }
}

/// Load, attach and pin the guard. An unsupported kernel is `Err(BpfError::Unsupported)`;
/// a kernel that refuses the program is `Err(BpfError::Load)` with libbpf's explanation.
///
/// (About 130 lines: load, pin into a fresh staging directory made through descriptors,
/// rename it into place never over anything, and remove the staging directory if any step
/// fails; in one piece, each step's checks sit beside the step they guard.)
pub fn install() -> Result<GuardInstall, BpfError> {
    require_root("installing the guard")?;
    if let Some(why) = LsmProbe::read().missing() {
        return Err(BpfError::Unsupported(why));
    }
    ensure_bpffs()?;
    let root = pins::bpffs()?;
    let stale = pins::sweep_stale_staging(root.as_fd())?;
    let current = status();
    if current.installed {
        return Ok(GuardInstall::AlreadyInstalled { stale });
    }
    let btf = skel::vmlinux_btf()
        .ok_or_else(|| BpfError::Unsupported("cannot read the kernel's BTF".into()))?;
    libbpf_log::start();
    let mut storage = MaybeUninit::uninit();
    let mut open = GuardSkelBuilder::default()
        .open(&mut storage)
        .map_err(|e| BpfError::load("opening the guard object", e))?;
    let mut skipped = Vec::new();
    for mut prog in open.open_object_mut().progs_mut() {
        let name = prog.name().to_string_lossy().into_owned();
        let Some(&(_, hook, required)) = PROGRAMS.iter().find(|(p, _, _)| *p == name) else {
            continue;
        };
        if !skel::btf_has_func(&btf, hook) {
            if required {
                return Err(BpfError::Unsupported(format!(
                    "the kernel has no LSM hook {hook} that the guard needs"
                )));
            }
            prog.set_autoload(false);
            skipped.push(hook.trim_start_matches("bpf_lsm_").to_string());
        }
    }
    let mut loaded = open
        .load()
        .map_err(|e| BpfError::load("loading the guard (BPF LSM)", e))?;
    loaded
        .attach()
        .map_err(|e| BpfError::load("attaching the guard to the LSM hooks", e))?;

    let mut replaced = None;
    if current.present {
        // Planted by another user, or a partial install (a crash between pins, an older
        // layout): start afresh. Only now that the guard loaded, so a kernel that refuses it
        // leaves things as they were.
        replaced = remove()?.planted;
    }
    // A fresh directory of our own (bpffs refuses names with a dot in them: EPERM), made
    // and used through descriptors: a name taken by anyone else is skipped, never entered.
    let bpffs = Path::new(pins::BPFFS);
    let mut staging = None;
    for n in 0..64 {
        let name = format!("{}{}-{n}", pins::STAGING_PREFIX, std::process::id());
        match pins::make_dir_at(root.as_fd(), &name) {
            Ok(fd) => {
                staging = Some((name, fd));
                break;
            }
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => return Err(BpfError::pin(&bpffs.join(&name), e.into())),
        }
    }
    let (staging, staging_fd) = staging.ok_or_else(|| {
        BpfError::pin(
            &bpffs.join(format!("{}*", pins::STAGING_PREFIX)),
            std::io::Error::other("no free staging name"),
        )
    })?;
    let result = (|| {
        let dir_of = |sub: &str| {
            pins::make_dir_at(staging_fd.as_fd(), sub)
                .map_err(|e| BpfError::pin(&bpffs.join(&staging).join(sub), e.into()))
        };
        let (maps_fd, links_fd) = (dir_of("maps")?, dir_of("links")?);
        for mut map in loaded.object_mut().maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            if MAPS.contains(&name.as_str()) {
                map.pin(pins::via_fd(maps_fd.as_fd(), &name))
                    .map_err(|e| BpfError::load(format!("pinning maps/{name}"), e))?;
            }
        }
        let all = links_mut(&mut loaded.links);
        for (name, link) in all {
            if let Some(link) = link.as_mut() {
                link.pin(pins::via_fd(links_fd.as_fd(), name))
                    .map_err(|e| BpfError::load(format!("pinning links/{name}"), e))?;
            }
        }
        // Never over anything: whatever appeared at the name meanwhile is looked at again.
        for _ in 0..4 {
            match pins::rename_noreplace(root.as_fd(), &staging, pins::NAME) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EEXIST) | Err(nix::errno::Errno::ENOTEMPTY) => {
                    match pins::inspect(root.as_fd()) {
                        Found::Untrusted(why) => {
                            pins::remove_all_at(root.as_fd(), pins::NAME, bpffs)?;
                            replaced = Some(why.to_string());
                        }
                        _ => {
                            return Err(BpfError::pin(
                                Path::new(PIN_DIR),
                                std::io::Error::other(
                                    "another guard appeared while this one was installed",
                                ),
                            ));
                        }
                    }
                }
                Err(e) => return Err(BpfError::pin(Path::new(PIN_DIR), e.into())),
            }
        }
        Err(BpfError::pin(
            Path::new(PIN_DIR),
            std::io::Error::other("something keeps being created at this path"),
        ))
    })();
    if let Err(e) = result {
        let _ = pins::remove_all_at(root.as_fd(), &staging, bpffs);
        return Err(e);
    }
    // Dropping the skeleton now closes our fds: the pins alone keep the guard attached,
    // so `hsm guard remove` detaches it even while this process lives on.
    drop(loaded);
    Ok(GuardInstall::Installed {
        skipped_hooks: skipped,
        replaced,
        stale,
    })
}

/// Detach and unpin the guard: links first, so the programs detach before their maps go,
/// then the directories. What another user planted at [`PIN_DIR`] is removed too, and
/// reported. Nothing there is nothing to do.
pub fn remove() -> Result<GuardRemoved, BpfError> {
    require_root("removing the guard")?;
    let root = pins::bpffs()?;
    let bpffs = Path::new(pins::BPFFS);
    let stale = pins::sweep_stale_staging(root.as_fd())?;
    match pins::inspect(root.as_fd()) {
        Found::Absent => Ok(GuardRemoved {
            stale,
            ..GuardRemoved::default()
        }),
        Found::Untrusted(why) => {
            pins::remove_all_at(root.as_fd(), pins::NAME, bpffs)?;
            Ok(GuardRemoved {
                pins: 0,
                planted: Some(why.to_string()),
                stale,
            })
        }
        Found::Trusted(dir) => {
            let top = Path::new(PIN_DIR);
            let mut pins_there = 0;
            // Links first: each program detaches before the maps it uses go.
            for (sub, fd) in [("links", &dir.links), ("maps", &dir.maps)] {
                if let Some(fd) = fd {
                    for name in pins::names(fd.as_fd()) {
                        pins_there += pins::remove_all_at(fd.as_fd(), &name, &top.join(sub))?;
                    }
                }
            }
            drop(dir);
            pins::remove_all_at(root.as_fd(), pins::NAME, bpffs)?;
            Ok(GuardRemoved {
                pins: pins_there,
                planted: None,
                stale,
            })
        }
    }
}

/// One registered holder, as `hsm guard status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderInfo {
    pub tgid: u32,
    pub kind: &'static str,
    pub alive: bool,
}

/// The guard as seen through its pins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardStatus {
    /// Something is at [`PIN_DIR`].
    pub present: bool,
    /// What is at [`PIN_DIR`] is not root's, or others may write to it: it is not the
    /// guard's (another user planted it), and why.
    pub untrusted: Option<String>,
    /// Every required link and every map is pinned, and each is the object it should be.
    pub installed: bool,
    /// Why pins that are there do not make an installed guard (or could not be checked).
    pub problems: Vec<String>,
    /// Every pin is there, but this process cannot check the objects (not root).
    pub unverified: bool,
    /// Pinned links, by program name.
    pub links: Vec<String>,
    /// Pinned maps.
    pub maps: Vec<String>,
    pub generation: u64,
    pub holders: Vec<HolderInfo>,
    /// Served filesystems as (major, minor).
    pub served: Vec<(u32, u32)>,
    /// Counter name and value, summed over CPUs.
    pub stats: Vec<(&'static str, u64)>,
}

/// Read the guard's pins and maps. Never fails: what cannot be read is absent, what is not
/// the guard's is reported. Checking the pinned objects themselves needs root.
pub fn status() -> GuardStatus {
    let mut st = GuardStatus::default();
    let root = match pins::bpffs() {
        Ok(fd) => fd,
        Err(e) => {
            st.problems.push(e.to_string());
            return st;
        }
    };
    let dir = match pins::inspect(root.as_fd()) {
        Found::Absent => return st,
        Found::Untrusted(why) => {
            st.present = true;
            st.untrusted = Some(why.to_string());
            return st;
        }
        Found::Trusted(dir) => dir,
    };
    st.present = true;
    let names = |d: &Option<std::os::fd::OwnedFd>| {
        d.as_ref()
            .map(|d| pins::names(d.as_fd()))
            .unwrap_or_default()
    };
    st.links = names(&dir.links);
    st.maps = names(&dir.maps);
    for (p, _, _) in PROGRAMS.iter().filter(|(_, _, required)| *required) {
        if !st.links.iter().any(|l| l == p) {
            st.problems.push(format!("links/{p} is missing"));
        }
    }
    for m in MAPS {
        if !st.maps.iter().any(|x| x == m) {
            st.problems.push(format!("maps/{m} is missing"));
        }
    }
    if !st.problems.is_empty() {
        return st;
    }
    if !nix::unistd::geteuid().is_root() {
        st.unverified = true;
        return st;
    }
    let (Some(links), Some(maps)) = (&dir.links, &dir.maps) else {
        return st;
    };
    let progs: HashMap<u32, (String, ProgramType)> = libbpf_rs::query::ProgInfoIter::default()
        .map(|p| (p.id, (p.name.to_string_lossy().into_owned(), p.ty)))
        .collect();
    for l in &st.links {
        if let Err(why) = verify_link(links.as_fd(), l, &progs) {
            st.problems.push(why.to_string());
        }
    }
    let mut opened: HashMap<&str, MapHandle> = HashMap::new();
    for m in MAPS {
        match verified_map(maps.as_fd(), m) {
            Ok(h) => {
                opened.insert(m, h);
            }
            Err(why) => st.problems.push(why.to_string()),
        }
    }
    st.installed = st.problems.is_empty();
    if !st.installed {
        return st;
    }
    if let Some(Ok(ctl)) = opened.get("hsm_ctl").map(read_ctl_from) {
        st.generation = ctl.generation;
        st.holders = ctl
            .holders
            .iter()
            .filter(|h| h.tgid != 0)
            .map(|h| HolderInfo {
                tgid: h.tgid,
                kind: match h.flags {
                    HOLDER_AGENT => "agent",
                    HOLDER_KEEPER => "keeper",
                    _ => "unknown",
                },
                alive: process_alive(h.tgid, h.start_ticks),
            })
            .collect();
    }
    if let Some(served) = opened.get("hsm_served") {
        st.served = served
            .keys()
            .filter_map(|k| k.try_into().ok().map(u32::from_ne_bytes))
            .map(|dev| (dev >> 20, dev & 0xfffff))
            .collect();
        st.served.sort_unstable();
    }
    if let Some(stats) = opened.get("hsm_stats") {
        for (i, name) in STATS.iter().enumerate() {
            let key = (i as u32).to_ne_bytes();
            let total = stats
                .lookup_percpu(&key, MapFlags::ANY)
                .ok()
                .flatten()
                .map(|cpus| {
                    cpus.iter()
                        .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
                        .map(u64::from_ne_bytes)
                        .sum()
                })
                .unwrap_or(0);
            st.stats.push((name, total));
        }
    }
    st
}

fn ctl_map() -> Result<MapHandle, BpfError> {
    open_map("hsm_ctl")
}

fn read_ctl() -> Result<Ctl, BpfError> {
    read_ctl_from(&ctl_map()?)
}

fn read_ctl_from(map: &MapHandle) -> Result<Ctl, BpfError> {
    let value = map
        .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
        .map_err(|e| BpfError::load("reading hsm_ctl", e))?
        .unwrap_or_default();
    Ok(decode_ctl(&value))
}

fn write_ctl(ctl: &Ctl) -> Result<(), BpfError> {
    ctl_map()?
        .update(&0u32.to_ne_bytes(), &encode_ctl(ctl), MapFlags::ANY)
        .map_err(|e| BpfError::load("writing hsm_ctl", e))
}

/// The kernel's dev_t encoding of a device number (MKDEV: major << 20 | minor), which is
/// what the guard sees in `inode->i_sb->s_dev`.
pub fn kernel_dev(dev: u64) -> u32 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (major << 20) | (minor & 0xfffff)
}

/// This process's registration with the pinned guard: while it is alive and registered,
/// stubs on the served filesystems may be read by others. Dropping it deregisters.
#[derive(Debug)]
pub struct Registration {
    tgid: u32,
    devs: Vec<u32>,
}

impl Registration {
    /// Register this process as a holder serving the filesystems with device numbers `devs`
    /// (`st_dev` values). Call it only once the fanotify marks are in place: a stub opened
    /// after registration but before the marks would be allowed and read as zeros.
    pub fn register(kind: HolderKind, devs: &[u64]) -> Result<Registration, BpfError> {
        let tgid = std::process::id();
        register_pid(kind, tgid, devs)?;
        Ok(Registration {
            tgid,
            devs: devs.iter().map(|&d| kernel_dev(d)).collect(),
        })
    }

    /// Deregister: readers of stubs on the served filesystems get EIO from now on (unless
    /// another live holder serves them).
    pub fn release(mut self) -> Result<(), BpfError> {
        self.release_inner()
    }
}

/// Register another process (the keeper) as a holder serving `devs`. It is not
/// deregistered by anyone: once it exits, the guard sees it dead.
pub fn register_other(kind: HolderKind, pid: u32, devs: &[u64]) -> Result<(), BpfError> {
    register_pid(kind, pid, devs)
}

fn register_pid(kind: HolderKind, tgid: u32, devs: &[u64]) -> Result<(), BpfError> {
    {
        // The guard compares this with the kernel's task->start_boottime.
        let start_ticks = process_start(tgid).map(|(t, _)| t).ok_or_else(|| {
            BpfError::Unsupported(format!("cannot read the start time of process {tgid}"))
        })?;
        let mut ctl = read_ctl()?;
        ctl.holders.resize(MAX_HOLDERS, Holder::default());
        let me = Holder {
            tgid,
            flags: match kind {
                HolderKind::Agent => HOLDER_AGENT,
                HolderKind::Keeper => HOLDER_KEEPER,
            },
            start_ticks,
        };
        let slot = ctl
            .holders
            .iter()
            .position(|h| h.tgid == tgid)
            .or_else(|| ctl.holders.iter().position(|h| h.tgid == 0))
            .or_else(|| {
                ctl.holders
                    .iter()
                    .position(|h| !process_alive(h.tgid, h.start_ticks))
            })
            .ok_or_else(|| {
                BpfError::Unsupported(format!(
                    "the guard already has {MAX_HOLDERS} live holders registered"
                ))
            })?;
        ctl.holders[slot] = me;
        ctl.generation += 1;
        let served = open_map("hsm_served")?;
        let mut value = vec![0u8; size_of::<types::hsm_served>()];
        put_u64(
            &mut value,
            offset_of!(types::hsm_served, generation),
            ctl.generation,
        );
        let devs: Vec<u32> = devs.iter().map(|&d| kernel_dev(d)).collect();
        for dev in &devs {
            served
                .update(&dev.to_ne_bytes(), &value, MapFlags::ANY)
                .map_err(|e| BpfError::load("writing hsm_served", e))?;
        }
        write_ctl(&ctl)?;
        Ok(())
    }
}

impl Registration {
    fn release_inner(&mut self) -> Result<(), BpfError> {
        if self.tgid == 0 {
            return Ok(());
        }
        let mut ctl = read_ctl()?;
        for h in ctl.holders.iter_mut().filter(|h| h.tgid == self.tgid) {
            *h = Holder::default();
        }
        let others_alive = ctl
            .holders
            .iter()
            .any(|h| process_alive(h.tgid, h.start_ticks));
        write_ctl(&ctl)?;
        if !others_alive {
            if let Ok(served) = open_map("hsm_served") {
                for dev in &self.devs {
                    let _ = served.delete(&dev.to_ne_bytes());
                }
            }
        }
        self.tgid = 0;
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = self.release_inner();
    }
}

/// Load the guard into the kernel and unload it at once (nothing attached or pinned):
/// the honest answer to "would install work here?", used by `hsm doctor`.
pub fn try_load() -> Result<(), BpfError> {
    require_root("loading the guard")?;
    if let Some(why) = LsmProbe::read().missing() {
        return Err(BpfError::Unsupported(why));
    }
    libbpf_log::start();
    let mut storage = MaybeUninit::uninit();
    let open = GuardSkelBuilder::default()
        .open(&mut storage)
        .map_err(|e| BpfError::load("opening the guard object", e))?;
    let loaded = open
        .load()
        .map_err(|e| BpfError::load("loading the guard (BPF LSM)", e))?;
    drop(loaded);
    Ok(())
}

/// Whether the guard protects, or can protect, stubs on this machine.
#[derive(Debug)]
pub enum GuardReadiness {
    /// Pinned and complete.
    Installed,
    /// Not installed, but it loads here: the agent installs it.
    Loadable,
    /// Not installed, and this process cannot tell whether it would load (not root).
    Unknown,
    /// Not installed, and it cannot be loaded here (why).
    Unavailable(BpfError),
}

impl GuardReadiness {
    /// Whether stubs nobody serves will fail with EIO (the guard is or will be in place).
    pub fn usable(&self) -> bool {
        matches!(self, GuardReadiness::Installed | GuardReadiness::Loadable)
    }
}

/// Is the guard installed, or could it be? When it is not installed and this process is
/// root, it is loaded and unloaded at once ([`try_load`]) to find out.
pub fn readiness() -> GuardReadiness {
    if status().installed {
        return GuardReadiness::Installed;
    }
    if !nix::unistd::geteuid().is_root() {
        return GuardReadiness::Unknown;
    }
    match try_load() {
        Ok(()) => GuardReadiness::Loadable,
        Err(e) => GuardReadiness::Unavailable(e),
    }
}

#[cfg(test)]
mod tests;
