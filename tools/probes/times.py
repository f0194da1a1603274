#!/usr/bin/env python3
"""Which operations a fill is made of move a file's mtime and ctime (docs/SEMANTICS.md).

Usage: times.py DIR   (root; DIR on the filesystem to test)

For each step, a file whose mtime and ctime lie in the past is changed once and the probe
prints whether each time moved: a pwrite of data (what a fill does), futimens putting the
old mtime back (what the agent does after a fill), setting and removing a trusted.* xattr
(the stub's map), and, on XFS only, a pwrite through a descriptor from
XFS_IOC_OPEN_BY_HANDLE (which the kernel opens with FMODE_NOCMTIME: "invisible" I/O that
leaves both times alone). No system call sets a ctime: utimensat takes atime and mtime
only, and any change of them sets ctime to the current time (shown by the futimens step).
"""
import ctypes
import fcntl
import os
import struct
import sys
import time

XFS_SUPER_MAGIC = 0x58465342


def times(path):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def fresh(d, name):
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(b"x" * 8192)
    os.utime(p, ns=(10**18, 10**18))  # mtime in 2001; this also sets ctime to now
    time.sleep(0.02)  # let "now" move past that ctime
    return p


def report(step, before, after):
    mt = "moved" if after[0] != before[0] else "kept"
    ct = "moved" if after[1] != before[1] else "kept"
    print(f"{step}: mtime {mt}, ctime {ct}")


def fs_magic(d):
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(120)
    if libc.statfs(d.encode(), buf) != 0:
        return None
    return struct.unpack_from("l", buf.raw, 0)[0]


def xfs_open_by_handle(path, d):
    # struct xfs_fsop_handlereq (x86_64): u32 fd; void *path; u32 oflags; void *ihandle;
    # u32 ihandlen; void *ohandle; u32 *ohandlen.
    fmt = "I4xQI4xQI4xQQ"
    hbuf = ctypes.create_string_buffer(64)
    hlen = ctypes.c_uint32(64)
    cpath = ctypes.create_string_buffer(path.encode())
    iowr = lambda nr: (3 << 30) | (struct.calcsize(fmt) << 16) | (ord("X") << 8) | nr
    req = bytearray(struct.pack(fmt, 0, ctypes.addressof(cpath), 0, 0, 0,
                                ctypes.addressof(hbuf), ctypes.addressof(hlen)))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(dfd, iowr(105), req)  # XFS_IOC_PATH_TO_HANDLE
        req = bytearray(struct.pack(fmt, 0, 0, os.O_RDWR, ctypes.addressof(hbuf), hlen.value, 0, 0))
        return fcntl.ioctl(dfd, iowr(107), req)  # XFS_IOC_OPEN_BY_HANDLE: returns the fd
    finally:
        os.close(dfd)


def main():
    d = sys.argv[1]
    os.makedirs(d, exist_ok=True)

    p = fresh(d, "pwrite")
    b = times(p)
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"y" * 4096, 4096)
    os.close(fd)
    report("pwrite", b, times(p))

    p = fresh(d, "futimens")
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"y" * 4096, 4096)
    b = (10**18, times(p)[1])
    time.sleep(0.02)
    os.utime(fd, ns=(os.stat(p).st_atime_ns, 10**18))
    os.close(fd)
    report("pwrite then futimens(old mtime)", b, times(p))

    p = fresh(d, "xattr")
    b = times(p)
    os.setxattr(p, "trusted.hsm.probe", b"1")
    a = times(p)
    report("setxattr trusted.*", b, a)
    time.sleep(0.02)
    os.removexattr(p, "trusted.hsm.probe")
    report("removexattr trusted.*", a, times(p))

    if fs_magic(d) == XFS_SUPER_MAGIC:
        p = fresh(d, "handle")
        b = times(p)
        fd = xfs_open_by_handle(p, d)
        os.pwrite(fd, b"y" * 4096, 4096)
        os.close(fd)
        report("xfs: pwrite through XFS_IOC_OPEN_BY_HANDLE", b, times(p))
    else:
        print("xfs: pwrite through XFS_IOC_OPEN_BY_HANDLE: not xfs")


main()
