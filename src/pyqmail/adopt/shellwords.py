"""A small, careful reader of the shell lines in qmail run scripts; it never runs anything.

The scripts that start qmail (``HOME/rc``, daemontools' and runit's ``run`` files) are
short ``/bin/sh`` programs: a few ``NAME=`cmd``` assignments and one ``exec`` chain such as
``exec envdir ./env softlimit -m N tcpserver ... qmail-smtpd 2>&1``. This module turns such
text into :class:`Command` records whose words keep their structure: literal text, a
``$NAME`` or ``${NAME}`` expansion (:class:`Var`) or a command substitution
(:class:`Sub`, backquotes or ``$( )``), so the caller decides what it can resolve.

Handled as sh does: comments, ``\\``-newline continuations, single and double quotes,
backslash escapes, ``;`` ``&`` ``&&`` ``||`` ``|`` and newlines between commands, and
redirections (``2>&1``, ``>file``, ``<file``), which are set aside from the words. Not
handled (reported by :class:`ShellError` or left as :class:`Sub` text): here-documents,
functions, ``if``/``case``/loops. Unquoted expansions are not field-split.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ShellError(ValueError):
    """The text is not shell this reader understands (an unterminated quote, ...)."""


@dataclass(frozen=True, slots=True)
class Var:
    """``$NAME`` or ``${NAME}``."""

    name: str


@dataclass(frozen=True, slots=True)
class Sub:
    """A command substitution: the text between backquotes or inside ``$( )``."""

    text: str


Part = str | Var | Sub
Word = tuple[Part, ...]


def literal(word: Word) -> str | None:
    """The word's text if it has no expansion, else None."""
    if all(isinstance(p, str) for p in word):
        return "".join(p for p in word if isinstance(p, str))
    return None


def show(word: Word) -> str:
    """The word as a script would spell it (for messages)."""
    out = []
    for p in word:
        if isinstance(p, Var):
            out.append("${" + p.name + "}")
        elif isinstance(p, Sub):
            out.append("`" + p.text + "`")
        else:
            out.append(p)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Command:
    """One simple command: its words, its redirections (as written) and the line it starts on."""

    words: tuple[Word, ...]
    redirects: tuple[str, ...] = ()
    line: int = 1


_SEPARATORS = ";&|\n"
_NAME_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_NAME_CHARS = _NAME_START + "0123456789"
_SPECIAL_VARS = "0123456789#?$!@*-"


@dataclass
class _Reader:
    text: str
    i: int = 0
    line: int = 1
    commands: list[Command] = field(default_factory=list)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.text[j] if j < len(self.text) else ""

    def take(self) -> str:
        c = self.text[self.i]
        self.i += 1
        if c == "\n":
            self.line += 1
        return c


def split_script(text: str) -> list[Command]:
    """Every simple command in ``text``, in order (see the module docstring)."""
    r = _Reader(text)
    words: list[Word] = []
    redirects: list[str] = []
    start = 1

    def end_command() -> None:
        nonlocal words, redirects
        if words or redirects:
            r.commands.append(Command(tuple(words), tuple(redirects), start))
        words, redirects = [], []

    while r.i < len(r.text):
        c = r.peek()
        if c in " \t":
            r.take()
        elif c == "\\" and r.peek(1) == "\n":
            r.take()
            r.take()
        elif c == "#":
            while r.i < len(r.text) and r.peek() != "\n":
                r.take()
        elif c in _SEPARATORS:
            r.take()
            if c in "&|" and r.peek() == c:
                r.take()
            end_command()
        elif c in "<>" or (c.isdigit() and _redirect_follows(r)):
            redirects.append(_redirect(r))
        else:
            if not words and not redirects:
                start = r.line
            words.append(_word(r))
    end_command()
    return r.commands


def _redirect_follows(r: _Reader) -> bool:
    k = 0
    while r.peek(k).isdigit():
        k += 1
    return r.peek(k) in ("<", ">")


def _redirect(r: _Reader) -> str:
    op = ""
    while r.peek().isdigit():
        op += r.take()
    op += r.take()
    while r.peek() in ("<", ">", "&"):
        op += r.take()
    while r.peek() in " \t":
        r.take()
    if r.peek() == "" or r.peek() in _SEPARATORS:
        raise ShellError(f"line {r.line}: a redirection without a target")
    return op + show(_word(r))


class _Parts:
    """The parts of the word being read: literal characters joined, expansions kept apart."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self.buf: list[str] = []

    def flush(self) -> None:
        if self.buf:
            self.parts.append("".join(self.buf))
            self.buf.clear()

    def dollar(self, r: _Reader) -> None:
        """At ``$`` or a backquote: an expansion, or a plain ``$`` kept as text."""
        expansion = _expansion(r)
        if expansion is None:
            self.buf.append(r.take())
        else:
            self.flush()
            self.parts.append(expansion)


def _word(r: _Reader) -> Word:
    w = _Parts()
    while r.i < len(r.text):
        c = r.peek()
        if c in " \t<>" or c in _SEPARATORS:
            break
        if c == "\\":
            r.take()
            if r.peek() == "\n":
                r.take()
            elif r.peek():
                w.buf.append(r.take())
        elif c == "'":
            r.take()
            end = r.text.find("'", r.i)
            if end < 0:
                raise ShellError(f"line {r.line}: unterminated single quote")
            while r.i < end:
                w.buf.append(r.take())
            r.take()
        elif c == '"':
            r.take()
            _double_quoted(r, w)
        elif c in ("$", "`"):
            w.dollar(r)
        else:
            w.buf.append(r.take())
    w.flush()
    return tuple(w.parts) if w.parts else ("",)


def _double_quoted(r: _Reader, w: _Parts) -> None:
    while True:
        if r.i >= len(r.text):
            raise ShellError(f"line {r.line}: unterminated double quote")
        c = r.peek()
        if c == '"':
            r.take()
            return
        if c == "\\" and r.peek(1) in ('"', "\\", "$", "`", "\n"):
            r.take()
            if r.take() != "\n":
                w.buf.append(r.text[r.i - 1])
        elif c in ("$", "`"):
            w.dollar(r)
        else:
            w.buf.append(r.take())


def _expansion(r: _Reader) -> Var | Sub | None:
    """``$NAME``, ``${NAME}``, ``$(cmd)`` or ```cmd```` at r.i, consumed; None: a plain ``$``."""
    c = r.peek()
    if c == "`":
        r.take()
        end = r.text.find("`", r.i)
        if end < 0:
            raise ShellError(f"line {r.line}: unterminated backquote")
        text = r.text[r.i : end]
        while r.i <= end:
            r.take()
        return Sub(text)
    nxt = r.peek(1)
    if nxt == "(":
        r.take()
        r.take()
        depth, start = 1, r.i
        while depth:
            if r.i >= len(r.text):
                raise ShellError(f"line {r.line}: unterminated $(")
            ch = r.take()
            depth += {"(": 1, ")": -1}.get(ch, 0)
        return Sub(r.text[start : r.i - 1])
    if nxt == "{":
        end = r.text.find("}", r.i)
        if end < 0:
            raise ShellError(f"line {r.line}: unterminated ${{")
        name = r.text[r.i + 2 : end]
        while r.i <= end:
            r.take()
        return Var(name)
    if nxt and (nxt in _NAME_START or nxt in _SPECIAL_VARS):
        r.take()
        name = r.take()
        if name in _NAME_START:
            while r.peek() and r.peek() in _NAME_CHARS:
                name += r.take()
        return Var(name)
    return None
