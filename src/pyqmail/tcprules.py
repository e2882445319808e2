"""ucspi-tcp's access rules: rules text -> cdb records, and tcpserver's lookup.

Compiling (tcprules.md section 1) works on bytes, line by line, exactly as ucspi-tcp
0.88's ``tcprules``: comments and lines without ``:`` are skipped, the address is the
text before the first ``:``, the instructions are ``allow`` or ``deny`` followed by any
number of ``,VAR=<q>value<q>`` items (``<q>`` is any one character), and an address
with a ``-`` (and no ``=`` or ``@``) is a numeric range expanded into one record per
number. The value encoding is ``D\\0`` for deny, then ``+VAR=value\\0`` per item, so the
cdb written from the records is byte-identical to ucspi-tcp's.

Looking up (tcprules.md section 2) probes the cdb with tcpserver's keys in its order and
uses the first key that exists: ``INFO@IP``, ``INFO@=HOST``, ``IP``, ``=HOST``, the IP's
prefixes ending in ``.`` (longest first), ``=.suffix`` of HOST (longest first), ``=``,
and the empty key. No key means: allowed, no variables.

Extension (ucspi-tcp-ipv6 style): an IPv6 client's keys are its address and its
prefixes ending in ``:``; and a rule line whose address is an IPv6 address or prefix
(``::1:allow``, ``2001:db8::allow``, which ucspi-tcp rejects) compiles to that address.
Every line ucspi-tcp accepts compiles exactly as it does.

This module does no I/O except :func:`compile_cdb` (the tcprules command), which hands
the records to :class:`pyqmail.cdb.Writer` (temporary file, fsync, rename).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pyqmail import cdb

_ULONG = 1 << 64  # ucspi-tcp's scan_ulong wraps like a C unsigned long (64-bit)
_V6_ADDRESS = re.compile(rb"(?:[^:@=]*@)?[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\Z")


class RulesError(Exception):
    """A rules line that tcprules cannot parse. ``line`` is the line as tcprules shows it."""

    def __init__(self, lineno: int, line: bytes) -> None:
        super().__init__(f"line {lineno}: unable to parse this line: {_show(line)}")
        self.lineno = lineno
        self.line = line


def _show(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule as written: its line number, address text and encoded cdb value."""

    lineno: int
    address: bytes
    value: bytes

    def cdb_keys(self) -> list[bytes]:
        """The cdb keys this rule stores under (more than one for a range)."""
        return expand_address(self.address)


def _instructions(text: bytes) -> bytes | None:
    """Encode ``allow|deny{,VAR=<q>value<q>}``; None if it is not valid."""
    if text.startswith(b"allow"):
        value = b""
        rest = text[5:]
    elif text.startswith(b"deny"):
        value = b"D\0"
        rest = text[4:]
    else:
        return None
    parts = [value]
    while rest:
        if rest[:1] != b",":
            return None
        eq = rest.find(b"=")
        if eq == -1 or eq + 1 >= len(rest):
            return None
        name = rest[1:eq]
        quote = rest[eq + 1 : eq + 2]
        end = rest.find(quote, eq + 2)
        if end == -1:
            return None
        parts.append(b"+" + name + b"=" + rest[eq + 2 : end] + b"\0")
        rest = rest[end + 1 :]
    return b"".join(parts)


def parse_line(line: bytes, lineno: int = 1, *, ipv6: bool = True) -> Rule | None:
    """One line of a rules file (without its newline) -> a Rule, or None if skipped.

    Raises :class:`RulesError` for a line tcprules refuses. ``ipv6=False`` turns the
    IPv6 extension off (then every line is read exactly as ucspi-tcp 0.88 reads it).
    """
    if not line or line[:1] == b"#":
        return None
    line = line.rstrip(b" \t\n")
    colon = line.find(b":")
    if colon == -1:
        return None
    address = line[:colon]
    value = _instructions(line[colon + 1 :])
    if value is None:
        v6 = _ipv6_rule(line) if ipv6 else None
        if v6 is None:
            raise RulesError(lineno, line)
        address, value = v6
    if not _range_ok(address):
        raise RulesError(lineno, line)
    return Rule(lineno, address, value)


def _ipv6_rule(line: bytes) -> tuple[bytes, bytes] | None:
    """The IPv6 extension: split at the first ``:allow``/``:deny`` after an IPv6 address."""
    for m in re.finditer(rb":(?=allow|deny)", line):
        address = line[: m.start()]
        if _V6_ADDRESS.match(address):
            value = _instructions(line[m.end() :])
            if value is not None:
                return address, value
    return None


def _range_parts(address: bytes) -> tuple[int, int, int] | None:
    """(start of the bottom number, the dash, end of the top number), or None if no range."""
    if b"=" in address or b"@" in address:
        return None
    dash = address.find(b"-")
    if dash == -1:
        return None
    left = address.rfind(b".", 0, dash) + 1
    right = address.find(b".", dash + 1)
    if right == -1:
        right = len(address)
    return left, dash, right


def _number(digits: bytes) -> int | None:
    """scan_ulong over the whole of ``digits`` (empty is 0); None if a non-digit is in it."""
    if digits and not digits.isdigit():
        return None
    return int(digits) % _ULONG if digits else 0


def _range_ok(address: bytes) -> bool:
    parts = _range_parts(address)
    if parts is None:
        return True
    left, dash, right = parts
    return (
        _number(address[left:dash]) is not None and _number(address[dash + 1 : right]) is not None
    )


def expand_address(address: bytes) -> list[bytes]:
    """The keys for an address: itself, or one key per number of a ``a-b`` range.

    The top is clamped to 255; a bottom above the top gives no key at all (as tcprules).
    """
    parts = _range_parts(address)
    if parts is None:
        return [address]
    left, dash, right = parts
    bottom = _number(address[left:dash])
    top = _number(address[dash + 1 : right])
    if bottom is None or top is None:
        raise ValueError(f"not a range: {_show(address)}")
    top = min(top, 255)
    head, tail = address[:left], address[right:]
    return [head + str(n).encode() + tail for n in range(bottom, top + 1)]


def iter_lines(text: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline); a final line without newline counts."""
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    yield from enumerate(lines, 1)


def records(lines: Iterable[bytes], *, ipv6: bool = True) -> Iterator[tuple[bytes, bytes]]:
    """Rules lines (each with or without its LF, as read from a binary file) -> the
    (key, value) records tcprules writes, in its order. Raises RulesError at a bad line."""
    for lineno, raw in enumerate(lines, 1):
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if not line:
            # tcprules reads "\n" as a line starting with a newline: skipped. Only a
            # zero-length read (end of input) stops it, so empty lines never end a file.
            continue
        rule = parse_line(line, lineno, ipv6=ipv6)
        if rule is not None:
            for key in rule.cdb_keys():
                yield key, rule.value


class CompileError(Exception):
    """Why tcprules stopped: ``what`` it was doing in tcprules' words, the ``cause`` (an
    OSError, a CdbError or a RulesError) and the exit code (100 for a bad line, else 111)."""

    def __init__(self, what: str, cause: Exception, code: int = 111) -> None:
        super().__init__(f"{what}: {cause}")
        self.what = what
        self.cause = cause
        self.code = code


def compile_cdb(
    lines: Iterable[bytes],
    path: str | os.PathLike[str],
    tmp: str | os.PathLike[str],
    *,
    ipv6: bool = True,
) -> None:
    """ucspi-tcp's tcprules: rules ``lines`` -> the cdb ``path``, written to ``tmp``, fsynced
    and renamed over it. On failure ``path`` is untouched, ``tmp`` removed (unlike
    ucspi-tcp), and CompileError says why."""
    path, tmp = os.fspath(path), os.fspath(tmp)
    try:
        writer = cdb.Writer(path, tmp)
    except OSError as e:
        raise CompileError(f"unable to create {tmp}", e) from e
    try:
        for key, value in records(lines, ipv6=ipv6):
            writer.add(key, value)
    except RulesError as e:
        writer.abort()
        raise CompileError("unable to parse this line", e, 100) from e
    except cdb.CdbError as e:
        writer.abort()
        raise CompileError(f"unable to write to {tmp}", e) from e
    except OSError as e:
        writer.abort()
        what = f"unable to write to {tmp}" if e.filename == tmp else "unable to read input"
        raise CompileError(what, e) from e
    try:
        writer.commit()
    except OSError as e:
        if e.filename2 is not None:
            raise CompileError(f"unable to move {tmp} to {path}", e) from e
        raise CompileError(f"unable to write to {tmp}", e) from e
    except cdb.CdbError as e:
        raise CompileError(f"unable to write to {tmp}", e) from e


# -- lookup -----------------------------------------------------------------------------


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def candidate_keys(
    ip: str | bytes, host: str | bytes | None = None, info: str | bytes | None = None
) -> Iterator[bytes]:
    """The keys tcpserver probes, in its order (an empty host or info still counts as set)."""
    bip = _b(ip)
    if bip[:7].lower() == b"::ffff:" and b"." in bip:
        bip = bip[7:]  # an IPv4-mapped client is its IPv4 address, as in ucspi-tcp-ipv6
    bhost = _b(host) if host is not None else None
    binfo = _b(info) if info is not None else None
    if binfo is not None:
        yield binfo + b"@" + bip
        if bhost is not None:
            yield binfo + b"@=" + bhost
    yield bip
    if bhost is not None:
        yield b"=" + bhost
    sep = b":" if b":" in bip else b"."
    for n in range(len(bip), 0, -1):
        if bip[n - 1 : n] == sep:
            yield bip[:n]
    if bhost is not None:
        for i in range(len(bhost)):
            if bhost[i : i + 1] == b".":
                yield b"=" + bhost[i:]
        yield b"="
    yield b""


def find(
    reader: cdb.Reader,
    ip: str | bytes,
    host: str | bytes | None = None,
    info: str | bytes | None = None,
) -> tuple[bytes, bytes] | None:
    """The first (key, value) tcpserver would use, or None when no key exists."""
    for key in candidate_keys(ip, host, info):
        value = reader.get(key)
        if value is not None:
            return key, value
    return None


def value_items(value: bytes) -> list[bytes]:
    """The NUL-terminated items of a rule's value (bytes after the last NUL are ignored)."""
    items = value.split(b"\0")
    items.pop()
    return items


@dataclass(frozen=True, slots=True)
class Decision:
    """What tcpserver does with a client: allow or deny, and the variables a rule sets."""

    allow: bool
    env: dict[str, str] = field(default_factory=dict)
    key: bytes | None = None  # the matching rule's key; None = no rule matched


def decide(key: bytes | None, value: bytes) -> Decision:
    """Apply a rule's value as tcpserver does: ``D`` denies, ``+NAME=value`` sets NAME."""
    allow = True
    env: dict[str, str] = {}
    for item in value_items(value):
        if item[:1] == b"D":
            allow = False
        elif item[:1] == b"+" and b"=" in item:
            name, _, val = item[1:].partition(b"=")
            env[name.decode("utf-8", "surrogateescape")] = val.decode("utf-8", "surrogateescape")
    return Decision(allow, env, key)


def lookup(
    reader: cdb.Reader,
    ip: str | bytes,
    host: str | bytes | None = None,
    info: str | bytes | None = None,
) -> Decision:
    """tcpserver's decision for a client; raises cdb.CdbError for a corrupt file."""
    hit = find(reader, ip, host, info)
    if hit is None:
        return Decision(True, {}, None)
    return decide(*hit)


def lookup_file(
    path: str | os.PathLike[str],
    ip: str | bytes,
    host: str | bytes | None = None,
    info: str | bytes | None = None,
) -> Decision:
    """Open the rules cdb at ``path`` (fresh, as tcpserver does per connection) and look up.

    OSError (missing file included) and cdb.CdbError propagate: tcpserver then drops the
    connection, and a caller should do the same unless told to allow a missing file.
    """
    with cdb.Reader.open(path) as r:
        return lookup(r, ip, host, info)


def explain(hit: tuple[bytes, bytes] | None) -> bytes:
    """tcprulescheck's report for a :func:`find` result, byte for byte as ucspi-tcp's."""
    if hit is None:
        return b"default:\nallow connection\n"
    key, value = hit
    out = [b"rule " + key + b":\n"]
    for item in value_items(value):
        if item[:1] == b"D":
            out.append(b"deny connection\n")
            return b"".join(out)
        if item[:1] == b"+":
            out.append(b"set environment variable " + item[1:] + b"\n")
    out.append(b"allow connection\n")
    return b"".join(out)
