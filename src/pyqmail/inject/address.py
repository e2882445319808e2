"""RFC 822 address lists as qmail-inject reads, rewrites and writes them back.

Owns: the tokenizer (atoms, quoted strings, domain literals, nested comments, specials),
the split of a field into address items (``phrase <route-addr>``, plain addr-specs with
comments, groups ``name: a, b;``), qmail's address completion (inject.md 1.3) and the
re-serialisation of a rewritten field, folded before column 79 the way qmail-inject folds.

Behaviour follows notqmail 1.09 as observed: comments after a plain address move behind
it (``u@h(c)`` -> ``u@h.dom (c)``), words with no ``.`` or ``@`` between them are separate
addresses (``fred barney`` -> ``fred@.., barney@..``), a route is dropped inside angle
brackets, and recipients of one field are reported last-first (qmail pushes them on a
stack; the envelope order is observable). Text is ``str`` decoded with surrogateescape,
so 8-bit bytes pass through unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# RFC 822 specials that end an atom; '.' is listed separately because it is a token.
_SPECIALS = frozenset('()<>@,;:\\".[]')
_SPACE = frozenset(" \t\r\n")
LINE_LIMIT = 78  # qmail-inject keeps a folded line (with its trailing comma) within this


class ParseError(ValueError):
    """The field cannot be tokenized or is not an address list. ``addresses``: what was
    read before the error (notqmail still takes those as recipients)."""

    addresses: list[str]

    def __init__(self, message: str, addresses: list[str] | None = None) -> None:
        super().__init__(message)
        self.addresses = addresses or []


class Kind(enum.Enum):
    ATOM = "atom"
    QUOTED = "quoted"  # text includes the quotes and escapes
    LITERAL = "literal"  # text includes the brackets
    COMMENT = "comment"  # text includes the parentheses
    SPECIAL = "special"  # one of < > @ , ; : .


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    text: str

    def is_word(self) -> bool:
        return self.kind in (Kind.ATOM, Kind.QUOTED, Kind.LITERAL)

    def is_special(self, ch: str) -> bool:
        return self.kind is Kind.SPECIAL and self.text == ch


def tokenize(text: str) -> list[Token]:
    """Split a header field body into tokens. Raises ParseError on an unclosed quote,
    literal or comment."""
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ParseError("unterminated quoted string")
            out.append(Token(Kind.QUOTED, text[i : j + 1]))
            i = j + 1
        elif c == "[":
            j = i + 1
            while j < n and text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                raise ParseError("unterminated domain literal")
            out.append(Token(Kind.LITERAL, text[i : j + 1]))
            i = j + 1
        elif c == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                if text[j] == "\\":
                    j += 1
                elif text[j] == "(":
                    depth += 1
                elif text[j] == ")":
                    depth -= 1
                j += 1
            if depth:
                raise ParseError("unterminated comment")
            out.append(Token(Kind.COMMENT, text[i:j]))
            i = j
        elif c in "<>@,;:.":
            out.append(Token(Kind.SPECIAL, c))
            i += 1
        elif c in ")]\\":
            raise ParseError(f"unexpected {c!r}")
        else:
            j = i
            while j < n and text[j] not in _SPECIALS and text[j] not in _SPACE:
                j += 1
            atom = text[i:j]
            if any(ch >= "\x80" for ch in atom):  # qmail writes 8-bit atoms quoted
                out.append(Token(Kind.QUOTED, '"' + atom + '"'))
            else:
                out.append(Token(Kind.ATOM, atom))
            i = j
    return out


def _unquote(tok: Token) -> str:
    if tok.kind is not Kind.QUOTED:
        return tok.text
    body, out, i = tok.text[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            i += 1
        out.append(body[i])
        i += 1
    return "".join(out)


def _join(tokens: Sequence[Token]) -> str:
    """Serialise tokens: one space between words and comments, none around . and @."""
    parts: list[str] = []
    prev: Token | None = None
    for t in tokens:
        if prev is not None and (
            (
                (prev.is_word() or prev.kind is Kind.COMMENT)
                and (t.is_word() or t.kind is Kind.COMMENT or t.is_special("<"))
            )
            or (prev.is_special(">") and t.is_special("<"))
        ):
            parts.append(" ")
        parts.append(t.text)
        prev = t
    return "".join(parts)


def needs_quoting(local: str) -> bool:
    """True if ``local`` is not a dot-atom qmail would write bare."""
    return not local or any((c in _SPECIALS and c != ".") or c in _SPACE or c < " " for c in local)


def quote(text: str, specials: str = '"\\()') -> str:
    """Backslash-escape ``specials`` in ``text`` (for quoted strings and comments)."""
    return "".join("\\" + c if c in specials else c for c in text)


def local_text(local: str, specials: str = '"\\()') -> str:
    """The local part as written in a header: quoted if it needs quoting."""
    return f'"{quote(local, specials)}"' if needs_quoting(local) else local


@dataclass(frozen=True)
class Rewriter:
    """qmail-inject's address completion (inject.md 1.3) with its three host names."""

    defaulthost: str
    defaultdomain: str
    plusdomain: str

    def host(self, host: str) -> str:
        """Steps 4-5: ``h+`` -> ``h.plusdomain``; no dot -> ``.defaultdomain``."""
        if host.startswith("["):
            return host
        host = host.rstrip(".")
        if host.endswith("+"):
            return host[:-1] + "." + self.plusdomain
        if "." not in host:
            return host + "." + self.defaultdomain
        return host

    def default_host(self) -> str:
        return self.host(self.defaulthost)

    def raw(self, addr: str) -> str:
        """Complete an address given as a plain string (arguments, -f, environment)."""
        if not addr or addr.endswith("@[]"):
            return addr
        at = addr.rfind("@")
        if at < 0:
            return addr + "@" + self.default_host()
        host = addr[at + 1 :]
        return addr[: at + 1] + (self.host(host) if host else self.default_host())

    def tokens(self, addr: list[Token]) -> list[Token]:
        """Complete an addr-spec given as tokens (route already removed)."""
        if not addr:
            return addr
        at = max((i for i, t in enumerate(addr) if t.is_special("@")), default=-1)
        if at < 0:
            if addr[-1].is_special("."):  # notqmail drops one trailing dot: "a." -> a@host
                addr = addr[:-1]
            return [*addr, Token(Kind.SPECIAL, "@"), Token(Kind.ATOM, self.default_host())]
        host = addr[at + 1 :]
        if len(host) == 1 and host[0].kind is Kind.LITERAL:
            return addr
        host_text = "".join(t.text for t in host)
        new = self.host(host_text) if host_text else self.default_host()
        return [*addr[: at + 1], Token(Kind.ATOM, new)]


def _strip_route(addr: list[Token]) -> list[Token]:
    """Remove a source route ``@a,@b:`` (inject.md 1.3 step 2). An address that starts
    with ``@`` and has no ``:`` is all route: nothing is left (notqmail: ``@h`` -> empty)."""
    if addr and addr[0].is_special("@"):
        for i, t in enumerate(addr):
            if t.is_special(":"):
                return addr[i + 1 :]
        return []
    return addr


def envelope_form(addr: list[Token]) -> str:
    """The address as it goes into the envelope: quotes removed, no spaces."""
    return "".join(_unquote(t) for t in addr)


@dataclass
class FieldResult:
    """A rewritten address field: its items (to be folded) and the addresses it names."""

    items: list[str]
    addresses: list[str]  # envelope form, in field order


def _split_plain(tokens: list[Token]) -> list[tuple[list[Token], list[Token]]]:
    """A plain item -> [(addr tokens, comments)], split where two words touch. A comment
    goes with the address that starts after it, else with the last one (notqmail)."""
    out: list[tuple[list[Token], list[Token]]] = []
    pending: list[Token] = []
    prev: Token | None = None
    for t in tokens:
        if t.kind is Kind.COMMENT:
            pending.append(t)
            continue
        if not out or (prev is not None and prev.is_word() and t.is_word()):
            out.append(([], pending))
            pending = []
        out[-1][0].append(t)
        prev = t
    if pending:
        if out:
            out[-1][1].extend(pending)
        else:
            out.append(([], pending))
    return out


def _rewrite_angles(tokens: list[Token], rw: Rewriter, addrs: list[str]) -> str:
    """An item with route-addrs: each ``<...>`` rewritten in place, the rest kept
    (notqmail writes ``<a> <b>`` as two addresses without a comma)."""
    out: list[Token] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if not t.is_special("<"):
            if t.is_special(">"):
                raise ParseError("unexpected >")
            out.append(t)
            i += 1
            continue
        gt = next((j for j in range(i + 1, len(tokens)) if tokens[j].is_special(">")), -1)
        inner = tokens[i + 1 : gt if gt >= 0 else len(tokens)]
        addr = [x for x in inner if x.kind is not Kind.COMMENT]
        if any(
            x.is_special("<") or (x.is_special(":") and x is not _route_colon(addr)) for x in addr
        ):
            raise ParseError("bad route-addr")
        addr = _strip_route(addr)
        if gt < 0 and not addr:  # an unclosed, empty '<' still gets the default host
            addr = [Token(Kind.ATOM, "")]
        addr = rw.tokens(addr)
        text = "".join(x.text for x in addr)
        out += [t, Token(Kind.ATOM, text)] if text else [t]
        if gt < 0:  # an unclosed '<' stays part of the address, as notqmail has it
            addrs.append("<" + envelope_form(addr))
            break
        addrs.append(envelope_form(addr))
        out.append(tokens[gt])
        i = gt + 1
    return _join(out)


def _route_colon(addr: list[Token]) -> Token | None:
    """The ':' ending a source route ``@a,@b:`` at the start of ``addr``, if any."""
    if addr and addr[0].is_special("@"):
        return next((x for x in addr if x.is_special(":")), None)
    return None


def _rewrite_item(tokens: list[Token], rw: Rewriter, addrs: list[str]) -> list[str]:
    """One comma-separated item -> its output strings (several if words touched)."""
    if any(t.is_special("<") for t in tokens):
        return [_rewrite_angles(tokens, rw, addrs)]
    if any(t.is_special(">") or t.is_special(":") for t in tokens):
        raise ParseError("unexpected > or :")
    out: list[str] = []
    for addr, comments in _split_plain(tokens):
        given = bool(addr)
        addr = rw.tokens(_strip_route(addr))
        if given:  # a lone "@" still names a (empty) recipient, as in notqmail
            addrs.append(envelope_form(addr))
        text = "".join(t.text for t in addr)
        if comments:
            text = (text + " " if text else "") + " ".join(c.text for c in comments)
        out.append(text)
    return out


def _split_items(tokens: list[Token]) -> list[tuple[list[Token], str | None]]:
    """Comma-separated items, each with its "glue": None, or the text that joins it to the
    previous one instead of a comma. As notqmail: words after a closed ``<...>`` start
    another item unless a ``<`` follows them (and comments just before them go with them);
    ``;`` ends an item and is kept; a route-addr after ``;`` whose phrase starts with a
    quoted string is glued with nothing, one without a phrase with a space."""
    items: list[tuple[list[Token], str | None]] = [([], None)]
    angle = closed = False
    for i, t in enumerate(tokens):
        if angle:
            items[-1][0].append(t)
            angle = not t.is_special(">")
            closed = not angle
        elif t.is_special(","):
            items.append(([], None))
            closed = False
        elif t.is_special(";"):
            items[-1][0].append(t)
            nxt = _next_solid(tokens, i + 1)
            glue = None
            if nxt is not None and _angle_ahead(tokens, i + 1):
                glue = "" if nxt.kind is Kind.QUOTED else " " if nxt.is_special("<") else None
            items.append(([], glue))
            closed = False
        else:
            if closed and not _angle_ahead(tokens, i):
                nxt = t if t.kind is not Kind.COMMENT else _next_solid(tokens, i)
                if nxt is not None and nxt.is_word():
                    items.append(([], None))  # another address: qmail adds a comma
                    closed = False
            items[-1][0].append(t)
            angle = t.is_special("<")
    out: list[tuple[list[Token], str | None]] = []
    for item, glued in items:  # what follows a ';' up to the next ',', if only comments
        last = out[-1][0] if out else []
        if last and last[-1].is_special(";") and all(t.kind is Kind.COMMENT for t in item):
            last.extend(item)
        else:
            out.append((item, glued))
    return out


def _next_solid(tokens: list[Token], i: int) -> Token | None:
    """The next token from ``i`` that is not a comment."""
    return next((t for t in tokens[i:] if t.kind is not Kind.COMMENT), None)


def _angle_ahead(tokens: list[Token], i: int) -> bool:
    for t in tokens[i:]:
        if t.is_special(",") or t.is_special(";"):
            return False
        if t.is_special("<"):
            return True
    return False


def rewrite_list(text: str, rw: Rewriter) -> FieldResult:
    """Rewrite every address in an address-list field body. Raises ParseError."""
    result = FieldResult([], [])
    _rewrite_items(_split_items(tokenize(text)), rw, result)
    return result


def _rewrite_items(
    items: list[tuple[list[Token], str | None]], rw: Rewriter, result: FieldResult
) -> None:
    in_group = False
    loose = 0
    for item, glued in items:
        colon = next((i for i, t in enumerate(item) if t.is_special(":")), -1)
        prefix = ""
        if colon >= 0 and not any(t.is_special("<") for t in item[:colon]):
            head = item[:colon]
            if in_group or not all(t.is_word() or t.kind is Kind.COMMENT for t in head):
                raise ParseError("bad group")
            in_group = True
            prefix = _join(head) + ": "
            item = item[colon + 1 :]
        suffix = ""
        semi = next((i for i, t in enumerate(item) if t.is_special(";")), -1)
        if semi >= 0:
            if not in_group:  # notqmail lets one ';' outside a group pass, not two
                loose += 1
                if loose > 1:
                    raise ParseError("';' outside a group")
            in_group = False
            suffix = ";" + _join(item[semi + 1 :])
            item = item[:semi]
        parts = _rewrite_item(item, rw, result.addresses) if item else [""]
        parts[0] = prefix + parts[0]
        if suffix:
            parts[-1] = (parts[-1] + suffix) if parts[-1].strip() else parts[-1].rstrip() + suffix
        if glued is not None and result.items:
            result.items[-1] += glued + parts.pop(0)
        result.items.extend(parts)
    if in_group:  # notqmail still takes the group's addresses as recipients
        raise ParseError("group not closed by ';'", list(result.addresses))


def _width(text: str) -> int:
    """Columns as qmail counts them: bytes."""
    return len(text.encode("utf-8", "surrogateescape"))


def fold(name: str, items: Sequence[str], limit: int = LINE_LIMIT) -> str:
    """``Name: a, b,\\n  c`` — break before an item that would pass ``limit`` columns
    (counting the comma that follows it)."""
    line = name + ":"
    fresh = True  # nothing placed on this line yet
    lines: list[str] = []
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if not fresh and item and _width(line) + 1 + _width(piece) > limit:
            lines.append(line)
            line = "  " + piece
        else:
            line += " " + piece
        fresh = False
    lines.append(line.rstrip())
    return "\n".join(lines)


def first_address(text: str, rw: Rewriter) -> str | None:
    """The first address of a field body (for Return-Path), rewritten; None if none."""
    res = rewrite_list(text, rw)
    return res.addresses[0] if res.addresses else None


def parse_return_path(text: str, rw: Rewriter) -> str:
    """Return-Path's envelope sender: ``<>`` is empty, else the first address."""
    tokens = [t for t in tokenize(text) if t.kind is not Kind.COMMENT]
    if len(tokens) >= 2 and tokens[0].is_special("<") and tokens[1].is_special(">"):
        return ""
    return first_address(text, rw) or ""
