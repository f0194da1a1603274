//! The fanotify fastpath handler: probe, and attach when the kernel has the hook.
//!
//! The hook (struct_ops `fanotify_fastpath_ops`, `FAN_IOC_ADD_FP`) was proposed upstream in
//! late 2024 and never merged; no kernel up to 7.3 has it. [`attach`] therefore checks the
//! running kernel's BTF for the type (and for the ioctl's argument struct, whose size must
//! match ours) before loading anything, and reports [`Fastpath::Absent`] otherwise: the
//! agent then relies on ignore marks, which work on every kernel.

use std::mem::MaybeUninit;

use hsm_kernel::fanotify::{FastpathArgs, Group};
use libbpf_rs::Link;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};

use crate::skel::fastpath::FastpathSkelBuilder;
use crate::{BpfError, PIN_DIR, libbpf_log, skel};

/// The kernel type that declares the hook.
pub const HOOK_TYPE: &str = "fanotify_fastpath_ops";
/// The ioctl argument type of the hook.
pub const ARGS_TYPE: &str = "fanotify_fastpath_args";
/// The name the handler registers under.
pub const HANDLER_NAME: &str = "hsm";

/// The outcome of [`attach`].
#[derive(Debug)]
pub enum Fastpath {
    /// Events for inodes known not to be stubs are dropped in the kernel.
    Attached(FastpathHandle),
    /// The kernel cannot take the handler; why, in one line.
    Absent(String),
}

/// Keeps the struct_ops registration alive (dropping it unregisters the handler).
#[derive(Debug)]
pub struct FastpathHandle {
    _link: Link,
}

/// Does the running kernel declare the hook? `Err` says why not.
pub fn probe() -> Result<(), BpfError> {
    let Some(btf) = skel::vmlinux_btf() else {
        return Err(BpfError::Unsupported(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux)".into(),
        ));
    };
    if !skel::btf_has_struct(&btf, HOOK_TYPE) {
        return Err(BpfError::Unsupported(format!(
            "the kernel has no fanotify fastpath hook (no struct {HOOK_TYPE} in its BTF; \
             the interface was proposed in late 2024 and no released kernel carries it)"
        )));
    }
    if !skel::btf_has_struct(&btf, ARGS_TYPE) {
        return Err(BpfError::Unsupported(format!(
            "the kernel declares {HOOK_TYPE} but not struct {ARGS_TYPE}: an interface this \
             build does not know"
        )));
    }
    let expected = std::mem::size_of::<FastpathArgs>();
    match skel::btf_struct_size(&btf, ARGS_TYPE) {
        Some(size) if size == expected => Ok(()),
        Some(size) => Err(BpfError::Unsupported(format!(
            "struct {ARGS_TYPE} is {size} bytes in this kernel, {expected} in this build: \
             not the interface this build was written for"
        ))),
        None => Err(BpfError::Unsupported(format!(
            "cannot read the size of struct {ARGS_TYPE}"
        ))),
    }
}

/// Parse the fastpath object without loading it: proves the program was built and embedded.
/// Returns the names of its programs.
pub fn object_programs() -> Result<Vec<String>, BpfError> {
    let mut storage = MaybeUninit::uninit();
    let open = FastpathSkelBuilder::default()
        .open(&mut storage)
        .map_err(|e| BpfError::load("opening the fastpath object", e))?;
    Ok(open
        .open_object()
        .progs()
        .map(|p| p.name().to_string_lossy().into_owned())
        .collect())
}

/// Load the handler and attach it to `group`, if the kernel has the hook. The handler reads
/// the guard's pinned verdict cache, so the guard must be installed for it to be useful;
/// without it every event still goes to user space (correct, just not faster).
pub fn attach(group: &Group) -> Fastpath {
    if let Err(why) = probe() {
        return Fastpath::Absent(why.to_string());
    }
    match load_and_attach(group) {
        Ok(handle) => Fastpath::Attached(handle),
        Err(e) => Fastpath::Absent(format!("the kernel refused the fastpath handler: {e}")),
    }
}

fn load_and_attach(group: &Group) -> Result<FastpathHandle, BpfError> {
    libbpf_log::start();
    let mut storage = MaybeUninit::uninit();
    let mut open = FastpathSkelBuilder::default()
        .open(&mut storage)
        .map_err(|e| BpfError::load("opening the fastpath object", e))?;
    let pinned = std::path::Path::new(PIN_DIR).join("maps/hsm_inodes");
    // Only a guard whose pins check out (root's, the right objects) is shared.
    if crate::guard::status().installed {
        open.maps
            .hsm_inodes
            .reuse_pinned_map(&pinned)
            .map_err(|e| BpfError::load("sharing the guard's verdict cache", e))?;
    }
    let mut loaded = open
        .load()
        .map_err(|e| BpfError::load("loading the fastpath handler", e))?;
    let link = loaded
        .maps
        .hsm_fastpath
        .attach_struct_ops()
        .map_err(|e| BpfError::load("registering the fastpath struct_ops", e))?;
    group
        .add_fastpath(HANDLER_NAME)
        .map_err(|e| BpfError::Unsupported(e.to_string()))?;
    Ok(FastpathHandle { _link: link })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fastpath_object_is_built_and_embedded() {
        let progs = object_programs().expect("the embedded fastpath object parses");
        for p in ["hsm_fp_handler", "hsm_fp_init", "hsm_fp_free"] {
            assert!(progs.iter().any(|x| x == p), "{p} missing from {progs:?}");
        }
    }

    #[test]
    fn probe_explains_an_absent_hook() {
        // No released kernel has the hook; if this one does, the probe must say Ok.
        if let Err(why) = probe() {
            let why = why.to_string();
            assert!(why.contains("fastpath") || why.contains("BTF"), "{why}");
        }
    }
}
