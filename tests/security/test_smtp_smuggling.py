"""SMTP smuggling and pipelining tricks against the real listener (smtpd.md, last section;
gaps.md 3.3).

Each attack hides a second transaction (sender ``evil@attacker.example``) inside or behind
something that must not end the first one. Whatever the server answers, the attacker's
transaction must never be queued, no traceback may reach the client, and a normal
session must work afterwards (checked by the autouse fixture).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.layout import create_home
from pyqmail.remote.transmit import encode as wire_encode
from tests.security._support import Listener, messages, queued

EVIL = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@test.example>\r\nDATA\r\n"
SMUGGLED = EVIL + b"From: ceo@test.example\r\n\r\nsmuggled\r\n"

# (name, end-of-data imitation). Each contains a bare CR or a bare LF: pyqmail refuses
# the whole message (451) and closes; qmail stores the bare-CR ones.
SEQUENCES = [
    ("LF.LF", b"\n.\n"),
    ("LF.CRLF", b"\n.\r\n"),
    ("CRLF.LF", b"\r\n.\n"),
    ("CR.CR", b"\r.\r"),
    ("CR.LF", b"\r.\n"),
    ("CR.CRLF", b"\r.\r\n"),
    ("CRLF.CR", b"\r\n.\r"),
    ("LF.CR", b"\n.\r"),
    ("CRCRLF.CRLF", b"\r\r\n.\r\n"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n"),
    ("CRLF.LFCRLF", b"\r\n.\n\r\n"),
    ("LFLF.CRLF", b"\n\n.\r\n"),
]


def _client_text(data: bytes) -> None:
    assert b"Traceback" not in data and b"Error" not in data and b"Exception" not in data


@pytest.mark.parametrize(("name", "seq"), SEQUENCES, ids=[s[0] for s in SEQUENCES])
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-by-byte"])
def test_smuggling_sequence_never_ends_data(
    smtp: Listener, name: str, seq: bytes, split: bool
) -> None:
    c = smtp.session()
    assert c.cmd(b"MAIL FROM:<a@client.example>")[0] == 250
    assert c.cmd(b"RCPT TO:<x@test.example>")[0] == 250
    assert c.cmd(b"DATA")[0] == 354
    attack = b"Subject: hi\r\n\r\nfirst" + seq + SMUGGLED + b".\r\n"
    if split:
        for i in range(len(attack)):
            c.send(attack[i : i + 1])
    else:
        c.send(attack)
    code, text = c.reply()
    _client_text(text)
    # A bare CR/LF is refused: 451 (qmail's smtplf reply) and the connection is closed.
    assert code == 451, (name, text)
    assert c.closed(), name
    c.close()
    assert queued(smtp.home) == [], name


def test_bare_lf_after_valid_end_is_not_a_second_message(smtp: Listener) -> None:
    """A real end of data followed by a transaction with LF line ends: the first message
    is accepted; the LF-only commands are still commands (qmail reads LF as a command's
    line end), so the attacker gains nothing a client could not do openly: its sender is
    not ours, and its recipient must still pass rcpthosts."""
    c = smtp.session()
    c.send(
        b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"one\r\n.\r\n"
        b"MAIL FROM:<evil@attacker.example>\nRCPT TO:<victim@elsewhere.example>\nDATA\n"
    )
    assert c.replies(4) == [250, 250, 354, 250]
    assert c.reply()[0] == 250  # MAIL
    assert c.reply()[0] == 553  # the relay attempt
    assert c.reply()[0] == 503  # DATA without recipients
    assert queued(smtp.home) == [(b"a@client.example", [b"x@test.example"])]


def test_nul_in_data_is_stored_and_ends_nothing(smtp: Listener) -> None:
    c = smtp.session()
    c.send(
        b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"Subject: nul\r\n\r\nbefore\x00\r\n.\x00\r\n\x00.\r\nafter\r\n.\r\n"
    )
    assert c.replies(4) == [250, 250, 354, 250]
    assert len(queued(smtp.home)) == 1
    body = messages(smtp.home)[0]
    assert body.endswith(b"\n\nbefore\x00\n\x00\n\x00.\nafter\n")  # ".\\0" unstuffed


def test_end_of_data_split_across_writes(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    for piece in (b"Subject: s\r\n\r\nline\r", b"\n", b".", b"\r", b"\n"):
        c.send(piece)
    assert c.reply()[0] == 250
    assert queued(smtp.home) == [(b"a@client.example", [b"x@test.example"])]


def test_connection_lost_inside_data_queues_nothing(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(b"Subject: cut\r\n\r\nno final dot\r\n")
    c.s.shutdown(1)  # EOF inside DATA
    assert c.closed()
    c.close()
    assert queued(smtp.home) == []


def test_reset_inside_data_queues_nothing(smtp: Listener) -> None:
    import socket
    import struct

    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(b"Subject: cut\r\n\r\nhalf")
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()  # RST
    assert smtp.alive()
    assert queued(smtp.home) == []


# ----------------------------------------------------------------- pipelining tricks


def test_pipelined_transactions_all_answered_in_order(smtp: Listener) -> None:
    c = smtp.session(b"EHLO client.example")
    one = b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
    c.send(one + b"m1\r\n.\r\n" + one + b"m2\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
    assert c.replies(11) == [250, 250, 354, 250, 250, 250, 354, 250, 250, 250, 221]
    assert len(queued(smtp.home)) == 2


def test_nothing_after_quit_runs(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"QUIT\r\n" + SMUGGLED + b".\r\n")
    code, _ = c.reply()
    assert code == 221
    rest = c.rest()
    assert rest == b"", rest
    assert queued(smtp.home) == []


@pytest.mark.parametrize(
    "refused",
    [
        b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@elsewhere.example>\r\nDATA\r\n",
        b"MAIL FROM:<spammer@evil.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n",
        b"DATA\r\n",
        b"MAIL FROM:<a@client.example>\r\nDATA\r\n",
    ],
    ids=["relay-refused", "badmailfrom", "no-mail", "no-rcpt"],
)
def test_transaction_stuffing_after_refused_data(smtp: Listener, refused: bytes) -> None:
    """After DATA is refused, what came in the same write is the would-be message body:
    it must not run as commands (it holds the attacker's own transaction)."""
    c = smtp.session()
    c.send(refused + SMUGGLED + b".\r\n")
    codes = [c.reply()[0] for _ in range(refused.count(b"\r\n"))]
    assert codes[-1] == 503, codes
    c.send(b"NOOP\r\n")
    code, text = c.reply()
    assert code == 250, text  # the stuffed transaction produced no replies of its own
    assert queued(smtp.home) == []


def test_stuffing_after_queue_refused_start(smtp: Listener) -> None:
    """The queue cannot make the message's files: the pipelined body behind DATA must not
    run as commands either. The failure comes at DATA (451) when the listener writes the
    queue itself, or after the data (354, then 451) when its committer process does, as
    qmail-queue's does after qmail-smtpd's 354."""
    pid = smtp.home.queue / "pid"
    moved = smtp.home.queue / "pid.away"
    pid.rename(moved)
    try:
        c = smtp.session()
        c.send(
            b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
            + SMUGGLED
            + b".\r\n"
        )
        codes = c.replies(3)
        assert codes[:2] == [250, 250]
        if codes[2] == 354:
            codes.append(c.reply()[0])  # the end of the data: the queue's failure
        assert codes[-1] is not None and codes[-1] // 100 == 4, codes
        c.send(b"NOOP\r\n")
        assert c.reply()[0] == 250
        c.close()
    finally:
        moved.rename(pid)
    assert queued(smtp.home) == []


@pytest.mark.parametrize(
    "verb",
    [b"BDAT 200 LAST", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS"],
)
def test_payload_of_unoffered_extension_never_runs(smtp: Listener, verb: bytes) -> None:
    c = smtp.session(b"EHLO client.example")
    c.send(verb + b"\r\n" + SMUGGLED + b".\r\n")
    code, text = c.reply()
    _client_text(text)
    assert code is not None and code >= 500, text
    after = c.rest(3)
    # the smuggled MAIL/RCPT/DATA were never answered
    assert b"354" not in after and b"250" not in after, after
    assert queued(smtp.home) == []


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: mx\r\nContent-Length: 200\r\n\r\nHELO x\r\n",
        b"CONNECT mx.test.example:25 HTTP/1.1\r\n\r\nHELO x\r\n",
        b"HEAD / HTTP/1.0\r\n\r\n",
        b"PUT /x HTTP/1.0\r\n\r\n",
        b"get / http/1.0\r\n\r\n",
    ],
    ids=["GET", "POST", "CONNECT", "HEAD", "PUT", "lower-get"],
)
def test_http_request_is_refused_and_its_body_never_runs(smtp: Listener, first: bytes) -> None:
    c = smtp.connect()
    assert c.reply()[0] == 220
    c.send(first + SMUGGLED + b".\r\nQUIT\r\n")
    code, text = c.reply()
    _client_text(text)
    assert code == 554, text
    assert c.closed()
    assert queued(smtp.home) == []


def test_http_verb_later_in_the_session_closes_too(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"POST / HTTP/1.1\r\n" + SMUGGLED + b".\r\n")
    code, _ = c.reply()
    assert code == 554
    assert c.closed()
    assert queued(smtp.home) == []


def test_tls_client_hello_as_first_bytes(smtp: Listener) -> None:
    hello = bytes.fromhex("160301020001" + "0001fc0303") + b"\x00" * 40 + b"\r\n" + SMUGGLED
    c = smtp.connect()
    assert c.reply()[0] == 220
    c.send(hello)
    code, text = c.reply()
    _client_text(text)
    assert code == 554
    assert c.closed()
    assert queued(smtp.home) == []


# ----------------------------------------------------------------- the next hop


STORED = [
    b"X\r.\n",  # what qmail-smtpd stores from X CR . CR LF
    b"a\r\n.\r\nMAIL FROM:<e@x>\r\n",
    b"a\n.\nb\n",
    b"\r.\r",
    b".\n",
    b"a\r",
    b"a\r\r\n.\r\r\n",
    b"..\n.\n",
]


@pytest.mark.parametrize("stored", STORED)
def test_stored_bytes_never_end_data_early_on_the_next_hop(stored: bytes) -> None:
    """Whatever bytes a legacy queue holds, the wire form has exactly one end of data, at
    the end, and no bare CR or LF (gaps.md 3.3: notqmail's qmail-remote fails here)."""
    wire = wire_encode(b"Subject: s\n\n" + stored + b"tail\n")
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")


# ----------------------------------------------------------------- failed messages


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"Received: x\r\n" * 100 + b"\r\nloop\r\n", 554),
        (b"Delivered-To: x@test.example\r\n" * 60 + b"Received: y\r\n" * 40 + b"\r\nb\r\n", 554),
        (b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 120, 552),
    ],
    ids=["100-received", "mixed-hops", "over-databytes"],
)
def test_failed_message_queues_nothing_and_session_goes_on(
    smtp: Listener, body: bytes, code: int
) -> None:
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(body + b".\r\nMAIL FROM:<b@client.example>\r\n")
    assert c.reply()[0] == code
    assert c.reply()[0] == 250  # pipelined after the dot: a new transaction may start
    assert queued(smtp.home) == []


def test_99_hops_is_still_accepted(smtp: Listener) -> None:
    c = smtp.session()
    c.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    # 99 here plus our own Received line: qmail counts only what the client sent
    assert c.cmd(b"Received: x\r\n" * 99 + b"\r\nb\r\n.")[0] == 250
    assert len(queued(smtp.home)) == 1


@pytest.fixture
def own_smtp(tmp_path: Path) -> Iterator[Listener]:
    """A listener of this test's own: its log is checked here, not shared."""
    home = Home(tmp_path / "qmail", single_user=True)
    create_home(home, "mx.test.example", None)
    (home.control / "rcpthosts").write_text("test.example\n")
    srv = Listener(home)
    yield srv
    srv.stop()


def test_reset_right_after_the_final_dot_leaves_whole_messages_only(own_smtp: Listener) -> None:
    """Clients that reset the connection the moment the final dot is out: each message is
    either queued whole (mess + todo) or not at all; no half-removed message remains."""
    import socket as _socket
    import struct as _struct

    from pyqmail.queue.layout import QueuePaths

    for _ in range(40):
        c = own_smtp.session()
        c.send(
            b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
            b"Subject: rst\r\n\r\nbody\r\n.\r\n"
        )
        c.s.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _struct.pack("ii", 1, 0))
        c.close()
    assert own_smtp.alive()  # a later commit finishing proves the earlier ones are done too
    paths = QueuePaths(own_smtp.home.queue)
    todo = [int(f.name) for f in (own_smtp.home.queue / "todo").iterdir()]
    mess = {int(f.name) for f in (own_smtp.home.queue / "mess").rglob("*") if f.is_file()}
    assert set(todo) <= mess
    for n in todo:
        assert paths.mess(n).stat().st_size > 0
        assert paths.intd(n).exists()
    assert mess == set(todo)  # no message file without its todo entry
    assert [f for f in (own_smtp.home.queue / "pid").iterdir()] == []
    assert "Traceback" not in own_smtp.log(), own_smtp.log()  # a gone connection is no error


def test_half_close_right_after_the_final_dot_still_queues(smtp: Listener) -> None:
    """A client that sends everything and then shuts down its side (EOF) without waiting
    gets its message queued, as qmail-smtpd commits before it reads again."""
    c = smtp.session()
    c.send(
        b"MAIL FROM:<a@client.example>\r\nRCPT TO:<x@test.example>\r\nDATA\r\n"
        b"Subject: half\r\n\r\nbody\r\n.\r\n"
    )
    c.s.shutdown(1)
    assert c.replies(4) == [250, 250, 354, 250]
    assert queued(smtp.home) == [(b"a@client.example", [b"x@test.example"])]
