"""What MTA-STS costs remote delivery: the policy look-up per message, and TLS deliveries.

    .venv/bin/python bench/mtasts.py [--n 2000] [--messages 200]

Debian's dnsmasq serves an MX and an ``_mta-sts`` TXT record for sts.test, and an MX only
for plain.test; sts.test's enforce policy is already in HOME/mtasts (the steady state: a
policy is fetched once per max_age or id change, so no HTTPS here).

* look-ups: N x ``MtaSts.policy`` (warm: the TXT answer in dnspython's cache, the policy in
  memory) for sts.test and for plain.test (a cached NXDOMAIN), against N x the MX look-up
  every delivery already makes; microseconds per call and the ratio to the MX look-up.
* deliveries: M messages one after another to a local STARTTLS peer with a trustme
  certificate, for plain.test (opportunistic TLS, connections kept between messages, as
  by default), plain.test with the pool off, and sts.test (enforce: verified TLS, never a
  kept connection); messages per second and the ratios to the first.

The machine is shared: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trustme
from tests.conftest import dnsmasq_server
from tests.integration.test_remote_peers import Peer, Script

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.remote.mtasts import Cached
from pyqmail.remote.mx import make_resolver, mx_addresses

POLICY = b"version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n"
RECORDS = [
    "--local-ttl=300",  # dnsmasq gives its own records TTL 0 by default: nothing cached
    "--mx-host=sts.test,mx.sts.test,10", "--host-record=mx.sts.test,127.0.0.1",
    "--txt-record=_mta-sts.sts.test,v=STSv1; id=1",
    "--mx-host=plain.test,mx.plain.test,10", "--host-record=mx.plain.test,127.0.0.1",
]  # fmt: skip


async def lookups(agent: RemoteAgent, n: int) -> dict[str, float]:
    res = agent.resolver
    out = {}
    for what, call in (
        ("MX look-up", lambda: mx_addresses(res, "sts.test")),
        ("policy, sts.test", lambda: agent.mtasts.policy("sts.test")),
        ("policy, plain.test", lambda: agent.mtasts.policy("plain.test")),
    ):
        await call()  # warm
        t = time.perf_counter()
        for _ in range(n):
            await call()
        out[what] = (time.perf_counter() - t) / n * 1e6
    return out


async def deliveries(home: Home, dns: str, cafile: str, ctx: ssl.SSLContext, m: int,
                     mess: Path) -> dict[str, float]:  # fmt: skip
    out = {}
    for what, domain, idle in (
        ("plain.test, kept connections", "plain.test", 5.0),
        ("plain.test, pool off", "plain.test", 0.0),
        ("sts.test, enforce", "sts.test", 5.0),
    ):
        async with Peer(Script(starttls=ctx, tls_first_only=False)) as peer:
            agent = RemoteAgent(home, ControlCache(home), port=peer.port, own_ips=[],
                                resolver=make_resolver(dns, lifetime=2), tls_cafile=cafile,
                                idle_timeout=idle)  # fmt: skip
            t = time.perf_counter()
            for i in range(m):
                (o,) = await agent.deliver(mess, "a@x.test", [f"u{i}@{domain}"])
                assert o.status.value == "K", o.text
            out[what] = m / (time.perf_counter() - t)
            await agent.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=200)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        home = Home(d / "q", single_user=True)
        create_home(home, "mx.bench.test", None)
        (home.root / "mtasts" / "sts.test").write_bytes(
            Cached.make("sts.test", "1", POLICY, time.time()).dump()
        )
        ca = trustme.CA()
        cafile = str(d / "ca.pem")
        ca.cert_pem.write_to_path(cafile)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mx.sts.test", "mx.plain.test").configure_cert(ctx)
        mess = d / "mess"
        mess.write_bytes(b"Subject: bench\n\n" + b"x" * 1000 + b"\n")
        (d / "dns").mkdir()
        with dnsmasq_server(d / "dns", RECORDS, "mx.sts.test") as dns:
            agent = RemoteAgent(home, ControlCache(home), resolver=make_resolver(dns, lifetime=2))
            lk = asyncio.run(lookups(agent, a.n))
            dl = asyncio.run(deliveries(home, dns, cafile, ctx, a.messages, mess))
    base = lk["MX look-up"]
    print(f"look-ups, {a.n} each (warm caches):")
    for k, v in lk.items():
        print(f"  {k:32s} {v:8.1f} us/call   x{v / base:.2f} of the MX look-up")
    first = next(iter(dl.values()))
    print(f"deliveries, {a.messages} one after another (STARTTLS peer on loopback):")
    for k, v in dl.items():
        print(f"  {k:32s} {v:8.1f} msg/s     x{v / first:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
