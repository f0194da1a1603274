//! What the guard's pins must be before they are trusted: each link pin a BPF LSM link to
//! the guard's program of that name, each map pin the guard's map of that name (the kernel
//! says, through fdinfo; libbpf would open any object). docs/BPF.md.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use libbpf_rs::{Link, MapCore, MapHandle, ProgramType};

use crate::pins::{self, PinProblem};

/// BPF object names are cut to 15 bytes by the kernel (`BPF_OBJ_NAME_LEN`).
pub(crate) fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// `/proc/self/fdinfo/FD` of one of our descriptors, as "key" -> "value".
fn fdinfo(fd: BorrowedFd<'_>) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Check that the pin `name` in the (trusted) `links` directory is a BPF link attaching the
/// guard's LSM program of that name. `progs` maps program ids to (name, type).
pub(crate) fn verify_link(
    dir: BorrowedFd<'_>,
    name: &str,
    progs: &HashMap<u32, (String, ProgramType)>,
) -> Result<(), PinProblem> {
    let what = format!("links/{name}");
    pins::pin_entry_ok(dir, name, &what)?;
    let link = Link::open(pins::via_fd(dir, name)).map_err(|source| PinProblem::NotOpenable {
        what: what.clone(),
        expected: "object",
        source,
    })?;
    // The kernel says what the descriptor is; libbpf would take any object for a link.
    let info = fdinfo(link.as_fd());
    let link_type = info.get("link_type");
    if link_type.map(String::as_str) != Some("tracing") {
        return Err(PinProblem::NotLsmLink {
            what,
            link_type: link_type.cloned(),
        });
    }
    let id: u32 = info
        .get("prog_id")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| PinProblem::NoProgram { what: what.clone() })?;
    match progs.get(&id) {
        Some((prog, ProgramType::Lsm)) if prog == kernel_name(name) => Ok(()),
        Some((prog, ty)) => Err(PinProblem::WrongProgram {
            what,
            prog: prog.clone(),
            ty: format!("{ty:?}"),
            name: name.to_string(),
        }),
        None => Err(PinProblem::UnreadableProgram { what, id }),
    }
}

/// Open the pin `name` in the (trusted) `maps` directory, checked to be a BPF map of that
/// name.
pub(crate) fn verified_map(dir: BorrowedFd<'_>, name: &str) -> Result<MapHandle, PinProblem> {
    let what = format!("maps/{name}");
    pins::pin_entry_ok(dir, name, &what)?;
    let map = MapHandle::from_pinned_path(pins::via_fd(dir, name)).map_err(|source| {
        PinProblem::NotOpenable {
            what: what.clone(),
            expected: "map",
            source,
        }
    })?;
    if !fdinfo(map.as_fd()).contains_key("map_type") {
        return Err(PinProblem::NotMap { what });
    }
    let got = map.name().to_string_lossy().into_owned();
    if got != kernel_name(name) {
        return Err(PinProblem::WrongMap {
            what,
            got,
            name: name.to_string(),
        });
    }
    Ok(map)
}
