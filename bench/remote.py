"""Remote delivery throughput: RemoteAgent vs Debian Postfix relaying to the same smtp-sink.

All in one run, on loopback, with 1 KiB messages:

* pyqmail: N message files (the queue's mess/ files) delivered by RemoteAgent.deliver()
  through smtproutes to Postfix's smtp-sink, at concurrency 20, 200 and 1,000 (one asyncio
  loop, uvloop as the daemon uses it when installed). Each level runs in a fresh process:
  deliveries/s, CPU ms per delivery (the process's user+sys), peak RSS.
* deferral: the same against smtp-sink answering 4xx to RCPT (``-r rcpt``): the cost of a
  temporary failure (connect, greeting, EHLO, MAIL, RCPT, QUIT).
* postfix: a private Debian Postfix instance (``postfix -c DIR``) whose smtpd puts every
  message on hold; N messages are submitted with smtp-source, then ``postsuper -H ALL``
  releases them and we time until its queue is empty. Postfix relays with its default
  per-destination concurrency of 20 and its connection cache; CPU is the whole machine's
  master process tree's CPU during the drain (its reaped daemons included).

Usage: python bench/remote.py [--n 5000] [--levels 20,200,1000] [--runs 1] [--no-uvloop]
       [--no-postfix]
Prints a table and the ratio pyqmail/postfix at concurrency 20. Needs root for Postfix.
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

# bench/queue.py would shadow the standard library's queue (imported by asyncio and
# concurrent.futures): take bench/ off the import path before any other import.
_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the project root, for tests/peers.py

import argparse
import asyncio
import json
import resource
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe, make_dir
from tests.peers import PrivatePostfix

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.outcome import Status
from pyqmail.remote.deliver import RemoteAgent

HZ = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, secs: float = 20) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def tree_jiffies(root: int) -> int:
    """CPU of ``root`` and every live descendant, with the reaped children of each
    (utime + stime + cutime + cstime): Postfix's master reaps its exiting daemons."""
    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = sum(int(x) for x in fields[11:15])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0)
        todo.extend(c for c, p in parent.items() if p == pid)
    return total


def message(i: int, size: int) -> bytes:
    head = f"From: bench@test.example\nTo: u{i}@sink.test\nSubject: bench {i}\n\n".encode()
    line = b"x" * 71 + b"\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(head) - 1)] + b"\n"
    return head + body


def start_sink(port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    user = ["-u", "root"] if os.geteuid() == 0 else []
    p = subprocess.Popen(
        ["smtp-sink", *user, *extra, f"127.0.0.1:{port}", "4096"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return p


# -- one pyqmail run, in its own process -------------------------------------------------
def child(args: argparse.Namespace) -> None:
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    home = Home(Path(args.home), single_user=True)
    files = sorted(Path(args.msgdir).iterdir())
    agent = RemoteAgent(home, ControlCache(home))

    async def run() -> dict[str, object]:
        sem = asyncio.Semaphore(args.concurrency)
        counts = {s.value: 0 for s in Status}

        async def one(i: int, f: Path) -> None:
            async with sem:
                (o,) = await agent.deliver(f, "bench@test.example", [f"u{i}@sink.test"])
            counts[o.status.value] += 1

        await agent.deliver(files[0], "bench@test.example", ["warm@sink.test"])
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        return {"wall": wall, "cpu": cpu, "counts": counts,
                "rss_mb": r1.ru_maxrss / 1024}  # fmt: skip

    print(json.dumps(asyncio.run(run())))


def run_child(args: argparse.Namespace, home: Path, msgdir: Path, conc: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--home", str(home), "--msgdir", str(msgdir),
           "--concurrency", str(conc)] + (["--no-uvloop"] if args.no_uvloop else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = json.loads(out)
    n = sum(res["counts"].values())
    return {
        "rate": n / res["wall"],
        "cpu_ms": 1000 * res["cpu"] / n,
        "rss_mb": res["rss_mb"],
        "ok": res["counts"]["K"],
        "temp": res["counts"]["Z"],
        "perm": res["counts"]["D"],
    }


# -- Postfix relaying the same messages ---------------------------------------------------
def postfix_config(d: Path, smtpd_port: int, sink_port: int) -> PrivatePostfix:
    """Postfix holding what it accepts, relaying everything to the sink once released."""
    return PrivatePostfix(
        d,
        smtpd_port,
        hostname="relay.bench.example",
        settings=f"""relayhost = [127.0.0.1]:{sink_port}
smtpd_client_restrictions = check_client_access static:HOLD
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_client_connection_count_limit = 1000
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
queue_run_delay = 1s
""",
    )


def queue_count(q: Path) -> int:
    n = 0
    for sub in ("incoming", "active", "deferred", "hold", "maildrop"):
        for _, _, files in os.walk(q / sub):
            n += len(files)
    return n


def queue_empty(q: Path) -> bool:
    """Whether Postfix's queue has no message left: stops at the first file found, so a
    poll costs little while a large queue drains (hold/ is a flat directory)."""

    def any_file(d: str) -> bool:
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        if any_file(e.path):
                            return True
                    else:
                        return True
        except FileNotFoundError:
            pass
        return False

    return not any(any_file(str(q / sub))
                   for sub in ("incoming", "active", "deferred", "hold", "maildrop"))  # fmt: skip


def postfix_drain(
    n: int, size: int, where: str | None, sink_port: int, poll: float = 0.02
) -> dict[str, float]:
    """A private Postfix holds ``n`` messages of ``size`` bytes (from smtp-source, one
    recipient each), then ``postsuper -H ALL`` releases them to the sink: the release's
    drain rate (msg/s until its queue is empty) and the master tree's CPU ms/message.
    Its files go in a new directory under ``where``. bench/backlog.py uses it too."""
    d = make_dir(where, "pyqmail-bench-postfix-")
    d.chmod(0o755)
    port = free_port()
    pfx = postfix_config(d, port, sink_port)
    try:
        pfx.start()
        wait_port(port)
        subprocess.run(
            ["smtp-source", "-s", "20", "-m", str(n), "-l", str(size),
             "-f", "bench@test.example", "-t", "u@sink.test", f"127.0.0.1:{port}"],
            check=True, capture_output=True,
        )  # fmt: skip
        q = pfx.queue
        deadline = time.monotonic() + max(120, n / 100)
        while queue_count(q) < n and time.monotonic() < deadline:
            time.sleep(max(poll, 0.05))
        held = queue_count(q)
        master = pfx.pid
        c0 = tree_jiffies(master)
        t0 = time.perf_counter()
        # hold -> deferred, then flush the deferred queue now (not at the next queue run)
        subprocess.run(["postsuper", "-c", str(d), "-H", "ALL"], check=True, capture_output=True)
        subprocess.run(["postqueue", "-c", str(d), "-f"], capture_output=True)
        deadline = time.monotonic() + max(600, n / 20)
        while not queue_empty(q) and time.monotonic() < deadline:
            time.sleep(poll)
        wall = time.perf_counter() - t0
        left = queue_count(q)
        busy = tree_jiffies(master) - c0
        return {"rate": held / wall, "cpu_ms": 1000 * busy / HZ / max(held, 1),
                "held": held, "left": left, "wall": wall}  # fmt: skip
    finally:
        pfx.stop()
        shutil.rmtree(d, ignore_errors=True)


def run_postfix(args: argparse.Namespace, sink_port: int) -> dict[str, float]:
    return postfix_drain(args.n, args.size, args.dir, sink_port)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--levels", default="20,200,1000")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--no-uvloop", action="store_true")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--home")
    ap.add_argument("--msgdir")
    ap.add_argument("--concurrency", type=int, default=20)
    add_dir_arg(ap)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    tmp = make_dir(args.dir, "pyqmail-bench-remote-")
    print(describe(tmp))
    sinks: list[subprocess.Popen[bytes]] = []
    try:
        home = Home(tmp / "qmail", single_user=True)
        create_home(home, "bench.test.example", None)
        msgdir = tmp / "mess"
        msgdir.mkdir()
        for i in range(args.n):
            (msgdir / str(i)).write_bytes(message(i, args.size))
        ok_port, defer_port = free_port(), free_port()
        sinks.append(start_sink(ok_port, []))
        sinks.append(start_sink(defer_port, ["-r", "rcpt"]))
        rows: list[tuple[str, dict[str, float]]] = []

        def median_run(conc: int) -> dict[str, float]:
            runs = [run_child(args, home.root, msgdir, conc) for _ in range(args.runs)]
            return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

        (home.control / "smtproutes").write_text(f"sink.test:127.0.0.1:{ok_port}\n")
        levels = [int(x) for x in args.levels.split(",")]
        for conc in levels:
            rows.append((f"pyqmail c={conc}", median_run(conc)))
        (home.control / "smtproutes").write_text(f"sink.test:127.0.0.1:{defer_port}\n")
        for conc in (levels[0], levels[-1]):
            rows.append((f"pyqmail 4xx c={conc}", median_run(conc)))
        pf: dict[str, float] | None = None
        if not args.no_postfix and shutil.which("postfix") and os.geteuid() == 0:
            pfs = [run_postfix(args, ok_port) for _ in range(args.runs)]
            pf = {k: statistics.median(r[k] for r in pfs) for k in pfs[0]}

        loop = "asyncio" if args.no_uvloop else "uvloop"
        print(f"remote delivery, {args.n} x {args.size} B to smtp-sink on loopback, "
              f"{os.cpu_count()} cores, loop={loop}, median of {args.runs} run(s)")  # fmt: skip
        print(f"{'row':24s} {'deliv/s':>9s} {'CPU ms/dlv':>11s} {'RSS MB':>8s}  result")
        for name, r in rows:
            res = f"K={r['ok']:.0f} Z={r['temp']:.0f} D={r['perm']:.0f}"
            print(f"{name:24s} {r['rate']:9.0f} {r['cpu_ms']:11.2f} {r['rss_mb']:8.1f}  {res}")
        if pf is not None:
            print(f"{'postfix (relay, c=20)':24s} {pf['rate']:9.0f} {pf['cpu_ms']:11.2f} "
                  f"{'-':>8s}  held={pf['held']:.0f} left={pf['left']:.0f}")  # fmt: skip
            ours = rows[0][1]["rate"]
            print(f"ratio pyqmail c={levels[0]} / postfix: {ours / pf['rate']:.2f}")
    finally:
        for p in sinks:
            p.terminate()
            p.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
