"""qmail-inject, QMQP and QMTP speed, each against a peer or a floor measured in the same run.

- inject: ``qmail-inject -n`` as a process per message, ours vs notqmail 1.09's (if
  /var/qmail-ref/bin/qmail-inject exists): what a program calling sendmail pays;
- rewrite: the header work alone, in process (``prepare`` on a typical header);
- qmqp: M messages over QMQP from C concurrent clients into a real queue (QmqpServer, one
  connection per message) vs the floor: the same M messages written straight into the
  queue by C threads with QueueWriter (same fsyncs, no network, no protocol);
- qmtp: M messages pipelined over one QMTP connection vs the same floor, single thread.

Prints medians over ROUNDS rounds. Usage:
    python bench/inject.py [--messages M] [--clients C] [--rounds K]
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
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe

from pyqmail.control import ControlCache, load
from pyqmail.home import Home
from pyqmail.inject.headers import read_header
from pyqmail.inject.inject import Options, Settings, prepare
from pyqmail.layout import create_home
from pyqmail.netstring import decode_one, encode
from pyqmail.queue.submit import InProcessSubmitter
from pyqmail.smtp.qmqpd import QmqpServer
from pyqmail.smtp.qmtpd import QmtpServer

REF = Path("/var/qmail-ref/bin/qmail-inject")
BODY = b"x" * 2000 + b"\n"
HEADER = (b"From: Some One <someone@example.org>\nTo: a@b.example, Bob <bob>, c\n"
          b"Cc: list@lists.example\nSubject: benchmark\nMIME-Version: 1.0\n\n")  # fmt: skip
ENV = {"USER": "robot", "QMAILDEFAULTHOST": "dh", "QMAILDEFAULTDOMAIN": "dd.example",
       "QMAILPLUSDOMAIN": "pd.example", "QMAILIDHOST": "id.example"}  # fmt: skip


def median_time(fn: Callable[[], object], rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def new_home(root: Path, name: str) -> Home:
    h = Home(root / name, single_user=True)
    create_home(h, f"{name}.example", None)
    return h


def bench_inject(home: Home, n: int, rounds: int) -> None:
    env = {"PATH": os.environ["PATH"], "PYQMAIL_HOME": str(home.root), **ENV}
    ours = str(Path(sys.executable).parent / "qmail-inject")

    def run(prog: str) -> Callable[[], None]:
        def go() -> None:
            for _ in range(n):
                subprocess.run([prog, "-n"], input=HEADER + BODY, env=env,
                               stdout=subprocess.DEVNULL, check=True)  # fmt: skip

        return go

    t_ours = median_time(run(ours), rounds) / n

    def bare() -> None:
        for _ in range(n):
            subprocess.run([sys.executable, "-c", "pass"], check=True)

    t_py = median_time(bare, rounds) / n
    line = (f"inject  qmail-inject -n per message: ours {t_ours * 1000:7.2f} ms "
            f"(bare python start {t_py * 1000:6.2f} ms)")  # fmt: skip
    if REF.exists():
        t_ref = median_time(run(str(REF)), rounds) / n
        line += f"   notqmail {t_ref * 1000:6.2f} ms   ours/notqmail {t_ours / t_ref:5.1f}x"
    print(line)
    settings = Settings.from_env(load(home), ENV)
    k = 2000

    def rewrite() -> None:
        for _ in range(k):
            prepare(read_header(io.BytesIO(HEADER)), Options(), settings)

    t = median_time(rewrite, rounds) / k
    print(f"rewrite prepare() in process: {t * 1e6:7.1f} us/message ({1 / t:8.0f}/s)")


class Loop:
    def __init__(self, make: Callable[[], object]) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start() -> None:
            srv = await make().start("127.0.0.1", 0)  # type: ignore[attr-defined]
            self.port = srv.sockets[0].getsockname()[1]
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def qmqp_one(port: int, i: int) -> None:
    inner = encode(HEADER + BODY) + encode(b"s@x.example") + encode(b"r%d@y.example" % i)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(encode(inner))
        buf = b""
        while (got := decode_one(buf)) is None:
            buf += s.recv(4096)
        assert got[0].startswith(b"K"), got


def floor_one(sub: InProcessSubmitter, i: int) -> None:
    p = sub.begin(origin="network")
    p.write(HEADER + BODY)
    p.commit(b"s@x.example", [b"r%d@y.example" % i])


def bench_servers(tmp: Path, m: int, clients: int, rounds: int) -> None:
    central = new_home(tmp, "central")
    (central.control / "rcpthosts").write_text("y.example\n")
    sub = InProcessSubmitter(central)
    qmqp = Loop(lambda: QmqpServer(central, ControlCache(central), sub))
    qmtp = Loop(lambda: QmtpServer(central, ControlCache(central), sub))

    def over_qmqp() -> None:
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(lambda i: qmqp_one(qmqp.port, i), range(m)))

    def floor_threads() -> None:
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(lambda i: floor_one(sub, i), range(m)))

    def over_qmtp() -> None:
        data = b"".join(encode(b"\n" + HEADER + BODY) + encode(b"s@x.example")
                        + encode(encode(b"r%d@y.example" % i)) for i in range(m))  # fmt: skip
        with socket.create_connection(("127.0.0.1", qmtp.port)) as s:
            s.sendall(data)
            buf, got = b"", 0
            while got < m:
                item = decode_one(buf)
                if item is None:
                    buf += s.recv(65536)
                    continue
                assert item[0].startswith(b"K")
                buf = buf[item[1] :]
                got += 1

    def floor_serial() -> None:
        for i in range(m):
            floor_one(sub, i)

    t_q = median_time(over_qmqp, rounds)
    t_f = median_time(floor_threads, rounds)
    print(f"qmqp    {m} msgs, {clients} clients: {m / t_q:7.0f} msg/s   queue floor "
          f"{m / t_f:7.0f} msg/s   qmqp/floor {t_f / t_q:5.2f}")  # fmt: skip
    t_t = median_time(over_qmtp, rounds)
    t_s = median_time(floor_serial, rounds)
    print(f"qmtp    {m} msgs pipelined, 1 conn: {m / t_t:7.0f} msg/s   serial floor "
          f"{m / t_s:7.0f} msg/s   qmtp/floor {t_s / t_t:5.2f}")  # fmt: skip
    qmqp.stop()
    qmtp.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inject-runs", type=int, default=20)
    add_dir_arg(ap)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        tmp = Path(d)
        print(describe(tmp))
        bench_inject(new_home(tmp, "inj"), a.inject_runs, a.rounds)
        bench_servers(tmp, a.messages, a.clients, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
