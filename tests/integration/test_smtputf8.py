"""SMTPUTF8 (RFC 6531) end to end: a UTF-8 sender through ``pyqmail run`` into a Maildir,
and remote delivery of UTF-8 addresses to a next hop with and without SMTPUTF8."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.outcome import Status
from tests.integration.test_e2e_mail import mta  # noqa: F401  (a fixture, used by name)
from tests.integration.test_remote_failures import deliver
from tests.integration.test_remote_peers import Script
from tests.integration.test_run_daemon import Mta, files, wait_for

ZOE = "zoë@remote.example"


@pytest.fixture
def mess(tmp_path: Path) -> Path:
    m = tmp_path / "m"
    m.write_bytes(b"From: a@test.example\nSubject: hi\n\nhello\n")
    return m


def test_a_next_hop_with_smtputf8_gets_the_utf8_envelope(home: Home, mess: Path) -> None:
    ehlo = b"250-peer.test\r\n250-PIPELINING\r\n250 SMTPUTF8\r\n"
    (o,), peer = deliver(home, Script(ehlo=ehlo), mess, [ZOE])
    assert o.status is Status.OK, o.text
    assert b"MAIL FROM:<a@test.example> SMTPUTF8\r\n" in peer.commands
    assert b"RCPT TO:<" + ZOE.encode() + b">\r\n" in peer.commands


def test_a_next_hop_without_smtputf8_bounces_it(home: Home, mess: Path) -> None:
    (o,), peer = deliver(home, Script(), mess, [ZOE])
    assert o.status is Status.PERM and "SMTPUTF8" in o.text and "#5.6.7" in o.text
    assert not peer.messages and not any(c.startswith(b"MAIL") for c in peer.commands)


def test_a_utf8_sender_reaches_the_maildir(mta: Mta) -> None:  # noqa: F811
    mta.start()
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as s:
        s.sendmail("jörg@elsewhere.example", ["alice@test.example"],
                   b"Subject: utf8\r\n\r\nhello\r\n", mail_options=["SMTPUTF8"])  # fmt: skip
        s.command_encoding = "utf-8"  # the same sender without the parameter: refused
        assert s.docmd("MAIL", "FROM:<jörg@elsewhere.example>")[0] == 553
    wait_for(lambda: len(files(mta.maildir("alice"))) == 1, what="delivery")
    got = files(mta.maildir("alice"))[0].read_bytes()
    assert got.startswith("Return-Path: <jörg@elsewhere.example>\n".encode())
    assert mta.stop() == 0
