"""Resource attacks on the real listener: long lines, no newline at all, slowloris,
recipient and error floods, connection floods, early talkers (smtpd.md, last section;
gaps.md 3.1: never hold a whole line or message in memory).

Every test ends with the autouse check that a normal session still succeeds.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.security._support import Listener, Raw, queued, wait_for


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ----------------------------------------------------------------- line lengths


def test_command_of_512_is_fine_and_513_is_refused(smtp: Listener) -> None:
    c = smtp.session()
    ok = b"NOOP " + b"a" * (512 - 5)
    assert c.cmd(ok)[0] == 250
    code, text = c.cmd(ok + b"a")
    assert code == 500, text
    assert c.cmd(b"NOOP")[0] == 250  # the session goes on


def test_overlong_rcpt_cannot_smuggle_its_tail(smtp: Listener) -> None:
    """The part of an over-long line past 512 octets must not run as a command."""
    c = smtp.session()
    assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
    line = b"RCPT TO:<x@test.example>" + b" " * 600 + b"RCPT TO:<victim@elsewhere.example>"
    assert c.cmd(line)[0] == 500
    assert c.cmd(b"DATA")[0] == 503  # no recipient was added by either half
    assert queued(smtp.home) == []


def test_huge_line_without_newline_is_cut_off(smtp: Listener) -> None:
    before = _rss_kb(smtp.proc.pid)
    c = smtp.session()
    chunk = b"A" * 65536
    sent = 0
    try:
        for _ in range(16 * 16):  # up to 16 MiB
            c.send(chunk)
            sent += len(chunk)
    except OSError:
        pass  # the server closed on us: that is the point
    code, text = c.reply()
    assert code in (421, 500), text
    assert c.closed()
    assert _rss_kb(smtp.proc.pid) - before < 32 * 1024  # not buffered whole


def test_data_line_of_1000_is_fine_and_1001_fails_the_message(smtp: Listener) -> None:
    c = smtp.session()
    for n, want in ((1000, 250), (1001, 554), (200_000, 554)):
        assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
        assert c.cmd(b"RCPT TO:<x@test.example>")[0] == 250
        assert c.cmd(b"DATA")[0] == 354
        code, text = c.cmd(b"Subject: long\r\n\r\n" + b"x" * n + b"\r\nend\r\n.")
        assert code == want, (n, text)
    assert len(queued(smtp.home)) == 1


def test_data_without_any_newline_is_bounded(smtp: Listener) -> None:
    """A message body that is one endless line: memory stays bounded, the message fails."""
    before = _rss_kb(smtp.proc.pid)
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    chunk = b"B" * 65536
    for _ in range(8 * 16):  # 8 MiB, over databytes too
        c.send(chunk)
    grown = _rss_kb(smtp.proc.pid) - before
    c.send(b"\r\n.\r\n")
    code, _ = c.reply()
    assert code is not None and code // 100 == 5
    assert grown < 32 * 1024, grown
    assert queued(smtp.home) == []


# ----------------------------------------------------------------- floods


def test_ten_thousand_recipients(smtp: Listener) -> None:
    c = smtp.session(b"EHLO client.example")
    rcpts = b"".join(b"RCPT TO:<u%d@test.example>\r\n" % i for i in range(10_000))
    c.send(b"MAIL FROM:<a@client.example>\r\n" + rcpts + b"DATA\r\n")
    codes = c.replies(10_002)
    assert codes[0] == 250
    assert codes[1:101] == [250] * 100
    assert set(codes[101:10_001]) == {452}  # not counted as errors: no 421
    assert codes[-1] == 354
    assert c.cmd(b"Subject: many\r\n\r\nx\r\n.")[0] == 250
    [(_, got)] = queued(smtp.home)
    assert len(got) == 100


def test_error_flood_gets_421(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"BOGUS\r\n" * 50 + b"MAIL FROM:<a@client.example>\r\n")
    data = c.rest()
    lines = data.split(b"\r\n")
    assert lines.count(b"502 unimplemented (#5.5.1)") == 20, data[:200]
    assert lines[20].startswith(b"421")
    assert b"250" not in data


def test_slowloris_one_byte_a_second_is_cut_off(smtp: Listener) -> None:
    """One byte at a time, never a whole line: the read timeout (timeoutsmtpd 2) does not
    restart with each byte; the connection is closed within a bound."""
    smtp.control("timeoutsmtpd", "2\n")
    c = smtp.connect()
    assert c.reply()[0] == 220
    start = time.monotonic()
    closed = False
    try:
        for b in b"HELO slooooooooooooooooooooooooooooooooooooow":
            c.send(bytes([b]))
            time.sleep(0.5)  # the attacker's pace, not synchronisation
            if time.monotonic() - start > 12:
                break
    except OSError:
        closed = True
    assert closed or c.closed(5)
    assert time.monotonic() - start < 12


def test_slowloris_in_data(smtp: Listener) -> None:
    smtp.control("timeoutsmtpd", "2\n")
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    start = time.monotonic()
    closed = False
    try:
        for _ in range(30):
            c.send(b"x")
            time.sleep(0.5)
            if time.monotonic() - start > 12:
                break
    except OSError:
        closed = True
    assert closed or c.closed(5)
    assert time.monotonic() - start < 12
    assert queued(smtp.home) == []


def test_idle_client_times_out(smtp: Listener) -> None:
    smtp.control("timeoutsmtpd", "1\n")
    c = smtp.connect()
    assert c.reply()[0] == 220
    code, text = c.reply()
    assert code == 451 and b"timeout" in text
    assert c.closed()


# ----------------------------------------------------------------- connection floods


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    """A listener with 6 connections in all, 3 per IP (loopback limited too), and a
    0.3-second greeting delay (for early talkers)."""
    home = Home(tmp_path_factory.mktemp("lim") / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    srv = Listener(home, "--max-conns", "6", "--max-per-ip", "3", "--limit-loopback",
                   "--greet-delay", "0.3")  # fmt: skip
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log


def _greeted(srv: Listener, source: str) -> Raw:
    """A greeted connection; slots of earlier tests' connections may still be closing."""
    deadline = time.monotonic() + 15
    while True:
        c = srv.connect(source=source)
        code, text = c.reply()
        if code == 220:
            return c
        c.close()
        assert code == 421 and time.monotonic() < deadline, text
        time.sleep(0.1)


def _free_again(srv: Listener, source: str) -> bool:
    """A new connection from ``source`` gets the greeting (its slot came back)."""

    def probe() -> bool:
        c = srv.connect(source=source)
        code, _ = c.reply()
        c.close()
        return code == 220

    return wait_for(probe, 15)


def test_per_ip_limit_and_slots_come_back(limited: Listener) -> None:
    held = [_greeted(limited, "127.0.0.5") for _ in range(3)]
    extra = limited.connect(source="127.0.0.5")
    code, _ = extra.reply()
    assert code == 421
    assert extra.closed()
    other = _greeted(limited, "127.0.0.6")  # another IP is not affected
    other.close()
    # free the slots three different ways: QUIT, plain close, RST
    held[0].cmd(b"QUIT")
    held[0].close()
    held[1].close()
    held[2].s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    held[2].close()
    assert _free_again(limited, "127.0.0.5")
    again = [_greeted(limited, "127.0.0.5") for _ in range(3)]
    for c in again:
        c.close()


def test_total_limit_and_slots_come_back(limited: Listener) -> None:
    held = [_greeted(limited, f"127.0.1.{i}") for i in range(6)]
    extra = limited.connect(source="127.0.1.99")
    assert extra.reply()[0] == 421
    for c in held:
        c.close()
    assert _free_again(limited, "127.0.1.99")


def test_connection_burst_then_normal_service(limited: Listener) -> None:
    socks = []
    for i in range(200):
        s = socket.socket()
        s.connect(("127.0.0.1", limited.port))
        if i % 2:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        socks.append(s)
    for s in socks:
        s.close()
    assert _free_again(limited, "127.0.0.1")
    assert _free_again(limited, "127.0.0.7")


def test_early_talker_is_refused_and_nothing_queued(limited: Listener) -> None:
    c = limited.connect(source="127.0.2.1")
    c.send(
        b"HELO x\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"Subject: early\r\n\r\nhi\r\n.\r\nQUIT\r\n"
    )
    code, text = c.reply()
    assert code == 554, text
    assert c.closed()
    assert queued(limited.home) == []
    assert _free_again(limited, "127.0.2.1")


def test_client_that_never_reads_its_replies(smtp: Listener) -> None:
    """Pipelined commands from a client that never reads: the replies pile up in the
    server only up to a bound (it stops reading), not until memory is gone."""
    before = _rss_kb(smtp.proc.pid)
    s = socket.create_connection(("127.0.0.1", smtp.port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(3)
    block = b"NOOP\r\n" * 10_000
    sent = 0
    start = time.monotonic()
    try:
        while sent < 100_000_000 and time.monotonic() - start < 20:
            s.sendall(block)
            sent += len(block)
    except TimeoutError:
        pass  # the server stopped reading: the bound we want
    grown = _rss_kb(smtp.proc.pid) - before
    s.close()
    assert grown < 64 * 1024, (sent, grown)
