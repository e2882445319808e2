"""SRS end to end through ``pyqmail run`` (docs/srs.md), with Postfix's smtp-sink as the
foreign MX behind smtproutes: a ``.qmail`` forward (an ``&`` line, and the ``forward``
program) of mail from a foreign sender to a foreign address leaves with an SRS0 envelope
sender; a bounce to that address, sent to
our SMTP door, goes back to the original sender; a forged one is refused at RCPT."""

from __future__ import annotations

import os
import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail import srs
from pyqmail.home import Home
from tests.conftest import write_control
from tests.integration.test_e2e_mail import Sink
from tests.integration.test_run_daemon import Mta, files, wait_for

pytestmark = pytest.mark.interop

SECRET = "e2e-srs-secret-0123456789abcdef"
SRSDOMAIN = "srs.test.example"


@pytest.fixture
def mta(home: Home, tmp_path: Path) -> Iterator[Mta]:
    m = Mta(home, tmp_path)
    yield m
    if m.proc is not None and m.proc.poll() is None:
        os.killpg(m.proc.pid, signal.SIGKILL)
        m.proc.wait(30)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path)
    yield s
    s.close()


def envelope_of(dump: bytes) -> tuple[str, str]:
    """smtp-sink's X-Mail-Args and X-Rcpt-Args lines."""
    head = dump.split(b"\n\n", 1)[0].decode()
    fields = dict(line.split(": ", 1) for line in head.splitlines() if line.startswith("X-"))
    return fields["X-Mail-Args"], fields["X-Rcpt-Args"]


def dumps_with(sink: Sink, needle: bytes) -> list[bytes]:
    return [d for d in (f.read_bytes() for f in files(sink.dump)) if needle in d]


def test_forward_then_bounce_back_then_forgery(mta: Mta, sink: Sink) -> None:
    write_control(mta.home, "srs", f"{SECRET}\n{SRSDOMAIN}\n")
    write_control(mta.home, "locals", f"mx.test.example\ntest.example\n{SRSDOMAIN}\n")
    write_control(mta.home, "rcpthosts", f"mx.test.example\ntest.example\n{SRSDOMAIN}\n")
    route = f"127.0.0.1:{sink.port}"
    write_control(mta.home, "smtproutes", f"elsewhere.example:{route}\nexample.org:{route}\n")
    (mta.users["alice"] / ".qmail-fwd").write_text("&carol@elsewhere.example\n")
    (mta.users["alice"] / ".qmail-prog").write_text("|forward dave@elsewhere.example\n")
    mta.start()

    # 1. foreign@example.org -> alice-fwd@test.example -> carol@elsewhere.example
    mta.send("foreign@example.org", ["alice-fwd@test.example"], "forwarded")
    wait_for(lambda: bool(dumps_with(sink, b"Subject: forwarded")), what="the forward")
    (fwd,) = dumps_with(sink, b"Subject: forwarded")
    mail_from, rcpt = envelope_of(fwd)
    assert rcpt == "<carol@elsewhere.example>"
    assert mail_from.startswith("<SRS0=") and mail_from.endswith(
        f"=example.org=foreign@{SRSDOMAIN}>"
    )
    assert b"Delivered-To: alice-fwd@test.example" in fwd
    srs_address = mail_from[1:-1]
    assert srs.Srs((SECRET.encode(),), SRSDOMAIN).reverse(srs_address.split("@")[0]) == (
        "foreign@example.org"
    )

    # ... and through the forward program ($SRSSENDER)
    mta.send("foreign@example.org", ["alice-prog@test.example"], "by program")
    wait_for(lambda: bool(dumps_with(sink, b"Subject: by program")), what="the program's forward")
    prog_from, prog_rcpt = envelope_of(dumps_with(sink, b"Subject: by program")[0])
    assert prog_rcpt == "<dave@elsewhere.example>"
    assert prog_from.startswith("<SRS0=") and prog_from.endswith(f"=foreign@{SRSDOMAIN}>")

    # 2. carol's MX bounces to the SRS address: it comes in at our door and goes back
    mta.send("", [srs_address], "bounce back")
    wait_for(lambda: bool(dumps_with(sink, b"Subject: bounce back")), what="the reversed bounce")
    (back,) = dumps_with(sink, b"Subject: bounce back")
    assert envelope_of(back) == ("<>", "<foreign@example.org>")
    assert f"Delivered-To: {srs_address}".encode() in back

    # also lower-cased by some MTA on the way
    mta.send("", [srs_address.lower()], "folded")
    wait_for(lambda: bool(dumps_with(sink, b"Subject: folded")), what="the folded bounce")
    assert envelope_of(dumps_with(sink, b"Subject: folded")[0])[1] == "<foreign@example.org>"

    # 3. forged and expired SRS addresses are refused at RCPT with 5.7.1
    forged = srs_address.replace("=foreign@", "=victim@")
    config = srs.Srs((SECRET.encode(),), SRSDOMAIN)
    import time

    old = config.forward("foreign@example.org", time.time() - 40 * 86400)
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.ehlo("bouncer.example")
        s.mail("")
        for bad in (forged, old):
            code, text = s.rcpt(bad)
            assert code == 550 and b"5.7.1" in text, (bad, code, text)
        code, _ = s.rcpt(srs_address)
        assert code == 250
    assert not dumps_with(sink, b"victim@")
    assert "failure" not in mta.log()
    assert mta.stop() == 0
