//! Publish's walk of SRC: what the manifest will list, in walk order.

use std::collections::HashMap;
use std::path::PathBuf;

use tracing::warn;

use super::entry_error;
use crate::source::{Attrs, Kind, LocalSource, Source};
use crate::{EntryError, PopulateError};

/// One entry of the tree, in walk order.
pub(super) enum Item {
    Dir,
    Symlink(String),
    /// Index into the file table.
    File(usize),
    /// Another name of the file at this index.
    Link(usize),
}

pub(super) struct WalkedFile {
    pub(super) rel: String,
    pub(super) size: u64,
    pub(super) attrs: Attrs,
}

pub(super) struct Walk {
    pub(super) root: Attrs,
    pub(super) items: Vec<(String, Item, Attrs)>,
    pub(super) files: Vec<WalkedFile>,
    pub(super) skipped_special: u64,
    pub(super) errors: Vec<EntryError>,
}

/// Walk SRC (no following of symlinks), collecting what the manifest will list.
pub(super) fn walk(src: &LocalSource) -> Result<Walk, PopulateError> {
    let root = src.root_attrs()?;
    let mut w = Walk {
        root,
        items: Vec::new(),
        files: Vec::new(),
        skipped_special: 0,
        errors: Vec::new(),
    };
    let mut links: HashMap<(u64, u64), usize> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let list = match src.list(&dir) {
            Ok(l) => l,
            Err(e) => {
                w.errors
                    .push(entry_error(dir.display().to_string(), e.to_string()));
                continue;
            }
        };
        let mut subdirs = Vec::new();
        for e in list {
            let rel_path = dir.join(&e.name);
            let Some(rel) = rel_path.to_str().map(str::to_string) else {
                w.errors.push(entry_error(
                    rel_path.to_string_lossy(),
                    "name is not valid UTF-8; manifest paths and object keys must be",
                ));
                continue;
            };
            if dir.as_os_str().is_empty() && rel.starts_with(".hsm-") {
                w.errors.push(entry_error(
                    &rel,
                    "names starting with .hsm- at the top are reserved for hsm's own files",
                ));
                continue;
            }
            if let Err(why) = hsm_manifest::check_path(&rel) {
                w.errors.push(entry_error(&rel, why.to_string()));
                continue;
            }
            match e.kind {
                Kind::Dir => {
                    w.items.push((rel, Item::Dir, e.attrs));
                    subdirs.push(rel_path);
                }
                Kind::Symlink { target } => match target.into_string() {
                    Ok(t) => w.items.push((rel, Item::Symlink(t), e.attrs)),
                    Err(_) => w
                        .errors
                        .push(entry_error(&rel, "symlink target is not valid UTF-8")),
                },
                Kind::Special(what) => {
                    warn!(path = %rel, "skipping {what}: special files are not published");
                    w.skipped_special += 1;
                }
                Kind::File(info) => {
                    if let Some(id) = info.link_id {
                        if let Some(&i) = links.get(&id) {
                            w.items.push((rel, Item::Link(i), e.attrs));
                            continue;
                        }
                        links.insert(id, w.files.len());
                    }
                    w.items
                        .push((rel.clone(), Item::File(w.files.len()), e.attrs));
                    w.files.push(WalkedFile {
                        rel,
                        size: info.size,
                        attrs: e.attrs,
                    });
                }
            }
        }
        // Depth first in name order: pushing in reverse pops the first name first.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(w)
}
