//! Builders for small OCI image layouts: raw tar headers (so paths the tar crate would
//! normalise or refuse can be written), PAX records, compressed layers, blobs, indexes.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// One tar entry, written with a raw header.
#[derive(Debug, Clone)]
pub struct E {
    pub path: Vec<u8>,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub data: Vec<u8>,
    pub link: Option<Vec<u8>>,
    pub pax: Vec<(String, Vec<u8>)>,
}

impl E {
    fn new(path: &str, kind: tar::EntryType, mode: u32) -> Self {
        E {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            data: Vec::new(),
            link: None,
            pax: Vec::new(),
        }
    }
    pub fn file(path: &str, data: &[u8]) -> Self {
        let mut e = E::new(path, tar::EntryType::Regular, 0o644);
        e.data = data.to_vec();
        e
    }
    pub fn dir(path: &str) -> Self {
        E::new(path, tar::EntryType::Directory, 0o755)
    }
    pub fn symlink(path: &str, target: &str) -> Self {
        let mut e = E::new(path, tar::EntryType::Symlink, 0o777);
        e.link = Some(target.as_bytes().to_vec());
        e
    }
    pub fn hardlink(path: &str, target: &str) -> Self {
        let mut e = E::new(path, tar::EntryType::Link, 0o644);
        e.link = Some(target.as_bytes().to_vec());
        e
    }
    pub fn special(path: &str, kind: tar::EntryType) -> Self {
        E::new(path, kind, 0o666)
    }
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, t: u64) -> Self {
        self.mtime = t;
        self
    }
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.pax
            .push((format!("SCHILY.xattr.{name}"), value.to_vec()));
        self
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "LEN KEY=VALUE\n", LEN counting itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn raw_header(path: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    assert!(path.len() < 100, "test paths fit the header");
    h.as_gnu_mut().expect("gnu header").name[..path.len()].copy_from_slice(path);
    h.set_entry_type(kind);
    h.set_size(size);
    h
}

/// A tar stream of `entries`, in order.
pub fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.pax.is_empty() {
            let data: Vec<u8> = e.pax.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let mut h = raw_header(b"PaxHeader", tar::EntryType::XHeader, data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, data.as_slice()).expect("pax");
        }
        let mut h = raw_header(&e.path, e.kind, e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        if let Some(l) = &e.link {
            h.as_gnu_mut().expect("gnu header").linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        b.append(&h, e.data.as_slice()).expect("append");
    }
    b.into_inner().expect("tar")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An image layout being written in a temporary directory.
pub struct Oci {
    pub dir: tempfile::TempDir,
}

impl Oci {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).expect("blobs");
        Oci { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Store a blob; its descriptor.
    pub fn blob(&self, data: &[u8], media: &str) -> Value {
        let hex = sha256(data);
        std::fs::write(self.path().join("blobs/sha256").join(&hex), data).expect("blob");
        json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": data.len()})
    }

    pub fn blob_file(&self, desc: &Value) -> std::path::PathBuf {
        let d = desc["digest"].as_str().expect("digest");
        self.path()
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    }

    /// Store config and layers (already compressed, with their media types); the
    /// manifest's descriptor.
    pub fn image(&self, layers: &[(Vec<u8>, &str)], config: &Value) -> Value {
        let config = self.blob(&serde_json::to_vec(config).expect("json"), CONFIG);
        let layers: Vec<Value> = layers.iter().map(|(d, m)| self.blob(d, m)).collect();
        self.manifest(config, layers)
    }

    pub fn manifest(&self, config: Value, layers: Vec<Value>) -> Value {
        let m = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": config,
            "layers": layers,
        });
        self.blob(&serde_json::to_vec(&m).expect("json"), MANIFEST)
    }

    pub fn index(&self, manifests: Vec<Value>) {
        let i = json!({"schemaVersion": 2, "manifests": manifests});
        std::fs::write(
            self.path().join("index.json"),
            serde_json::to_vec(&i).expect("json"),
        )
        .expect("index");
    }

    pub fn reference(&self, tag: Option<&str>) -> hsm_oci::ImageRef {
        hsm_oci::ImageRef {
            dir: self.path().to_path_buf(),
            tag: tag.map(str::to_string),
        }
    }
}

pub fn tagged(mut desc: Value, tag: &str) -> Value {
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    desc
}

pub fn config() -> Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": []}
    })
}

/// A single-image layout with these layers.
pub fn one_image(layers: &[(Vec<u8>, &str)]) -> Oci {
    let oci = Oci::new();
    let m = oci.image(layers, &config());
    oci.index(vec![tagged(m, "latest")]);
    oci
}

/// Stage into a fresh parent directory; the parent comes back so tests can check that
/// nothing is left in it.
pub fn stage(
    oci: &Oci,
) -> (
    tempfile::TempDir,
    Result<hsm_oci::Staged, hsm_oci::OciError>,
) {
    let parent = tempfile::tempdir().expect("tmp");
    let r = hsm_oci::stage(&oci.reference(None), parent.path());
    (parent, r)
}

pub fn is_empty_dir(p: &Path) -> bool {
    std::fs::read_dir(p).expect("read_dir").next().is_none()
}
