#!/usr/bin/env python3
"""Chaos: readers verify every byte they read while the agent is SIGKILLed and restarted.

    chaos.py --src SRC --dst DST --hsm HSM --work DIR [--cycles N] [--readers N]
             [--processes N] [--lengths L,...] [--min-up S] [--max-up S] [--config FILE]

SRC holds the files, DST their stubs (already populated). The script starts the agent,
runs reader threads (half keep their descriptor open across agent deaths, half reopen for
each read; with --processes, that many reader processes instead, for rates a thread-bound
reader cannot reach), and every cycle SIGKILLs the agent at a random moment, waits a random short
while (readers stay blocked: the keeper holds the group), and starts a new agent. After
the last cycle it stops the agent cleanly and compares every file in full.

Prints one summary line per measure (key: value) and exits 0; the caller asserts.
"""
import argparse
import hashlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--hsm", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--config")
    p.add_argument("--cycles", type=int, default=10)
    p.add_argument("--readers", type=int, default=12)
    p.add_argument("--processes", type=int, default=0,
                   help="reader processes (one reader each) instead of --readers threads")
    p.add_argument("--span", type=float, default=1.0,
                   help="read only this fraction of each file (below 1, no file becomes "
                        "whole, so every read stays an event for the agent)")
    p.add_argument("--lengths", default="4096,65536,262144,1048576",
                   help="read lengths to draw from, in bytes")
    p.add_argument("--min-up", type=float, default=0.3)
    p.add_argument("--max-up", type=float, default=1.5)
    p.add_argument("--max-down", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args()


class Agent:
    def __init__(self, args):
        self.args = args
        self.proc = None
        self.generation = 0
        self.log = open(os.path.join(args.work, "chaos-agent.log"), "ab")

    def start(self):
        self.generation += 1
        ready = os.path.join(self.args.work, "chaos-ready")
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        cmd = [self.args.hsm]
        if self.args.config:
            cmd += ["--config", self.args.config]
        cmd += ["agent", self.args.dst, "--ready-file", ready]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while not os.path.exists(ready):
            if self.proc.poll() is not None:
                raise SystemExit(f"chaos: agent generation {self.generation} exited during start-up")
            if time.monotonic() > deadline:
                raise SystemExit("chaos: agent not ready after 30 s")
            time.sleep(0.01)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.reads = 0
        self.bytes = 0
        self.wrong_bytes = 0
        self.failed = 0
        self.errors = {}
        self.longest = 0.0

    def add(self, n, wrong, wait, err=None):
        with self.lock:
            self.reads += 1
            self.bytes += n
            self.wrong_bytes += wrong
            self.longest = max(self.longest, wait)
            if err is not None:
                self.failed += 1
                self.errors[err] = self.errors.get(err, 0) + 1


def wrong_count(a, b):
    if a == b:
        return 0
    n = min(len(a), len(b))
    diff = sum(1 for i in range(n) if a[i] != b[i])
    return diff + abs(len(a) - len(b))


def reader(idx, args, files, stop, stats, sources):
    rng = random.Random(idx * 7919 + (args.seed or 0))
    keep = idx % 2 == 0
    held = {}
    while not stop.is_set():
        name, size = rng.choice(files)
        off = rng.randrange(0, max(int(size * args.span), 1)) & ~4095
        length = min(rng.choice(args.lengths), size - off)
        if length <= 0:
            continue
        t0 = time.monotonic()
        try:
            if keep:
                fd = held.get(name)
                if fd is None:
                    fd = held[name] = os.open(os.path.join(args.dst, name), os.O_RDONLY)
                got = os.pread(fd, length, off)
            else:
                fd = os.open(os.path.join(args.dst, name), os.O_RDONLY)
                try:
                    got = os.pread(fd, length, off)
                finally:
                    os.close(fd)
        except OSError as e:
            stats.add(0, 0, time.monotonic() - t0, e.strerror or str(e.errno))
            continue
        wait = time.monotonic() - t0
        want = os.pread(sources[name], length, off)
        stats.add(len(got), wrong_count(got, want), wait)
    for fd in held.values():
        os.close(fd)


def reader_process(idx, args, files, stop, results):
    """One reader in a process of its own; its figures go back through `results`."""
    sources = {n: os.open(os.path.join(args.src, n), os.O_RDONLY) for n, _ in files}
    stats = Stats()
    reader(idx, args, files, stop, stats, sources)
    results.put((stats.reads, stats.bytes, stats.wrong_bytes, stats.failed, stats.errors,
                 stats.longest))


def main():
    args = parse()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    files = sorted(
        (n, os.path.getsize(os.path.join(args.src, n)))
        for n in os.listdir(args.src)
        if os.path.isfile(os.path.join(args.src, n))
    )
    sources = {n: os.open(os.path.join(args.src, n), os.O_RDONLY) for n, _ in files}
    rng = random.Random(args.seed)
    agent = Agent(args)
    agent.start()
    stats = Stats()
    if args.processes:
        mp = multiprocessing.get_context("fork")
        stop = mp.Event()
        results = mp.Queue()
        threads = [
            mp.Process(target=reader_process, args=(i, args, files, stop, results), daemon=True)
            for i in range(args.processes)
        ]
    else:
        stop = threading.Event()
        threads = [
            threading.Thread(target=reader, args=(i, args, files, stop, stats, sources),
                             daemon=True)
            for i in range(args.readers)
        ]
    for t in threads:
        t.start()
    downtime = []
    for _ in range(args.cycles):
        time.sleep(rng.uniform(args.min_up, args.max_up))
        t0 = time.monotonic()
        agent.kill()
        time.sleep(rng.uniform(0, args.max_down))
        agent.start()
        downtime.append(time.monotonic() - t0)
    time.sleep(args.min_up)
    stop.set()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    stuck = sum(1 for t in threads if t.is_alive())
    if args.processes:
        for _ in range(len(threads) - stuck):
            reads, nbytes, wrong, failed, errors, longest = results.get(timeout=30)
            stats.reads += reads
            stats.bytes += nbytes
            stats.wrong_bytes += wrong
            stats.failed += failed
            stats.longest = max(stats.longest, longest)
            for k, v in errors.items():
                stats.errors[k] = stats.errors.get(k, 0) + v
    status = agent.stop()
    # Whole-file check of everything, through a fresh agent.
    agent.start()
    whole_bad = 0
    for name, _ in files:
        with open(os.path.join(args.dst, name), "rb") as f, open(os.path.join(args.src, name), "rb") as s:
            if hashlib.sha256(f.read()).digest() != hashlib.sha256(s.read()).digest():
                whole_bad += 1
    final = agent.stop()
    print(f"cycles: {args.cycles}")
    print(f"agent generations: {agent.generation}")
    print(f"reads: {stats.reads}")
    print(f"bytes verified: {stats.bytes}")
    print(f"wrong bytes: {stats.wrong_bytes}")
    print(f"failed reads: {stats.failed} {stats.errors if stats.errors else ''}".rstrip())
    print(f"longest wait ms: {int(stats.longest * 1000)}")
    print(f"longest restart ms: {int(max(downtime, default=0) * 1000)}")
    print(f"readers stuck at the end: {stuck}")
    print(f"files differing at the end: {whole_bad}")
    print(f"clean stop exit statuses: {status} {final}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
