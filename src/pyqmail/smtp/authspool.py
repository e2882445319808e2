"""The message side of the checks of incoming mail (smtp/authcheck.py): spool, verdict, and
the Authentication-Results header in the queued message.

The header can only be known after the body (DKIM, DMARC's From), but the queue writer
writes the Received lines first, when a message is begun (``begin(received=...)``), and
the message is streamed, never held. So a checked message is spooled first: the
:class:`CheckedSubmission` the session's ``begin`` gets writes the decoded DATA into a
``SpooledTemporaryFile`` (in memory up to ``SPOOL_MEMORY``, then an unlinked file in the
temporary directory, mode 0600), and at the end of DATA:

1. :meth:`CheckedSubmission.verdict` runs the checks on the spool (the header section, at
   most ``HEADER_MAX`` bytes of it; the whole message for DKIM up to the checker's
   ``verify_max``) and gives the refusal reply, if any: the listener then aborts;
2. :meth:`CheckedSubmission.commit` writes our Received line and our Authentication-Results
   field, then copies the spool through :class:`HeaderFilter` (which drops every incoming
   Authentication-Results field that claims our authserv-id, RFC 8601 5), and commits.

The real queue entry is still begun at DATA (its file work overlaps the client's data, and
a queue that cannot start still answers DATA with ``451 qqt failure``), with an empty
``received``: every submitter writes ``received`` as the first bytes of the message, so
writing it first at the end gives the same bytes. The price is a second copy of each
checked message (page cache, usually). With DKIM and
DMARC off the header is known at DATA (SPF was checked at MAIL): then nothing is spooled,
the queue entry is begun at once and the message streams into it through the filter
(:class:`FilteredSubmission`). Unchecked sessions (relay clients, every check off) do not
pass through here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from collections.abc import Awaitable, Sequence
from typing import Any

import authres  # type: ignore[import-untyped]

from pyqmail.queue import codes
from pyqmail.queue.contract import QueueError, Reply, Submission, Submitter
from pyqmail.smtp.authcheck import ConnectionChecks, Mode, Verdict, build_header

log = logging.getLogger("pyqmail.authcheck")

SPOOL_MEMORY = 256 << 10  # a message up to this size is spooled in memory
HEADER_MAX = 1 << 20  # bytes of the header section read for the checks
AR_MAX = 64 << 10  # bytes of one incoming Authentication-Results field looked at
COPY_CHUNK = 64 << 10
_AR = b"authentication-results:"


def claims(field: bytes, me: str) -> bool:
    """Does this Authentication-Results field (name, value, folding) name ``me``?

    authres parses it when it is valid RFC 8601; when it is not, the authserv-id is still
    its first word after comments: a malformed field that claims us goes too."""
    text = re.sub(r"\r?\n(?=[ \t])", "", field.decode("latin-1")).rstrip("\r\n")
    try:
        ident = str(authres.AuthenticationResultsHeader.parse(text).authserv_id)
    except Exception:
        ident = _first_word(text.partition(":")[2])
    return ident.lower().rstrip(".") == me.lower().rstrip(".")


def _first_word(value: str) -> str:
    """The first word of a header value, after comments (nested; RFC 5322 3.2.2)."""
    depth, i = 0, 0
    out: list[str] = []
    while i < len(value):
        c = value[i]
        if c == "\\" and depth:
            i += 2
            continue
        if c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif not depth:
            if c in " \t;":
                if out:
                    break
            else:
                out.append(c)
        i += 1
    return "".join(out).strip('"')


class HeaderFilter:
    """Streams a message and drops the Authentication-Results fields that claim ``me``.

    Only the header section is looked at; each field is passed on as it comes except an
    Authentication-Results field, held until its end (at most ``AR_MAX`` bytes: a longer
    one is judged by its start). Lines are LF-terminated (the queue's form)."""

    def __init__(self, me: str, ar_max: int = AR_MAX) -> None:
        self.me = me
        self.ar_max = ar_max
        self.removed = 0
        self._in_header = True
        self._line = b""  # an incomplete line
        self._field: list[bytes] | None = None  # the A-R field being held
        self._held = 0
        self._mode = ""  # "drop" / "pass": an over-long A-R field, judged already

    def feed(self, data: bytes) -> bytes:
        if not self._in_header:
            return data
        data = self._line + data
        lines = data.split(b"\n")
        self._line = lines.pop()
        out: list[bytes] = []
        for i, raw in enumerate(lines):
            line = raw + b"\n"
            if not self._in_header:
                out.append(b"\n".join(lines[i:]) + b"\n")
                break
            self._take(line, out)
        if not self._in_header and self._line:
            out.append(self._line)
            self._line = b""
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if self._line and self._in_header:
            self._take(self._line, out)
            self._line = b""
        self._flush(out)
        tail, self._line = self._line, b""
        return b"".join(out) + tail

    def _take(self, line: bytes, out: list[bytes]) -> None:
        if line[:1] in (b" ", b"\t"):  # a continuation of the field before
            if self._mode == "drop":
                return
            if self._field is not None:
                self._field.append(line)
                self._held += len(line)
                if self._held > self.ar_max:
                    self._mode = "drop" if claims(b"".join(self._field), self.me) else "pass"
                    if self._mode == "drop":
                        self.removed += 1
                        self._field = None
                    else:
                        self._flush(out)
                return
            out.append(line)
            return
        self._flush(out)
        self._mode = ""
        if line in (b"\n", b"\r\n"):
            self._in_header = False
            out.append(line)
        elif line[: len(_AR)].lower() == _AR:
            self._field, self._held = [line], len(line)
        else:
            out.append(line)

    def _flush(self, out: list[bytes]) -> None:
        field, self._field = self._field, None
        if field is None:
            return
        if self._mode == "pass" or not claims(b"".join(field), self.me):
            out.extend(field)
        else:
            self.removed += 1


class CheckingSubmitter:
    """A Submitter (queue/contract.py) for a checked connection: each message is spooled."""

    def __init__(self, inner: Submitter, checks: ConnectionChecks) -> None:
        self.inner = inner
        self.checks = checks

    def begin(
        self, *, origin: str = "network", received: bytes = b"", sign: bool = False
    ) -> CheckedSubmission | FilteredSubmission:
        checks = self.checks
        if checks.policy.dkim is Mode.OFF and checks.policy.dmarc is Mode.OFF:
            header = build_header(checks.me, Verdict(spf=list(checks.spf_results)))
            sub = self.inner.begin(origin=origin, received=received + header)
            return FilteredSubmission(sub, checks.me)
        return CheckedSubmission(self.inner, checks, origin, received)


class FilteredSubmission:
    """A message streamed straight into the queue, through the filter (header known)."""

    def __init__(self, inner: Submission, me: str) -> None:
        self.inner = inner
        self.filter = HeaderFilter(me)

    def write(self, data: bytes) -> None:
        out = self.filter.feed(data)
        if out:
            self.inner.write(out)

    def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Awaitable[Reply]:
        tail = self.filter.finish()
        if tail:
            self.inner.write(tail)
        return self.inner.commit(sender, recipients)

    def abort(self) -> None:
        self.inner.abort()


class CheckedSubmission:
    """One checked message: spooled, judged (:meth:`verdict`), then queued (:meth:`commit`)."""

    def __init__(
        self, inner: Submitter, checks: ConnectionChecks, origin: str, received: bytes
    ) -> None:
        self.checks = checks
        self.received = received
        self.inner = inner
        self.sub: Submission = inner.begin(origin=origin, received=b"")  # QueueError: 451 qqt
        self.spool: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
        self.size = 0
        self.header: bytes | None = None
        self.result: Verdict | None = None

    def write(self, data: bytes) -> None:
        try:
            self.spool.write(data)
        except OSError as e:
            raise QueueError(codes.WRITE_ERROR, f"unable to spool the message: {e}") from e
        self.size += len(data)

    def _header_section(self) -> bytes:
        self.spool.seek(0)
        head = bytes(self.spool.read(HEADER_MAX))
        end = head.find(b"\n\n")
        if head.startswith(b"\n"):
            return b""
        return head[: end + 1] if end >= 0 else head[: head.rfind(b"\n") + 1]

    def _whole(self) -> bytes:
        """The whole message (in the checker's thread); b"" if the session has gone and
        closed the spool meanwhile."""
        try:
            self.spool.seek(0)
            return bytes(self.spool.read())
        except (ValueError, OSError):
            return b""

    async def verdict(self) -> bytes | None:
        """Run the checks; the refusal reply, or None to queue the message."""
        header = self._header_section()
        body = self._whole if self.size <= self.checks.checker.verify_max else None
        v = await self.checks.message(header, body)
        self.result = v
        self.header = build_header(self.checks.me, v)
        return v.refusal

    async def commit(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        if self.header is None:
            await self.verdict()
        sub = self.sub
        try:
            sub.write(self.received + (self.header or b""))
            await self._copy(sub)
        except QueueError as e:
            sub.abort()
            return Reply.of(e)
        except Exception:
            log.exception("copying a checked message into the queue failed")
            sub.abort()
            return Reply(codes.WRITE_ERROR)
        finally:
            self.spool.close()
        return await sub.commit(sender, recipients)

    async def _copy(self, sub: Submission) -> None:
        """The spool into the queue entry, through the filter, a chunk at a time; the
        loop runs between chunks and a committer that lags is waited for."""
        f = HeaderFilter(self.checks.me)
        self.spool.seek(0)
        while chunk := self.spool.read(COPY_CHUNK):
            sub.write(f.feed(chunk))
            await asyncio.sleep(0)
            while getattr(self.inner, "paused", False):  # a committer that lags
                await asyncio.sleep(0.005)
        sub.write(f.finish())

    def abort(self) -> None:
        self.spool.close()
        self.sub.abort()
