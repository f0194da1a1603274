//! Runtime specs from image configs, users resolved in a fake root filesystem.

use hsm_oci::{OciError, runtime_spec};
use serde_json::json;

fn rootfs() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(d.path().join("etc")).expect("etc");
    std::fs::write(
        d.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nweb:x:33:33::/:/bin/false\n",
    )
    .expect("passwd");
    std::fs::write(
        d.path().join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .expect("group");
    d
}

fn config(user: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": user,
            "Env": ["LANG=C.UTF-8"],
            "Entrypoint": ["/usr/bin/tini", "--"],
            "Cmd": ["/app/run", "--port", "80"],
            "WorkingDir": "/app"
        }
    }))
    .expect("json")
}

#[test]
fn spec_takes_args_env_cwd_and_resolves_users() {
    let root = rootfs();
    let spec = runtime_spec(&config("app:staff"), root.path(), None).expect("spec");
    let p = &spec.process;
    assert_eq!(p.args, ["/usr/bin/tini", "--", "/app/run", "--port", "80"]);
    assert_eq!(p.env[0], hsm_oci::spec::DEFAULT_PATH);
    assert!(p.env.contains(&"LANG=C.UTF-8".to_string()));
    assert_eq!(p.cwd, "/app");
    assert_eq!((p.user.uid, p.user.gid), (1000, 50));
    assert!(!p.terminal);
    assert_eq!(spec.root.path, root.path().to_str().expect("utf8"));
    assert!(spec.root.readonly);

    // Arguments after `--` replace Cmd, not Entrypoint.
    let args = vec!["/bin/echo".to_string(), "hi".to_string()];
    let spec = runtime_spec(&config("web"), root.path(), Some(&args)).expect("spec");
    assert_eq!(
        spec.process.args,
        ["/usr/bin/tini", "--", "/bin/echo", "hi"]
    );
    // A user name alone takes its primary group.
    assert_eq!((spec.process.user.uid, spec.process.user.gid), (33, 33));
    // Numeric ids need no lookup.
    let spec = runtime_spec(&config("4242:77"), root.path(), None).expect("spec");
    assert_eq!((spec.process.user.uid, spec.process.user.gid), (4242, 77));
    let spec = runtime_spec(&config(""), root.path(), None).expect("spec");
    assert_eq!((spec.process.user.uid, spec.process.user.gid), (0, 0));
}

#[test]
fn unknown_users_and_groups_are_errors_naming_them() {
    let root = rootfs();
    let e = runtime_spec(&config("nobody"), root.path(), None).expect_err("unknown");
    assert!(
        matches!(&e, OciError::UnknownUser { name, .. } if name == "nobody"),
        "{e}"
    );
    let e = runtime_spec(&config("app:wheel"), root.path(), None).expect_err("unknown");
    assert!(
        matches!(&e, OciError::UnknownGroup { name, .. } if name == "wheel"),
        "{e}"
    );
}

#[test]
fn passwd_symlinks_resolve_inside_the_root() {
    // An image whose /etc/passwd is an absolute symlink must not read the host's file.
    let root = rootfs();
    std::fs::rename(
        root.path().join("etc/passwd"),
        root.path().join("etc/passwd.real"),
    )
    .expect("mv");
    std::os::unix::fs::symlink("/etc/passwd.real", root.path().join("etc/passwd"))
        .expect("symlink");
    let spec = runtime_spec(&config("app"), root.path(), None).expect("spec");
    assert_eq!(spec.process.user.uid, 1000);
}

#[test]
fn spec_json_has_runc_shape() {
    let root = rootfs();
    let spec = runtime_spec(&config("app"), root.path(), None).expect("spec");
    let v = serde_json::to_value(&spec).expect("json");
    assert_eq!(v["ociVersion"], "1.0.2");
    assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
    assert_eq!(v["process"]["rlimits"][0]["soft"], 1024);
    let ns: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .expect("ns")
        .iter()
        .map(|n| n["type"].as_str().expect("type"))
        .collect();
    assert_eq!(ns, ["pid", "network", "ipc", "uts", "mount"]);
    let mounts: Vec<&str> = v["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| m["destination"].as_str().expect("dest"))
        .collect();
    assert_eq!(
        mounts,
        [
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys"
        ]
    );
    assert_eq!(
        v["process"]["capabilities"]["bounding"],
        json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"])
    );
    // No Entrypoint and no Cmd: the command must be given.
    let bare = serde_json::to_vec(&json!({"config": {}})).expect("json");
    assert!(matches!(
        runtime_spec(&bare, root.path(), None),
        Err(OciError::Spec(_))
    ));
}
