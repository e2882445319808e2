#!/usr/bin/env python3
"""Where an SMTP transaction's time goes: the median time of each step, as a client sees it.

Starts ``pyqmail run --single-user`` (or, with ``--root``, as root on a multi-user home)
on a fresh home under DIR, then drives it with SESSIONS concurrent clients, a new
connection per message as smtp-source makes them, and prints the median and 90th
percentile of each step: connect and greeting, HELO, MAIL, RCPT, DATA, the message up
to the 250 after its final dot (the queue's commit), QUIT. With ``--port`` it drives an
MTA already listening there instead; with ``--postfix`` a private Postfix (bench/e2e.py's,
delivering to a virtual Maildir under DIR) is driven the same way after pyqmail, each
run of one followed by a run of the other.

The step after the dot is the one that waits for the disk: on a journalled file system,
two journal commits one after the other for qmail's queue (message and envelope, then
the todo/ link), one for Postfix's. The client is asyncio in this process; its own CPU
competes with the server's, so compare runs made the same way, not absolute times.

Usage: bench/phases.py [--dir DIR] [--n 2000] [--sessions 10] [--runs 2] [--root]
[--postfix | --port P]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.e2e import VENV_BIN, free_port, make_home, postfix_config, wait_port
from bench.fsinfo import add_dir_arg, describe, make_dir

STEPS = ("connect", "helo", "mail", "rcpt", "data", "dot", "quit", "total")
BODY = (
    b"From: <sender@bench.local>\r\nTo: <x@vbench.local>\r\nSubject: phases\r\n\r\n"
    + (b"X" * 78 + b"\r\n") * 12
    + b".\r\n"
)


async def _reply(r: asyncio.StreamReader) -> bytes:
    while True:
        line = await r.readline()
        if line[3:4] != b"-":
            return line


async def _one(port: int, times: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await _reply(r)
    times["connect"].append(time.perf_counter() - t0)
    for step, cmd in (
        ("helo", b"HELO client.bench.local\r\n"),
        ("mail", b"MAIL FROM:<sender@bench.local>\r\n"),
        ("rcpt", b"RCPT TO:<x@vbench.local>\r\n"),
        ("data", b"DATA\r\n"),
        ("dot", BODY),
        ("quit", b"QUIT\r\n"),
    ):
        t = time.perf_counter()
        w.write(cmd)
        line = await _reply(r)
        times[step].append(time.perf_counter() - t)
        if line[:1] not in b"23":
            raise SystemExit(f"{step}: {line!r}")
    w.close()
    times["total"].append(time.perf_counter() - t0)


async def drive(port: int, n: int, sessions: int) -> tuple[float, dict[str, list[float]]]:
    """Send ``n`` messages over ``sessions`` concurrent clients; (msg/s, step times)."""
    times: dict[str, list[float]] = {k: [] for k in STEPS}
    per = n // sessions

    async def client() -> None:
        for _ in range(per):
            await _one(port, times)

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(sessions)))
    return per * sessions / (time.perf_counter() - t), times


def table(label: str, rate: float, times: dict[str, list[float]]) -> str:
    def ms(v: list[float], q: float) -> str:
        return f"{1000 * sorted(v)[min(len(v) - 1, int(q * len(v)))]:.2f}"

    cells = " | ".join(f"{ms(times[k], 0.5)} / {ms(times[k], 0.9)}" for k in STEPS)
    return f"| {label} | {rate:.0f} | {cells} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--root", action="store_true", help="pyqmail run as root, multi-user home")
    ap.add_argument("--port", type=int, help="drive an MTA already listening on this port")
    ap.add_argument("--postfix", action="store_true", help="a private Postfix beside pyqmail")
    add_dir_arg(ap)
    a = ap.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    stops: list[Callable[[], None]] = []
    targets: list[tuple[str, int]] = []
    where = Path(a.dir) if a.dir else Path(tempfile.gettempdir())
    try:
        if a.port is not None:
            targets.append(("given", a.port))
        else:
            d = make_dir(a.dir, "pyqmail-bench-phases-")
            home, _maildir, env = make_home(d, a.root)
            port = free_port()
            argv = [str(VENV_BIN / "pyqmail"), "run", "--home", str(home)]
            argv += ["--smtp", f"127.0.0.1:{port}"] + ([] if a.root else ["--single-user"])
            quiet = subprocess.DEVNULL
            procs.append(subprocess.Popen(argv, env=env, stdout=quiet, stderr=quiet,
                                          start_new_session=True))  # fmt: skip
            stops.append(functools.partial(shutil.rmtree, d, ignore_errors=True))
            wait_port(port)
            targets.append(("pyqmail", port))
        if a.postfix:
            pd = make_dir(a.dir, "pyqmail-bench-phases-postfix-")
            pd.chmod(0o755)
            pport = free_port()
            pfx = postfix_config(pd, pport)
            pfx.start()
            stops.append(pfx.stop)
            stops.append(functools.partial(shutil.rmtree, pd, ignore_errors=True))
            wait_port(pport)
            targets.append(("postfix", pport))
        print(describe(where))
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
              f"n={a.n} sessions={a.sessions}; median / 90th percentile in ms")  # fmt: skip
        print("| MTA | msg/s | " + " | ".join(STEPS) + " |")
        print("|---" * (len(STEPS) + 2) + "|")
        rates: dict[str, list[float]] = {label: [] for label, _ in targets}
        for _ in range(a.runs):
            for label, port in targets:
                rate, times = asyncio.run(drive(port, a.n, a.sessions))
                rates[label].append(rate)
                print(table(label, rate, times), flush=True)
        for label, rs in rates.items():
            print(f"{label}: median {statistics.median(rs):.0f} msg/s")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
        for stop in stops:
            stop()


if __name__ == "__main__":
    main()
