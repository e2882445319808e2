"""MAIL FROM / RCPT TO argument parsing: where the path is, and pyqmail's byte rules.

:func:`split_path` finds the path the way qmail-smtpd's ``addrparse`` does (smtpd.md
section 4: after the first ``<``, else after the first ``:`` and spaces, up to the first
unquoted ``>``, or space without brackets) but hands it on as sent, quotes and source
route included, for :func:`pyqmail.mailbox.parse_path` to check as an RFC 5321 path and
turn into qmail's unquoted queue form. What follows the path is the parameter text,
which qmail ignores and pyqmail validates (:func:`parse_mail_params`,
:func:`check_rcpt_params`).

:func:`check_bytes` and :func:`check_address` apply the strict envelope rules: a control
byte, DEL, or (with no SMTPUTF8) an 8-bit byte in an address is refused, so no NUL or
newline can ever reach the NUL-separated queue envelope; an address of 900 bytes or more
is qmail's syntax error. :func:`ip_literal` recognises ``[d.d.d.d]`` (as a number, like
qmail: ``[127.000.000.001]`` is 127.0.0.1) and ``[IPv6:...]``.

Everything here is pure: bytes in, values out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyqmail.smtp import replies

# qmail counts the NUL: an address of 900 bytes or more is a syntax error.
MAX_ADDRESS = 899
_MAX_SIZE_DIGITS = 20


@dataclass(frozen=True, slots=True)
class MailParams:
    """Validated MAIL parameters: SIZE (None if not given) and BODY (upper case, or b"")."""

    size: int | None = None
    body: bytes = b""
    smtputf8: bool = False  # RFC 6531: the addresses may be UTF-8


def split_path(arg: bytes) -> tuple[bytes, bytes] | None:
    """Split a MAIL/RCPT argument into (path text as sent, text after it).

    ``arg`` is what follows the verb and its spaces (``FROM:<a@b> SIZE=5``). The path is
    what lies between the first ``<`` and the first ``>`` outside double quotes (a
    backslash escapes the next byte), quotes and route kept for
    :func:`pyqmail.mailbox.parse_path`. Without ``<`` (qmail takes ``FROM:a@b``, so do
    we) it runs from after the first ``:`` and spaces to the next unquoted space. None
    when a ``<`` is never closed: RFC 5321 has no such path (qmail took the rest).
    """
    lt = arg.find(b"<")
    bracket = lt >= 0
    if bracket:
        i = lt + 1
    else:
        colon = arg.find(b":")
        i = colon + 1 if colon >= 0 else 0
        while i < len(arg) and arg[i] == 0x20:
            i += 1
    stop = 0x3E if bracket else 0x20  # '>' or ' '
    start = i
    n = len(arg)
    quoted = False
    while i < n:
        c = arg[i]
        if c == 0x5C:  # backslash: the next byte is literal
            i += 2
            continue
        if c == 0x22:
            quoted = not quoted
        elif c == stop and not quoted:
            return arg[start:i], arg[i + 1 :]
        i += 1
    return None if bracket else (arg[start:], b"")


def check_bytes(text: bytes, *, utf8: bool = False) -> bytes | None:
    """A control byte, DEL or (no SMTPUTF8) an 8-bit byte in an address: the refusal reply.
    With SMTPUTF8 (RFC 6531) 8-bit bytes must be UTF-8."""
    if not text.isascii():
        if not utf8:
            return replies.EIGHTBIT_ADDRESS
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return replies.SYNTAX
    for c in text:
        if c < 0x20 or c == 0x7F:
            return replies.BAD_BYTES
    return None


def check_address(address: bytes, *, utf8: bool = False) -> bytes | None:
    """The strict envelope rules; returns the refusal reply, or None if the address is fine."""
    if len(address) > MAX_ADDRESS:
        return replies.SYNTAX
    return check_bytes(address, utf8=utf8)


def asks_utf8(params: bytes) -> bool:
    """Does MAIL's parameter text hold RFC 6531's ``SMTPUTF8`` (checked again, with the
    rest, by :func:`parse_mail_params`)?"""
    return any(w.upper() == b"SMTPUTF8" for w in params.split(b" "))


def _split_params(text: bytes) -> list[tuple[bytes, bytes | None]] | None:
    out: list[tuple[bytes, bytes | None]] = []
    for word in text.split(b" "):
        if not word:
            continue
        key, eq, value = word.partition(b"=")
        if not key:
            return None
        out.append((key.upper(), value if eq else None))
    return out


def parse_mail_params(text: bytes, databytes: int) -> MailParams | bytes:
    """Validate MAIL parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8); a reply
    on refusal."""
    params = _split_params(text)
    if params is None:
        return replies.BAD_PARAM
    size: int | None = None
    body = b""
    utf8 = False
    seen: set[bytes] = set()
    for key, value in params:
        if key in seen:
            return replies.BAD_PARAM
        seen.add(key)
        if key == b"SIZE":
            if (
                value is None
                or not value
                or len(value) > _MAX_SIZE_DIGITS
                or not value.isdigit()
                or not value.isascii()
            ):
                return replies.BAD_SIZE
            size = int(value)
            if databytes > 0 and size > databytes:
                return replies.SIZE_TOO_BIG
        elif key == b"BODY":
            v = (value or b"").upper()
            if v == b"BINARYMIME":
                return replies.BINARYMIME
            if v not in (b"7BIT", b"8BITMIME"):
                return replies.BAD_PARAM
            body = v
        elif key == b"SMTPUTF8" and value is None:
            utf8 = True
        else:
            return replies.BAD_PARAM
    return MailParams(size, body, utf8)


def check_rcpt_params(text: bytes) -> bytes | None:
    """RCPT takes no parameters here (no DSN): anything after the address is refused."""
    if text.strip(b" "):
        return replies.BAD_PARAM
    return None


def ip_literal(domain: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``[d.d.d.d]`` or ``[IPv6:x::y]`` as an address; None for anything else."""
    if len(domain) < 3 or domain[:1] != b"[" or domain[-1:] != b"]":
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == b"ipv6:":
        try:
            return ipaddress.IPv6Address(inner[5:].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return None
    parts = inner.split(b".")
    if len(parts) != 4:
        return None
    octets = []
    for p in parts:
        if not p or len(p) > 10 or not p.isdigit() or not p.isascii():
            return None
        v = int(p)
        if v > 255:
            return None
        octets.append(v)
    return ipaddress.IPv4Address(bytes(octets))


def domain_of(address: bytes) -> bytes:
    """The text after the last ``@`` (empty if there is none): what relay control checks."""
    at = address.rfind(b"@")
    return address[at + 1 :] if at >= 0 else b""
