//! The `hsm` binary facing an unprivileged user (issue 12): `hsm doctor` run as `nobody`
//! must fail and say it needs root. Runs as root: it switches to `nobody` with setpriv.

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
