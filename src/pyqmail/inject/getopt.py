"""qmail's getopt (sgetopt) for the commands that parse options by hand: qmail-inject and
the sendmail wrapper.

Owns the scanning only: single-letter flags clustered (``-aH``), an option's argument
attached (``-fjoe``) or as the next word (``-f joe``), ``--`` ends the options, so does the
first word that does not start with ``-`` (or is ``-`` alone). The caller decides what each
option means while iterating, so its own errors come in the same order as qmail's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class GetoptError(Exception):
    """A bad option; ``str()`` is getopt's complaint (``illegal option -- x``)."""


class Getopt:
    """Iterate to get ``(letter, argument)`` pairs (argument ``""`` for a flag); after the
    loop, ``rest`` holds the words after the options. Raises GetoptError while iterating."""

    def __init__(self, argv: Sequence[str], flags: str, with_arg: str) -> None:
        self.args = list(argv)
        self.flags = flags
        self.with_arg = with_arg
        self.rest: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, str]]:
        args = self.args
        i = 0
        while i < len(args):
            a = args[i]
            if a == "--":
                i += 1
                break
            if not a.startswith("-") or a == "-":
                break
            j = 1
            while j < len(a):
                c = a[j]
                if c in self.flags:
                    yield c, ""
                    j += 1
                    continue
                if c not in self.with_arg:
                    raise GetoptError(f"illegal option -- {c}")
                if j + 1 < len(a):
                    value = a[j + 1 :]
                elif i + 1 < len(args):
                    i += 1
                    value = args[i]
                else:
                    raise GetoptError(f"option requires an argument -- {c}")
                yield c, value
                break
            i += 1
        self.rest = args[i:]
