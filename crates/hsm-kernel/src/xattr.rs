//! Extended attributes on open descriptors.
//!
//! Stubs are described by xattrs in namespaces unprivileged users cannot write
//! (`security.*`, `trusted.*`); these wrappers only move bytes and report errors.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{KernelError, Result};

/// How [`fset`] treats an existing attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetMode {
    /// Create or replace.
    Any,
    /// Fail with EEXIST if present.
    Create,
    /// Fail with ENODATA if absent.
    Replace,
}

fn cname(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| KernelError::Sys {
        op: format!("xattr name {name:?}"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Read attribute `name` into `buf` (resized to fit). Returns `false` when it is absent.
pub fn fget(fd: BorrowedFd<'_>, name: &str, buf: &mut Vec<u8>) -> Result<bool> {
    let c = cname(name)?;
    if buf.capacity() < 256 {
        buf.reserve(256 - buf.len());
    }
    loop {
        let cap = buf.capacity();
        buf.resize(cap, 0);
        // SAFETY: buf has `cap` writable bytes; c is NUL-terminated; fd is borrowed valid.
        let n = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                c.as_ptr(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                cap,
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => {
                buf.clear();
                return Ok(false);
            }
            Some(libc::ERANGE) => {
                // Ask for the size, then retry (the value may change between the calls).
                // SAFETY: a zero size with a null buffer only queries the length.
                let need =
                    unsafe { libc::fgetxattr(fd.as_raw_fd(), c.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(KernelError::last(format!("fgetxattr {name}")));
                }
                buf.reserve((need as usize).max(cap * 2));
            }
            _ => {
                return Err(KernelError::Sys {
                    op: format!("fgetxattr {name}"),
                    source: err,
                });
            }
        }
    }
}

/// Read attribute `name` of `path` itself (a symlink is not followed) into `buf` (resized
/// to fit). Returns `false` when it is absent. For walks that must not open files in a
/// served tree (opening one would raise events).
pub fn lget(path: &std::path::Path, name: &str, buf: &mut Vec<u8>) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = cname(name)?;
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| KernelError::Sys {
        op: format!("lgetxattr {name}: path with a NUL byte"),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    if buf.capacity() < 256 {
        buf.reserve(256 - buf.len());
    }
    loop {
        let cap = buf.capacity();
        buf.resize(cap, 0);
        // SAFETY: buf has `cap` writable bytes; p and c are NUL-terminated.
        let n = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                c.as_ptr(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                cap,
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENODATA) => {
                buf.clear();
                return Ok(false);
            }
            // Too small: grow and retry (the value may grow again in between).
            Some(libc::ERANGE) => buf.reserve(cap.max(4096)),
            _ => {
                return Err(KernelError::Sys {
                    op: format!("lgetxattr {name}"),
                    source: err,
                });
            }
        }
    }
}

/// Set attribute `name` to `value`.
pub fn fset(fd: BorrowedFd<'_>, name: &str, value: &[u8], mode: SetMode) -> Result<()> {
    let c = cname(name)?;
    let flags = match mode {
        SetMode::Any => 0,
        SetMode::Create => libc::XATTR_CREATE,
        SetMode::Replace => libc::XATTR_REPLACE,
    };
    // SAFETY: value is a readable slice of value.len() bytes; c is NUL-terminated.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            c.as_ptr(),
            value.as_ptr().cast::<libc::c_void>(),
            value.len(),
            flags,
        )
    };
    if rc < 0 {
        return Err(KernelError::last(format!("fsetxattr {name}")));
    }
    Ok(())
}

/// Remove attribute `name`. Returns `false` when it was already absent.
pub fn fremove(fd: BorrowedFd<'_>, name: &str) -> Result<bool> {
    let c = cname(name)?;
    // SAFETY: c is NUL-terminated; fd is valid.
    let rc = unsafe { libc::fremovexattr(fd.as_raw_fd(), c.as_ptr()) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODATA) {
            return Ok(false);
        }
        return Err(KernelError::Sys {
            op: format!("fremovexattr {name}"),
            source: err,
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn lget_reads_by_path_without_following_symlinks() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("f");
        let file = std::fs::File::create(&f).expect("create");
        let mut buf = Vec::new();
        assert!(!lget(&f, "user.hsm.test", &mut buf).expect("get absent"));
        match fset(file.as_fd(), "user.hsm.test", &[5u8; 300], SetMode::Create) {
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => return,
            r => r.expect("set"),
        }
        let mut small = Vec::with_capacity(4);
        assert!(lget(&f, "user.hsm.test", &mut small).expect("get"));
        assert_eq!(small, vec![5u8; 300]);
        // The link itself has no such attribute (user.* cannot be set on symlinks).
        std::os::unix::fs::symlink(&f, d.path().join("l")).expect("symlink");
        assert!(!lget(&d.path().join("l"), "user.hsm.test", &mut buf).expect("link"));
    }

    #[test]
    fn user_xattr_round_trip() {
        let f = tempfile::tempfile().expect("tempfile");
        let fd = f.as_fd();
        let mut buf = Vec::new();
        assert!(!fget(fd, "user.hsm.test", &mut buf).expect("get absent"));
        let big = vec![7u8; 1000];
        match fset(fd, "user.hsm.test", &big, SetMode::Create) {
            // Some test hosts mount the temp dir without user xattrs.
            Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => return,
            r => r.expect("set"),
        }
        let mut small = Vec::with_capacity(4);
        assert!(fget(fd, "user.hsm.test", &mut small).expect("get"));
        assert_eq!(small, big);
        assert_eq!(
            fset(fd, "user.hsm.test", b"x", SetMode::Create)
                .err()
                .and_then(|e| e.errno()),
            Some(libc::EEXIST)
        );
        assert!(fremove(fd, "user.hsm.test").expect("remove"));
        assert!(!fremove(fd, "user.hsm.test").expect("remove again"));
    }
}
