//! Placing one file in DST: making room for it (removing only what populate manages unless
//! `force`), then creating or replacing its stub, or leaving an unchanged one alone.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use crate::dst::{self, ExistingFile, StubSpec};
use crate::source::{FileInfo, SourceEntry};
use crate::{Ctx, inc};

/// The slot a source entry wants in DST.
pub(crate) enum Slot {
    Free,
    Existing(hsm_kernel::stat::FileStat),
    Blocked,
}

/// Put the stub for `e` at `rel`. Returns whether a stub (or a file already matching SRC)
/// stands there afterwards.
pub(crate) fn place_file(
    ctx: &Ctx<'_>,
    dir: BorrowedFd<'_>,
    rel: &Path,
    e: &SourceEntry,
    info: &FileInfo,
    present: bool,
) -> bool {
    let key = match &info.key {
        Ok(k) => k.clone(),
        Err(why) => {
            ctx.error(rel, why);
            return false;
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
        Slot::Blocked => return false,
        Slot::Free => false,
        Slot::Existing(st) => match dst::classify_file(dir, &e.name) {
            Err(err) => {
                ctx.error(rel, err);
                return false;
            }
            Ok(ExistingFile::Stub { meta, .. })
                if meta.remote_url == spec.url
                    && meta.etag == spec.etag
                    && meta.version == spec.version
                    && meta.remote_size == spec.size
                    && (meta.key == spec.key
                        || (info.link_id.is_some()
                            && ctx.source.current_etag(&meta.key) == spec.etag)) =>
            {
                if !dst::attrs_match(&st, &spec.attrs) {
                    if let Err(err) = dst::apply_attrs_at(dir, &e.name, &spec.attrs, false) {
                        ctx.error(rel, err);
                        return false;
                    }
                }
                inc(&ctx.stats.stubs_unchanged);
                return true;
            }
            Ok(
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_),
            ) => true,
            Ok(ExistingFile::Stub { modified: true, .. }) if !ctx.opts.force => {
                inc(&ctx.stats.kept_local);
                ctx.warn(
                    rel,
                    "stub was written locally and SRC changed; kept (use --force to replace)",
                );
                return false;
            }
            Ok(ExistingFile::Stub { modified: true, .. }) => true,
            Ok(ExistingFile::Plain) => {
                if st.size == spec.size && dst::same_mtime(st.mtime, spec.attrs.mtime) {
                    inc(&ctx.stats.files_unchanged);
                    return true;
                }
                if !ctx.opts.force {
                    inc(&ctx.stats.kept_local);
                    ctx.warn(rel, "local file differs from SRC and is not a stub; kept (use --force to replace)");
                    return false;
                }
                true
            }
        },
    };
    match dst::create_stub(dir, &e.name, &spec, replace) {
        Ok(()) if spec.size == 0 => inc(&ctx.stats.empty_files),
        Ok(()) if replace => inc(&ctx.stats.stubs_replaced),
        Ok(()) => inc(&ctx.stats.stubs_created),
        Err(err) => {
            ctx.error(rel, err);
            return false;
        }
    }
    true
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
pub(crate) fn remove_entry(ctx: &Ctx<'_>, dir: BorrowedFd<'_>, rel: &Path, name: &OsStr) -> bool {
    let st = match dst::lookup(dir, name) {
        Ok(Some(st)) => st,
        Ok(None) => return true,
        Err(err) => {
            ctx.error(rel, err);
            return false;
        }
    };
    let removable = if st.is_dir() {
        if st.dev != ctx.root_dev {
            inc(&ctx.stats.kept_local);
            ctx.warn(
                rel,
                "another filesystem is mounted here; not descending into it",
            );
            return false;
        }
        let child = match dst::open_child_dir(dir, name) {
            Ok(c) => c,
            Err(e) => {
                ctx.error(rel, dst::op_error("open", rel.as_os_str(), e));
                return false;
            }
        };
        let names = match dst::read_names(child.as_fd()) {
            Ok(n) => n,
            Err(err) => {
                ctx.error(rel, err);
                return false;
            }
        };
        let mut all = true;
        for n in names {
            all &= remove_entry(ctx, child.as_fd(), &rel.join(&n), &n);
        }
        return all
            && match dst::rmdir(dir, name) {
                Ok(true) => {
                    inc(&ctx.stats.removed);
                    true
                }
                Ok(false) => false,
                Err(err) => {
                    ctx.error(rel, err);
                    false
                }
            };
    } else if st.is_symlink() {
        true
    } else if st.is_file() {
        match dst::classify_file(dir, name) {
            Ok(
                ExistingFile::Stub {
                    modified: false, ..
                }
                | ExistingFile::BrokenStub(_),
            ) => true,
            Ok(ExistingFile::Stub { modified: true, .. } | ExistingFile::Plain) => ctx.opts.force,
            Err(err) => {
                ctx.error(rel, err);
                false
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
