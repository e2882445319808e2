"""Backlog drain: a full queue emptied to a local sink, pyqmail's scheduler beside Postfix.

Issue 20's "rate at which a 100,000-message backlog drains to a local sink". Both MTAs
relay to the same Postfix ``smtp-sink`` on a loopback port, one recipient per message,
1 KiB messages:

* pyqmail: a fresh single-user home whose ``control/smtproutes`` sends ``sink.test`` to
  the sink; N messages are written into its queue while no scheduler runs, by the
  project's own queue writer (queue/writer.py, group commits of 1,000: the real
  format, every message fsynced, in todo/ as qmail-queue leaves it). Then
  ``pyqmail run --single-user`` starts (an SMTP listener on an unused port, default
  controls: concurrencyremote 20) and is timed from its start until the queue is empty
  (no file left in todo/, info/ or mess/). Start-up = until the first ``success`` in its
  log; CPU = the daemon's process tree (with its reaped children) from /proc.
* postfix: bench/remote.py's private Postfix: N messages held by its smtpd (from
  smtp-source), ``postsuper -H ALL`` releases them, timed until its queue is empty
  (default per-destination concurrency 20, connection cache); CPU = its master's tree.

Usage: python bench/backlog.py [--n 100000] [--size 1024] [--runs 1] [--dir DIR]
       [--no-postfix]
Prints the file system, a table (drain msg/s, seconds, start-up, CPU ms/msg) and the
ratio pyqmail/postfix. Needs root for Postfix.
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

# bench/queue.py would shadow the standard library's queue: take bench/ off the path.
_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the project root, for bench.* and tests/

import argparse
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe, make_dir
from bench.remote import HZ, free_port, message, postfix_drain, start_sink, tree_jiffies

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.writer import QueueError, QueueWriter, commit_many

VENV_BIN = Path(sys.executable).parent
BATCH = 1000


def fill_queue(home: Home, n: int, size: int) -> float:
    """Write ``n`` messages into ``home``'s queue (nobody is poked); seconds taken."""
    w = QueueWriter(home)
    t0 = time.perf_counter()
    batch: list[tuple[object, bytes, list[bytes]]] = []
    for i in range(n):
        p = w.begin(origin="uid")
        p.write(message(i, size))
        batch.append((p, b"bench@test.example", [f"u{i}@sink.test".encode()]))
        if len(batch) == BATCH or i == n - 1:
            for r in commit_many(batch):  # type: ignore[arg-type]
                if isinstance(r, QueueError):
                    raise SystemExit(f"queue writer: {r}")
            batch = []
    w.close()
    return time.perf_counter() - t0


def queue_dirs(home: Home) -> list[str]:
    paths = QueuePaths(home.queue)
    dirs = [str(paths.dir("todo"))]
    for kind in ("info", "mess"):
        dirs += [str(d) for d in paths.split_dirs(kind)]
    return dirs


def any_file(dirs: list[str]) -> bool:
    """Whether any of ``dirs`` holds an entry (stops at the first: cheap when full)."""
    for d in dirs:
        with os.scandir(d) as it:
            if next(it, None) is not None:
                return True
    return False


def count_files(dirs: list[str]) -> int:
    return sum(len(os.listdir(d)) for d in dirs)


def run_pyqmail(a: argparse.Namespace, sink_port: int) -> dict[str, float]:
    d = make_dir(a.dir, "pyqmail-bench-backlog-")
    d.chmod(0o755)
    proc: subprocess.Popen[bytes] | None = None
    try:
        home = Home(d / "qmail", single_user=True)
        create_home(home, "bench.test.example", None)
        (home.control / "smtproutes").write_text(f"sink.test:127.0.0.1:{sink_port}\n")
        fill = fill_queue(home, a.n, a.size)
        dirs = queue_dirs(home)
        queued = len(os.listdir(dirs[0]))
        os.sync()
        env = dict(os.environ, PYQMAIL_SINGLE_USER="1")
        logpath = d / "log"
        log = open(logpath, "wb")  # noqa: SIM115 - closed with the process
        argv = [str(VENV_BIN / "pyqmail"), "run", "--home", str(home.root), "--single-user",
                "--smtp", f"127.0.0.1:{free_port()}"]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        first: float | None = None
        seen = 0
        poll = 0.02 if a.n <= 5000 else 0.1
        deadline = t0 + max(600, a.n / 20)
        while time.perf_counter() < deadline and proc.poll() is None:
            if first is None:
                with open(logpath, "rb") as f:
                    f.seek(seen)
                    chunk = f.read()
                if b": success:" in chunk:
                    first = time.perf_counter() - t0
                elif not any_file(dirs):
                    break
                seen += max(0, chunk.rfind(b"\n") + 1)
            elif not any_file(dirs):
                break
            time.sleep(poll)
        wall = time.perf_counter() - t0
        busy = tree_jiffies(proc.pid)
        left = count_files(dirs)
        text = logpath.read_bytes()
        ok, temp, perm = (text.count(w) for w in (b": success:", b": deferral:", b": failure:"))
        if left or ok < queued:
            odd = [x for x in text.decode(errors="replace").splitlines()
                   if not x.startswith(("starting", "delivery", "new msg", "info msg",
                                        "end msg", "status:"))]  # fmt: skip
            print("pyqmail log (unusual lines):", *odd[-20:], sep="\n  ", file=sys.stderr)
        return {"rate": queued / wall, "wall": wall, "start": first or 0.0,
                "cpu_ms": 1000 * busy / HZ / max(queued, 1), "n": queued, "left": left,
                "ok": ok, "temp": temp, "perm": perm, "fill": queued / fill}  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        shutil.rmtree(d, ignore_errors=True)


def median(rs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rs) for k in rs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-postfix", action="store_true")
    add_dir_arg(ap)
    a = ap.parse_args()
    for prog in ("smtp-sink", "smtp-source"):
        if not shutil.which(prog):
            raise SystemExit(f"{prog} (Debian package postfix) is needed")
    where = make_dir(a.dir, "pyqmail-bench-backlog-sink-")
    print(describe(where))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    sink_port = free_port()
    sink = start_sink(sink_port, [])
    try:
        pq = median([run_pyqmail(a, sink_port) for _ in range(a.runs)])
        pf: dict[str, float] | None = None
        if not a.no_postfix and shutil.which("postfix") and os.geteuid() == 0:
            pf = median([postfix_drain(a.n, a.size, a.dir, sink_port, poll=0.1 if a.n > 5000
                                       else 0.02) for _ in range(a.runs)])  # fmt: skip
    finally:
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(where, ignore_errors=True)
    print(f"backlog drain, N={a.n} x {a.size} B to smtp-sink on loopback, "
          f"median of {a.runs} run(s)")  # fmt: skip
    print(f"{'MTA':10s} {'drain msg/s':>11s} {'seconds':>8s} {'start-up s':>10s} "
          f"{'after start':>11s} {'CPU ms/msg':>10s}  result")  # fmt: skip
    after = pq["n"] / max(pq["wall"] - pq["start"], 1e-9)
    print(f"{'pyqmail':10s} {pq['rate']:11.0f} {pq['wall']:8.1f} {pq['start']:10.2f} "
          f"{after:11.0f} {pq['cpu_ms']:10.2f}  queued={pq['n']:.0f} K={pq['ok']:.0f} "
          f"Z={pq['temp']:.0f} D={pq['perm']:.0f} left={pq['left']:.0f} (queue written at "
          f"{pq['fill']:.0f} msg/s)")  # fmt: skip
    if pf is not None:
        print(f"{'postfix':10s} {pf['rate']:11.0f} {pf['wall']:8.1f} {'-':>10s} "
              f"{'-':>11s} {pf['cpu_ms']:10.2f}  held={pf['held']:.0f} "
              f"left={pf['left']:.0f}")  # fmt: skip
        print(f"ratio pyqmail/postfix (drain rate) = {pq['rate'] / pf['rate']:.2f}")


if __name__ == "__main__":
    main()
