#!/usr/bin/env python3
"""Probe the write-lease facts `hsm evict` relies on (docs/KERNEL.md, "Leases").

  tools/probes/leases.py DIR     # DIR: a directory on ext4, xfs or btrfs

Prints one line per fact; exits 1 if any differs from what the agent assumes.
"""
import errno
import fcntl
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time

signal.signal(signal.SIGIO, signal.SIG_IGN)
d = sys.argv[1]
p = os.path.join(d, "lease-probe")
with open(p, "wb") as f:
    f.write(b"x" * 8192)
bad = 0


def check(label, got, want):
    global bad
    ok = got == want
    bad += not ok
    print(f"{label}: {got}{'' if ok else f' (expected {want})'}")


def lease(flags):
    fd = os.open(p, flags)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return "granted"
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)


check("write lease, nobody else has it open", lease(os.O_RDWR), "granted")
other = os.open(p, os.O_RDONLY)
check("write lease, another read-only descriptor open", lease(os.O_RDWR), "EAGAIN")
m = mmap.mmap(other, 0, prot=mmap.PROT_READ)
os.close(other)
check("write lease, only a mapping left", lease(os.O_RDWR), "EAGAIN")
m.close()
check("write lease, after munmap", lease(os.O_RDWR), "granted")

fd = os.open(p, os.O_RDWR)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
child = subprocess.Popen(
    [sys.executable, "-c", f"import os,time;t=time.time();os.open({p!r},os.O_RDONLY);print(time.time()-t)"],
    stdout=subprocess.PIPE, text=True)
time.sleep(0.5)
during = fcntl.fcntl(fd, fcntl.F_GETLEASE)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
waited = float(child.communicate()[0])
os.close(fd)
check("F_GETLEASE while a read-only open breaks it", "F_RDLCK" if during == fcntl.F_RDLCK else during, "F_RDLCK")
check("the other open waited for the lease (>= 0.4 s)", waited >= 0.4, True)

exe = os.path.join(d, "lease-probe-sleep")
shutil.copy("/bin/sleep", exe)
proc = subprocess.Popen([exe, "3"])
time.sleep(0.3)
try:
    os.close(os.open(exe, os.O_RDWR))
    got = "opened"
except OSError as e:
    got = errno.errorcode[e.errno]
check("O_RDWR open of a file being executed", got, "ETXTBSY")
fd = os.open(exe, os.O_RDONLY)
try:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    got = "granted"
except OSError as e:
    got = errno.errorcode[e.errno]
os.close(fd)
check("write lease on a read-only descriptor of it", got, "EAGAIN")
proc.kill()
proc.wait()
os.unlink(exe)
os.unlink(p)
sys.exit(1 if bad else 0)
