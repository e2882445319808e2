"""Remote delivery over QMTP where control/qmtproutes names a route: RemoteAgent on home A
hands the message to home B's QmtpServer; other domains keep SMTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.outcome import Status
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.submit import InProcessSubmitter
from pyqmail.remote import deliver
from pyqmail.smtp.qmtpd import QmtpServer
from tests.integration.test_qmqp_server import Listener, queued


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Home, Home, Listener]]:
    a = Home(tmp_path / "a", single_user=True)
    create_home(a, "a.test.example", None)
    b = Home(tmp_path / "b", single_user=True)
    create_home(b, "b.test.example", None)
    (b.control / "rcpthosts").write_text("b.test.example\n")
    lst = Listener(QmtpServer(b, ControlCache(b), InProcessSubmitter(b)))
    yield a, b, lst
    lst.close()


def _queue(a: Home) -> Path:
    p = InProcessSubmitter(a).begin()
    p.write(b"Subject: over qmtp\n\nhello\n")
    n = p.commit_blocking(b"s@a.test.example", [b"u@b.test.example"]).msgnum
    return QueuePaths(a.queue).mess(n)


def test_remote_agent_uses_qmtp_for_a_qmtproutes_domain(pair: tuple[Home, Home, Listener]) -> None:
    a, b, lst = pair
    (a.control / "qmtproutes").write_text(f"b.test.example:[127.0.0.1]:{lst.port}\n")
    mess = _queue(a)
    agent = deliver.RemoteAgent(a, ControlCache(a))
    out = asyncio.run(agent.deliver(mess, "s@a.test.example",
                                    ["u@b.test.example", "v@b.test.example"]))  # fmt: skip
    assert [o.status for o in out] == [Status.OK, Status.OK]
    [(sender, rcpts, stored)] = queued(b)
    assert (sender, rcpts) == (b"s@a.test.example", (b"u@b.test.example", b"v@b.test.example"))
    assert b" with QMTP; " in stored and stored.endswith(b"\n\nhello\n")


def test_qmtp_route_down_is_a_temporary_failure(pair: tuple[Home, Home, Listener]) -> None:
    a, _, _ = pair
    (a.control / "qmtproutes").write_text("b.test.example:[127.0.0.2]:1\n")
    out = asyncio.run(deliver.RemoteAgent(a, ControlCache(a)).deliver(
        _queue(a), "s@a.test.example", ["u@b.test.example"]))  # fmt: skip
    assert [o.status for o in out] == [Status.TEMP]
    assert "QMTP" in out[0].text
