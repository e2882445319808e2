"""Local delivery throughput: Maildir deliveries/s through the LocalSpawner vs raw writes.

Three rows, measured in the same run on the same file system:

* raw: the bare work of one Maildir delivery done by a thread pool (open tmp/NAME O_EXCL,
  write Return-Path + Delivered-To + message, fsync, link into new/, fsync new/, unlink)
  at the same concurrency: the physical limit;
* spawner, single-user: LocalSpawner.deliver() -> forked child -> qmail-local's whole
  algorithm (users/cdb lookup, .qmail lookup, loop check, Maildir write);
* spawner, uid drop (only as root): the same in multi-user mode, the delivery process
  dropping to a dedicated test user (created with useradd if missing, removed
  afterwards): once with the default reuse of that user's workers, once with a fresh
  child per delivery (qmail-lspawn's model, ``reuse=False``).

Usage: python bench/local.py [--n 2000] [--concurrency 10] [--size 1024] [--runs 5]
       [--dir /var/tmp]
Each run measures every row back to back; the table gives the median rate and the
median of the per-run ratios to raw (the machine's load moves both together).
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
import pwd
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe, make_dir

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.local import users
from pyqmail.local.maildir import unique_name
from pyqmail.local.spawn import LocalSpawner

BENCH_USER = "pyqbench"
HEADER = b"Return-Path: <sender@bench.example>\nDelivered-To: user-box@bench.example\n"


def make_message(size: int) -> bytes:
    head = b"From: sender@bench.example\nTo: user-box@bench.example\nSubject: bench\n\n"
    line = b"x" * 71 + b"\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def maildir(path: Path, uid: int | None = None) -> None:
    for sub in ("", "tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)
        if uid is not None:
            os.chown(path / sub, uid, uid)


def raw_run(md: Path, message: bytes, n: int, concurrency: int) -> float:
    """Deliveries/s of the bare Maildir sequence from a thread pool."""
    data = HEADER + message
    new_dir = md / "new"

    def one(_: int) -> None:
        name = unique_name()
        tmp = md / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, new_dir / name)
        dfd = os.open(new_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.unlink(tmp)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    return n / (time.perf_counter() - start)


def spawner_run(sp: LocalSpawner, mess: Path, n: int, concurrency: int) -> float:
    async def main() -> float:
        sem = asyncio.Semaphore(concurrency)
        failures: list[str] = []

        async def one() -> None:
            async with sem:
                out = await sp.deliver(mess, "sender@bench.example", "user-box@bench.example")
                if out.status.value != "K":
                    failures.append(out.text)

        start = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        elapsed = time.perf_counter() - start
        if failures:
            raise SystemExit(f"deliveries failed: {failures[0]!r} ({len(failures)} of {n})")
        return n / elapsed

    return asyncio.run(main())


def clear(md: Path) -> None:
    for sub in ("new", "tmp"):
        for name in os.listdir(md / sub):
            os.unlink(md / sub / name)


def ensure_user() -> tuple[int, int, bool]:
    """The bench user's (uid, gid, created_by_us)."""
    try:
        pw = pwd.getpwnam(BENCH_USER)
        return pw.pw_uid, pw.pw_gid, False
    except KeyError:
        pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", BENCH_USER],
        check=True,
    )
    pw = pwd.getpwnam(BENCH_USER)
    return pw.pw_uid, pw.pw_gid, True


def setup(base: Path, name: str, single_user: bool, uid: int, gid: int) -> tuple[Home, Path]:
    home = Home(base / name / "qmail", single_user=single_user)
    create_home(home, "bench.example", None)
    user_home = base / name / "user"
    user_home.mkdir(mode=0o755)
    maildir(user_home / "Maildir")
    (user_home / ".qmail-box").write_text("./Maildir/\n")
    for root, _dirs, files in os.walk(user_home):
        os.chown(root, uid, gid)
        for f in files:
            os.chown(os.path.join(root, f), uid, gid)
    (home.users / "assign").write_text(f"+user-:{BENCH_USER}:{uid}:{gid}:{user_home}:-::\n.\n")
    users.newu(home)
    return home, user_home / "Maildir"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    add_dir_arg(ap, "/var/tmp")
    a = ap.parse_args()

    base = make_dir(a.dir, "pyqmail-bench-local-")
    print(describe(base))
    base.chmod(0o755)
    message = make_message(a.size)
    mess = base / "mess"
    mess.write_bytes(message)
    as_root = os.geteuid() == 0
    created = False
    rows: dict[str, list[float]] = {"raw": [], "single-user": []}
    spawners: list[tuple[str, LocalSpawner, Path]] = []
    try:
        su_home, su_md = setup(base, "single", True, os.getuid(), os.getgid())
        sp = LocalSpawner(su_home, ControlCache(su_home))
        sp.start()
        spawners.append(("single-user", sp, su_md))
        if as_root:
            uid, gid, created = ensure_user()
            for reuse, label in ((True, "reused workers"), (False, "child per delivery")):
                mu_home, mu_md = setup(base, f"multi-{reuse}", False, uid, gid)
                sp2 = LocalSpawner(
                    mu_home, ControlCache(mu_home), message_owner=os.getuid(), reuse=reuse
                )
                sp2.start()
                spawners.append((f"uid drop, {label}", sp2, mu_md))
                rows[spawners[-1][0]] = []
        raw_md = base / "raw" / "Maildir"
        (base / "raw").mkdir()
        maildir(raw_md)

        # warm up every path once (page cache, first fork)
        raw_run(raw_md, message, 50, a.concurrency)
        clear(raw_md)
        for _label, s, md in spawners:
            spawner_run(s, mess, 50, a.concurrency)
            clear(md)

        for _ in range(a.runs):
            rows["raw"].append(raw_run(raw_md, message, a.n, a.concurrency))
            clear(raw_md)
            for label, s, md in spawners:
                rows[label].append(spawner_run(s, mess, a.n, a.concurrency))
                got = len(os.listdir(md / "new"))
                if got != a.n:
                    raise SystemExit(f"{label}: {got} files in new/, expected {a.n}")
                if label.startswith("uid drop"):
                    owners = {(md / "new" / f).stat().st_uid for f in os.listdir(md / "new")}
                    if owners != {uid}:
                        raise SystemExit(f"{label}: files owned by {owners}, not {uid}")
                clear(md)

        async def close_all() -> None:
            for _label, s, _md in spawners:
                await s.close()

        asyncio.run(close_all())
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if created:
            subprocess.run(["userdel", BENCH_USER], check=False)

    print(
        f"Maildir deliveries, {a.n} x {len(message)} bytes, concurrency {a.concurrency}, "
        f"median of {a.runs} runs, dir {a.dir}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'path':<30} {'deliveries/s':>12} {'vs raw':>7}   per run (rate/ratio)")
    for label, values in rows.items():
        ratios = [v / r for v, r in zip(values, rows["raw"], strict=True)]
        runs = " ".join(f"{v:.0f}/{q:.0%}" for v, q in zip(values, ratios, strict=True))
        print(
            f"{label:<30} {statistics.median(values):>12.0f} "
            f"{statistics.median(ratios):>7.0%}   {runs}"
        )


if __name__ == "__main__":
    main()
