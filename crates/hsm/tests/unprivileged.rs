//! The `hsm` binary facing an unprivileged user (issue 12): `hsm doctor` run as `nobody`
//! must fail and say it needs root, and guard directories `nobody` plants in bpffs (mode
//! 1777) must never pass for the guard. The guard cannot load on a host kernel, so this
//! checks what status and remove make of planted paths (fstest 082 covers install and the
//! agent in the VM lane). Runs as root: it switches to `nobody` with setpriv and mounts a
//! bpffs of its own in a private mount namespace (unshare), so the host's is untouched.

use std::process::{Command, Output};

const HSM: &str = env!("CARGO_BIN_EXE_hsm");

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests switch to nobody and mount bpffs: run them as root"
    );
}

fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(args);
    c
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn doctor_as_nobody_fails_and_says_it_needs_root() {
    require_root();
    let out = as_nobody(&[HSM, "doctor"])
        .output()
        .expect("setpriv runs hsm doctor");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("doctor needs root"), "{stderr}");
    assert!(
        stdout.contains("these probes did not run")
            && stdout.contains("fanotify pre-content group")
            && stdout.contains("loading the stub guard"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("  - fanotify FAN_PRE_ACCESS marks"),
        "{stdout}"
    );
}

/// Run `script` with bash in a private mount namespace with a fresh bpffs (mode 1777) on
/// /sys/fs/bpf. `$HSM` is the binary; `nobody CMD...` runs a command as nobody.
fn in_private_bpffs(script: &str) -> Output {
    let full = format!(
        "set -u\nmount -t bpf bpf /sys/fs/bpf || exit 90\n\
         nobody() {{ setpriv --reuid=nobody --regid=nogroup --clear-groups -- \"$@\"; }}\n{script}"
    );
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", &full])
        .env("HSM", HSM)
        .output()
        .expect("unshare runs bash")
}

#[test]
fn planted_guard_directories_are_not_the_guard() {
    require_root();
    let out = in_private_bpffs(
        r#"
        test "$(stat -c %a /sys/fs/bpf)" = 1777 || exit 91
        plant() {
            nobody mkdir -p /sys/fs/bpf/hsm/links /sys/fs/bpf/hsm/maps
            for m in hsm_inodes hsm_ctl hsm_served hsm_files hsm_stats; do
                nobody mkdir /sys/fs/bpf/hsm/maps/$m
            done
            for l in hsm_file_open hsm_file_free hsm_file_permission hsm_mmap_file \
                     hsm_file_truncate hsm_path_truncate; do
                nobody mkdir /sys/fs/bpf/hsm/links/$l
            done
            nobody ln -s /etc /sys/fs/bpf/hsm/links/hsm_inode_free
        }
        plant
        echo "== status"
        "$HSM" guard status; echo "rc=$?"
        echo "== status as nobody"
        nobody "$HSM" guard status; echo "rc=$?"
        echo "== remove"
        "$HSM" guard remove; echo "rc=$?"
        test -e /sys/fs/bpf/hsm && echo "left behind"
        test -d /etc/passwd -o ! -e /etc/passwd && echo "/etc harmed"
        echo "== a root-owned directory others may write"
        mkdir -m 0777 /sys/fs/bpf/hsm; chmod 0777 /sys/fs/bpf/hsm
        "$HSM" guard status; echo "rc=$?"
        "$HSM" guard remove; echo "rc=$?"
        test -e /sys/fs/bpf/hsm && echo "left behind"
        echo "== a symlink"
        nobody ln -s /etc /sys/fs/bpf/hsm
        "$HSM" guard status; echo "rc=$?"
        "$HSM" guard remove; echo "rc=$?"
        test -L /sys/fs/bpf/hsm && echo "left behind"
        true
        "#,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let expected = "\
== status
guard: not installed: /sys/fs/bpf/hsm is a directory owned by uid 65534 (mode 0755), not by root
guard: /sys/fs/bpf/hsm is not the guard's and is ignored (`hsm guard install` or `hsm guard remove` removes it)
rc=3
== status as nobody
guard: not installed: /sys/fs/bpf/hsm is a directory owned by uid 65534 (mode 0755), not by root
guard: /sys/fs/bpf/hsm is not the guard's and is ignored (`hsm guard install` or `hsm guard remove` removes it)
rc=3
== remove
guard: removed what was not the guard's: /sys/fs/bpf/hsm is a directory owned by uid 65534 (mode 0755), not by root
rc=0
== a root-owned directory others may write
guard: not installed: /sys/fs/bpf/hsm is a directory that users other than root may write to (mode 0777)
guard: /sys/fs/bpf/hsm is not the guard's and is ignored (`hsm guard install` or `hsm guard remove` removes it)
rc=3
guard: removed what was not the guard's: /sys/fs/bpf/hsm is a directory that users other than root may write to (mode 0777)
rc=0
== a symlink
guard: not installed: /sys/fs/bpf/hsm is a symlink owned by uid 65534 (mode 0777), not by root
guard: /sys/fs/bpf/hsm is not the guard's and is ignored (`hsm guard install` or `hsm guard remove` removes it)
rc=3
guard: removed what was not the guard's: /sys/fs/bpf/hsm is a symlink owned by uid 65534 (mode 0777), not by root
rc=0
";
    assert_eq!(stdout, expected, "stderr: {stderr}");
}

#[test]
fn a_crashed_install_leaves_no_staging_directory_behind() {
    require_root();
    // An install pins into /sys/fs/bpf/hsm-installing-PID-N and renames it to hsm; one
    // killed in between leaves the directory (its link pins would keep the programs
    // attached). The next remove (or install) takes away root's whose process is gone, and
    // leaves alone an install still running and a directory another user made.
    let out = in_private_bpffs(
        r#"
        dead=999999999
        mkdir -p /sys/fs/bpf/hsm-installing-$dead-0/links/hsm_file_open /sys/fs/bpf/hsm-installing-$dead-0/maps
        sleep 30 & live=$!
        mkdir /sys/fs/bpf/hsm-installing-$live-0
        nobody mkdir /sys/fs/bpf/hsm-installing-$dead-1
        "$HSM" guard remove; echo "rc=$?"
        for d in $dead-0 $live-0 $dead-1; do
            test -e /sys/fs/bpf/hsm-installing-$d && echo "left: $d" | sed "s/$live/LIVE/; s/$dead/DEAD/"
        done
        kill $live; wait $live
        "$HSM" guard remove | sed "s/$live/LIVE/"
        "$HSM" guard remove; echo "rc=$?"
        "#,
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let expected = "\
guard: removed the staging directory of an install that did not finish: /sys/fs/bpf/hsm-installing-999999999-0
rc=0
left: LIVE-0
left: DEAD-1
guard: removed the staging directory of an install that did not finish: /sys/fs/bpf/hsm-installing-LIVE-0
guard: nothing to remove
rc=0
";
    assert_eq!(stdout, expected, "stderr: {stderr}");
}
