"""DKIM signing cost per message against raw injection, measured in the same run.

For messages of 1 KiB and 100 KiB (a typical header, then body):
- queue: a message injected into a real queue in process (``InProcessSubmitter``, the
  fsyncs included), unsigned: the floor;
- queue+sign: the same with ``sign=True`` (what qmail-inject does), for an RSA-2048 key,
  an Ed25519 key, and both (two signatures);
- sign only: ``Signer.signature`` alone (no queue), the same keys.

Prints messages/s (median of ROUNDS rounds of N messages) and the signed rate as a share
of the raw one. Usage:
    python bench/dkim.py [--messages N] [--rounds K] [--dir DIR]
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

# bench/queue.py would shadow the standard library's queue: take bench/ off the path.
_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the project root, for bench/fsinfo.py

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.fsinfo import add_dir_arg, describe

from pyqmail import dkim
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.submit import InProcessSubmitter

HEADER = (b"From: Some One <someone@example.test>\nTo: a@b.example\nCc: list@lists.example\n"
          b"Subject: benchmark\nDate: Mon, 7 Dec 2026 11:00:00 +0000\n"
          b"Message-ID: <bench@example.test>\nMIME-Version: 1.0\n"
          b"Content-Type: text/plain; charset=us-ascii\n\n")  # fmt: skip


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(HEADER) - 1)] + b"\n"
    return HEADER + body


def rate(fn: Callable[[], object], n: int, rounds: int) -> float:
    """Messages per second: the median of ``rounds`` runs of ``n`` calls."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    add_dir_arg(ap)
    args = ap.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="pyqmail-bench-dkim-", dir=args.dir))
    home = Home(top / "qmail", single_user=True)
    create_home(home, "mx.example.test", None)
    dkim.keygen(home, "example.test", "rsa")
    dkim.keygen(home, "example.test", "ed", ed=True)
    selector = home.control / "dkim" / "example.test" / "selector"
    sub = InProcessSubmitter(home)
    print(describe(top))
    print(f"{args.messages} messages x {args.rounds} rounds; messages/s (median)")
    print(
        f"{'size':>8} {'keys':>10} {'queue':>9} {'queue+sign':>11} {'share':>6} {'sign only':>10}"
    )

    def inject(msg: bytes, sign: bool) -> None:
        p = sub.begin(origin="uid", sign=sign)
        p.write(msg)
        p.commit(b"someone@example.test", [b"a@b.example"])

    for size in (1024, 100 * 1024):
        msg = message(size)
        raw = rate(lambda: inject(msg, False), args.messages, args.rounds)  # noqa: B023
        for keys in ("rsa", "ed", "rsa\ned"):
            selector.write_text(keys + "\n")
            signed = rate(lambda: inject(msg, True), args.messages, args.rounds)  # noqa: B023
            signer = dkim.Signer(home)
            only = rate(lambda: signer.signature(msg), args.messages, args.rounds)  # noqa: B023
            name = {"rsa": "rsa-2048", "ed": "ed25519", "rsa\ned": "both"}[keys]
            print(f"{size // 1024:>6}Ki {name:>10} {raw:>9.0f} {signed:>11.0f} "
                  f"{signed / raw:>6.2f} {only:>10.0f}")  # fmt: skip
    for f in (home.queue / "todo").iterdir():
        f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
