"""DKIM signing and verifying cost per message, and injection with signing on vs off.

For messages of 1 KiB and 100 KiB (a typical header, then body), RSA-2048 and Ed25519:

1. cost per message, ms (median of ``--calls`` timed calls, after a warm-up):
   - sign, dkimpy alone: ``Signer.signature`` with dkimpy's own RSA arithmetic (Python
     integers), what pyqmail did before ``dkim.fast_rsa``;
   - sign: ``Signer.signature`` as it runs now (RSA by OpenSSL through cryptography;
     Ed25519 is libsodium's through PyNaCl either way);
   - verify: dkimpy's verification of that signature, the key record given in memory (no
     DNS), as smtp/authcheck.py runs it;
2. injection rate: a message injected into a real queue in process
   (``InProcessSubmitter``, the fsyncs included) unsigned, then with ``sign=True`` (what
   qmail-inject does) for each key and both; messages/s (median of ``--rounds`` rounds of
   ``--messages``) and signed/unsigned, in the same run.

Usage:
    python bench/dkim.py [--calls N] [--messages N] [--rounds K] [--dir DIR]
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
import contextlib
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim as dkimpy  # type: ignore[import-untyped]
from bench.fsinfo import add_dir_arg, describe

from pyqmail import dkim
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.queue.submit import InProcessSubmitter

HEADER = (b"From: Some One <someone@example.test>\nTo: a@b.example\nCc: list@lists.example\n"
          b"Subject: benchmark\nDate: Mon, 7 Dec 2026 11:00:00 +0000\n"
          b"Message-ID: <bench@example.test>\nMIME-Version: 1.0\n"
          b"Content-Type: text/plain; charset=us-ascii\n\n")  # fmt: skip
KEYS = {"rsa-2048": "rsa", "ed25519": "ed"}


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(HEADER) - 1)] + b"\n"
    return HEADER + body


def costs_ms(fns: list[Callable[[], object]], calls: int) -> list[float]:
    """Median milliseconds of one call of each of ``fns``, called in turn (so the load of a
    shared machine falls on all alike), ``calls`` times each after one warm-up round."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(calls + 1):
        for fn, out in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            if i:
                out.append(time.perf_counter() - t)
    return [statistics.median(t) * 1000 for t in times]


def rates(fns: list[Callable[[], object]], n: int, rounds: int) -> list[list[float]]:
    """Messages per second of each of ``fns`` in each round: ``n`` calls of each in turn,
    per round, after one warm-up round."""
    out: list[list[float]] = [[] for _ in fns]
    for r in range(rounds + 1):
        for fn, got in zip(fns, out, strict=True):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            if r:
                got.append(n / (time.perf_counter() - t))
    return out


@contextlib.contextmanager
def dkimpy_alone() -> Iterator[None]:
    """Signing as before dkim.fast_rsa: dkimpy's own RSA arithmetic."""
    saved = dkim.fast_rsa
    dkim.fast_rsa = lambda _m: False  # type: ignore[assignment]
    original = dkimpy.RSASSA_PKCS1_v1_5_sign
    dkimpy.RSASSA_PKCS1_v1_5_sign = dkimpy.crypto.RSASSA_PKCS1_v1_5_sign
    try:
        yield
    finally:
        dkimpy.RSASSA_PKCS1_v1_5_sign = original
        dkim.fast_rsa = saved


def alone(fn: Callable[..., object], *args: object) -> object:
    with dkimpy_alone():
        return fn(*args)


def verifier(home: Home, domain: str) -> Callable[[bytes], bool]:
    """dkimpy's verification with the keygen records served from memory."""
    recs = {}
    for key in dkim.load_keys(home, domain):
        r = dkim.record_for(key)
        recs[r.name] = r.value.encode()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return recs.get(name.decode().rstrip("."), b"")

    def verify(signed: bytes) -> bool:
        return bool(dkimpy.DKIM(signed).verify(dnsfunc=dnsfunc))

    return verify


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=30, help="timed calls per cost figure")
    ap.add_argument("--messages", type=int, default=40, help="messages per injection round")
    ap.add_argument("--rounds", type=int, default=3)
    add_dir_arg(ap)
    args = ap.parse_args(argv)
    top = Path(tempfile.mkdtemp(prefix="pyqmail-bench-dkim-", dir=args.dir))
    home = Home(top / "qmail", single_user=True)
    create_home(home, "mx.example.test", None)
    dkim.keygen(home, "example.test", "rsa")
    dkim.keygen(home, "example.test", "ed", ed=True)
    selector = home.control / "dkim" / "example.test" / "selector"
    selector.write_text("rsa\ned\n")
    verify = verifier(home, "example.test")
    signer = dkim.Signer(home)
    print(describe(top))
    print(f"\ncost per message, ms (median of {args.calls} calls)")
    print(f"{'size':>7} {'key':>9} {'sign, dkimpy alone':>19} {'sign':>7} {'speed-up':>9} "
          f"{'verify':>7}")  # fmt: skip
    for size in (1024, 100 * 1024):
        msg = message(size)
        for name, sel in KEYS.items():
            selector.write_text(sel + "\n")
            before, after = costs_ms(
                [lambda: alone(signer.signature, msg), lambda: signer.signature(msg)],  # noqa: B023
                args.calls,
            )
            signed = re.sub(rb"\r?\n", b"\r\n", signer.signature(msg) + msg)
            assert verify(signed), "the signature does not verify"
            (ver,) = costs_ms([lambda: verify(signed)], args.calls)  # noqa: B023
            print(f"{size // 1024:>5}Ki {name:>9} {before:>19.2f} {after:>7.2f} "
                  f"{before / after:>8.1f}x {ver:>7.2f}")  # fmt: skip

    sub = InProcessSubmitter(home)

    def inject(msg: bytes, sign: bool) -> None:
        p = sub.begin(origin="uid", sign=sign)
        p.write(msg)
        r = p.commit_blocking(b"someone@example.test", [b"a@b.example"])
        assert r.ok, r

    print(f"\ninjection, messages/s (median of {args.rounds} rounds of {args.messages} each,")
    print("unsigned and signed in turn); signed/unsigned: the median of the rounds' ratios")
    print(f"{'size':>7} {'keys':>20} {'unsigned':>9} {'signed':>8} {'signed/unsigned':>16}")
    for size in (1024, 100 * 1024):
        msg = message(size)
        for label, keys, is_alone in (
            ("rsa-2048 dkimpy alone", "rsa", True),
            ("rsa-2048", "rsa", False),
            ("ed25519", "ed", False),
            ("both", "rsa\ned", False),
        ):
            selector.write_text(keys + "\n")
            sign = (lambda: alone(inject, msg, True)) if is_alone else (lambda: inject(msg, True))  # noqa: B023
            raw, signed_ = rates([lambda: inject(msg, False), sign], args.messages, args.rounds)  # noqa: B023
            ratio = statistics.median(b / a for a, b in zip(raw, signed_, strict=True))
            print(f"{size // 1024:>5}Ki {label:>20} {statistics.median(raw):>9.0f} "
                  f"{statistics.median(signed_):>8.0f} {ratio:>16.2f}")  # fmt: skip
    shutil.rmtree(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
