"""The optimised DATA decoder against a plain model of RFC 5321 + pyqmail's strict rules,
for random input cut in random places (smtpd.md 5 and its last section; gaps.md 3.3).

The model: the data ends at the first CRLF "." CRLF that starts at a line start; if any
CR or LF before that end is not part of a CRLF, the connection fails (bare CR/LF);
otherwise lines lose one leading dot and CRLF becomes LF. The decoder must agree on
where the data ends, on failing, and on the stored bytes, however the input is cut.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail.smtp.data import DataDecoder

ATOMS = [
    b"\r\n",
    b"\r",
    b"\n",
    b".",
    b"..",
    b"\r\n.\r\n",
    b".\r\n",
    b"a",
    b"X-",
    b"\x00",
    b"\r\r\n",
]


def _model(data: bytes) -> tuple[str, bytes, bytes]:
    """("done"|"fatal"|"more", stored bytes, rest after the end)."""
    if data.startswith(b".\r\n"):
        body, rest, done = b"", data[3:], True
    else:
        e = data.find(b"\r\n.\r\n")
        if e >= 0:
            body, rest, done = data[: e + 2], data[e + 5 :], True
        else:
            body, rest, done = data, b"", False
    check = body if done else body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else b""
    tail = b"" if done else body[len(check) :]
    stripped = check.replace(b"\r\n", b"")
    if b"\r" in stripped or b"\n" in stripped or b"\n" in tail or b"\r" in tail[:-1]:
        return "fatal", b"", b""
    if not done:
        return "more", b"", b""
    lines = body.split(b"\r\n")[:-1]
    out = b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\n" for ln in lines)
    return "done", out, rest


def _decode(data: bytes, cuts: list[int]) -> tuple[str, bytes, bytes]:
    dec = DataDecoder(0, max_line=10_000)
    stored = b""
    i = k = 0
    while i < len(data):
        n = cuts[k % len(cuts)]
        k += 1
        res = dec.feed(data[i : i + n])
        i += n
        stored += b"".join(res.chunks)
        if res.fatal is not None:
            return "fatal", b"", b""
        if res.done:
            return "done", stored, res.rest + data[i:]
    return "more", b"", b""


@settings(max_examples=2000, deadline=None)
@given(
    atoms=st.lists(st.sampled_from(ATOMS), max_size=25),
    cuts=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8),
)
def test_decoder_agrees_with_the_model(atoms: list[bytes], cuts: list[int]) -> None:
    data = b"".join(atoms)
    want = _model(data)
    got = _decode(data, cuts)
    assert got == want, (data, cuts)
