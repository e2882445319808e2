"""Reading a message header as qmail-inject does (inject.md 1.4).

Owns: splitting the input into header fields and the start of the body, without ever
reading the body. The header is the lines up to the first empty line; a line starting
with space or tab continues the previous field; a first line ``From `` (an mbox
separator) becomes an ``MBOX-Line:`` field; any other line that is not ``name:`` ends the
header, and qmail-inject then writes a blank line before it (the line and the rest are
body). Field names are matched case-insensitively; their bytes are kept as written.

pyqmail difference (documented in docs/inject.md): a line that is only ``CR LF`` ends the
header like an empty line, where qmail keeps it as the first body line after an inserted
blank line. An unterminated last line gets its newline, as qmail-inject gives it. Header
lines may be CR LF or LF; a trailing CR is white space to the address
parser and is kept in fields that are copied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

# printable ASCII except ':' and space, then optional white space, then ':'
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")

SENDER_FIELDS = frozenset(
    {"sender", "from", "reply-to", "return-path", "return-receipt-to", "errors-to",
     "resent-sender", "resent-from", "resent-reply-to"}
)  # fmt: skip
RECIPIENT_FIELDS = frozenset(
    {"to", "cc", "bcc", "apparently-to", "resent-to", "resent-cc", "resent-bcc"}
)  # fmt: skip
RESENT_FIELDS = frozenset(
    {"resent-sender", "resent-from", "resent-reply-to", "resent-to", "resent-cc",
     "resent-bcc", "resent-date", "resent-message-id"}
)  # fmt: skip


@dataclass
class Field:
    """One header field: its name as written, and its raw lines (with their newlines)."""

    name: bytes
    raw: bytes

    @property
    def key(self) -> str:
        return self.name.decode("ascii", "replace").lower()

    @property
    def value(self) -> bytes:
        """Everything after the colon, continuation lines included."""
        return self.raw[self.raw.index(b":") + 1 :]


@dataclass
class Header:
    """The parsed header, and what follows it."""

    fields: list[Field]
    separator: bytes  # b"\n" if a blank line ended the header, b"" at EOF
    body_start: bytes  # a non-header line that ended the header (now body), else b""


def read_header(stream: BinaryIO) -> Header:
    """Read header fields from ``stream``; leaves the stream at the start of the body."""
    fields: list[Field] = []
    first = True
    while True:
        line = stream.readline()
        if not line:
            return Header(fields, b"", b"")
        if not line.endswith(b"\n"):
            line += b"\n"  # qmail-inject ends a last, unterminated line
        if line in (b"\n", b"\r\n"):
            return Header(fields, b"\n", b"")
        if first and line.startswith(b"From "):
            line = b"MBOX-Line: " + line
        first = False
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line
            continue
        m = _FIELD.match(line)
        if m is None:
            return Header(fields, b"\n", line)
        fields.append(Field(m.group(1), line))
