//! What the guard's pins must be before they are trusted: each link pin a BPF LSM link to
//! the guard's program of that name, each map pin the guard's map of that name (the kernel
//! says, through fdinfo; libbpf would open any object). docs/BPF.md.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use libbpf_rs::{Link, MapCore, MapHandle, ProgramType};

use crate::pins;

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
) -> Result<(), String> {
    pins::pin_entry_ok(dir, name).map_err(|why| format!("links/{why}"))?;
    let link = Link::open(pins::via_fd(dir, name))
        .map_err(|e| format!("links/{name} cannot be opened as a BPF object: {e}"))?;
    // The kernel says what the descriptor is; libbpf would take any object for a link.
    let info = fdinfo(link.as_fd());
    let link_type = info.get("link_type").map(String::as_str);
    if link_type != Some("tracing") {
        return Err(format!(
            "links/{name} is not a BPF LSM link ({})",
            match link_type {
                Some(t) => format!("a link of type {t}"),
                None => "not a link at all".into(),
            }
        ));
    }
    let prog_id: u32 = info
        .get("prog_id")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("links/{name} names no program"))?;
    match progs.get(&prog_id) {
        Some((prog, ProgramType::Lsm)) if prog == kernel_name(name) => Ok(()),
        Some((prog, ty)) => Err(format!(
            "links/{name} attaches program {prog:?} of type {ty:?}, not the guard's LSM program {name}"
        )),
        None => Err(format!(
            "links/{name} attaches program {prog_id}, which cannot be read"
        )),
    }
}

/// Open the pin `name` in the (trusted) `maps` directory, checked to be a BPF map of that
/// name.
pub(crate) fn verified_map(dir: BorrowedFd<'_>, name: &str) -> Result<MapHandle, String> {
    pins::pin_entry_ok(dir, name).map_err(|why| format!("maps/{why}"))?;
    let map = MapHandle::from_pinned_path(pins::via_fd(dir, name))
        .map_err(|e| format!("maps/{name} cannot be opened as a BPF map: {e}"))?;
    if !fdinfo(map.as_fd()).contains_key("map_type") {
        return Err(format!("maps/{name} is not a BPF map"));
    }
    let got = map.name().to_string_lossy().into_owned();
    if got != kernel_name(name) {
        return Err(format!(
            "maps/{name} is the map {got:?}, not the guard's {name}"
        ));
    }
    Ok(map)
}
