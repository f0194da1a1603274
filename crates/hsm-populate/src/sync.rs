//! One directory of DST brought in line with SRC: what is gone is removed, subdirectories
//! are walked in parallel, and each leaf (symlink, file, special) is synced.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::dst::{self, FileId};
use crate::place::{Slot, place_file, prepare_slot, remove_entry};
use crate::source::{FileInfo, Kind, SourceEntry};
use crate::{Ctx, DeferredLink, human_bytes, inc, lock};

/// Sync directory `rel`, which must still be the directory `expect` that populate created
/// or found there: one swapped in for it since (by a user who can write its parent) is
/// neither written into nor, later, given SRC's owner and mode.
pub(crate) fn sync_dir<'s>(
    ctx: &'s Ctx<'s>,
    scope: &rayon::Scope<'s>,
    rel: PathBuf,
    expect: FileId,
) {
    let dir = match dst::open_beneath(ctx.root.as_fd(), &rel)
        .and_then(|d| dst::check_same(d.as_fd(), rel.as_os_str(), expect, "directory").map(|_| d))
    {
        Ok(d) => d,
        Err(e) => return ctx.error(&rel, e),
    };
    let entries = match ctx.source.list(&rel) {
        Ok(e) => e,
        Err(e) => return ctx.error(&rel, e),
    };
    let existing: HashSet<OsString> = match dst::read_names(dir.as_fd()) {
        Ok(n) => n.into_iter().collect(),
        Err(e) => return ctx.error(&rel, e),
    };
    let wanted: HashSet<&OsStr> = entries.iter().map(|e| e.name.as_os_str()).collect();
    for name in &existing {
        if !wanted.contains(name.as_os_str()) {
            remove_entry(ctx, dir.as_fd(), &rel.join(name), name);
        }
    }
    let mut leaves = Vec::new();
    for e in entries {
        if e.kind == Kind::Dir {
            let child = rel.join(&e.name);
            ctx.tick();
            let id = match prepare_slot(
                ctx,
                dir.as_fd(),
                &child,
                &e.name,
                libc::S_IFDIR,
                existing.contains(&e.name),
            ) {
                Slot::Blocked => {
                    ctx.warn(
                        &child,
                        "the directory could not be made here; nothing of SRC below it was created",
                    );
                    continue;
                }
                Slot::Existing(st) => FileId::of(&st),
                Slot::Free => match dst::ensure_dir(dir.as_fd(), &e.name) {
                    Ok(created) => match dst::new_dir_id(dir.as_fd(), &e.name, created) {
                        Ok(id) => {
                            if created {
                                inc(&ctx.stats.dirs_created);
                            }
                            id
                        }
                        Err(err) => {
                            ctx.error(&child, err);
                            continue;
                        }
                    },
                    Err(err) => {
                        ctx.error(&child, err);
                        continue;
                    }
                },
            };
            lock(&ctx.dirs).push((child.clone(), e.attrs, id));
            scope.spawn(move |s| sync_dir(ctx, s, child, id));
        } else {
            leaves.push(e);
        }
    }
    leaves.par_iter().for_each(|e| {
        ctx.tick();
        let present = existing.contains(&e.name);
        sync_leaf(ctx, dir.as_fd(), &rel.join(&e.name), e, present);
    });
    if ctx.stats.entries.load(Ordering::Relaxed) % 64 == 0 {
        ctx.progress
            .set_message(human_bytes(ctx.stats.bytes.load(Ordering::Relaxed)));
    }
}

fn sync_leaf(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &Path, e: &SourceEntry, present: bool) {
    match &e.kind {
        Kind::Dir => {}
        Kind::Special(what) => {
            inc(&ctx.stats.skipped_special);
            ctx.warn(
                rel,
                &format!("skipping {what}: special files are not populated"),
            );
        }
        Kind::Symlink { target } => {
            match prepare_slot(ctx, dir, rel, &e.name, libc::S_IFLNK, present) {
                Slot::Blocked => {}
                slot => match dst::ensure_symlink(
                    dir,
                    &e.name,
                    target,
                    &e.attrs,
                    matches!(slot, Slot::Existing(_)),
                ) {
                    Ok(_) => inc(&ctx.stats.symlinks),
                    Err(err) => ctx.error(rel, err),
                },
            }
        }
        Kind::File(info) => sync_file(ctx, dir, rel, e, info, present),
    }
}

fn sync_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    e: &SourceEntry,
    info: &FileInfo,
    present: bool,
) {
    ctx.stats.bytes.fetch_add(info.size, Ordering::Relaxed);
    let Some(id) = info.link_id else {
        place_file(ctx, dir, rel, e, info, present);
        return;
    };
    {
        let mut primaries = lock(&ctx.link_primary);
        if primaries.contains_key(&id) {
            drop(primaries);
            lock(&ctx.deferred_links).push(DeferredLink {
                rel: rel.to_path_buf(),
                id,
                entry: e.clone(),
            });
            return;
        }
        primaries.insert(id, None);
    }
    match place_file(ctx, dir, rel, e, info, present) {
        // The other names become links to this inode, and only while it stands here.
        Some(placed) => {
            lock(&ctx.link_primary).insert(id, Some((rel.to_path_buf(), placed)));
        }
        // Nothing of SRC's stands here (kept local, refused, failed): other names of this
        // file must not be linked to it; one of them becomes the stub instead.
        None => {
            lock(&ctx.link_primary).remove(&id);
        }
    }
}
