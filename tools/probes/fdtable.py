#!/usr/bin/env python3
"""How long growing a process's descriptor table takes, with and without other threads.

The kernel keeps each process's descriptors in a table it grows by doubling when a new
descriptor does not fit (256, 512, 1024, ...: FDSize in /proc/PID/status). When the table is
shared by other threads, each growth waits for an RCU grace period before the call that
needed the room returns. This probe times the dup2() calls that grow the table from 256 to
16384, first in a process of one thread, then (in a fresh child) with one other thread
alive, and prints each growth's time. The agent sizes its table at start for this
(docs/KERNEL.md, "Descriptor table growth"); fstests/tests/091 checks that it does.

Usage: tools/probes/fdtable.py        (any user; raises its soft RLIMIT_NOFILE to 16384)
"""
import os
import resource
import sys
import threading
import time


def fdsize():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("FDSize:"):
                return int(line.split()[1])
    raise SystemExit("no FDSize in /proc/self/status")


def growths(label):
    fd = os.open("/dev/null", os.O_RDONLY)
    out = []
    size = fdsize()
    while size < 16384:
        t = time.perf_counter()
        os.dup2(fd, size)  # the first number that does not fit
        ms = (time.perf_counter() - t) * 1e3
        os.close(size)
        new = fdsize()
        out.append(f"{size}->{new} {ms:.2f} ms")
        size = new
    print(f"{label}: " + ", ".join(out))


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 16384:
        raise SystemExit(f"RLIMIT_NOFILE hard limit {hard} < 16384")
    resource.setrlimit(resource.RLIMIT_NOFILE, (16384, hard))
    for threaded in (False, True):
        pid = os.fork()
        if pid == 0:
            if threaded:
                stop = threading.Event()
                threading.Thread(target=stop.wait, daemon=True).start()
                growths("one other thread alive")
                stop.set()
            else:
                growths("single-threaded       ")
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)


main()
