"""MAIL FROM / RCPT TO argument parsing: qmail's path rules, then pyqmail's stricter checks.

:func:`parse_path` is qmail-smtpd's ``addrparse`` (smtpd.md section 4): start after the
first ``<`` (else after the first ``:`` and spaces), drop a source route, copy up to the
first unquoted ``>`` (or space without brackets) removing quotes and backslash escapes.
What follows the address is returned as the parameter text, which qmail ignores and
pyqmail validates (:func:`parse_mail_params`, :func:`check_rcpt_params`).

:func:`check_address` applies the strict envelope rules: a control byte, DEL, or (with no
SMTPUTF8) an 8-bit byte in an address is refused, so no NUL or newline can ever reach the
NUL-separated queue envelope. :func:`ip_literal` recognises ``[d.d.d.d]`` (as a number,
like qmail: ``[127.000.000.001]`` is 127.0.0.1) and, as an extension, ``[IPv6:...]``.

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


def parse_path(arg: bytes) -> tuple[bytes, bytes]:
    """Split a MAIL/RCPT argument into (address, text after the address), as qmail does.

    ``arg`` is what follows the verb and its spaces (``FROM:<a@b> SIZE=5``).
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
    n = len(arg)
    if i < n and arg[i] == 0x40:  # '@': a source route, dropped up to the first ':'
        colon = arg.find(b":", i)
        i = colon + 1 if colon >= 0 else n
    stop = 0x3E if bracket else 0x20  # '>' or ' '
    if b'"' not in arg and b"\\" not in arg:
        end = arg.find(bytes((stop,)), i)
        if end < 0:
            return arg[i:], b""
        return arg[i:end], arg[end + 1 :]
    out = bytearray()
    quoted = False
    while i < n:
        c = arg[i]
        i += 1
        if c == 0x5C:  # backslash: the next byte is literal
            if i < n:
                out.append(arg[i])
                i += 1
            continue
        if c == 0x22:  # double quote
            quoted = not quoted
            continue
        if c == stop and not quoted:
            return bytes(out), arg[i:]
        out.append(c)
    return bytes(out), b""


def check_address(address: bytes) -> bytes | None:
    """The strict envelope rules; returns the refusal reply, or None if the address is fine."""
    if len(address) > MAX_ADDRESS:
        return replies.SYNTAX
    if not address.isascii():
        return replies.EIGHTBIT_ADDRESS
    for c in address:
        if c < 0x20 or c == 0x7F:
            return replies.BAD_BYTES
    return None


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
    """Validate MAIL parameters (RFC 1870 SIZE, RFC 6152 BODY); a reply on refusal."""
    params = _split_params(text)
    if params is None:
        return replies.BAD_PARAM
    size: int | None = None
    body = b""
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
        else:
            return replies.BAD_PARAM
    return MailParams(size, body)


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
