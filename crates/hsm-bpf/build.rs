//! Compiles the BPF programs with clang and generates their libbpf-rs skeletons.
//!
//! Needs clang (Debian's clang 14 works), plus libelf-dev, zlib1g-dev and pkg-config for
//! libbpf-sys. The kernel types come from `src/bpf/hsm_kernel_types.h` (CO-RE), so the
//! build does not depend on the build machine's kernel.

use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const PROGRAMS: [&str; 2] = ["guard", "fastpath"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let bpf_dir = PathBuf::from("src/bpf");
    // uapi headers (linux/bpf.h) are arch-independent except asm/types.h.
    let multiarch = "/usr/include/x86_64-linux-gnu";
    for name in PROGRAMS {
        let src = bpf_dir.join(format!("{name}.bpf.c"));
        let skel = out.join(format!("{name}.skel.rs"));
        let mut builder = SkeletonBuilder::new();
        builder
            .source(&src)
            .clang_args(["-I", "src/bpf", "-I", multiarch, "-Wall", "-Werror"]);
        if let Err(e) = builder.build_and_generate(&skel) {
            panic!(
                "building {}: {e:#}\n(needs clang, libelf-dev, zlib1g-dev and pkg-config: \
                 apt-get install clang libelf-dev zlib1g-dev pkg-config)",
                src.display()
            );
        }
    }
    println!("cargo:rerun-if-changed=src/bpf");
}
