"""Smarthost with AUTH: what the kept authenticated connection saves.

RemoteAgent delivers N 1 KiB messages through smtproutes to one relay on loopback (the
STARTTLS + AUTH relay of tests/integration/test_remote_smarthost.py, certificate from a
trustme CA), at a given concurrency, three ways:

* auth, kept: control/smtproutesauth set; connections are kept between messages (the
  default), so the TLS handshake and AUTH happen once per connection;
* auth, one connection per message (``idle_timeout=0``, as the qmail-remote command);
* no auth: no credentials, opportunistic STARTTLS, connections kept (the relay accepts).

Usage: python bench/smarthost.py [--n 500] [--concurrency 20]
Prints deliveries/s for each and the ratio kept/one-per-message.
"""

# ruff: noqa: E402  (sys.path is fixed before the imports)
from __future__ import annotations

import os
import sys

_here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != _here]
sys.path.insert(0, os.path.dirname(_here))  # the project root, for tests/

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import trustme
from tests.integration.test_remote_smarthost import AUTHLINE, AuthRelay, server_ctx

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.outcome import Status
from pyqmail.remote.deliver import RemoteAgent


async def run(home: Home, cafile: str, relay: AuthRelay, n: int, conc: int, idle: float) -> float:
    mess = home.root / "mess"
    mess.write_bytes(b"Subject: bench\n\n" + b"x" * 1000 + b"\n")
    async with relay:
        (home.control / "smtproutes").write_text(f":[127.0.0.1]:{relay.port}\n")
        agent = RemoteAgent(home, ControlCache(home), tls_cafile=cafile, idle_timeout=idle)
        sem = asyncio.Semaphore(conc)

        async def one(i: int) -> None:
            async with sem:
                (o,) = await agent.deliver(mess, "a@test.example", [f"r{i}@far.example"])
                assert o.status is Status.OK, o.text

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        took = time.perf_counter() - t0
        await agent.close()
    return n / took


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=20)
    a = p.parse_args()
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as d:
        cafile = str(Path(d) / "ca.pem")
        ca.cert_pem.write_to_path(cafile)
        home = Home(Path(d) / "q", single_user=True)
        create_home(home, "mx.bench.example", None)
        results = {}
        for name, auth, idle in (("auth, kept", True, 5.0), ("auth, one per message", True, 0.0),
                                 ("no auth, kept", False, 5.0)):  # fmt: skip
            authfile = home.control / "smtproutesauth"
            if auth:
                authfile.write_text(AUTHLINE)
                authfile.chmod(0o600)
            else:
                authfile.unlink(missing_ok=True)
            relay = AuthRelay(server_ctx(ca), require_auth=auth)
            results[name] = asyncio.run(run(home, cafile, relay, a.n, a.concurrency, idle))
            print(f"{name:24} {results[name]:8.1f} deliveries/s  "
                  f"({relay.connections} connections, {len(relay.authed)} AUTH)")  # fmt: skip
        ratio = results["auth, kept"] / results["auth, one per message"]
        print(f"ratio kept / one per message: {ratio:.2f}")
        plain = results["auth, kept"] / results["no auth, kept"]
        print(f"ratio auth kept / no auth kept: {plain:.2f}")


if __name__ == "__main__":
    main()
