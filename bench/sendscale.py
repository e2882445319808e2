#!/usr/bin/env python3
"""The scheduler with a big queue: start-up scan, memory, and the cost per new message.

For each backlog size N (default 0, 10,000 and 100,000): a fresh home gets N queued
messages written straight in qmail's on-disk format (mess/S/N, info/S/N, remote/S/N with
an mtime one day ahead, so they are scheduled but not due), then the scheduler
(send/manager.py) starts on it with an in-process remote agent that accepts at once.
Measured:

* start-up: time for ``Scheduler.start()`` (the info/ scan and the heap build) and the
  resident memory it added, per queued message;
* steady state: K new messages (default 2,000) queued through the real QueueWriter with
  the in-process notify, each to a remote recipient (so they go through todo, info/remote,
  the remote channel's heap beside the N waiting entries, delivery, marking and cleanup);
  wall time and this process's CPU per message.

If each event costs O(log N), the steady-state CPU per message barely moves between N = 0
and N = 100,000; a rescan per event would grow it linearly. The fsyncs of the queue writer
and of preprocessing are part of every message's cost here, as in the daemon.

Usage: bench/sendscale.py [--sizes 0,10000,100000] [--k 2000]
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

# bench/queue.py would shadow the standard library's queue (imported by asyncio and
# concurrent.futures): take bench/ off the import path before any other import.
_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the project root, for bench/fsinfo.py

import argparse
import asyncio
import io
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe, make_dir

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.outcome import Outcome
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueWriter
from pyqmail.send.log import SendLog
from pyqmail.send.manager import Scheduler


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def fill(home: Home, n: int) -> None:
    """N messages to x@remote.example, next try tomorrow (no fsync: a bench fixture)."""
    paths = QueuePaths(home.queue)
    later = time.time() + 86400
    tmp = home.queue / "pid" / "fill"
    for i in range(n):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"Received: (qmail 1 invoked by uid 0); x\nSubject: backlog %d\n\nx\n" % i)
        num = os.fstat(fd).st_ino
        os.close(fd)
        os.rename(tmp, paths.mess(num))
        with open(paths.info(num), "wb") as f:
            f.write(b"Fbulk@test.example\0")
        r = paths.remote(num)
        with open(r, "wb") as f:
            f.write(b"Tx%d@remote.example\0" % i)
        os.utime(r, (later, later))


async def measure(home: Home, k: int) -> dict[str, float]:
    delivered = 0

    async def local(mess: Path, sender: str, rcpt: str) -> Outcome:
        return Outcome.ok("did 1+0+0\n")

    async def remote(mess: Path, sender: str, rcpts: list[str]) -> list[Outcome]:
        nonlocal delivered
        delivered += len(rcpts)
        return [Outcome.ok("accepted\n")] * len(rcpts)

    sched = Scheduler(home, lambda: load(home), local=local, remote=remote,
                      log=SendLog(io.BytesIO()), use_trigger=False)  # fmt: skip
    m0 = rss_mb()
    t0 = time.perf_counter()
    await sched.start()
    t_start = time.perf_counter() - t0
    m1 = rss_mb()
    backlog = sched.queued()
    writer = QueueWriter(home, notify=sched.notify)
    sched.submitter = writer
    loop = asyncio.get_running_loop()

    def put(i: int) -> int:
        p = writer.begin()
        p.write(b"Subject: new %d\n\nx\n" % i)
        return p.commit(b"new@test.example", [b"y%d@remote.example" % i])

    c0 = time.process_time()
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(10)  # ten concurrent submitters, as ten SMTP sessions

    async def one(i: int) -> None:
        async with sem:
            await loop.run_in_executor(None, put, i)

    await asyncio.gather(*(one(i) for i in range(k)))
    while delivered < k or sched.queued() > backlog:
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await sched.stop()
    return {
        "backlog": backlog,
        "start_s": t_start,
        "start_us_per_msg": 1e6 * t_start / max(backlog, 1),
        "mem_mb": m1 - m0,
        "mem_b_per_msg": (m1 - m0) * 2**20 / max(backlog, 1),
        "rate": k / wall,
        "cpu_ms_per_msg": 1000 * cpu / k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0,10000,100000")
    ap.add_argument("--k", type=int, default=2000)
    add_dir_arg(ap)
    a = ap.parse_args()
    print(describe(a.dir or tempfile.gettempdir()))
    print(f"{'backlog':>8} {'start s':>8} {'us/msg':>7} {'mem MB':>7} {'B/msg':>6} "
          f"{'new msg/s':>10} {'CPU ms/msg':>11}")  # fmt: skip
    for n in (int(x) for x in a.sizes.split(",")):
        d = make_dir(a.dir, "pyqmail-bench-sendscale-")
        try:
            home = Home(d / "q", single_user=True)
            create_home(home, "mx.test.example", None)
            fill(home, n)
            r = asyncio.run(measure(home, a.k))
            per = (
                (f"{r['start_us_per_msg']:7.1f}", f"{r['mem_b_per_msg']:6.0f}") if n else ("-", "-")
            )
            print(f"{int(r['backlog']):8d} {r['start_s']:8.2f} {per[0]:>7} "
                  f"{r['mem_mb']:7.1f} {per[1]:>6} {r['rate']:10.0f} "
                  f"{r['cpu_ms_per_msg']:11.2f}", flush=True)  # fmt: skip
        finally:
            shutil.rmtree(d, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"(peak RSS of this process: {peak} MB)")


if __name__ == "__main__":
    main()
