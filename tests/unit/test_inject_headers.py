"""Reading a header the way qmail-inject does, on real-world and hostile input."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.inject.address import Rewriter
from pyqmail.inject.headers import read_header
from pyqmail.inject.inject import CHUNK, InjectError, Options, Settings, inject, prepare
from pyqmail.queue.contract import Reply

ENV = {"USER": "robot", "QMAILDEFAULTHOST": "dh", "QMAILDEFAULTDOMAIN": "dd.example",
       "QMAILPLUSDOMAIN": "pd.example", "QMAILIDHOST": "id.example"}  # fmt: skip


def _read(data: bytes):
    stream = io.BytesIO(data)
    h = read_header(stream)
    return h, stream.read()


def test_folded_fields_stay_one_field() -> None:
    h, body = _read(b"Subject: a\n b\n\tc\nTo: x\n\nbody\n")
    assert [f.key for f in h.fields] == ["subject", "to"]
    assert h.fields[0].raw == b"Subject: a\n b\n\tc\n"
    assert h.separator == b"\n" and body == b"body\n"


def test_missing_blank_line_starts_the_body() -> None:
    h, body = _read(b"Subject: x\nthis is body text\nmore\n")
    assert [f.key for f in h.fields] == ["subject"]
    assert h.body_start == b"this is body text\n"
    assert h.separator == b"\n"  # qmail-inject inserts the blank line
    assert body == b"more\n"


@pytest.mark.parametrize("line", [b"no colon here\n", b": empty name\n", b"two words: x\n",
                                  b" leading space first\n"])  # fmt: skip
def test_lines_that_end_the_header(line: bytes) -> None:
    h, _ = _read(line + b"Subject: x\n\n")
    assert h.fields == []
    assert h.body_start == line


def test_mbox_from_line() -> None:
    h, _ = _read(b"From someone Mon Jan  1 00:00:00 2024\nSubject: x\n\n")
    assert h.fields[0].raw.startswith(b"MBOX-Line: From someone")


def test_crlf_header_ends_at_crlf_line() -> None:
    h, body = _read(b"Subject: x\r\nTo: a\r\n\r\nbody\r\n")
    assert [f.key for f in h.fields] == ["subject", "to"]
    assert body == b"body\r\n"


def test_eof_in_header() -> None:
    h, body = _read(b"Subject: x\nTo: a")
    assert h.separator == b"" and body == b""
    assert h.fields[1].raw == b"To: a\n"  # the unterminated line gets its newline


def _prepare(home: Home, data: bytes, env: dict[str, str] | None = None) -> bytes:
    stream = io.BytesIO(data)
    s = Settings.from_env(load(home), {**ENV, **(env or {})})
    return prepare(read_header(stream), Options(), s, now=0, pid=1).header + stream.read()


def test_8bit_and_encoded_words_pass_through(home: Home) -> None:
    data = (
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= und Grüße\nX-Raw: \xff\xfe\n"
        "To: =?utf-8?b?SsO2cmc=?= <j@x.example>\n\n"
    ).encode("utf-8", "surrogateescape")
    data = data.replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe")  # raw non-UTF-8 bytes
    out = _prepare(home, data)
    assert b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= und Gr\xc3\xbc\xc3\x9fe\n" in out
    assert b"X-Raw: \xff\xfe\n" in out
    assert b"To: =?utf-8?b?SsO2cmc=?= <j@x.example>\n" in out


def test_100kb_header_line(home: Home) -> None:
    long_subject = b"Subject: " + b"x" * 100_000 + b"\n"
    many = b"To: " + b", ".join(b"u%d@h%d.example" % (i, i) for i in range(5000)) + b"\n"
    out = _prepare(home, long_subject + many + b"\nbody\n")
    assert long_subject in out
    to = out[out.index(b"\nTo: ") + 1 :].split(b"\n\n")[0]
    assert to.count(b"@") == 5000
    assert max(len(line) for line in to.split(b"\n")) <= 78


class _CountingSink:
    def __init__(self) -> None:
        self.total = 0
        self.biggest = 0
        self.committed: tuple[bytes, list[bytes]] | None = None

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self.biggest = max(self.biggest, len(data))

    def commit_blocking(self, sender: bytes, recipients: list[bytes]) -> Reply:
        self.committed = (sender, list(recipients))
        return Reply(0, 0, 1)

    def abort(self) -> None:
        raise AssertionError("abort")


class _Body(io.RawIOBase):
    """A message whose 50 MB body is generated as it is read (never held whole)."""

    def __init__(self, header: bytes, size: int) -> None:
        self.header = io.BytesIO(header)
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        n = self.header.readinto(b)
        if n:
            return n
        n = min(len(b), self.left)
        b[:n] = b"y" * (n - 1) + b"\n" if n else b""
        self.left -= n
        return n


def test_50mb_message_is_streamed(home: Home) -> None:
    size = 50 * 1024 * 1024
    stream = io.BufferedReader(_Body(b"To: a\nSubject: big\n\n", size))
    sink = _CountingSink()
    s = Settings.from_env(load(home), ENV)
    inject(stream, Options(), s, sink)
    assert sink.committed == (b"robot@dh.dd.example", [b"a@dh.dd.example"])
    assert sink.total > size
    assert sink.biggest <= CHUNK + 8192  # copied in chunks, never as one piece


_header_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"To: ", b"From: ", b"Cc: ", b"Bcc: ", b"Resent-To: ", b"Return-Path: ",
                         b"Subject: ", b" ", b"\t", b"\n", b"\r\n", b"<", b">", b"@", b",", b";",
                         b":", b'"', b"(", b")", b"[", b"]", b"\\", b".", b"+", b"\xff", b"From "]),
        st.binary(max_size=8),
    ),
    max_size=40,
).map(b"".join)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_header_bytes, st.sampled_from(["", "fis", "crm"]))
def test_any_header_bytes_give_a_message_or_a_clean_error(data: bytes, flags: str) -> None:
    s = Settings(Rewriter("dh", "dd.example", "pd.example"), "id.example", "robot", None,
                 "A Name", None, None, flags, None)  # fmt: skip
    stream = io.BytesIO(data + b"\n\nbody\n")
    try:
        p = prepare(read_header(stream), Options(mode="h"), s, now=0, pid=1)
    except InjectError as e:
        assert e.code == 100 and str(e).startswith("unable to parse this line:")
        return
    assert p.header.endswith(b"\n")
    assert b"\nBcc:" not in b"\n" + p.header and b"\nReturn-Path:" not in b"\n" + p.header
