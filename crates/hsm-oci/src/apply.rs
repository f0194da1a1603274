//! Applying layer tar streams, in order, into a staging root, without ever following a
//! symlink: every directory is reached one component at a time with `openat2`
//! (`RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`), and every change is made relative to the
//! descriptor of the entry's parent.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fchmod, fstatat, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};

use crate::error::{EntryProblem, OciError};

/// A path inside the image, as its components.
type Comps = Vec<OsString>;

/// Lexically normalise a tar entry path: `./a//b/` is `a/b`; `a/../b` is `b`; a `..` that
/// would climb above the root, and any absolute path, are refused.
pub(crate) fn normalize(raw: &[u8]) -> Result<Comps, EntryProblem> {
    if raw.first() == Some(&b'/') {
        return Err(EntryProblem::Absolute);
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(EntryProblem::Escapes);
                }
            }
            name => out.push(OsStr::from_bytes(name).to_os_string()),
        }
    }
    Ok(out)
}

fn show(comps: &[OsString]) -> String {
    let v: Vec<_> = comps.iter().map(|c| c.to_string_lossy()).collect();
    v.join("/")
}

fn sys(op: &'static str) -> impl Fn(Errno) -> EntryProblem {
    move |errno| EntryProblem::Sys { op, errno }
}

/// Open directory `name` of `dir`, refusing symlinks.
fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat2(
        dir,
        name,
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH),
    )
}

/// The file type of `name` in `dir` (not following a symlink), or `None` if absent.
fn file_type_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<SFlag>, EntryProblem> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(
            st.st_mode & SFlag::S_IFMT.bits(),
        ))),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(sys("stat")(e)),
    }
}

fn list(dir: BorrowedFd<'_>) -> Result<Vec<OsString>, Errno> {
    let fd = openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut d = Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

/// Remove `name` from `dir`, a directory with everything below it; absent is fine.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() {
        let sub = open_dir_at(dir, name)?;
        for n in list(sub.as_fd())? {
            remove_at(sub.as_fd(), &n)?;
        }
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
    }
}

/// What the tar header (and its PAX records) say about an entry.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: TimeSpec,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, EntryProblem> {
    let bad = |e: std::io::Error| EntryProblem::Read(e.to_string());
    let h = entry.header();
    let mode = h.mode().map_err(bad)? & 0o7777;
    let uid = h.uid().map_err(bad)?;
    let gid = h.gid().map_err(bad)?;
    let mut mtime = TimeSpec::new(h.mtime().map_err(bad)? as i64, 0);
    let uid = u32::try_from(uid).map_err(|_| EntryProblem::BadOwner(uid))?;
    let gid = u32::try_from(gid).map_err(|_| EntryProblem::BadOwner(gid))?;
    let mut xattrs = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(bad)? {
        for ext in exts {
            let ext = ext.map_err(bad)?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            } else if key == "mtime" {
                if let Some(t) = ext.value().ok().and_then(parse_pax_time) {
                    mtime = t;
                }
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
        xattrs,
    })
}

/// A PAX time, `SECONDS[.FRACTION]`.
fn parse_pax_time(s: &str) -> Option<TimeSpec> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    if sec < 0 {
        return None;
    }
    let mut nsec: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nsec += i64::from(c.to_digit(10)?) * 10i64.pow(8 - i as u32);
    }
    Some(TimeSpec::new(sec, nsec))
}

/// Owner, mode and xattrs on an open file or directory (in this order: chown clears
/// setuid bits and capabilities).
fn set_attrs(fd: BorrowedFd<'_>, m: &Meta) -> Result<(), EntryProblem> {
    fchown(fd, Some(Uid::from_raw(m.uid)), Some(Gid::from_raw(m.gid))).map_err(sys("chown"))?;
    fchmod(fd, Mode::from_bits_truncate(m.mode)).map_err(sys("chmod"))?;
    for (name, value) in &m.xattrs {
        hsm_kernel::xattr::fset(fd, name, value, hsm_kernel::xattr::SetMode::Any).map_err(|e| {
            EntryProblem::Sys {
                op: "setxattr",
                errno: e.errno().map_or(Errno::EIO, Errno::from_raw),
            }
        })?;
    }
    Ok(())
}

/// Applies layers into the staging root.
#[derive(Debug)]
pub(crate) struct Stager {
    root: OwnedFd,
    /// Paths the current layer created (an opaque directory keeps these).
    created: HashSet<Comps>,
    /// Directory mtimes, set once every layer is in (children change them).
    dir_times: HashMap<Comps, TimeSpec>,
    pub skipped_special: u64,
    pub entries: u64,
    pub symlink_xattrs_dropped: u64,
}

impl Stager {
    pub fn new(root: OwnedFd) -> Self {
        Stager {
            root,
            created: HashSet::new(),
            dir_times: HashMap::new(),
            skipped_special: 0,
            entries: 0,
            symlink_xattrs_dropped: 0,
        }
    }

    /// Apply one layer's tar stream.
    pub fn apply_archive<R: Read>(
        &mut self,
        layer: usize,
        digest: &str,
        archive: &mut tar::Archive<R>,
    ) -> Result<(), OciError> {
        self.created.clear();
        let corrupt = |e: std::io::Error| OciError::Archive {
            layer,
            digest: digest.to_string(),
            detail: e.to_string(),
        };
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            let raw = entry.path_bytes().into_owned();
            self.apply_entry(&mut entry)
                .map_err(|problem| OciError::Entry {
                    layer,
                    digest: digest.to_string(),
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                    problem,
                })?;
            self.entries += 1;
        }
        Ok(())
    }

    /// Open directory `comps` below the root, one component at a time, never through a
    /// symlink. Missing directories are created (0755, root) when `create`, else `None`.
    fn walk(&mut self, comps: &[OsString], create: bool) -> Result<Option<OwnedFd>, EntryProblem> {
        let mut cur = self
            .root
            .try_clone()
            .map_err(|e| EntryProblem::Read(e.to_string()))?;
        for (i, c) in comps.iter().enumerate() {
            let next = match open_dir_at(cur.as_fd(), c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    mkdirat(cur.as_fd(), c.as_os_str(), Mode::from_bits_truncate(0o755))
                        .map_err(sys("mkdir"))?;
                    self.created.insert(comps[..=i].to_vec());
                    open_dir_at(cur.as_fd(), c).map_err(sys("open directory"))?
                }
                Err(Errno::ENOENT) => return Ok(None),
                // A symlink gives ELOOP or ENOTDIR (O_DIRECTORY is checked first).
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let parent = show(&comps[..=i]);
                    return Err(if file_type_at(cur.as_fd(), c)? == Some(SFlag::S_IFLNK) {
                        EntryProblem::SymlinkParent { parent }
                    } else {
                        EntryProblem::ParentNotDir { parent }
                    });
                }
                Err(e) => return Err(sys("open directory")(e)),
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Remove everything below `dir` (at `path`) that this layer did not create.
    fn opaque(&self, path: &[OsString], dir: BorrowedFd<'_>) -> Result<(), EntryProblem> {
        for name in list(dir).map_err(sys("list directory"))? {
            let mut child = path.to_vec();
            child.push(name.clone());
            if !self.created.contains(&child) {
                remove_at(dir, &name).map_err(sys("remove"))?;
            } else if file_type_at(dir, &name)? == Some(SFlag::S_IFDIR) {
                let sub = open_dir_at(dir, &name).map_err(sys("open directory"))?;
                self.opaque(&child, sub.as_fd())?;
            }
        }
        Ok(())
    }

    /// Apply one tar entry: dispatch on its path (root, whiteout, other) and its type.
    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), EntryProblem> {
        use tar::EntryType as T;
        let et = entry.header().entry_type();
        if et.is_pax_global_extensions() {
            return Ok(());
        }
        let comps = normalize(&entry.path_bytes())?;
        let Some((name, parent)) = comps.split_last() else {
            return self.apply_root(entry, et);
        };
        // Whiteouts remove from the layers below; they are never created.
        if let Some(rest) = name.as_bytes().strip_prefix(b".wh.") {
            return self.apply_whiteout(name, parent, rest);
        }
        let meta = read_meta(entry)?;
        let dir = self
            .walk(parent, true)?
            .ok_or(EntryProblem::Read("parent vanished".into()))?;
        let dir = dir.as_fd();
        let existing = file_type_at(dir, name)?;
        match et {
            T::Directory => {
                if existing != Some(SFlag::S_IFDIR) {
                    if existing.is_some() {
                        remove_at(dir, name).map_err(sys("remove"))?;
                    }
                    mkdirat(dir, name.as_os_str(), Mode::from_bits_truncate(0o700))
                        .map_err(sys("mkdir"))?;
                }
                let fd = open_dir_at(dir, name).map_err(sys("open directory"))?;
                set_attrs(fd.as_fd(), &meta)?;
                self.dir_times.insert(comps.clone(), meta.mtime);
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                write_regular(entry, dir, name, existing, &meta)?;
            }
            T::Symlink => {
                write_symlink(entry, dir, name, existing, &meta)?;
                if !meta.xattrs.is_empty() {
                    self.symlink_xattrs_dropped += 1;
                }
            }
            T::Link => {
                if !self.write_hard_link(entry, &comps, dir, name, existing)? {
                    return Ok(());
                }
            }
            T::Char | T::Block | T::Fifo => {
                // Stub trees have no device nodes or FIFOs; what this entry replaces goes.
                if existing.is_some() {
                    remove_at(dir, name).map_err(sys("remove"))?;
                }
                self.skipped_special += 1;
            }
            other => return Err(EntryProblem::UnsupportedType(other.as_byte() as char)),
        }
        self.created.insert(comps);
        Ok(())
    }

    /// Apply the entry for the root itself ("./"): only its attributes.
    fn apply_root<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        et: tar::EntryType,
    ) -> Result<(), EntryProblem> {
        if !et.is_dir() {
            return Err(EntryProblem::RootNotDir);
        }
        let meta = read_meta(entry)?;
        set_attrs(self.root.as_fd(), &meta)?;
        self.dir_times.insert(Vec::new(), meta.mtime);
        Ok(())
    }

    /// Apply whiteout `name` (`.wh.` + `rest`) in `parent`: remove from the layers below.
    fn apply_whiteout(
        &mut self,
        name: &OsString,
        parent: &[OsString],
        rest: &[u8],
    ) -> Result<(), EntryProblem> {
        let Some(dir) = self.walk(parent, false)? else {
            return Ok(());
        };
        if rest == b".wh..opq" {
            return self.opaque(parent, dir.as_fd());
        }
        if rest.is_empty() || rest == b"." || rest == b".." {
            return Err(EntryProblem::BadWhiteout {
                name: name.to_string_lossy().into_owned(),
            });
        }
        remove_at(dir.as_fd(), OsStr::from_bytes(rest)).map_err(sys("remove"))
    }

    /// Make hard link `name` in `dir` to the entry's target; `false` if it names itself.
    fn write_hard_link<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        comps: &Comps,
        dir: BorrowedFd<'_>,
        name: &OsString,
        existing: Option<SFlag>,
    ) -> Result<bool, EntryProblem> {
        let raw = entry
            .link_name_bytes()
            .ok_or(EntryProblem::Read("hard link without a target".into()))?
            .into_owned();
        let target = String::from_utf8_lossy(&raw).into_owned();
        let tcomps = normalize(&raw).map_err(|_| EntryProblem::HardLinkOutside {
            target: target.clone(),
        })?;
        let Some((tname, tparent)) = tcomps.split_last() else {
            return Err(EntryProblem::HardLinkToDir { target });
        };
        let Some(tdir) = self.walk(tparent, false)? else {
            return Err(EntryProblem::HardLinkMissing { target });
        };
        match file_type_at(tdir.as_fd(), tname)? {
            None => return Err(EntryProblem::HardLinkMissing { target }),
            Some(SFlag::S_IFDIR) => return Err(EntryProblem::HardLinkToDir { target }),
            Some(_) => {}
        }
        if tcomps == *comps {
            return Ok(false);
        }
        if existing.is_some() {
            remove_at(dir, name).map_err(sys("remove"))?;
        }
        linkat(
            tdir.as_fd(),
            tname.as_os_str(),
            dir,
            name.as_os_str(),
            AtFlags::empty(),
        )
        .map_err(sys("link"))?;
        Ok(true)
    }

    /// Give every directory the mtime its last entry said, deepest first.
    pub fn finish(&mut self) {
        let mut dirs: Vec<(Comps, TimeSpec)> = self.dir_times.drain().collect();
        dirs.sort_by_key(|(c, _)| Reverse(c.len()));
        for (comps, t) in dirs {
            if let Ok(Some(fd)) = self.walk(&comps, false) {
                let _ = futimens(fd.as_fd(), &t, &t);
            }
        }
    }
}

/// Write regular file `name` in `dir` from the entry's data, replacing what is there.
fn write_regular<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    existing: Option<SFlag>,
    meta: &Meta,
) -> Result<(), EntryProblem> {
    if existing.is_some() {
        remove_at(dir, name).map_err(sys("remove"))?;
    }
    let fd = openat(
        dir,
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(sys("create"))?;
    let mut f = File::from(fd);
    std::io::copy(entry, &mut f).map_err(|e| EntryProblem::Read(e.to_string()))?;
    set_attrs(f.as_fd(), meta)?;
    futimens(f.as_fd(), &meta.mtime, &meta.mtime).map_err(sys("set times"))?;
    Ok(())
}

/// Make symlink `name` in `dir` to the entry's target, owned and timed as the entry says.
fn write_symlink<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dir: BorrowedFd<'_>,
    name: &OsStr,
    existing: Option<SFlag>,
    meta: &Meta,
) -> Result<(), EntryProblem> {
    let target = entry
        .link_name_bytes()
        .ok_or(EntryProblem::Read("symlink without a target".into()))?
        .into_owned();
    if existing.is_some() {
        remove_at(dir, name).map_err(sys("remove"))?;
    }
    symlinkat(OsStr::from_bytes(&target), dir, name).map_err(sys("symlink"))?;
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys("chown"))?;
    utimensat(
        dir,
        name,
        &meta.mtime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(sys("set times"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_or_are_refused() {
        let n = |s: &str| normalize(s.as_bytes()).map(|c| show(&c));
        assert_eq!(n("./a//b/"), Ok("a/b".into()));
        assert_eq!(n("a/../b"), Ok("b".into()));
        assert_eq!(n("./"), Ok(String::new()));
        assert_eq!(n("../x"), Err(EntryProblem::Escapes));
        assert_eq!(n("a/../../x"), Err(EntryProblem::Escapes));
        assert_eq!(n("/etc/passwd"), Err(EntryProblem::Absolute));
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time("1700000000.25"),
            Some(TimeSpec::new(1_700_000_000, 250_000_000))
        );
        assert_eq!(parse_pax_time("12"), Some(TimeSpec::new(12, 0)));
        assert_eq!(parse_pax_time("x"), None);
    }
}
