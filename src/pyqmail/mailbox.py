"""Envelope addresses: what RFC 5321 accepts as a mailbox, and nothing a shell could run.

Every door that takes an envelope address from someone else (SMTP's MAIL and RCPT, the
QMQP and QMTP servers, the queue service) asks this module, so one set of rules holds
everywhere. It is a leaf: it imports nothing of pyqmail's, so smtp/, inject/ and queue/
all may use it.

The grammar is RFC 5321 section 4.1.2, read strictly:

* ``Mailbox = Local-part "@" ( Domain / address-literal )``;
* ``Local-part = Dot-string / Quoted-string``: atoms of ``atext`` joined by single dots,
  or one quoted string of printable ASCII where ``\\`` escapes the next printable byte.
  No unquoted space or special (``( ) < > [ ] : ; @ \\ , "``), no backslash outside
  quotes, no leading, trailing or doubled dot, no unbalanced quote. An empty local part
  (``""@host``) is refused: in the queue it would read as ``@host``;
* ``Domain``: labels of letters, digits and inner hyphens joined by dots (no trailing
  dot, no underscore), at most 255 octets and 63 per label (RFC 5321 4.5.3.1.2, RFC
  1035: a longer name cannot be in the DNS);
* address literals ``[d.d.d.d]`` (each part 1-3 digits up to 255) and ``[IPv6:...]``
  (the ``ipaddress`` module's reading, no zone index). General literals (``[tag:...]``)
  are refused: no tag is registered with IANA;
* a source route ``@a,@b:`` in front of a path is checked as a list of ``@Domain`` and
  then ignored (RFC 5321 section 4.1.2 and appendix C);
* a local part over 64 octets is accepted (RFC 5321 4.5.3.1 asks implementations not
  to impose limits where they can; VERP and SRS senders are longer, and qmail accepts
  them); the doors keep their own cap on the whole address (qmail's 899/1000 bytes);
* 8-bit bytes only with ``utf8=True`` (RFC 6531), and then only as valid UTF-8;
* no domain at all: ``postmaster`` as a recipient (RFC 5321 4.1.1.3 requires it), or
  any local part when the caller says so (``bare_ok``: an SMTP client whose
  RELAYCLIENT value will complete it; and QMQP, QMTP and the queue service, which are
  not RFC 5321 and whose domain-less addresses qmail-send completes with envnoathost,
  as qmail does for them).

And one rule that is not about syntax: an address whose unquoted form contains ``(``,
``)``, ``{`` in the shape of a bash function definition (``()`` then ``{``, with any
whitespace between) is refused wherever it is. Bash (CVE-2014-6271, "Shellshock") read
any environment value starting ``() {`` as a function and ran what followed it, and a
qmail ``|program`` delivery puts the sender in ``$SENDER`` and pieces of the recipient
in ``$LOCAL``, ``$EXT``, ``$EXT2``... (each a suffix after a dash), ``$HOST``... So
"starts with" is not enough: ``me-() { :;}; cmd@host`` gives ``EXT="() { :;}; cmd"``.
Refusing the shape anywhere costs no real address and closes every variable at once.
The unquoted form is what reaches the environment, so ``"() { :;}; x"@host`` is refused
although it is a valid RFC 5321 mailbox.

Addresses come back in qmail's queue form: quotes and escapes removed
(``"john doe"@example.test`` -> ``john doe@example.test``), as qmail-smtpd stores them.
:func:`quote` is the way back: every client that hands a queue-form address to one of
these doors (the queue service, QMQP, QMTP) writes it as a mailbox first, as
qmail-remote (here smtp/client.py) does on SMTP, so ``a;b@x`` from the queue travels as
``"a;b"@x`` and arrives as ``a;b@x`` again, while a raw ``a;b@x`` is refused.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

MAX_DOMAIN = 255
MAX_LABEL = 63

_ALPHA = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGIT = b"0123456789"
# RFC 5321 4.1.2 / RFC 5322 3.2.3 atext.
_ATEXT = frozenset(_ALPHA + _DIGIT + b"!#$%&'*+-/=?^_`{|}~")
_LETDIG = frozenset(_ALPHA + _DIGIT)
_LDH = frozenset(_ALPHA + _DIGIT + b"-")
_LDH_OR_8BIT = bytes(sorted(_LDH)) + bytes(range(0x80, 0x100))  # translate()'s delete set
_FUNCTION = re.compile(rb"\(\s*\)\s*\{")
DOUBLE_BOUNCE = b"#@[]"  # qmail's sender for double bounces (qmail-send)


class Refusal(enum.Enum):
    """Why an address is refused; the value is the text for a log or a reply."""

    SYNTAX = "not an RFC 5321 mailbox"
    ROUTE = "bad source route"
    FUNCTION = "looks like a shell function definition"
    NO_DOMAIN = "an address needs a domain"
    EMPTY_LOCAL = "empty local part"
    DOMAIN_TOO_LONG = "domain too long"
    EIGHT_BIT = "8-bit address without SMTPUTF8"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A checked mailbox: the local part without quotes, and the domain (b"" if none)."""

    local: bytes
    domain: bytes

    @property
    def address(self) -> bytes:
        """qmail's queue form: ``local@domain``, or the bare local part."""
        return self.local + b"@" + self.domain if self.domain else self.local


def is_function_definition(text: bytes) -> bool:
    """Does ``text`` hold ``()`` then ``{`` (whitespace allowed between), as bash's functions?"""
    return _FUNCTION.search(text) is not None


def parse_path(
    path: bytes, *, rcpt: bool, bare_ok: bool = False, utf8: bool = False
) -> Mailbox | Refusal | None:
    """The text between SMTP's ``<`` and ``>``: None for the null path ``<>``.

    A source route is checked and dropped. The caller decides whether None is allowed
    (at MAIL it is the bounce sender; at RCPT it is refused).
    """
    if not path:
        return None
    if path[:1] == b"@":
        colon = path.find(b":")
        if colon < 0 or not all(_route_hop(h) for h in path[:colon].split(b",")):
            return Refusal.ROUTE
        path = path[colon + 1 :]
    return parse_mailbox(path, rcpt=rcpt, bare_ok=bare_ok, utf8=utf8)


def parse_mailbox(
    text: bytes, *, rcpt: bool, bare_ok: bool = False, utf8: bool = False
) -> Mailbox | Refusal:
    """Check ``text`` as an RFC 5321 Mailbox (see the module docstring for the rules)."""
    if not text.isascii():
        if not utf8:
            return Refusal.EIGHT_BIT
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return Refusal.SYNTAX
    parsed = _local_part(text)
    if parsed is None:
        return Refusal.SYNTAX
    local, end = parsed
    if end == len(text):
        domain = b""
        if not (bare_ok or (rcpt and local.lower() == b"postmaster")):
            return Refusal.NO_DOMAIN
    elif text[end] != 0x40:  # '@'
        return Refusal.SYNTAX
    else:
        domain = text[end + 1 :]
        bad = _check_domain(domain) if domain[:1] != b"[" else _check_literal(domain)
        if bad is not None:
            return bad
    if not local:
        return Refusal.EMPTY_LOCAL
    if is_function_definition(local) or is_function_definition(domain):
        return Refusal.FUNCTION
    return Mailbox(local, domain)


def check_envelope(address: bytes, *, sender: bool) -> bytes | Refusal:
    """An address as QMQP, QMTP or the queue service carries it: its queue form, or why not.

    These carry the address without SMTP's brackets, written as an RFC 5321 mailbox
    (quoted where it needs quotes). The empty sender and qmail's double-bounce sender
    ``#@[]`` are allowed as senders; an empty recipient is refused; a local part without
    a domain is allowed (qmail-send adds envnoathost). 8-bit addresses are allowed if
    they are valid UTF-8: these doors have no SMTPUTF8 to negotiate.
    """
    if sender and address in (b"", DOUBLE_BOUNCE):
        return address
    if not address:
        return Refusal.SYNTAX
    got = parse_mailbox(address, rcpt=not sender, bare_ok=True, utf8=True)
    return got if isinstance(got, Refusal) else got.address


def queue_form(address: bytes, *, sender: bool) -> bytes | None:
    """:func:`check_envelope` for a door that only needs yes or no: the queue form, or None."""
    got = check_envelope(address, sender=sender)
    return None if isinstance(got, Refusal) else got


def quote(address: bytes) -> bytes:
    """A queue-form address written as an RFC 5321 mailbox (the inverse of the checks).

    The local part (before the last ``@``) is quoted unless it is a dot-string, with
    ``\\`` before each ``"`` and ``\\``; the domain is left as it is. The empty address
    and ``#@[]`` stay as they are. Bytes no mailbox may hold (controls) are left for the
    receiving door to refuse.
    """
    at = address.rfind(b"@")
    local, rest = (address, b"") if at < 0 else (address[:at], address[at:])
    if not local or _is_dot_string(local):
        return address
    return b'"' + local.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"' + rest


def _is_dot_string(local: bytes) -> bool:
    return all(atom and all(c in _ATEXT for c in atom) for atom in local.split(b"."))


def _local_part(text: bytes) -> tuple[bytes, int] | None:
    """(unquoted local part, index after it) for a Dot-string or Quoted-string prefix."""
    n = len(text)
    if n and text[0] == 0x22:  # Quoted-string
        out = bytearray()
        i = 1
        while i < n:
            c = text[i]
            if c == 0x22:
                return bytes(out), i + 1
            if c == 0x5C:  # quoted-pairSMTP: backslash then %d32-126
                if i + 1 >= n or not _qpair_ok(text[i + 1]):
                    return None
                out.append(text[i + 1])
                i += 2
                continue
            if not (0x20 <= c <= 0x7E or c >= 0x80):  # qtextSMTP (+ UTF-8 when allowed)
                return None
            out.append(c)
            i += 1
        return None  # unbalanced quote
    i = 0
    while True:  # Dot-string: Atom *("." Atom)
        start = i
        while i < n and (text[i] in _ATEXT or text[i] >= 0x80):
            i += 1
        if i == start:
            return None
        if i < n and text[i] == 0x2E:
            i += 1
            continue
        return text[:i], i


def _qpair_ok(c: int) -> bool:
    return 0x20 <= c <= 0x7E or c >= 0x80


def _check_domain(domain: bytes) -> Refusal | None:
    if not domain:
        return Refusal.SYNTAX
    if len(domain) > MAX_DOMAIN:
        return Refusal.DOMAIN_TOO_LONG
    for label in domain.split(b"."):
        if not label or len(label) > MAX_LABEL:
            return Refusal.SYNTAX if not label else Refusal.DOMAIN_TOO_LONG
        if not (_letdig(label[0]) and _letdig(label[-1])):
            return Refusal.SYNTAX
        if label.translate(None, _LDH_OR_8BIT):  # a byte other than LDH or 8-bit is left
            return Refusal.SYNTAX
    return None


def _letdig(c: int) -> bool:
    return c in _LETDIG or c >= 0x80


def _check_literal(domain: bytes) -> Refusal | None:
    if len(domain) < 3 or domain[-1:] != b"]":
        return Refusal.SYNTAX
    inner = domain[1:-1]
    if inner[:5].lower() == b"ipv6:":
        v6 = inner[5:]
        if not v6 or any(c not in b"0123456789abcdefABCDEF:." for c in v6):
            return Refusal.SYNTAX  # no zone index, nothing ipaddress would tolerate
        try:
            ipaddress.IPv6Address(v6.decode("ascii"))
        except ValueError:
            return Refusal.SYNTAX
        return None
    parts = inner.split(b".")
    if len(parts) != 4 or not all(0 < len(p) <= 3 and p.isdigit() for p in parts):
        return Refusal.SYNTAX
    if any(int(p) > 255 for p in parts):
        return Refusal.SYNTAX
    return None


def _route_hop(hop: bytes) -> bool:
    return hop[:1] == b"@" and _check_domain(hop[1:]) is None
