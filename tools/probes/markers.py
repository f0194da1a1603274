#!/usr/bin/env python3
"""Shared data markers: what FICLONERANGE does with a block of zeros on this filesystem.

Usage: tools/probes/markers.py DIR   (root; DIR empty, on the filesystem to probe)

hsm puts a block of zeros (a data marker) at the start of every granule a stub still has
to fetch, so SEEK_DATA-driven copiers read it (docs/SEMANTICS.md, "Copying stubs"). It
shares one block between markers where the filesystem can (docs/KERNEL.md, "Shared data
markers"). This probe shows, for the filesystem DIR is on:
  - whether a 4 KiB block of zeros can be cloned into other files, and whether the clone
    reads as zeros, stops SEEK_DATA, and is reported shared by FIEMAP;
  - that st_blocks (so du) counts a shared block once in every file that holds it;
  - what happens to a file shorter than a block: a template of exactly its length, and a
    whole block cloned then cut back by ftruncate (btrfs keeps it shared, xfs copies it);
  - whether a clone between two mounts of the same filesystem works (the clone ioctls
    once required one mount; hsm falls back to writing on EXDEV).
"""
import errno, fcntl, os, struct, subprocess, sys

FICLONERANGE = 0x4020940D
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_SHARED = 0x2000
ZEROS = bytes(4096)


def clone(src, src_off, length, dst, dst_off):
    try:
        fcntl.ioctl(dst, FICLONERANGE, struct.pack("=qQQQ", src, src_off, length, dst_off))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def extents(fd):
    buf = bytearray(struct.pack("=QQIIII", 0, 2**64 - 1, 1, 0, 32, 0)) + bytes(56 * 32)
    fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    n = struct.unpack_from("=QQIIII", buf)[3]
    out = []
    for i in range(n):
        lo, phys, ln, _, _, fl, _, _, _ = struct.unpack_from("=QQQQQIIII", buf, 32 + 56 * i)
        out.append((lo, phys, ln, bool(fl & FIEMAP_EXTENT_SHARED)))
    return out


def new(d, name, size=0, data=None):
    p = os.path.join(d, name)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    if data is not None:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    if size:
        os.ftruncate(fd, size)
    return fd


def say(what, result):
    print(f"{what:<58} {result}")


def main():
    d = sys.argv[1]
    tpl = new(d, "template", data=ZEROS)
    a = new(d, "a", size=3 << 20)
    r = [clone(tpl, 0, 4096, a, g << 20) for g in range(3)]
    say("clone a 4 KiB zero block to 0, 1 MiB, 2 MiB of a 3 MiB file", ",".join(sorted(set(r))))
    if r[0] == "ok":
        say("  reads as zeros", os.pread(a, 4096, 1 << 20) == ZEROS and "yes" or "no")
        say("  SEEK_DATA from 4096", os.lseek(a, 4096, os.SEEK_DATA))
        ext = extents(a)
        say("  FIEMAP: extents, all shared, one physical block",
            f"{len(ext)}, {all(s for *_, s in ext)}, {len({p for _, p, _, _ in ext}) == 1}")
        say("  st_blocks of the file (512-byte units)", os.fstat(a).st_blocks)
    # A file shorter than a block.
    t3 = new(d, "template3000", data=ZEROS[:3000])
    b = new(d, "b", size=3000)
    r = clone(t3, 0, 3000, b, 0)
    c = new(d, "c", size=3000)
    r2 = clone(t3, 0, 3000, c, 0)
    shared = r == "ok" and r2 == "ok" and extents(b)[0][1] == extents(c)[0][1]
    say("3000-byte files from a 3000-byte template: clone, one block", f"{r}, {shared}")
    e = new(d, "e", size=3000)
    r = clone(tpl, 0, 4096, e, 0)
    size_after = os.fstat(e).st_size
    os.ftruncate(e, 3000)
    os.fsync(e)
    ext = extents(e) if r == "ok" else []
    kept = bool(ext) and ext[0][3] and ext[0][1] == extents(tpl)[0][1]
    say("whole block into a 3000-byte file: clone, size after it", f"{r}, {size_after}")
    say("  cut back to 3000 bytes: still the template's block", kept)
    say("  reads as 3000 zeros", os.pread(e, 8192, 0) == ZEROS[:3000] and "yes" or "no")
    # Two mounts of one filesystem.
    other = os.path.join(d, "bind")
    os.mkdir(other)
    subprocess.run(["mount", "--bind", d, other], check=True)
    try:
        f = os.open(os.path.join(other, "a"), os.O_RDWR)
        say("clone from one mount of the filesystem to another", clone(tpl, 0, 4096, f, 0))
        os.close(f)
    finally:
        subprocess.run(["umount", other], check=True)
        os.rmdir(other)


main()
