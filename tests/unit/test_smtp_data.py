"""The DATA decoder alone: end of data, unstuffing, bare LF/CR, limits, chunk boundaries."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.smtp.data import DataDecoder, DataError


def decode(wire: bytes, piece: int = 0, **kw: int) -> tuple[bytes, DataDecoder, bytes, bool]:
    dec = DataDecoder(**kw)
    out = b""
    rest = b""
    done = False
    chunks = [wire] if piece <= 0 else [wire[i : i + piece] for i in range(0, len(wire), piece)]
    for c in chunks:
        if done:
            rest += c
            continue
        r = dec.feed(c)
        out += b"".join(r.chunks)
        if r.fatal is not None:
            return out, dec, b"", False
        if r.done:
            done = True
            rest = r.rest
    return out, dec, rest, done


@pytest.mark.parametrize("piece", [1, 2, 5, 0])
@pytest.mark.parametrize(
    ("wire", "stored", "rest"),
    [
        (b".\r\n", b"", b""),
        (b".\r\nNOOP\r\n", b"", b"NOOP\r\n"),
        (b"a\r\n.\r\n", b"a\n", b""),
        (b"..x\r\n.\r\n", b".x\n", b""),
        (b".x\r\n.\r\n", b"x\n", b""),
        (b"a\r\n..\r\n.\r\n", b"a\n.\n", b""),
        (b"a\r\n\r\n.\r\nQUIT\r\n", b"a\n\n", b"QUIT\r\n"),
        (b"nul\x00byte\r\n.\r\n", b"nul\x00byte\n", b""),
        (b"8bit \xff\r\n.\r\n", b"8bit \xff\n", b""),
    ],
)
def test_end_and_unstuffing(wire: bytes, stored: bytes, rest: bytes, piece: int) -> None:
    out, dec, r, done = decode(wire, piece)
    assert (out, r, done, dec.failure) == (stored, rest, True, None)


@pytest.mark.parametrize("piece", [1, 3, 0])
@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"a\nb\r\n.\r\n", DataError.BARE_LF),
        (b"a\r\n.\n", DataError.BARE_LF),
        (b"\n.\n", DataError.BARE_LF),
        (b"a\rb\r\n.\r\n", DataError.BARE_CR),
        (b"a\r\r\n.\r\n", DataError.BARE_CR),
        (b"x\r.\r\n.\r\n", DataError.BARE_CR),
        (b"a\r\n.\r\r\n.\r\n", DataError.BARE_CR),
        (b"a\n\r.\r\n", DataError.BARE_LF),
        (b"a\r\n\rb\n", DataError.BARE_CR),
    ],
)
def test_bare_lf_and_cr_are_fatal(wire: bytes, why: DataError, piece: int) -> None:
    _out, dec, _, done = decode(wire, piece)
    assert not done and dec.failure is why


def test_bare_lf_is_seen_before_the_line_completes() -> None:
    r = DataDecoder().feed(b"hello\nworld")
    assert r.fatal is DataError.BARE_LF


def test_trailing_cr_waits_for_its_lf() -> None:
    dec = DataDecoder()
    assert dec.feed(b"a\r").fatal is None
    assert dec.feed(b"\n.\r").fatal is None
    r = dec.feed(b"\n")
    assert r.done and dec.failure is None


def test_line_length_limit() -> None:
    _, dec, _, done = decode(b"a" * 1000 + b"\r\n.\r\n")
    assert done and dec.failure is None
    _, dec, _, done = decode(b"a" * 1001 + b"\r\n.\r\n", piece=13)
    assert done and dec.failure is DataError.LINE_TOO_LONG


def test_databytes_counts_stored_bytes() -> None:
    out, dec, _, _ = decode(b"abcd\r\n.\r\n", databytes=5)
    assert dec.failure is None and out == b"abcd\n"
    out, dec, _, done = decode(b"abcde\r\nmore\r\n.\r\n", databytes=5)
    assert done and dec.failure is DataError.TOO_BIG and dec.size > 5


def test_hops_only_in_the_header() -> None:
    wire = (
        b"Received: a\r\nreceived: b\r\nRECEIVED: c\r\nDelivered-To: d\r\n\r\nReceived: e\r\n.\r\n"
    )
    _, dec, _, _ = decode(wire, max_hops=100)
    assert dec.hops == 4
    _, dec, _, _ = decode(wire, max_hops=4)
    assert dec.failure is DataError.TOO_MANY_HOPS


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30
    ),
    st.integers(min_value=1, max_value=100),
    st.binary(max_size=30),
)
def test_round_trip_any_chunking(lines: list[bytes], piece: int, after: bytes) -> None:
    wire = b"".join((b"." + x if x[:1] == b"." else x) + b"\r\n" for x in lines)
    out, dec, rest, done = decode(wire + b".\r\n" + after, piece)
    assert done and dec.failure is None
    assert out == b"".join(x + b"\n" for x in lines)
    assert rest == after


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_chunking_never_changes_the_result(wire: bytes, piece: int) -> None:
    whole = decode(wire)
    pieces = decode(wire, piece)
    assert whole[0] == pieces[0] or whole[1].failure is not None
    assert whole[1].failure == pieces[1].failure
    assert whole[3] == pieces[3]
    if whole[3]:
        assert whole[2] == pieces[2]


def test_hops_are_reported_before_databytes_as_qmail_does() -> None:
    wire = b"Received: x\r\n" * 5 + b"\r\n" + b"y" * 100 + b"\r\n.\r\n"
    _, dec, _, done = decode(wire, databytes=10, max_hops=5)
    assert done and dec.failure is DataError.TOO_MANY_HOPS
    _, dec, _, done = decode(b"z" * 2000 + b"\r\n" + b"z\r\n" * 20 + b".\r\n", databytes=10)
    assert done and dec.failure is DataError.TOO_BIG


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=12),
)
def test_long_line_scan_agrees_with_splitting(lengths: list[int], limit: int) -> None:
    from pyqmail.smtp.data import _has_long_line

    data = b"".join(b"x" * n + b"\n" for n in lengths)
    assert _has_long_line(data, 0, limit) == (max(lengths) > limit)


def reference(wire: bytes) -> tuple[bytes, bytes | None, DataError | None]:
    """The rules one byte at a time, the slow obvious way: (stored, rest after the final
    dot or None if not seen, the fatal error or None)."""
    out = bytearray()
    i, n = 0, len(wire)
    line_start = True
    while i < n:
        if line_start and wire[i : i + 3] == b".\r\n":
            return bytes(out), wire[i + 3 :], None
        if line_start and wire[i : i + 1] == b".":
            if i + 1 == n or wire[i + 1 : i + 3] == b"\r":
                break  # maybe the final dot: wait for more
            i += 1  # a stuffed dot
        line_start = False
        c = wire[i]
        if c == 0x0A:
            return bytes(out), None, DataError.BARE_LF
        if c == 0x0D:
            if i + 1 == n:
                break
            if wire[i + 1] != 0x0A:
                return bytes(out), None, DataError.BARE_CR
            out += b"\n"
            i += 2
            line_start = True
            continue
        out.append(c)
        i += 1
    return bytes(out), None, None


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.\r\n", b".."]),
        max_size=40,
    ).map(b"".join),
    st.integers(min_value=0, max_value=12),
)
def test_agrees_with_a_byte_at_a_time_reference(wire: bytes, piece: int) -> None:
    stored, rest, fatal = reference(wire)
    out, dec, r, done = decode(wire, piece)
    if fatal is not None:
        assert dec.failure is fatal and not done
    elif rest is not None:
        assert (done, out, r, dec.failure) == (True, stored, rest, None)
    else:
        assert not done and dec.failure is None
        assert stored.startswith(out)  # only whole lines are given out before the end
