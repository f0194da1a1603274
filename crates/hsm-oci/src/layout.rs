//! The OCI image layout on disk: `oci-layout`, `index.json`, `blobs/sha256/…`; choosing the
//! image and reading its manifest and config, every blob checked against its descriptor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{BlobRole, OciError};

pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The annotation skopeo, buildah and podman put the tag in.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Manifests and indexes are small; configs a little larger. Anything bigger is refused
/// rather than read into memory.
const MAX_JSON: u64 = 16 << 20;

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The compression of a layer media type, or `None` when it is not a layer type we know.
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// A content descriptor (OCI image spec, descriptor.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

impl Descriptor {
    fn media(&self) -> &str {
        self.media_type.as_deref().unwrap_or("")
    }

    fn tag(&self) -> Option<&str> {
        self.annotations.get(REF_NAME).map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct LayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    version: String,
}

/// `oci:DIR` or `oci:DIR:TAG`, parsed. DIR cannot contain `:` (as with skopeo's `oci:`
/// transport); TAG is everything after the first `:` following DIR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, OciError> {
        let rest = s
            .strip_prefix("oci:")
            .ok_or_else(|| OciError::BadReference(s.to_string()))?;
        let (dir, tag) = match rest.split_once(':') {
            Some((d, t)) => (d, Some(t.to_string())),
            None => (rest, None),
        };
        if dir.is_empty() || tag.as_deref() == Some("") {
            return Err(OciError::BadReference(s.to_string()));
        }
        Ok(ImageRef {
            dir: PathBuf::from(dir),
            tag,
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci:{}", self.dir.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        Ok(())
    }
}

/// A reader that hashes and counts every byte that passes through it.
#[derive(Debug)]
pub struct Verify<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Verify<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> Verify<R> {
    /// Read what is left, then compare size and digest with the descriptor.
    pub fn finish(mut self, role: BlobRole, desc: &Descriptor) -> Result<(), OciError> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| OciError::BlobIo {
            role,
            digest: desc.digest.clone(),
            path: PathBuf::new(),
            source: e,
        })?;
        if self.count != desc.size {
            return Err(OciError::SizeMismatch {
                role,
                digest: desc.digest.clone(),
                want: desc.size,
                got: self.count,
            });
        }
        let got = hex(&self.hasher.finalize());
        if desc.digest.strip_prefix("sha256:") != Some(got.as_str()) {
            return Err(OciError::DigestMismatch {
                role,
                digest: desc.digest.clone(),
                got,
            });
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An opened, checked image layout.
#[derive(Debug)]
pub struct Layout {
    dir: PathBuf,
}

/// The image chosen from a layout: its manifest, config bytes and layer descriptors.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's digest (`sha256:…`): the image's identity.
    pub digest: String,
    /// The config blob, verbatim.
    pub config: Vec<u8>,
    pub config_descriptor: Descriptor,
    /// Lowest first.
    pub layers: Vec<Descriptor>,
}

fn bad_json(file: impl Into<String>, what: &'static str, e: serde_json::Error) -> OciError {
    OciError::BadJson {
        file: file.into(),
        what,
        detail: e.to_string(),
    }
}

impl Layout {
    /// Check `oci-layout` (version 1.x) and that `index.json` exists.
    pub fn open(dir: &Path) -> Result<Self, OciError> {
        let not = |why: String| OciError::NotLayout {
            dir: dir.to_path_buf(),
            why,
        };
        let marker = dir.join("oci-layout");
        let bytes = std::fs::read(&marker).map_err(|e| not(format!("oci-layout: {e}")))?;
        let lf: LayoutFile = serde_json::from_slice(&bytes)
            .map_err(|e| bad_json(marker.display().to_string(), "oci-layout file", e))?;
        if lf.version.split('.').next() != Some("1") {
            return Err(not(format!(
                "oci-layout: imageLayoutVersion {:?} is not supported (1.x is)",
                lf.version
            )));
        }
        Ok(Layout {
            dir: dir.to_path_buf(),
        })
    }

    /// The file of a blob, after checking the digest's form (it becomes a path).
    pub fn blob_path(&self, role: BlobRole, desc: &Descriptor) -> Result<PathBuf, OciError> {
        let hexpart = desc
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| OciError::BadDigest {
                role,
                digest: desc.digest.clone(),
            })?;
        Ok(self.dir.join("blobs").join("sha256").join(hexpart))
    }

    /// Open a blob for streaming: its size is checked now, its digest when the returned
    /// reader is finished.
    pub fn open_blob(&self, role: BlobRole, desc: &Descriptor) -> Result<Verify<File>, OciError> {
        let path = self.blob_path(role, desc)?;
        let io_err = |source| OciError::BlobIo {
            role,
            digest: desc.digest.clone(),
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len != desc.size {
            return Err(OciError::SizeMismatch {
                role,
                digest: desc.digest.clone(),
                want: desc.size,
                got: len,
            });
        }
        Ok(Verify {
            inner: file,
            hasher: Sha256::new(),
            count: 0,
        })
    }

    /// A whole (small) blob, verified.
    pub fn read_blob(&self, role: BlobRole, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        if desc.size > MAX_JSON {
            return Err(OciError::TooLarge {
                role,
                digest: desc.digest.clone(),
                limit: MAX_JSON,
            });
        }
        let mut v = self.open_blob(role, desc)?;
        let mut buf = Vec::with_capacity(desc.size as usize);
        (&mut v)
            .take(desc.size + 1)
            .read_to_end(&mut buf)
            .map_err(|source| OciError::BlobIo {
                role,
                digest: desc.digest.clone(),
                path: PathBuf::new(),
                source,
            })?;
        v.finish(role, desc)?;
        Ok(buf)
    }

    /// Choose the image `tag` names (or the only one), follow a nested index to its
    /// linux/amd64 entry, and read and verify the manifest and config.
    pub fn image(&self, tag: Option<&str>) -> Result<Image, OciError> {
        let index_path = self.dir.join("index.json");
        let bytes = std::fs::read(&index_path).map_err(|e| OciError::NotLayout {
            dir: self.dir.clone(),
            why: format!("index.json: {e}"),
        })?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| bad_json(index_path.display().to_string(), "image index", e))?;
        let images: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| is_manifest(d.media()) || is_index(d.media()))
            .collect();
        let tags = || {
            let t: Vec<&str> = images.iter().filter_map(|d| d.tag()).collect();
            if t.is_empty() {
                "none".to_string()
            } else {
                t.join(", ")
            }
        };
        let chosen = match tag {
            Some(tag) => *images
                .iter()
                .find(|d| d.tag() == Some(tag))
                .ok_or_else(|| OciError::TagNotFound {
                    dir: self.dir.clone(),
                    tag: tag.to_string(),
                    found: tags(),
                })?,
            None => match images.as_slice() {
                [one] => *one,
                [] => {
                    return Err(OciError::NoImage {
                        dir: self.dir.clone(),
                    });
                }
                many => {
                    return Err(OciError::Ambiguous {
                        dir: self.dir.clone(),
                        count: many.len(),
                        found: tags(),
                    });
                }
            },
        };
        let manifest_desc = if is_index(chosen.media()) {
            self.platform_manifest(chosen)?
        } else {
            chosen.clone()
        };
        self.read_manifest(&manifest_desc)
    }

    fn platform_manifest(&self, desc: &Descriptor) -> Result<Descriptor, OciError> {
        let bytes = self.read_blob(BlobRole::Index, desc)?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| bad_json(format!("image index {}", desc.digest), "image index", e))?;
        let amd64 = |p: &Option<Platform>| {
            p.as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        };
        match index
            .manifests
            .iter()
            .find(|d| is_manifest(d.media()) && amd64(&d.platform))
        {
            Some(d) => Ok(d.clone()),
            None => Err(OciError::NoPlatform {
                index: format!("image index {}", desc.digest),
                found: index
                    .manifests
                    .iter()
                    .map(|d| match &d.platform {
                        Some(p) => format!("{}/{}", p.os, p.architecture),
                        None => "unspecified".to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn read_manifest(&self, desc: &Descriptor) -> Result<Image, OciError> {
        let bytes = self.read_blob(BlobRole::Manifest, desc)?;
        let doc: ManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| bad_json(format!("manifest {}", desc.digest), "image manifest", e))?;
        if let Some(mt) = &doc.media_type {
            if !is_manifest(mt) {
                return Err(OciError::UnknownMediaType {
                    role: BlobRole::Manifest,
                    digest: desc.digest.clone(),
                    media_type: mt.clone(),
                });
            }
        }
        let cmt = doc.config.media();
        if cmt != MT_OCI_CONFIG && cmt != MT_DOCKER_CONFIG {
            return Err(OciError::UnknownMediaType {
                role: BlobRole::Config,
                digest: doc.config.digest.clone(),
                media_type: cmt.to_string(),
            });
        }
        for (i, l) in doc.layers.iter().enumerate() {
            if layer_compression(l.media()).is_none() {
                return Err(OciError::UnknownMediaType {
                    role: BlobRole::Layer(i + 1),
                    digest: l.digest.clone(),
                    media_type: l.media().to_string(),
                });
            }
            self.blob_path(BlobRole::Layer(i + 1), l)?;
        }
        let config = self.read_blob(BlobRole::Config, &doc.config)?;
        // The config must parse: runtime-spec reads it later from the store.
        crate::spec::ImageConfig::parse(&config)
            .map_err(|e| bad_json(format!("config {}", doc.config.digest), "image config", e))?;
        Ok(Image {
            digest: desc.digest.clone(),
            config,
            config_descriptor: doc.config,
            layers: doc.layers,
        })
    }
}

fn is_manifest(mt: &str) -> bool {
    mt == MT_OCI_MANIFEST || mt == MT_DOCKER_MANIFEST
}

fn is_index(mt: &str) -> bool {
    mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        assert_eq!(
            ImageRef::parse("oci:/x/y").ok(),
            Some(ImageRef {
                dir: "/x/y".into(),
                tag: None
            })
        );
        assert_eq!(
            ImageRef::parse("oci:img:docker.io/library/alpine:3").ok(),
            Some(ImageRef {
                dir: "img".into(),
                tag: Some("docker.io/library/alpine:3".into())
            })
        );
        assert!(ImageRef::parse("docker://alpine").is_err());
        assert!(ImageRef::parse("oci:").is_err());
        assert!(ImageRef::parse("oci:dir:").is_err());
    }

    #[test]
    fn layer_types() {
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(layer_compression("application/x-tar"), None);
    }
}
