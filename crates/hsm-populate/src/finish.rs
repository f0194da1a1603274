//! What runs once the walk is done: the deferred hard links, then directory attributes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::Path;

use rayon::prelude::*;

use crate::dst::{self, DstError, ExistingFile};
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
pub(crate) fn finish_links(ctx: &Ctx<'_>) {
    let links = std::mem::take(&mut *lock(&ctx.deferred_links));
    let mut groups: HashMap<(u64, u64), Vec<DeferredLink>> = HashMap::new();
    for l in links {
        groups.entry(l.id).or_default().push(l);
    }
    let groups: Vec<((u64, u64), Vec<DeferredLink>)> = groups.into_iter().collect();
    groups.par_iter().for_each(|(id, names)| {
        let mut primary = lock(&ctx.link_primary).get(id).cloned();
        for DeferredLink { rel, entry, .. } in names {
            match &primary {
                Some(p) => match link_to(ctx, p, rel) {
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
                            false
                        }
                    };
                    if placed {
                        primary = Some(rel.clone());
                    }
                }
            }
        }
    });
}

/// Make `rel` a hard link to `primary` (both relative to DST).
fn link_to(ctx: &Ctx<'_>, primary: &Path, rel: &Path) -> Result<(), DstError> {
    let (pdir, pname) = split(primary);
    let (ndir, nname) = split(rel);
    let pfd = dst::open_beneath(ctx.root.as_fd(), pdir)?;
    let nfd = dst::open_beneath(ctx.root.as_fd(), ndir)?;
    let target = dst::lookup(pfd.as_fd(), pname)?
        .ok_or_else(|| DstError::LinkTargetMissing(primary.to_path_buf()))?;
    if let Some(existing) = dst::lookup(nfd.as_fd(), nname)? {
        if existing.ino == target.ino && existing.dev == target.dev {
            return Ok(()); // already linked
        }
        let managed = existing.is_symlink()
            || (existing.is_file()
                && matches!(
                    dst::classify_file(nfd.as_fd(), nname)?,
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
        nix::unistd::linkat(
            pfd.as_fd(),
            pname,
            nfd.as_fd(),
            tmp.as_os_str(),
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(|e| dst::op_error("link", &tmp, e))?;
        return nix::fcntl::renameat(nfd.as_fd(), tmp.as_os_str(), nfd.as_fd(), nname)
            .map_err(|e| dst::op_error("rename", nname, e));
    }
    nix::unistd::linkat(
        pfd.as_fd(),
        pname,
        nfd.as_fd(),
        nname,
        nix::fcntl::AtFlags::empty(),
    )
    .map_err(|e| dst::op_error("link to", primary.as_os_str(), e))
}

/// Directory owners, modes and times last, deepest first: creating children changes a
/// directory's mtime, and a read-only mode must not stop us creating them.
pub(crate) fn finish_dirs(ctx: &Ctx<'_>, root_attrs: &Attrs) {
    let mut dirs = std::mem::take(&mut *lock(&ctx.dirs));
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
    for (rel, attrs) in &dirs {
        let (parent, name) = split(rel);
        let result = dst::open_beneath(ctx.root.as_fd(), parent)
            .and_then(|p| dst::apply_attrs_at(p.as_fd(), name, attrs, true));
        if let Err(e) = result {
            ctx.error(rel, e);
        }
    }
    if let Err(e) = dst::apply_attrs_fd(ctx.root.as_fd(), root_attrs) {
        ctx.error(Path::new("."), format!("set attributes of DST: {e}"));
    }
}
