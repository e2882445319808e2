"""Queue insert throughput vs. the raw fsync limit of the same disk, measured together.

For each concurrency (1, 8, 32, 128 threads) it runs, interleaved, for DURATION seconds each:

- queue: ``QueueWriter.begin()``, write a 4 KiB message, ``commit()`` to 1 recipient
  (the full crash-safe sequence: pid file, mess link, fsync mess, fsync mess/S,
  intd, fsync intd, link todo, fsync todo/);
- raw: the same file writes and fsyncs per message, in the writer's order, with no
  queue logic: create+write 4 KiB to one file and the envelope to a second, fsync
  both files, fsync both directories (each thread on its own, nothing shared).

Prints the median inserts/s over ROUNDS rounds and the median of the per-round
queue/raw ratios (raw and queue run back to back, so both see the same load). Usage:
    python bench/queue.py [--dir DIR] [--duration S] [--rounds N] [--conc 1,8,32,128]
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

# This file's name would shadow the standard library's queue (imported by
# concurrent.futures through pyqmail.queue.writer): take bench/ off the import path and
# put the project root (bench/fsinfo.py) on it before any other import.
_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))

import argparse
import platform
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe, make_dir

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.writer import QueueWriter

MESSAGE = (b"Subject: bench\n\n" + b"x" * 79 + b"\n") * 51  # ~4 KiB
MESSAGE = MESSAGE[:4096]
RCPT = [b"someone@example.org"]


def run_threads(conc: int, duration: float, one: Callable[[int, int], None]) -> float:
    """Run ``one(thread, i)`` in ``conc`` threads for ``duration`` s; operations per second."""
    counts = [0] * conc
    stop = time.monotonic() + duration
    start = threading.Barrier(conc + 1)

    def worker(t: int) -> None:
        start.wait()
        i = 0
        while time.monotonic() < stop:
            one(t, i)
            i += 1
        counts[t] = i

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(conc)]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    start.wait()
    for th in threads:
        th.join()
    return sum(counts) / (time.monotonic() - t0)


def bench_queue(base: Path, conc: int, duration: float, share: bool = True) -> float:
    home = Home(base / "qmail", single_user=True)
    create_home(home, "bench.example", None)
    w = QueueWriter(home, notify=lambda n: None, share_dir_syncs=share)

    def one(t: int, i: int) -> None:
        p = w.begin()
        p.write(MESSAGE)
        p.commit(b"bench@example.org", RCPT)

    try:
        return run_threads(conc, duration, one)
    finally:
        shutil.rmtree(home.root)


def bench_raw(base: Path, conc: int, duration: float) -> float:
    d1, d2 = base / "raw1", base / "raw2"
    d1.mkdir()
    d2.mkdir()
    env = b"u0\0p1\0Fbench@example.org\0Tsomeone@example.org\0"

    def put(path: Path, data: bytes) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        return fd

    def sync_close(fd: int) -> None:
        os.fsync(fd)
        os.close(fd)

    def fsync_dir(d: Path) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)

    def one(t: int, i: int) -> None:
        name = f"{t}.{i}"
        a = put(d1 / name, MESSAGE)
        b = put(d2 / name, env)
        sync_close(a)
        sync_close(b)
        fsync_dir(d1)
        fsync_dir(d2)

    try:
        return run_threads(conc, duration, one)
    finally:
        shutil.rmtree(d1)
        shutil.rmtree(d2)


def machine(path: Path) -> str:
    fs = subprocess.run(
        ["findmnt", "-no", "FSTYPE", "-T", str(path)], capture_output=True, text=True
    ).stdout.split()[:1]
    dev = subprocess.run(
        ["df", "--output=source", str(path)], capture_output=True, text=True
    ).stdout.split()[-1:]
    return (
        f"nproc {os.cpu_count()}, fs {' '.join(fs)} on {' '.join(dev)}, "
        f"kernel {platform.release()}, Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    add_dir_arg(ap)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conc", default="1,8,32,128")
    ap.add_argument(
        "--unshared", action="store_true", help="also run the queue without shared dir fsyncs"
    )
    a = ap.parse_args()
    concs = [int(c) for c in a.conc.split(",")]
    base = make_dir(a.dir, "pyqmail-bench-")
    print(f"# queue inserts of 4 KiB messages, {machine(base)}")
    print(f"# {a.rounds} rounds x {a.duration:g} s per cell, medians; dir {base}")
    print(f"# {describe(base)}")
    results: dict[tuple[str, int], list[float]] = {}
    try:
        # Raw and queue alternate in short slices and are compared pairwise, so that
        # load from other processes hits both sides of each ratio alike.
        for _ in range(a.rounds):
            for c in concs:
                raw = bench_raw(base, c, a.duration)
                q = bench_queue(base, c, a.duration)
                results.setdefault(("raw", c), []).append(raw)
                results.setdefault(("queue", c), []).append(q)
                results.setdefault(("ratio", c), []).append(q / raw)
                if a.unshared:
                    u = bench_queue(base, c, a.duration, share=False)
                    results.setdefault(("unshared", c), []).append(u)
                    results.setdefault(("uratio", c), []).append(u / raw)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    extra = f" {'unshared/s':>11} {'unsh/raw':>9}" if a.unshared else ""
    print(f"{'threads':>8} {'raw/s':>10} {'queue/s':>10} {'queue/raw':>10}{extra}")
    med = statistics.median
    for c in concs:
        line = (
            f"{c:>8} {med(results[('raw', c)]):>10.0f} {med(results[('queue', c)]):>10.0f}"
            f" {med(results[('ratio', c)]):>10.0%}"
        )
        if a.unshared:
            line += f" {med(results[('unshared', c)]):>11.0f} {med(results[('uratio', c)]):>9.0%}"
        print(line)
    print("# queue/raw = median over rounds of the paired ratio")


if __name__ == "__main__":
    main()
