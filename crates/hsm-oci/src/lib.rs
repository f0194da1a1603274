//! OCI image layouts for hsm.
//!
//! [`stage`] reads an image layout directory (what `skopeo copy`, `buildah push` and
//! `podman save --format oci-dir` write), chooses the image (`oci:DIR` or `oci:DIR:TAG`),
//! verifies every blob it reads against its descriptor (size and sha256, while streaming)
//! and applies the layers in order into a private staging directory, honouring whiteouts
//! and refusing entries that would escape the root or pass through a symlink. The staged
//! root filesystem is then published like any directory. [`runtime_spec`] turns the image
//! config into an OCI runtime spec for runc or crun. See docs/OCI.md.

mod apply;
pub mod error;
pub mod layout;
pub mod spec;

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use tracing::{info, warn};

pub use error::{BlobRole, EntryProblem, OciError};
pub use layout::{Compression, Descriptor, Image, ImageRef, Layout};
pub use spec::{ImageConfig, Spec, runtime_spec};

/// The object, beside the manifest, that holds the image config verbatim.
pub const IMAGE_CONFIG_KEY: &str = ".hsm-image.json";

/// An image applied into a staging directory. Dropping it removes the directory.
#[derive(Debug)]
pub struct Staged {
    dir: tempfile::TempDir,
    pub image: Image,
    /// Tar entries applied (whiteouts included).
    pub entries: u64,
    /// Device nodes and FIFOs left out.
    pub skipped_special: u64,
}

impl Staged {
    /// The image's root filesystem.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Remove the staging directory now, reporting a failure (dropping ignores it).
    pub fn remove(self) -> Result<(), OciError> {
        let path = self.dir.path().to_path_buf();
        self.dir.close().map_err(|e| OciError::Staging {
            path,
            detail: format!("cannot remove: {e}"),
        })
    }
}

/// The default parent of staging directories: `$TMPDIR`, else `/var/tmp` (images can be
/// larger than a RAM-backed `/tmp`).
pub fn default_staging() -> PathBuf {
    std::env::var_os("TMPDIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

/// A layer's stream after decompression, keeping the verifying reader underneath.
enum Decompressed {
    Plain(layout::Verify<File>),
    Gzip(flate2::read::MultiGzDecoder<layout::Verify<File>>),
    Zstd(zstd::Decoder<'static, BufReader<layout::Verify<File>>>),
}

impl Read for Decompressed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Decompressed::Plain(r) => r.read(buf),
            Decompressed::Gzip(r) => r.read(buf),
            Decompressed::Zstd(r) => r.read(buf),
        }
    }
}

impl Decompressed {
    fn into_verify(self) -> layout::Verify<File> {
        match self {
            Decompressed::Plain(r) => r,
            Decompressed::Gzip(r) => r.into_inner(),
            Decompressed::Zstd(r) => r.finish().into_inner(),
        }
    }
}

/// Stream layer `n` into the stager; its digest is checked after the stream ends, and a
/// mismatch is reported in preference to anything else the stream did.
fn apply_layer(
    layout: &Layout,
    stager: &mut apply::Stager,
    n: usize,
    desc: &Descriptor,
) -> Result<(), OciError> {
    let role = BlobRole::Layer(n);
    let media = desc.media_type.as_deref().unwrap_or("");
    let compression =
        layout::layer_compression(media).ok_or_else(|| OciError::UnknownMediaType {
            role,
            digest: desc.digest.clone(),
            media_type: media.to_string(),
        })?;
    let verify = layout.open_blob(role, desc)?;
    let reader = match compression {
        Compression::None => Decompressed::Plain(verify),
        Compression::Gzip => Decompressed::Gzip(flate2::read::MultiGzDecoder::new(verify)),
        Compression::Zstd => {
            Decompressed::Zstd(zstd::Decoder::new(verify).map_err(|e| OciError::Archive {
                layer: n,
                digest: desc.digest.clone(),
                detail: format!("zstd: {e}"),
            })?)
        }
    };
    let mut archive = tar::Archive::new(reader);
    let applied = stager.apply_archive(n, &desc.digest, &mut archive);
    archive.into_inner().into_verify().finish(role, desc)?;
    applied
}

fn staging_err(path: &Path) -> impl Fn(std::io::Error) -> OciError + '_ {
    move |e| OciError::Staging {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Read the image `reference` names and apply its layers into a new staging directory
/// (mode 0700, owned by root) under `staging_parent`. On error nothing is left behind.
pub fn stage(reference: &ImageRef, staging_parent: &Path) -> Result<Staged, OciError> {
    let layout = Layout::open(&reference.dir)?;
    let image = layout.image(reference.tag.as_deref())?;
    std::fs::create_dir_all(staging_parent).map_err(staging_err(staging_parent))?;
    let dir = tempfile::Builder::new()
        .prefix(".hsm-oci-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(staging_parent)
        .map_err(staging_err(staging_parent))?;
    std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).map_err(|e| OciError::Staging {
        path: dir.path().to_path_buf(),
        detail: format!("cannot make it root's ({e}): publishing an image needs root"),
    })?;
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).map_err(staging_err(&rootfs))?;
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
        .map_err(staging_err(&rootfs))?;
    let root = nix::fcntl::open(
        &rootfs,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| OciError::Staging {
        path: rootfs.clone(),
        detail: e.to_string(),
    })?;
    let mut stager = apply::Stager::new(root);
    let total = image.layers.len();
    for (i, desc) in image.layers.iter().enumerate() {
        apply_layer(&layout, &mut stager, i + 1, desc)?;
        info!(
            "{reference}: layer {}/{total} {} applied ({} bytes)",
            i + 1,
            desc.digest,
            desc.size
        );
    }
    stager.finish();
    if stager.skipped_special > 0 {
        warn!(
            "{reference}: skipped {} device nodes and FIFOs: stub trees have none (the runtime \
             provides /dev)",
            stager.skipped_special
        );
    }
    if stager.symlink_xattrs_dropped > 0 {
        warn!(
            "{reference}: extended attributes of {} symlinks were not applied",
            stager.symlink_xattrs_dropped
        );
    }
    Ok(Staged {
        dir,
        image,
        entries: stager.entries,
        skipped_special: stager.skipped_special,
    })
}
