//! What runs once the walk is done: the deferred hard links, then directory attributes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;

use rayon::prelude::*;

use crate::dst::{self, DstError, ExistingFile, FileId};
use crate::place::place_file;
use crate::source::{Attrs, Kind};
use crate::{Ctx, DeferredLink, inc, lock};

fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or(OsStr::new(".")),
    )
}

/// Second and later names of hard-linked source files become hard links to the first; if
/// no stub stands for the first (a local file was kept there, say), one of them becomes it.
/// Every name that ends up without its link is an error naming it (a filesystem's limit of
/// links to one file, `EMLINK`, included): none is left out silently.
pub(crate) fn finish_links(ctx: &Ctx<'_>) {
    let links = std::mem::take(&mut *lock(&ctx.deferred_links));
    let mut groups: HashMap<(u64, u64), Vec<DeferredLink>> = HashMap::new();
    for l in links {
        groups.entry(l.id).or_default().push(l);
    }
    let groups: Vec<((u64, u64), Vec<DeferredLink>)> = groups.into_iter().collect();
    groups.par_iter().for_each(|(id, names)| {
        let mut primary = lock(&ctx.link_primary).get(id).cloned().flatten();
        for DeferredLink { rel, entry, .. } in names {
            match &primary {
                Some((p, pid)) => match link_to(ctx, p, *pid, rel) {
                    Ok(()) => inc(&ctx.stats.hard_links),
                    Err(e) => ctx.error(rel, e),
                },
                None => {
                    let Kind::File(info) = &entry.kind else {
                        continue;
                    };
                    let (parent, _) = split(rel);
                    let placed = match dst::open_beneath(ctx.root.as_fd(), parent) {
                        Ok(dir) => {
                            let present = dst::lookup(dir.as_fd(), &entry.name)
                                .ok()
                                .flatten()
                                .is_some();
                            place_file(ctx, dir.as_fd(), rel, entry, info, present)
                        }
                        Err(e) => {
                            ctx.error(rel, e);
                            None
                        }
                    };
                    if let Some(pid) = placed {
                        primary = Some((rel.clone(), pid));
                    }
                }
            }
        }
    });
}

/// Link `fd` (an open file) as `name` in `dir`: the link is made to the inode populate
/// checked, never to whatever a name resolves to by then.
fn link_fd(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    match nix::unistd::linkat(fd, "", dir, name, AtFlags::AT_EMPTY_PATH) {
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; /proc's link to the descriptor does not.
        Err(Errno::ENOENT) => {
            let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
            nix::unistd::linkat(
                nix::fcntl::AT_FDCWD,
                proc.as_str(),
                dir,
                name,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        }
        r => r,
    }
}

/// The error for a failed link of `rel` to `primary`.
fn link_error(primary: &Path, e: Errno) -> DstError {
    match e {
        Errno::EMLINK => dst::op_error(
            "link to",
            primary.as_os_str(),
            "the filesystem allows no more links to one file (EMLINK); this name is not created",
        ),
        e => dst::op_error("link to", primary.as_os_str(), e),
    }
}

/// Make `rel` a hard link to `primary` (both relative to DST), which must still be the inode
/// `pid` populate placed there.
fn link_to(ctx: &Ctx<'_>, primary: &Path, pid: FileId, rel: &Path) -> Result<(), DstError> {
    let (pdir, pname) = split(primary);
    let (ndir, nname) = split(rel);
    let pfd = dst::open_beneath(ctx.root.as_fd(), pdir)?;
    let nfd = dst::open_beneath(ctx.root.as_fd(), ndir)?;
    let (target_fd, target) = match dst::open_file(pfd.as_fd(), pname) {
        Ok(t) => t,
        Err(dst::DstError::Op { source, .. })
            if source
                .downcast_ref::<Errno>()
                .is_some_and(|e| *e == Errno::ENOENT) =>
        {
            return Err(DstError::LinkTargetMissing(primary.to_path_buf()));
        }
        Err(e) => return Err(e),
    };
    if FileId::of(&target) != pid {
        return Err(DstError::Swapped(primary.to_path_buf(), "file"));
    }
    if let Some(existing) = dst::lookup(nfd.as_fd(), nname)? {
        if FileId::of(&existing) == pid {
            return Ok(()); // already linked
        }
        let managed = existing.is_symlink()
            || (existing.is_file()
                && matches!(
                    dst::classify_file(nfd.as_fd(), nname)?.0,
                    ExistingFile::Stub {
                        modified: false,
                        ..
                    } | ExistingFile::BrokenStub(_)
                ));
        if !managed && !ctx.opts.force {
            inc(&ctx.stats.kept_local);
            ctx.warn(
                rel,
                "local file is in the way of a hard link; kept (use --force)",
            );
            return Ok(());
        }
        if existing.is_dir() {
            return Err(DstError::DirectoryInTheWay);
        }
        let tmp = dst::temp_name(nname);
        link_fd(target_fd.as_fd(), nfd.as_fd(), tmp.as_os_str())
            .map_err(|e| link_error(primary, e))?;
        return nix::fcntl::renameat(nfd.as_fd(), tmp.as_os_str(), nfd.as_fd(), nname).map_err(
            |e| {
                let _ = nix::unistd::unlinkat(
                    nfd.as_fd(),
                    tmp.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
                dst::op_error("rename", nname, e)
            },
        );
    }
    link_fd(target_fd.as_fd(), nfd.as_fd(), nname).map_err(|e| link_error(primary, e))
}

/// Directory owners, modes and times last, deepest first: creating children changes a
/// directory's mtime, and a read-only mode must not stop us creating them. Each is set only
/// on the directory populate made or walked there (see [`dst::apply_dir_attrs`]).
pub(crate) fn finish_dirs(ctx: &Ctx<'_>, root_attrs: &Attrs) {
    let mut dirs = std::mem::take(&mut *lock(&ctx.dirs));
    dirs.sort_by_key(|(rel, _, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, attrs, id) in &dirs {
        let (parent, name) = split(rel);
        let result = dst::open_beneath(ctx.root.as_fd(), parent)
            .and_then(|p| dst::apply_dir_attrs(p.as_fd(), name, attrs, *id));
        if let Err(e) = result {
            ctx.error(rel, e);
        }
    }
    if let Err(e) = dst::apply_attrs_fd(ctx.root.as_fd(), root_attrs) {
        ctx.error(Path::new("."), format!("set attributes of DST: {e}"));
    }
}
