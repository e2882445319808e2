"""The streaming DATA decoder: SMTP's dot-terminated text in, queue-format bytes out.

It owns every rule about the bytes between ``354`` and the final dot (smtpd.md section 5
and the strict rules at its end):

* Only ``CRLF . CRLF`` ends the data; the start of the data counts as a line start, so an
  empty message (``.`` CRLF right after 354) is legal.
* CRLF is stored as LF; a line that starts with ``.`` loses that dot (dot-unstuffing).
* A bare LF anywhere is fatal (qmail's 451 smtplf reply, then the connection closes).
  A bare CR is fatal too: qmail stores it, and a stored ``\\r.`` is what becomes a smuggled
  end of data on the next hop (gaps.md 3.3). So LF.LF, CR.CR, LF.CRLF, CRLF.LF, CR.LF and
  every other smuggling sequence fail the whole connection before any of it is queued.
* A text line longer than ``max_line`` octets (without its CRLF) fails the message;
  the line is never held whole: once too long, only a marker of it is kept.
* Hop counting over the header (lines starting ``Received`` / ``Delivered``) and the
  databytes cap over the stored bytes; both let the data run on to its end, then fail it.

The decoder works a chunk at a time with ``bytes`` methods (find, count, translate),
never a Python loop per byte: this is the server's hot path. It holds at most one
incomplete line (bounded by ``max_line``) between chunks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_TEXT_LINE = 1000
MAX_HOPS = 100


class DataError(enum.Enum):
    """Why a message failed. BARE_* are fatal for the connection; the others for the message."""

    BARE_LF = "bare LF"
    BARE_CR = "bare CR"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "too big"
    TOO_MANY_HOPS = "too many hops"


@dataclass(slots=True)
class DataResult:
    """What one :meth:`DataDecoder.feed` produced.

    ``chunks`` are stored bytes to append to the message. ``done`` is True when the final
    dot was seen, and then ``rest`` holds the bytes that followed it (pipelined commands).
    ``fatal`` is set for a bare LF/CR: stop, reply, close; nothing may be queued.
    """

    chunks: list[bytes] = field(default_factory=list)
    done: bool = False
    rest: bytes = b""
    fatal: DataError | None = None


class DataDecoder:
    """One message's DATA section. Feed raw bytes; read :attr:`failure` at the end."""

    __slots__ = ("_buf", "_failures", "_fatal", "_in_header", "_max_line", "_mid_line",
                 "databytes", "hops", "max_hops", "size")  # fmt: skip

    def __init__(
        self, databytes: int = 0, *, max_line: int = MAX_TEXT_LINE, max_hops: int = MAX_HOPS
    ) -> None:
        self.databytes = databytes
        self._max_line = max_line
        self.max_hops = max_hops
        self._buf = b""  # an incomplete line, always starting at a line start
        self._mid_line = False  # True after a too-long line's head was thrown away
        self._in_header = True
        self.hops = 0
        self.size = 0
        self._fatal: DataError | None = None
        self._failures: set[DataError] = set()

    @property
    def failure(self) -> DataError | None:
        """Why the message failed, in qmail-smtpd's order (hops before databytes)."""
        if self._fatal is not None:
            return self._fatal
        if not self._failures:
            return None
        for why in _ORDER:
            if why in self._failures:
                return why
        return None

    @property
    def partial(self) -> bool:
        """True while an incomplete line is held."""
        return bool(self._buf)

    def feed(self, data: bytes) -> DataResult:
        """Decode the next bytes of DATA."""
        res = DataResult()
        buf = self._buf + data if self._buf else data
        if not buf:
            return res
        end = -1  # index of the CRLF that precedes the final dot, or -2 for a dot at 0
        stuffed = False  # a line of the region may start with a dot (it loses it)
        if not self._mid_line and buf[:1] == b".":
            if buf.startswith(b".\r\n"):
                end = -2
            stuffed = True
        if end == -1:
            # One scan finds the end and tells whether any line starts with a dot; past
            # a dot line, the end is looked for from there (one more scan at most).
            e = buf.find(b"\r\n.")
            if e >= 0:
                if buf[e + 3 : e + 5] == b"\r\n":
                    end = e
                else:
                    stuffed = True
                    end = buf.find(b"\r\n.\r\n", e + 3)
        if end == -2:
            region, tail = b"", b""
            res.rest = buf[3:]
        elif end >= 0:
            region, tail = buf[: end + 2], b""
            res.rest = buf[end + 5 :]
        else:
            last = buf.rfind(b"\r\n")
            region, tail = (buf[: last + 2], buf[last + 2 :]) if last >= 0 else (b"", buf)
        # CRLF -> LF by dropping every CR, valid only if each CR began a CRLF and each LF
        # ended one: as many CRLFs as CRs and as LFs (else the first bare one is found).
        out = region.translate(None, b"\r") if region else b""
        crlf = len(region) - len(out)
        fatal: DataError | None = None
        if out.count(b"\n") != crlf or region.count(b"\r\n") != crlf:
            fatal = _first_bare(region)
        elif b"\n" in tail:
            fatal = _first_bare(tail)
        elif 0 <= tail.find(b"\r") < len(tail) - 1:
            fatal = DataError.BARE_CR
        if fatal is not None:
            res.fatal = fatal
            self._fatal = fatal
            self._buf = b""
            return res
        if out:
            self._take(out, res, stuffed)
        if end != -1:
            res.done = True
            self._buf = b""
            return res
        if len(tail) > self._max_line + 1:  # the line can no longer be short enough
            self._fail(DataError.LINE_TOO_LONG)
            tail = b"X\r" if tail.endswith(b"\r") else b"X"
            self._mid_line = True
        self._buf = tail
        return res

    def _fail(self, why: DataError) -> None:
        self._failures.add(why)

    def _take(self, out: bytes, res: DataResult, stuffed: bool) -> None:
        """Complete lines in LF form, starting at a line start (or inside a failed line);
        ``stuffed``: some line of them may start with a dot."""
        start = 0
        if self._mid_line:  # the rest of a line already failed as too long
            self._mid_line = False
            start = out.find(b"\n") + 1
        if self._in_header:
            self._count_hops(out, start)
        if (
            not self._failures
            and len(out) - start > self._max_line
            and _has_long_line(out, start, self._max_line)
        ):
            self._fail(DataError.LINE_TOO_LONG)
        if self._failures:  # nothing more is stored, but the size is still counted
            self.size += len(out) - start
            if self.databytes and self.size > self.databytes:
                self._fail(DataError.TOO_BIG)
            return
        if stuffed:
            if out[:1] == b".":
                out = out[1:]
            out = out.replace(b"\n.", b"\n")
        self.size += len(out)
        if self.databytes and self.size > self.databytes:
            self._fail(DataError.TOO_BIG)
            return
        res.chunks.append(out)

    def _count_hops(self, out: bytes, start: int) -> None:
        """Count Received/Delivered header lines up to the first empty line."""
        if out[start : start + 1] == b"\n":
            self._in_header = False
            return
        e = out.find(b"\n\n", start)
        if e >= 0:
            self._in_header = False
            part = out[start : e + 1]
        else:
            part = out[start:]
        low = b"\n" + part.lower()
        self.hops += low.count(b"\nreceived") + low.count(b"\ndelivered")
        if self.hops >= self.max_hops:
            self._fail(DataError.TOO_MANY_HOPS)


def _has_long_line(data: bytes, start: int, limit: int) -> bool:
    """True if a line of ``data[start:]`` (LF-separated) is longer than ``limit`` octets.

    A run of ``limit + 1`` bytes without LF contains a whole block of ``(limit + 2) // 2``
    bytes aligned on ``start``; so only blocks with no LF are looked at closely, and the
    scan costs one ``find`` per block, not a Python step per line.
    """
    block = (limit + 2) // 2
    n = len(data)
    s = start
    while s + block <= n:
        if data.find(b"\n", s, s + block) >= 0:
            s += block
            continue
        line_start = data.rfind(b"\n", start, s) + 1 or start
        nxt = data.find(b"\n", s + block)
        line_end = nxt if nxt >= 0 else n
        if line_end - line_start > limit:
            return True
        s = line_end + 1
    return False


_ORDER = (DataError.TOO_MANY_HOPS, DataError.TOO_BIG, DataError.LINE_TOO_LONG)


def _first_bare(data: bytes) -> DataError:
    """Which comes first in ``data``: a LF without CR before it, or a CR without LF after."""
    i = 0
    n = len(data)
    while i < n:
        cr = data.find(b"\r", i)
        lf = data.find(b"\n", i)
        if lf >= 0 and (cr < 0 or lf < cr):
            return DataError.BARE_LF
        if cr < 0:
            break
        if cr + 1 < n and data[cr + 1] == 0x0A:
            i = cr + 2
            continue
        if cr + 1 >= n:
            break  # a CR at the very end may still be followed by LF
        return DataError.BARE_CR
    return DataError.BARE_CR
