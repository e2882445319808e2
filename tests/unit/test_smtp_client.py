"""smtp/client.py: reply parsing, address quoting, and the dialogue state machine."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.smtp.client import (
    TEXT_CAP,
    ClientSession,
    Done,
    Reply,
    ReplyParser,
    Send,
    SendBody,
    StartTls,
    TlsMode,
    quote_address,
)


def feed_bytewise(data: bytes) -> list[Reply]:
    p = ReplyParser()
    out: list[Reply] = []
    for i in range(len(data)):
        out += p.feed(data[i : i + 1])
    return out


@pytest.mark.parametrize(
    ("wire", "code", "text"),
    [
        (b"250 ok\r\n", 250, b"250 ok\n"),
        (b"250-one\r\n250-two\r\n250 three\r\n", 250, b"250-one\n250-two\n250 three\n"),
        # qmail-remote takes the code from the first line (notqmail 1.09, observed).
        (b"250-a\r\n550 first line counts\r\n", 250, b"250-a\n550 first line counts\n"),
        (b"550-a\r\n250-b\r\n250 c\r\n", 550, b"550-a\n250-b\n250 c\n"),
        (b"25x-a\r\n250 b\r\n", None, b"25x-a\n250 b\n"),
        (b"220\r\n", 220, b"220\n"),
        (b"421 bye\n", 421, b"421 bye\n"),
        (b"hello there\r\n", None, b"hello there\n"),
        (b"25x ok\r\n", None, b"25x ok\n"),
    ],
)
def test_reply_parsing_whole_and_bytewise(wire: bytes, code: int | None, text: bytes) -> None:
    for replies in (ReplyParser().feed(wire), feed_bytewise(wire)):
        assert replies == [Reply(code, text)]


@settings(deadline=None)  # timing is not under test; the machine is shared
@given(st.lists(st.integers(min_value=0, max_value=60), max_size=8))
def test_any_split_gives_the_same_replies(cuts: list[int]) -> None:
    wire = b"220-a\r\n220 b\r\n250 ok\r\n354 go\r\n550-x\r\n550 5.1.1 y\r\n"
    p = ReplyParser()
    got: list[Reply] = []
    prev = 0
    for c in [*sorted(cuts), len(wire)]:
        got += p.feed(wire[prev:c])
        prev = max(prev, c)
    assert got == ReplyParser().feed(wire)
    assert [r.code for r in got] == [220, 250, 354, 550]


def test_each_reply_takes_its_own_first_line() -> None:
    p = ReplyParser()
    assert p.feed(b"451-a\r\n") == []
    assert not p.idle
    got = p.feed(b"250 b\r\n354-c\r\n")
    assert [r.code for r in got] == [451]
    assert [r.code for r in p.feed(b"550 d\r\n")] == [354]
    assert p.idle


def test_several_replies_in_one_read() -> None:
    got = ReplyParser().feed(b"250 a\r\n251 b\r\n354 go\r\n")
    assert [r.code for r in got] == [250, 251, 354]


def test_huge_reply_line_is_capped_not_held() -> None:
    p = ReplyParser()
    assert p.feed(b"550 ") == []
    for _ in range(100):
        assert p.feed(b"x" * 100_000) == []
    (reply,) = p.feed(b"\r\n")
    assert reply.code == 550
    assert len(reply.text) == TEXT_CAP
    assert len(p._text) == 0


def test_malformed_reply_counts_as_temporary() -> None:
    assert Reply(None, b"junk").kind == 4
    assert Reply(999, b"999").kind == 4
    assert Reply(554, b"").kind == 5


@pytest.mark.parametrize(
    ("addr", "wire"),
    [
        (b"", b""),
        (b"joe@example.com", b"joe@example.com"),
        (b"a b@example.com", b'"a b"@example.com'),
        (b'a"b@x', b'"a\\"b"@x'),
        (b".joe@x", b'".joe"@x'),
        (b"joe.@x", b'"joe."@x'),
        (b"j..oe@x", b'"j..oe"@x'),
        (b"j.o.e@x", b"j.o.e@x"),
        (b"@x", b'""@x'),
        (b"noat", b"noat"),
        (b"a@b@c", b'"a@b"@c'),
        (b"\xe9@x", b'"\xe9"@x'),
        (b"a\\b@x", b'"a\\\\b"@x'),
    ],
)
def test_quote_address_like_qmail(addr: bytes, wire: bytes) -> None:
    assert quote_address(addr) == wire


def R(line: bytes) -> Reply:
    (r,) = ReplyParser().feed(line)
    return r


def session(rcpts: int = 1, **kw: object) -> ClientSession:
    return ClientSession(
        "192.0.2.1",
        b"helo.example",
        b"a@b.example",
        [f"r{i}@c.example".encode() for i in range(rcpts)],
        tls=kw.pop("tls", TlsMode.OFF),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def done(actions: list[object]) -> Done:
    assert isinstance(actions[-1], Done), actions
    return actions[-1]


def test_happy_path_without_pipelining_one_command_at_a_time() -> None:
    s = session(2)
    assert s.reply(R(b"220 hi\r\n")) == [Send(b"EHLO helo.example\r\n")]
    assert s.reply(R(b"250-x\r\n250 8BITMIME\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]
    assert s.reply(R(b"250 ok\r\n")) == [Send(b"RCPT TO:<r0@c.example>\r\n")]
    assert s.reply(R(b"250 ok\r\n")) == [Send(b"RCPT TO:<r1@c.example>\r\n")]
    assert s.reply(R(b"250 ok\r\n")) == [Send(b"DATA\r\n")]
    assert s.reply(R(b"354 go\r\n")) == [SendBody()]
    res = done(s.reply(R(b"250 queued as X\r\n"))).result
    assert res.recipients == (("r", b""), ("r", b""))
    assert res.message == ("K", b"192.0.2.1 accepted message.\nRemote host said: 250 queued as X\n")
    assert res.reports() == (
        b"r\0r\0K192.0.2.1 accepted message.\nRemote host said: 250 queued as X\n\0"
    )


def test_pipelining_sends_mail_rcpts_data_at_once() -> None:
    s = session(2)
    s.reply(R(b"220 hi\r\n"))
    (act,) = s.reply(R(b"250-x\r\n250 PIPELINING\r\n"))
    assert act == Send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<r0@c.example>\r\nRCPT TO:<r1@c.example>\r\nDATA\r\n"
    )
    assert s.reply(R(b"250 ok\r\n")) == []
    assert s.reply(R(b"550 5.1.1 no\r\n")) == []
    assert s.reply(R(b"250 ok\r\n")) == []
    assert s.reply(R(b"354 go\r\n")) == [SendBody()]
    res = done(s.reply(R(b"250 ok\r\n"))).result
    assert res.recipients[0] == (
        "h",
        b"192.0.2.1 does not like recipient.\nRemote host said: 550 5.1.1 no\n",
    )
    assert res.recipients[1] == ("r", b"")
    assert res.message[0] == "K"


def test_ehlo_rejected_falls_back_to_helo() -> None:
    s = session()
    s.reply(R(b"220 hi\r\n"))
    assert s.reply(R(b"502 what\r\n")) == [Send(b"HELO helo.example\r\n")]
    assert s.reply(R(b"250 hi\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]


@pytest.mark.parametrize(
    ("steps", "letter", "text"),
    [
        ([b"421 busy\r\n"], "Z", b"Connected to 192.0.2.1 but greeting failed.\n"),
        (
            [b"220 x\r\n", b"500 no\r\n", b"550 no\r\n"],
            "Z",
            b"Connected to 192.0.2.1 but my name was rejected.\n",
        ),
        (
            [b"220 x\r\n", b"250 x\r\n", b"553 bad sender\r\n"],
            "D",
            b"Connected to 192.0.2.1 but sender was rejected.\n",
        ),
        (
            [b"220 x\r\n", b"250 x\r\n", b"451 later\r\n"],
            "Z",
            b"Connected to 192.0.2.1 but sender was rejected.\n",
        ),
        (
            [b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n", b"250 ok\r\n", b"554 no data\r\n"],
            "D",
            b"192.0.2.1 failed on DATA command.\n",
        ),
        (
            [b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n", b"250 ok\r\n", b"451 later\r\n"],
            "Z",
            b"192.0.2.1 failed on DATA command.\n",
        ),
        (
            [
                b"220 x\r\n",
                b"250 x\r\n",
                b"250 ok\r\n",
                b"250 ok\r\n",
                b"354 go\r\n",
                b"552 too big\r\n",
            ],
            "D",
            b"192.0.2.1 failed after I sent the message.\n",
        ),
        (
            [
                b"220 x\r\n",
                b"250 x\r\n",
                b"250 ok\r\n",
                b"250 ok\r\n",
                b"354 go\r\n",
                b"452 full\r\n",
            ],
            "Z",
            b"192.0.2.1 failed after I sent the message.\n",
        ),
        (
            [
                b"220 x\r\n",
                b"250 x\r\n",
                b"250 ok\r\n",
                b"250 ok\r\n",
                b"354 go\r\n",
                b"garbage\r\n",
            ],
            "Z",
            b"192.0.2.1 failed after I sent the message.\n",
        ),
        (
            [
                b"220 x\r\n",
                b"250 x\r\n",
                b"250 ok\r\n",
                b"250 ok\r\n",
                b"354 go\r\n",
                b"354 what\r\n",
            ],
            "Z",
            b"192.0.2.1 failed after I sent the message.\n",
        ),
    ],
)
def test_each_failure_point_has_qmails_text(steps: list[bytes], letter: str, text: bytes) -> None:
    s = session()
    actions: list[object] = []
    for wire in steps:
        actions = list(s.reply(R(wire)))
    res = done(actions).result
    assert res.message == (letter, text + b"Remote host said: " + steps[-1].replace(b"\r", b""))
    assert res.quit


def test_giving_up_repeats_no_server_text() -> None:
    s = session()
    for wire in (b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n"):
        s.reply(R(wire))
    res = done(s.reply(R(b"550 no\r\n"))).result
    # notqmail prints the reply with the recipient only (byte-compared with its qmail-remote)
    assert res.reports() == (
        b"h192.0.2.1 does not like recipient.\nRemote host said: 550 no\n\0"
        b"DGiving up on 192.0.2.1.\n\0"
    )


def test_no_recipient_accepted_with_temp_reply_reports_s() -> None:
    s = session()
    for wire in (b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n"):
        s.reply(R(wire))
    res = done(s.reply(R(b"451 4.2.0 greylisted\r\n"))).result
    assert res.recipients == (
        ("s", b"192.0.2.1 does not like recipient.\nRemote host said: 451 4.2.0 greylisted\n"),
    )
    assert res.message[0] == "D"


def test_connection_lost_texts() -> None:
    s = session()
    s.reply(R(b"220 x\r\n"))
    assert s.connection_lost().message == (
        "Z",
        b"Connected to 192.0.2.1 but connection died. (#4.4.2)\n",
    )
    s = session()
    for wire in (b"220 x\r\n", b"250 x\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        s.reply(R(wire))
    assert b"Possible" not in s.connection_lost().message[1]  # dropped mid-DATA
    s.body_sent()
    res = s.connection_lost()
    assert res.message == (
        "Z",
        b"Connected to 192.0.2.1 but connection died. Possible duplicate! (#4.4.2)\n",
    )
    assert res.recipients == (("r", b""),)
    assert not res.quit


def test_starttls_opportunistic_and_reehlo() -> None:
    s = session(tls=TlsMode.OPPORTUNISTIC)
    s.reply(R(b"220 x\r\n"))
    assert s.reply(R(b"250-x\r\n250 STARTTLS\r\n")) == [Send(b"STARTTLS\r\n")]
    assert s.reply(R(b"220 go ahead\r\n")) == [StartTls(verify=False)]
    assert s.tls_done(True) == [Send(b"EHLO helo.example\r\n")]
    # after TLS, STARTTLS is not offered again and must not be tried again
    assert s.reply(R(b"250-x\r\n250 STARTTLS\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]


def test_starttls_refused_is_plaintext_unless_required() -> None:
    s = session(tls=TlsMode.OPPORTUNISTIC)
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250-x\r\n250 STARTTLS\r\n"))
    assert s.reply(R(b"454 no tls now\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]
    s = session(tls=TlsMode.REQUIRED, tls_required_for="c.example")
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250-x\r\n250 STARTTLS\r\n"))
    res = done(s.reply(R(b"454 no tls now\r\n"))).result
    assert res.message[0] == "Z"
    assert b"TLS is required for c.example" in res.message[1]


def test_tls_required_but_not_offered() -> None:
    s = session(tls=TlsMode.REQUIRED, tls_required_for="c.example")
    s.reply(R(b"220 x\r\n"))
    res = done(s.reply(R(b"250 x\r\n"))).result
    assert res.message[0] == "Z"
    assert b"does not offer STARTTLS" in res.message[1]


def test_handshake_failure_policy() -> None:
    s = session(tls=TlsMode.OPPORTUNISTIC)
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250-x\r\n250 STARTTLS\r\n"))
    s.reply(R(b"220 go\r\n"))
    res = done(s.tls_done(False, "bad")).result
    assert res.tls_fallback and res.message[0] == "Z"
    s = session(tls=TlsMode.REQUIRED, tls_required_for="c.example")
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250-x\r\n250 STARTTLS\r\n"))
    assert s.reply(R(b"220 go\r\n")) == [StartTls(verify=True)]
    res = done(s.tls_done(False, "CERTIFICATE_VERIFY_FAILED")).result
    assert not res.tls_fallback and res.message[0] == "Z"
    assert b"CERTIFICATE_VERIFY_FAILED" in res.message[1]


def test_8bitmime_body_parameter_only_when_offered_and_needed() -> None:
    s = session(is_8bit=lambda: True)
    s.reply(R(b"220 x\r\n"))
    assert s.reply(R(b"250-x\r\n250 8BITMIME\r\n")) == [
        Send(b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n")
    ]
    s = session(is_8bit=lambda: True)
    s.reply(R(b"220 x\r\n"))
    assert s.reply(R(b"250 x\r\n")) == [Send(b"MAIL FROM:<a@b.example>\r\n")]


def test_line_breaks_in_addresses_are_never_sent() -> None:
    s = ClientSession("192.0.2.1", b"h", b"a@b", [b"x\r\nRSET@c", b"ok@c"], tls=TlsMode.OFF)
    s.reply(R(b"220 x\r\n"))
    s.reply(R(b"250 x\r\n"))
    (send,) = s.reply(R(b"250 ok\r\n"))
    assert send == Send(b"RCPT TO:<ok@c>\r\n")
    s.reply(R(b"250 ok\r\n"))
    s.reply(R(b"354 go\r\n"))
    res = done(s.reply(R(b"250 ok\r\n"))).result
    assert res.recipients[0][0] == "h" and res.recipients[1] == ("r", b"")
    bad = ClientSession("192.0.2.1", b"h", b"a\n@b", [b"ok@c"], tls=TlsMode.OFF)
    bad.reply(R(b"220 x\r\n"))
    assert done(bad.reply(R(b"250 x\r\n"))).result.message[0] == "D"


_REPLIES = st.sampled_from(
    [b"220 hi\r\n", b"250 ok\r\n", b"250-x\r\n250 PIPELINING\r\n", b"250-x\r\n250 STARTTLS\r\n",
     b"354 go\r\n", b"421 bye\r\n", b"451 later\r\n", b"550 no\r\n", b"junk\r\n", b"\r\n",
     b"199 odd\r\n", b"999 odd\r\n"]
)  # fmt: skip


@settings(deadline=None, max_examples=400)
@given(st.lists(_REPLIES, max_size=14), st.integers(min_value=1, max_value=3), st.booleans())
def test_no_sequence_of_replies_reports_delivery_without_a_2xx_after_the_body(
    replies: list[bytes], rcpts: int, tls_ok: bool
) -> None:
    s = session(rcpts, tls=TlsMode.OPPORTUNISTIC)
    body_sent = False
    last_after_body: Reply | None = None
    result = None
    for wire in replies:
        if s.done:
            break
        reply = R(wire)
        if body_sent:
            last_after_body = reply
        actions = list(s.reply(reply))
        while actions:
            act = actions.pop(0)
            if isinstance(act, StartTls):
                actions += s.tls_done(tls_ok, "x")
            elif isinstance(act, SendBody):
                s.body_sent()
                body_sent = True
            elif isinstance(act, Done):
                result = act.result
            else:
                assert isinstance(act, Send)
                assert act.data.endswith(b"\r\n")
                for line in act.data.split(b"\r\n")[:-1]:
                    assert b"\r" not in line and b"\n" not in line
    if result is None:
        result = s.connection_lost()
    letter = result.message[0]
    assert letter in "KZD"
    if letter == "K":
        assert body_sent and last_after_body is not None
        assert last_after_body.code is not None and 200 <= last_after_body.code <= 299
    assert len(result.recipients) <= rcpts
    assert all(r[0] in "rhs" for r in result.recipients)
