#!/usr/bin/env python3
"""Which sets of stub xattrs fit inside the inode, and which cost a block of their own.

Usage: inode-xattrs.py DIR   (root; DIR on the filesystem to probe)

Each case is an empty file (no data blocks) given xattrs of the sizes a stub's have:
the 12-byte marker (security.bpf.hsm), a resident map (trusted.hsm.map) of a small stub
(25 bytes: one granule, nothing resident) or larger, and metadata (trusted.hsm.meta) of a
short URL and key (60 bytes). st_blocks then counts only what the xattrs took outside the
inode: 0, or 8 (one 4 KiB block). On ext4 with its default 256-byte inodes, marker and a
map of up to 28 bytes stay in the inode and anything more spills into a block; xfs (512-byte
inodes) and btrfs (xattrs in the metadata tree) give 0 for every case. docs/KERNEL.md
("Stub xattrs inside the inode") states this; hsm populate --index relies on it.
"""
import os
import sys

MARKER = ("security.bpf.hsm", 12)
CASES = [
    ("marker alone", [MARKER]),
    ("marker + 25-byte map (a small stub, --index)", [MARKER, ("trusted.hsm.map", 25)]),
    ("marker + 28-byte map", [MARKER, ("trusted.hsm.map", 28)]),
    ("marker + 32-byte map", [MARKER, ("trusted.hsm.map", 32)]),
    ("marker + 25-byte map + 60-byte metadata", [MARKER, ("trusted.hsm.map", 25), ("trusted.hsm.meta", 60)]),
]


def main():
    d = sys.argv[1]
    for i, (label, xattrs) in enumerate(CASES):
        p = os.path.join(d, f"case{i}")
        with open(p, "wb"):
            pass
        for name, size in xattrs:
            os.setxattr(p, name, bytes([0xA5]) * size)
        os.sync()
        print(f"{label:<50} st_blocks {os.stat(p).st_blocks}")
        os.unlink(p)


main()
