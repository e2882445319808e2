"""remote/deliver.py fold(): qmail-rspawn's folding of r/h/s + K/Z/D into one outcome."""

from __future__ import annotations

import pytest

from pyqmail.outcome import Status
from pyqmail.remote.deliver import fold
from pyqmail.smtp.client import SessionResult

ACC = b"1.2.3.4 accepted message.\nRemote host said: 250 ok\n"
GIVE = b"Giving up on 1.2.3.4.\n"
HTXT = b"1.2.3.4 does not like recipient.\nRemote host said: 550 no\n"
STXT = b"1.2.3.4 does not like recipient.\nRemote host said: 451 later\n"


@pytest.mark.parametrize(
    ("rcpt", "msg", "status", "text"),
    [
        (("r", b""), ("K", ACC), Status.OK, ACC),
        (("r", b""), ("Z", b"z\n"), Status.TEMP, b"z\n"),
        (("r", b""), ("D", b"d\n"), Status.PERM, b"d\n"),
        (("h", HTXT), ("D", GIVE), Status.PERM, HTXT + GIVE),
        (("s", STXT), ("D", GIVE), Status.TEMP, STXT + GIVE),
        (("h", HTXT), ("K", ACC), Status.PERM, HTXT),  # message better: not appended
        (("s", STXT), ("K", ACC), Status.TEMP, STXT),
        (("s", STXT), ("Z", b"z\n"), Status.TEMP, STXT + b"z\n"),
        (("h", HTXT), ("Z", b"z\n"), Status.PERM, HTXT),
    ],
)
def test_fold_like_rspawn(
    rcpt: tuple[str, bytes], msg: tuple[str, bytes], status: Status, text: bytes
) -> None:
    (o,) = fold(SessionResult((rcpt,), msg), 1)
    assert o.status is status
    assert o.text == text.decode()


def test_recipients_without_report_get_the_message_report() -> None:
    res = SessionResult((), ("Z", b"Connected to 1.2.3.4 but greeting failed.\n"))
    outs = fold(res, 3)
    assert [o.status for o in outs] == [Status.TEMP] * 3
    assert outs[2].text == "Connected to 1.2.3.4 but greeting failed.\n"


def test_mixed_recipients_on_one_connection() -> None:
    res = SessionResult((("r", b""), ("h", HTXT), ("s", STXT)), ("K", ACC))
    assert [o.status for o in fold(res, 3)] == [Status.OK, Status.PERM, Status.TEMP]


@pytest.mark.parametrize(
    ("rcpt", "msg", "status"),
    [
        (("h", HTXT), ("K", ACC), Status.PERM),
        (("s", STXT), ("K", ACC), Status.TEMP),
        (("h", HTXT), ("Z", b"z\n"), Status.PERM),
        (("s", STXT), ("Z", b"z\n"), Status.TEMP),
        (("h", HTXT), ("D", GIVE), Status.PERM),
        (("s", STXT), ("D", b"d\n"), Status.TEMP),
    ],
)
def test_refused_recipient_ends_giving_up_like_its_own_qmail_remote_run(
    rcpt: tuple[str, bytes], msg: tuple[str, bytes], status: Status
) -> None:
    # qmail-send gives qmail-remote one recipient; refused, that run ends "Giving up on IP."
    # whatever the other recipients of this connection did.
    res = SessionResult((("r", b""), rcpt), msg, refused=frozenset({1}), ip="1.2.3.4")
    accepted, refused = fold(res, 2)
    assert refused.status is status
    assert refused.text == (rcpt[1] + GIVE).decode()
    assert accepted.text == (msg[1] if msg[0] != "K" else ACC).decode()
