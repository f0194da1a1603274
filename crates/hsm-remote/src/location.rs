//! Remote URLs and object keys.

use std::path::{Component, Path, PathBuf};

use crate::RemoteError;

/// A parsed remote base URL. Issue-2 scope: `file://` URLs and plain local paths; the other
/// schemes object_store knows are recognised so the error can say what is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    /// A local directory (object_store's local backend).
    Local { root: PathBuf, url: String },
}

impl RemoteUrl {
    /// Parse a URL (`file:///abs/dir`) or an absolute or relative local directory path.
    pub fn parse(input: &str) -> Result<Self, RemoteError> {
        let err = |detail: String| RemoteError::Config {
            url: input.to_string(),
            detail,
        };
        if let Some(rest) = input.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(err(
                    "a file:// URL needs an absolute path (file:///dir)".into()
                ));
            }
            let u = url::Url::parse(input).map_err(|e| err(e.to_string()))?;
            let root = u
                .to_file_path()
                .map_err(|()| err("not a local path".into()))?;
            return Ok(RemoteUrl::local(normalize(&root)));
        }
        if let Some((scheme, _)) = input.split_once("://") {
            return Err(err(format!(
                "the {scheme}:// scheme is not supported by this build (supported: file://)"
            )));
        }
        let path = Path::new(input);
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| err(format!("current directory: {e}")))?
                .join(path)
        };
        Ok(RemoteUrl::local(normalize(&abs)))
    }

    fn local(root: PathBuf) -> Self {
        let url = url::Url::from_directory_path(&root)
            .map(|u| u.as_str().trim_end_matches('/').to_string())
            .unwrap_or_else(|()| format!("file://{}", root.display()));
        RemoteUrl::Local { root, url }
    }

    /// The canonical URL string stored in stubs.
    pub fn as_str(&self) -> &str {
        match self {
            RemoteUrl::Local { url, .. } => url,
        }
    }

    /// The local root, for a local remote.
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            RemoteUrl::Local { root, .. } => Some(root),
        }
    }
}

/// Lexically normalise an absolute path (drop `.`, resolve `..`) without touching the disk.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The object key for a file at `rel` (relative to a local remote's root), or an error that
/// names the path when object_store cannot address it.
///
/// object_store's local backend maps each key segment to a file name literally, and refuses
/// segments with ASCII control characters, `.` and `..`; names that are not UTF-8 cannot be
/// keys at all.
pub fn key_from_relative_path(rel: &Path) -> Result<String, String> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                let s = name
                    .to_str()
                    .ok_or_else(|| format!("{}: file name is not valid UTF-8", rel.display()))?;
                if s.chars().any(|ch| ch.is_ascii_control()) {
                    return Err(format!(
                        "{}: file name contains a control character, which object stores cannot address",
                        rel.display()
                    ));
                }
                parts.push(s);
            }
            _ => return Err(format!("{}: not a plain relative path", rel.display())),
        }
    }
    if parts.is_empty() {
        return Err("empty path".to_string());
    }
    let key = parts.join("/");
    object_store::path::Path::parse(&key).map_err(|e| format!("{}: {e}", rel.display()))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_forms() {
        let a = RemoteUrl::parse("file:///srv/src/").expect("file url");
        assert_eq!(a.local_root(), Some(Path::new("/srv/src")));
        assert_eq!(a.as_str(), "file:///srv/src");
        let b = RemoteUrl::parse("/srv/./x/../src").expect("path");
        assert_eq!(b, a);
        let spaced = RemoteUrl::parse("/srv/with space").expect("space");
        assert_eq!(spaced.as_str(), "file:///srv/with%20space");
        assert_eq!(
            RemoteUrl::parse(spaced.as_str()).expect("round trip"),
            spaced
        );
        assert!(RemoteUrl::parse("file://relative").is_err());
        let e = RemoteUrl::parse("s3://bucket/prefix").expect_err("unsupported");
        assert!(e.to_string().contains("s3://"), "{e}");
    }

    #[test]
    fn keys_from_paths() {
        assert_eq!(
            key_from_relative_path(Path::new("a/b c/d%e#f?.txt")).expect("key"),
            "a/b c/d%e#f?.txt"
        );
        assert!(key_from_relative_path(Path::new("a/new\nline")).is_err());
        assert!(key_from_relative_path(Path::new("../x")).is_err());
        assert!(key_from_relative_path(Path::new("")).is_err());
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
        assert!(key_from_relative_path(Path::new(bad)).is_err());
    }
}
