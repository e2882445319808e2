"""The message body on the wire: CRLF line ends, dot-stuffing, no way to end data early.

Stored messages use LF line ends. :class:`DataEncoder` turns them, chunk by chunk, into
SMTP DATA content (RFC 5321 section 4.5.2) with one invariant that notqmail's qmail-remote
breaks (gaps.md 3.3, CVE-2023-51764 family): **the output never contains a bare CR or a
bare LF, and every line that starts with ``.`` gets another**, so no stored byte sequence
can put ``CRLF . CRLF`` on the wire before the real end of data.

- ``LF`` -> ``CRLF``; ``CR LF`` -> ``CRLF`` (a stored CRLF is not doubled);
- a lone ``CR`` (followed by anything but LF, or at the end) -> ``CRLF``, and what follows
  starts a new line, so it is dot-stuffed (stored ``X\\r.\\n`` goes out as
  ``X\\r\\n..\\r\\n``);
- a final line without LF is completed with CRLF (pyqmail's choice; qmail-remote refuses
  the message permanently with #5.6.2, which helps nobody);
- 8-bit bytes, NULs and long lines pass unchanged, as qmail sends them.
"""

from __future__ import annotations


class DataEncoder:
    """Incremental LF-text -> dot-stuffed CRLF encoder. ``feed`` then ``finish`` once."""

    def __init__(self) -> None:
        self._bol = True  # the next byte starts a line
        self._cr = False  # the previous chunk ended in CR: held until we see what follows

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            self._cr = True
            data = data[:-1]
        if not data:
            return b""
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._bol and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..")
        self._bol = data.endswith(b"\n")
        return data.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """The rest of the message and the terminating ``.CRLF``."""
        tail = b""
        if self._cr:
            self._cr = False
            tail = b"\r\n"
            self._bol = True
        if not self._bol:
            tail += b"\r\n"
        return tail + b".\r\n"


def encode(message: bytes) -> bytes:
    """The whole DATA content for ``message`` including the final ``.CRLF``."""
    enc = DataEncoder()
    return enc.feed(message) + enc.finish()


def has_8bit(chunk: bytes) -> bool:
    """True if any byte is above 127 (for BODY=8BITMIME when the server offers it)."""
    return not chunk.isascii()
