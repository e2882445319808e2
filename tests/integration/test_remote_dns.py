"""MX routing through a real DNS server: Debian's dnsmasq on loopback with test records."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.outcome import Status
from pyqmail.remote.deliver import RemoteAgent
from pyqmail.remote.mx import Address, DnsFailure, make_resolver, mx_addresses
from tests.conftest import dnsmasq_server, require_tools, write_control
from tests.integration.test_remote_peers import Peer, Script


@pytest.fixture(autouse=True)
def _dnsmasq() -> None:
    require_tools("dnsmasq")


RECORDS = [
    "--mx-host=mx.test,a.mx.test,10",
    "--mx-host=mx.test,b.mx.test,20",
    "--host-record=a.mx.test,127.0.0.2",
    "--host-record=b.mx.test,127.0.0.3,::1",
    "--host-record=plain.test,127.0.0.4",
    "--cname=alias.test,plain.test",
    "--cname=mxalias.test,mx.test",
    # three MX of equal preference: their order must vary
    "--mx-host=eq.test,e1.test,5", "--mx-host=eq.test,e2.test,5", "--mx-host=eq.test,e3.test,5",
    "--host-record=e1.test,127.0.1.1", "--host-record=e2.test,127.0.1.2",
    "--host-record=e3.test,127.0.1.3",
    # we (127.0.0.1) are the best MX / a worse MX
    "--mx-host=self.test,me.mx.test,10", "--mx-host=self.test,other.mx.test,20",
    "--host-record=me.mx.test,127.0.0.1", "--host-record=other.mx.test,127.0.0.5",
    "--mx-host=backup.test,other.mx.test,10", "--mx-host=backup.test,me.mx.test,20",
    # an MX whose target does not exist, and one that exists
    "--mx-host=half.test,gone.test,10", "--mx-host=half.test,plain.test,20",
    "--mx-host=none.test,gone.test,10",
    # delivery: first MX refuses, second accepts (same port, other address)
    "--mx-host=deliver.test,dead.mx.test,10", "--mx-host=deliver.test,live.mx.test,20",
    "--host-record=dead.mx.test,127.0.0.6", "--host-record=live.mx.test,127.0.0.7",
    "--mx-host=v6.test,six.mx.test,10", "--host-record=six.mx.test,::1",
]  # fmt: skip


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("dnsmasq")
    with dnsmasq_server(d, ["--server=/broken.test/127.0.0.1#9", *RECORDS], "plain.test") as spec:
        yield spec


def lookup(spec: str, host: str, seed: int = 0) -> list[Address]:
    res = make_resolver(spec, lifetime=2)
    return asyncio.run(mx_addresses(res, host, rng=random.Random(seed)))


def failure(spec: str, host: str) -> tuple[Status, str]:
    with pytest.raises(DnsFailure) as e:
        lookup(spec, host)
    return e.value.outcome.status, e.value.outcome.text


def test_mx_by_preference_with_a_and_aaaa(dnsmasq: str) -> None:
    assert lookup(dnsmasq, "mx.test") == [
        Address(10, "127.0.0.2", "a.mx.test"),
        Address(20, "127.0.0.3", "b.mx.test"),
        Address(20, "::1", "b.mx.test"),
    ]


def test_equal_preferences_in_random_order(dnsmasq: str) -> None:
    orders = {tuple(a.ip for a in lookup(dnsmasq, "eq.test", seed)) for seed in range(30)}
    assert len(orders) >= 3
    assert all(sorted(o) == ["127.0.1.1", "127.0.1.2", "127.0.1.3"] for o in orders)


def test_address_fallback_without_mx(dnsmasq: str) -> None:
    assert lookup(dnsmasq, "plain.test") == [Address(0, "127.0.0.4", "plain.test")]


def test_cnames_are_followed(dnsmasq: str) -> None:
    assert [a.ip for a in lookup(dnsmasq, "alias.test")] == ["127.0.0.4"]
    assert [a.ip for a in lookup(dnsmasq, "mxalias.test")] == ["127.0.0.2", "127.0.0.3", "::1"]


def test_nxdomain_is_permanent(dnsmasq: str) -> None:
    assert failure(dnsmasq, "nosuch.test") == (
        Status.PERM,
        "Sorry, I couldn't find any host named nosuch.test. (#5.1.2)\n",
    )


def test_servfail_is_temporary(dnsmasq: str) -> None:
    assert failure(dnsmasq, "x.broken.test") == (
        Status.TEMP,
        "Sorry, I couldn't find any host by that name. (#4.1.2)\n",
    )


def test_mx_targets_that_do_not_exist(dnsmasq: str) -> None:
    assert [a.ip for a in lookup(dnsmasq, "half.test")] == ["127.0.0.4"]
    assert failure(dnsmasq, "none.test") == (
        Status.PERM,
        "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n",
    )


def agent(home: Home, spec: str, port: int = 25, **kw: object) -> RemoteAgent:
    return RemoteAgent(
        home,
        ControlCache(home),
        port=port,
        resolver=make_resolver(spec, lifetime=2),
        **kw,  # type: ignore[arg-type]
    )


def test_self_mx_when_we_are_best_is_permanent(home: Home, dnsmasq: str, tmp_path: Path) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"\n")
    (o,) = asyncio.run(agent(home, dnsmasq).deliver(mess, "a@x", ["u@self.test"]))
    assert o.status is Status.PERM
    assert o.text.endswith("so I don't treat it as local. (#5.4.6)\n")


def test_self_mx_by_name_in_locals(home: Home, dnsmasq: str, tmp_path: Path) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"\n")
    write_control(home, "locals", "mx.test.example\nplain.test\n")
    ag = agent(home, dnsmasq, own_ips=["0.0.0.0"])
    (o,) = asyncio.run(ag.deliver(mess, "a@x", ["u@half.test"]))
    # gone.test has no addresses and plain.test (pref 20) is us: nothing is eligible
    assert o.status is Status.PERM and "(#5.4.6)" in o.text


def test_delivery_through_mx_skips_a_dead_first_mx(
    home: Home, dnsmasq: str, tmp_path: Path
) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"Subject: mx\n\nhello\n")

    async def go() -> tuple[list[object], Peer]:
        peer = await Peer(Script()).start("127.0.0.7")
        try:
            ag = agent(home, dnsmasq, peer.port)
            outs = await ag.deliver(mess, "a@x", ["u@deliver.test"])
            await ag.close()
        finally:
            await peer.close()
        return list(outs), peer

    (o,), peer = asyncio.run(go())
    assert o.status is Status.OK  # type: ignore[attr-defined]
    assert o.text.startswith("127.0.0.7 accepted message.")  # type: ignore[attr-defined]
    assert len(peer.messages) == 1


def test_backup_mx_delivers_to_the_better_one(home: Home, dnsmasq: str, tmp_path: Path) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"Subject: mx\n\nhello\n")

    async def go() -> tuple[Status, Peer]:
        peer = await Peer(Script()).start("127.0.0.5")
        try:
            ag = agent(home, dnsmasq, peer.port)
            (o,) = await ag.deliver(mess, "a@x", ["u@backup.test"])
            await ag.close()
        finally:
            await peer.close()
        return o.status, peer

    status, peer = asyncio.run(go())
    assert status is Status.OK and len(peer.messages) == 1


def test_ipv6_mx(home: Home, dnsmasq: str, tmp_path: Path) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"Subject: v6\n\nhello\n")

    async def go() -> tuple[str, Peer]:
        peer = await Peer(Script()).start("::1")
        try:
            ag = agent(home, dnsmasq, peer.port, own_ips=["0.0.0.0"])
            (o,) = await ag.deliver(mess, "a@x", ["u@v6.test"])
            await ag.close()
        finally:
            await peer.close()
        return o.text, peer

    text, peer = asyncio.run(go())
    assert text.startswith("::1 accepted message.") and len(peer.messages) == 1


def test_relay_names_use_address_records_never_mx(home: Home, dnsmasq: str, tmp_path: Path) -> None:
    mess = tmp_path / "m"
    mess.write_bytes(b"Subject: relay\n\nhello\n")

    async def go() -> tuple[list[tuple[Status, str]], Peer]:
        peer = await Peer(Script()).start("127.0.0.4")
        try:
            write_control(
                home,
                "smtproutes",
                f"a.example:plain.test:{peer.port}\nb.example:mx.test:{peer.port}\n"
                f"c.example:nosuch.test:{peer.port}\n",
            )
            ag = agent(home, dnsmasq, own_ips=["127.0.0.4"])  # the self-MX rule is off
            outs = []
            for d in ("a", "b", "c"):
                (o,) = await ag.deliver(mess, "x@y", [f"u@{d}.example"])
                outs.append((o.status, o.text))
            await ag.close()
        finally:
            await peer.close()
        return outs, peer

    outs, peer = asyncio.run(go())
    assert outs[0][0] is Status.OK and len(peer.messages) == 1
    assert outs[1] == (
        Status.PERM,
        "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)\n",
    )  # mx.test has MX records but no address of its own
    assert outs[2] == (Status.PERM, "Sorry, I couldn't find any host named nosuch.test. (#5.1.2)\n")
