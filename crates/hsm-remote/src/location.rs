//! Remote URLs and object keys.

use std::path::{Component, Path, PathBuf};

use crate::RemoteError;

/// The kind of object store behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    S3,
    Azure,
    Gcs,
    Http,
}

/// A parsed remote base URL: a local directory, or an object store URL with an optional
/// key prefix (`s3://bucket/prefix`, `az://container/prefix`, `gs://bucket/prefix`,
/// `https://host/prefix`; object_store's other spellings are accepted too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    /// A local directory (object_store's local backend).
    Local { root: PathBuf, url: String },
    /// An object store; keys are relative to `prefix`.
    Object {
        kind: StoreKind,
        /// The canonical URL stored in stubs (no trailing slash).
        url: String,
        /// The URL handed to object_store's builder.
        store_url: url::Url,
        prefix: object_store::path::Path,
    },
}

impl RemoteUrl {
    /// Parse a URL or an absolute or relative local directory path.
    pub fn parse(input: &str) -> Result<Self, RemoteError> {
        let err = |detail: String| RemoteError::Config {
            url: redact_url(input),
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
        if input.contains("://") {
            let u = url::Url::parse(input.trim_end_matches('/')).map_err(|e| err(e.to_string()))?;
            if !u.username().is_empty() || u.password().is_some() {
                return Err(err(
                    "credentials do not belong in the URL: use the configuration or the environment".into(),
                ));
            }
            let (scheme, path) =
                object_store::ObjectStoreScheme::parse(&u).map_err(|e| err(e.to_string()))?;
            use object_store::ObjectStoreScheme as S;
            let kind = match scheme {
                S::AmazonS3 => StoreKind::S3,
                S::MicrosoftAzure => StoreKind::Azure,
                S::GoogleCloudStorage => StoreKind::Gcs,
                S::Http => StoreKind::Http,
                S::Local => return RemoteUrl::parse(u.path()),
                other => return Err(err(format!("{other:?} stores are not supported"))),
            };
            let prefix = object_store::path::Path::parse(path).map_err(|e| err(e.to_string()))?;
            return Ok(RemoteUrl::Object {
                kind,
                url: u.as_str().trim_end_matches('/').to_string(),
                store_url: u,
                prefix,
            });
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
            RemoteUrl::Local { url, .. } | RemoteUrl::Object { url, .. } => url,
        }
    }

    /// The local root, for a local remote.
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            RemoteUrl::Local { root, .. } => Some(root),
            RemoteUrl::Object { .. } => None,
        }
    }
}

/// A URL fit for logs and error messages: no user or password.
pub fn redact_url(input: &str) -> String {
    match url::Url::parse(input) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => input.to_string(),
    }
}

/// Why a key cannot name a path below DST, or a path cannot be an object key. Every
/// variant names the key or path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("empty key")]
    EmptyKey,
    #[error("key {0:?} is absolute")]
    Absolute(String),
    #[error("key {key:?} {why}; refused")]
    Refused { key: String, why: &'static str },
    #[error("empty path")]
    EmptyPath,
    #[error("{}: file name is not valid UTF-8", .0.display())]
    NotUtf8(PathBuf),
    #[error(
        "{}: file name contains a control character, which object stores cannot address",
        .0.display()
    )]
    ControlCharacter(PathBuf),
    #[error("{}: not a plain relative path", .0.display())]
    NotPlain(PathBuf),
    #[error("{}: {detail}", .path.display())]
    Unaddressable { path: PathBuf, detail: String },
}

/// Check an object key (relative to a remote's prefix) before it becomes a path under DST:
/// every segment must be a plain name. Returns why not, naming the key.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::EmptyKey);
    }
    if key.starts_with('/') {
        return Err(KeyError::Absolute(key.to_string()));
    }
    for part in key.split('/') {
        let why = if part.is_empty() {
            Some("has an empty segment")
        } else if part == "." || part == ".." {
            Some("has a '.' or '..' segment that would leave its directory")
        } else if part.contains('\0') {
            Some("contains NUL")
        } else if part.len() > 255 {
            Some("has a segment longer than 255 bytes")
        } else if part.chars().any(|c| c.is_ascii_control()) {
            Some("contains a control character")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(KeyError::Refused {
                key: key.to_string(),
                why,
            });
        }
    }
    Ok(())
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
pub fn key_from_relative_path(rel: &Path) -> Result<String, KeyError> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                let s = name
                    .to_str()
                    .ok_or_else(|| KeyError::NotUtf8(rel.to_path_buf()))?;
                if s.chars().any(|ch| ch.is_ascii_control()) {
                    return Err(KeyError::ControlCharacter(rel.to_path_buf()));
                }
                parts.push(s);
            }
            _ => return Err(KeyError::NotPlain(rel.to_path_buf())),
        }
    }
    if parts.is_empty() {
        return Err(KeyError::EmptyPath);
    }
    let key = parts.join("/");
    object_store::path::Path::parse(&key).map_err(|e| KeyError::Unaddressable {
        path: rel.to_path_buf(),
        detail: e.to_string(),
    })?;
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
        let s3 = RemoteUrl::parse("s3://bucket/pre/fix/").expect("s3");
        assert!(
            matches!(&s3, RemoteUrl::Object { kind: StoreKind::S3, prefix, .. } if prefix.as_ref() == "pre/fix")
        );
        assert_eq!(s3.as_str(), "s3://bucket/pre/fix");
        assert!(matches!(
            RemoteUrl::parse("az://container/p").expect("az"),
            RemoteUrl::Object {
                kind: StoreKind::Azure,
                ..
            }
        ));
        assert!(matches!(
            RemoteUrl::parse("gs://b").expect("gs"),
            RemoteUrl::Object {
                kind: StoreKind::Gcs,
                ..
            }
        ));
        assert!(matches!(
            RemoteUrl::parse("http://127.0.0.1:8080/pkgs").expect("http"),
            RemoteUrl::Object {
                kind: StoreKind::Http,
                ..
            }
        ));
        let e = RemoteUrl::parse("https://user:pw@example.com/x").expect_err("credentials in URL");
        assert!(!e.to_string().contains("pw"), "{e}");
        assert!(RemoteUrl::parse("ftp://x/y").is_err());
    }

    #[test]
    fn keys_that_would_escape_are_refused() {
        assert!(check_key("a/b/c.txt").is_ok());
        for bad in [
            "",
            "/abs",
            "a//b",
            "../x",
            "a/../../x",
            "a/./b",
            "a/b/",
            "new\nline",
            "nul\0x",
        ] {
            let e = check_key(bad).expect_err(bad).to_string();
            assert!(e.contains("key") || e.contains("empty"), "{e}");
        }
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
