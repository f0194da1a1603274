//! Placing one file in DST: making room for it (removing only what populate manages unless
//! `force`), then creating or replacing its stub, or leaving an unchanged one alone.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use hsm_kernel::stat::FileStat;

use crate::dst::{self, ExistingFile, FileId, StubSpec};
use crate::source::{FileInfo, SourceEntry};
use crate::{Ctx, inc};

/// The slot a source entry wants in DST.
pub(crate) enum Slot {
    Free,
    Existing(hsm_kernel::stat::FileStat),
    Blocked,
}

/// Put the stub for `e` at `rel`. Returns the inode standing there afterwards when it is a
/// stub of SRC's file or a file already matching it (`None`: nothing of SRC's is there).
///
/// An existing file is opened once: whether it is a stub, whether it matches, and the
/// owner, mode and times set on it all go through that descriptor. A file a user swaps in
/// for the stub's name meanwhile is at worst classified (as a local file, kept); it is never
/// the one chowned or chmodded.
pub(crate) fn place_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    e: &SourceEntry,
    info: &FileInfo,
    present: bool,
) -> Option<FileId> {
    let key = match &info.key {
        Ok(k) => k.clone(),
        Err(why) => {
            ctx.error(rel, why);
            return None;
        }
    };
    let spec = StubSpec {
        url: ctx.source.url().to_string(),
        key,
        size: info.size,
        etag: info.etag.clone(),
        version: info.version.clone(),
        attrs: e.attrs,
        holes: if info.maybe_sparse {
            ctx.source.holes(rel, info.size)
        } else {
            Vec::new()
        },
        min_granule_shift: ctx
            .opts
            .min_granule_shift
            .max(ctx.source.min_granule_shift()),
        integrity: info.integrity.clone(),
    };
    let replace = match prepare_slot(ctx, dir, rel, &e.name, libc::S_IFREG, present) {
        Slot::Blocked => return None,
        Slot::Free => false,
        Slot::Existing(_) => {
            let classified = dst::open_file(dir, &e.name).and_then(|(fd, st)| {
                dst::classify_fd(fd.as_fd(), &e.name).map(|kind| (fd, st, kind))
            });
            let (fd, st, kind) = match classified {
                Ok(c) => c,
                Err(err) => {
                    ctx.error(rel, err);
                    return None;
                }
            };
            match kind {
                ExistingFile::Stub { meta, .. }
                    if meta.remote_url == spec.url
                        && meta.etag == spec.etag
                        && meta.version == spec.version
                        && meta.remote_size == spec.size
                        && (meta.key == spec.key
                            || (info.link_id.is_some()
                                && ctx.source.current_etag(&meta.key) == spec.etag)) =>
                {
                    if !dst::attrs_match(&st, &spec.attrs) {
                        if let Err(err) = dst::apply_attrs_fd(fd.as_fd(), &spec.attrs) {
                            ctx.error(rel, dst::op_error("set attributes of", &e.name, err));
                            return None;
                        }
                    }
                    inc(&ctx.stats.stubs_unchanged);
                    return Some(FileId::of(&st));
                }
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_) => true,
                ExistingFile::Stub { modified: true, .. } if !ctx.opts.force => {
                    inc(&ctx.stats.kept_local);
                    ctx.warn(
                        rel,
                        "stub was written locally and SRC changed; kept (use --force to replace)",
                    );
                    return None;
                }
                ExistingFile::Stub { modified: true, .. } => true,
                ExistingFile::Plain => {
                    if st.size == spec.size && dst::same_mtime(st.mtime, spec.attrs.mtime) {
                        inc(&ctx.stats.files_unchanged);
                        return Some(FileId::of(&st));
                    }
                    if !ctx.opts.force {
                        inc(&ctx.stats.kept_local);
                        ctx.warn(rel, "local file differs from SRC and is not a stub; kept (use --force to replace)");
                        return None;
                    }
                    true
                }
            }
        }
    };
    match dst::create_stub(dir, &e.name, &spec, replace, ctx.index.as_ref()) {
        Ok(id) => {
            if spec.size == 0 {
                inc(&ctx.stats.empty_files)
            } else if replace {
                inc(&ctx.stats.stubs_replaced)
            } else {
                inc(&ctx.stats.stubs_created)
            }
            Some(id)
        }
        Err(err) => {
            ctx.error(rel, err);
            None
        }
    }
}

/// Make room for an entry of type `want` at `name`, removing what populate manages and
/// refusing (without `force`) to remove what it does not.
pub(crate) fn prepare_slot(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    name: &OsStr,
    want: u32,
    present: bool,
) -> Slot {
    if !present {
        return Slot::Free;
    }
    let st = match dst::lookup(dir, name) {
        Ok(Some(st)) => st,
        Ok(None) => return Slot::Free,
        Err(err) => {
            ctx.error(rel, err);
            return Slot::Blocked;
        }
    };
    if st.file_type() == want {
        return Slot::Existing(st);
    }
    // A different kind is in the way.
    if remove_entry(ctx, dir, rel, name) {
        Slot::Free
    } else {
        ctx.warn(
            rel,
            "exists with another type and holds local files; not replaced (use --force)",
        );
        Slot::Blocked
    }
}

/// Remove `name` if populate manages it (stubs, symlinks, directories of such), or always
/// with `force`. Returns whether it is gone.
///
/// A directory is removed depth first without recursion (a tree a user made may be
/// arbitrarily deep) and holding two descriptors at most: each directory is entered from
/// its parent's descriptor without following a symlink, and left through its `..`, which
/// must be the directory it was entered from (else a user moved it, and the removal stops
/// there with an error). Nothing on another filesystem is entered.
pub(crate) fn remove_entry(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &Path, name: &OsStr) -> bool {
    let st = match dst::lookup(dir, name) {
        Ok(Some(st)) => st,
        Ok(None) => return true,
        Err(err) => {
            ctx.error(rel, err);
            return false;
        }
    };
    if st.is_dir() {
        remove_tree(ctx, dir, rel, name, &st)
    } else {
        remove_leaf(ctx, dir, rel, name, &st)
    }
}

/// A directory being removed: its name in its parent, its inode, the names in it still
/// to visit, and whether everything visited so far is gone.
struct Frame {
    name: OsString,
    id: FileId,
    pending: Vec<OsString>,
    all: bool,
}

/// Open the directory `name` (`st` from the lookup of it) in `dir` and list it, unless it
/// is on another filesystem or is no longer the directory looked up.
fn enter(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    name: &OsStr,
    st: &FileStat,
) -> Option<(OwnedFd, Frame)> {
    if st.dev != ctx.root_dev {
        inc(&ctx.stats.kept_local);
        ctx.warn(
            rel,
            "another filesystem is mounted here; not descending into it",
        );
        return None;
    }
    let id = FileId::of(st);
    let opened = dst::open_child_dir(dir, name)
        .map_err(|e| dst::op_error("open", name, e))
        .and_then(|fd| dst::check_same(fd.as_fd(), name, id, "directory").map(|_| fd))
        .and_then(|fd| dst::read_names(fd.as_fd()).map(|names| (fd, names)));
    match opened {
        Ok((fd, pending)) => Some((
            fd,
            Frame {
                name: name.to_os_string(),
                id,
                pending,
                all: true,
            },
        )),
        Err(err) => {
            ctx.error(rel, err);
            None
        }
    }
}

fn remove_tree(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    name: &OsStr,
    st: &FileStat,
) -> bool {
    let top = match hsm_kernel::stat::fstatx(dir) {
        Ok(st) => FileId::of(&st),
        Err(e) => {
            ctx.error(rel, dst::op_error("stat parent of", name, e));
            return false;
        }
    };
    let Some((mut cur, frame)) = enter(ctx, dir, rel, name, st) else {
        return false;
    };
    let mut stack = vec![frame];
    // The path of the directory `cur` is (for messages).
    let mut path = rel.to_path_buf();
    loop {
        let Some(frame) = stack.last_mut() else {
            return false;
        };
        if let Some(n) = frame.pending.pop() {
            path.push(&n);
            let gone = match dst::lookup(cur.as_fd(), &n) {
                Ok(None) => true,
                Err(err) => {
                    ctx.error(&path, err);
                    false
                }
                Ok(Some(cst)) if cst.is_dir() => match enter(ctx, cur.as_fd(), &path, &n, &cst) {
                    Some((child, child_frame)) => {
                        stack.push(child_frame);
                        cur = child;
                        continue; // `path` now names `cur`
                    }
                    None => false,
                },
                Ok(Some(cst)) => remove_leaf(ctx, cur.as_fd(), &path, &n, &cst),
            };
            frame.all &= gone;
            path.pop();
            continue;
        }
        // Everything in `cur` visited: leave it through its `..` and remove it.
        let Some(done) = stack.pop() else {
            return false;
        };
        let parent_id = stack.last().map_or(top, |f| f.id);
        let parent = match dst::open_child_dir(cur.as_fd(), OsStr::new("..")) {
            Ok(p) => p,
            Err(e) => {
                ctx.error(&path, dst::op_error("open", OsStr::new(".."), e));
                return false;
            }
        };
        if let Err(err) = dst::check_same(parent.as_fd(), path.as_os_str(), parent_id, "directory")
        {
            // Moved elsewhere by someone while it was being emptied: stop here.
            ctx.error(&path, format!("moved while being removed; stopped ({err})"));
            return false;
        }
        let removed = done.all
            && match dst::rmdir(parent.as_fd(), &done.name) {
                Ok(true) => {
                    inc(&ctx.stats.removed);
                    true
                }
                Ok(false) => false,
                Err(err) => {
                    ctx.error(&path, err);
                    false
                }
            };
        path.pop();
        match stack.last_mut() {
            Some(f) => {
                f.all &= removed;
                cur = parent;
            }
            None => return removed,
        }
    }
}

/// Remove the non-directory `name` (`st` from its lookup) if populate manages it: a
/// symlink, a stub not written locally; anything else only with `force`. The file is
/// classified through one descriptor; the unlink itself can only go by name (a user who
/// swaps their own file in at that moment has it removed from a directory they can write,
/// which they could do themselves).
fn remove_leaf(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    name: &OsStr,
    st: &FileStat,
) -> bool {
    let removable = if st.is_symlink() {
        true
    } else if st.is_file() {
        match dst::classify_file(dir, name) {
            Ok((
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_),
                _,
            )) => true,
            Ok((ExistingFile::Stub { modified: true, .. } | ExistingFile::Plain, _)) => {
                ctx.opts.force
            }
            Err(err) => {
                ctx.error(rel, err);
                return false;
            }
        }
    } else {
        ctx.opts.force
    };
    if !removable {
        inc(&ctx.stats.kept_local);
        ctx.warn(
            rel,
            "not in SRC and not a stub; kept (use --force to remove)",
        );
        return false;
    }
    match dst::unlink(dir, name) {
        Ok(()) => {
            inc(&ctx.stats.removed);
            true
        }
        Err(err) => {
            ctx.error(rel, err);
            false
        }
    }
}
