//! Uploading one file: read, digest and put it (in parts when large).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use hsm_manifest::{ChunkDigester, FileObject};
use hsm_remote::Store;
use indicatif::ProgressBar;

use super::{MULTIPART_THRESHOLD, PART_SIZE, UploadError};

/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// Read, digest and upload one file, `key` below the source directory `root`. The file must
/// still have the size and mtime the walk saw when it has been read, else the upload is
/// refused (publish again once it is quiet). It is opened beneath `root` with no symlink in
/// any component, non-blocking, and only if it is a regular file: a directory swapped for a
/// symlink cannot make publish upload a file from outside SRC, nor a FIFO hang it.
pub(super) async fn upload_file(
    store: Arc<dyn Store>,
    root: PathBuf,
    key: String,
    want: (u64, (i64, u32)),
    chunk_size: u64,
    progress: ProgressBar,
) -> Result<FileObject, UploadError> {
    let io = |op| move |source| UploadError::Io { op, source };
    let root_fd = nix::fcntl::open(
        &root,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| UploadError::Io {
        op: "open",
        source: e.into(),
    })?;
    let (file, _) = hsm_kernel::beneath::open_regular_beneath(
        std::os::fd::AsFd::as_fd(&root_fd),
        std::path::Path::new(&key),
    )
    .map_err(|e| UploadError::Io {
        op: "open",
        source: std::io::Error::other(e),
    })?;
    let changed = |f: &std::fs::File| -> Result<(), UploadError> {
        let md = f.metadata().map_err(io("stat"))?;
        if md.size() != want.0 || (md.mtime(), md.mtime_nsec() as u32) != want.1 {
            return Err(UploadError::Changed);
        }
        Ok(())
    };
    changed(&file)?;
    let size = want.0;
    let multipart = if size < MULTIPART_THRESHOLD {
        None
    } else {
        // None: the store has no multipart upload (plain HTTP, WebDAV): one PUT of it all.
        store.start_upload(&key, PART_SIZE).await?
    };
    let (file, digests, result) = match multipart {
        None => {
            let (file, data, digests) = tokio::task::spawn_blocking(move || {
                let mut data = Vec::with_capacity(size as usize);
                use std::io::Read;
                (&file)
                    .take(size + 1)
                    .read_to_end(&mut data)
                    .map_err(io("read"))?;
                let digests = hsm_manifest::chunk_digests(&data, chunk_size);
                Ok::<_, UploadError>((file, data, digests))
            })
            .await
            .map_err(UploadError::Reader)??;
            if data.len() as u64 != size {
                return Err(UploadError::Changed);
            }
            let result = store.put(&key, Bytes::from(data)).await?;
            progress.inc(size);
            (file, digests, result)
        }
        Some(mut upload) => {
            let mut digester = Some(ChunkDigester::new(chunk_size));
            let mut file = Some(file);
            let mut offset = 0u64;
            let outcome: Result<(), UploadError> = async {
                while offset < size {
                    let f = file.take().expect("file is returned by every read");
                    let mut d = digester.take().expect("digester is returned by every read");
                    let len = (size - offset).min(PART_SIZE as u64) as usize;
                    let (f, buf, d) = tokio::task::spawn_blocking(move || {
                        use std::os::unix::fs::FileExt;
                        let mut buf = vec![0u8; len];
                        let r = f.read_exact_at(&mut buf, offset);
                        if r.is_ok() {
                            d.update(&buf);
                        }
                        (f, r.map(|()| buf), d)
                    })
                    .await
                    .map_err(UploadError::Reader)?;
                    file = Some(f);
                    digester = Some(d);
                    let buf = buf.map_err(|source| UploadError::ReadAt { offset, source })?;
                    upload.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                    upload.put(Bytes::from(buf));
                    offset += len as u64;
                    progress.inc(len as u64);
                }
                Ok(())
            }
            .await;
            if let Err(e) = outcome {
                let _ = upload.abort().await;
                return Err(e);
            }
            let result = upload.finish().await?;
            (
                file.expect("file is returned by every read"),
                digester
                    .expect("digester is returned by every read")
                    .finish(),
                result,
            )
        }
    };
    changed(&file)?;
    let (etag, version) = if result.etag.is_some() {
        (result.etag, result.version)
    } else {
        // Some stores (WebDAV) do not return the ETag from a put.
        let meta = store.head(&key).await?;
        (meta.etag, result.version.or(meta.version))
    };
    Ok(FileObject {
        size,
        key,
        etag,
        version,
        digests,
    })
}
