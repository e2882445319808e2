"""Manual pages for pyqmail's own commands, made from the argparse parsers behind ``--help``.

``python -m pyqmail.cli.manpage DIR`` (``make man``) writes ``pyqmail.1`` and one
``pyqmail-SUB.1`` per subcommand of :mod:`pyqmail.cli.main`. A command built on argparse
gets its parser captured as its ``main`` is about to parse (``parse_known_args`` raises
before the command does anything), so the page and ``--help`` cannot disagree; a
qmail-style command (fixed argument order, no argparse) gets its page from its module
docstring. The output is plain man(7) roff.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pyqmail import __version__
from pyqmail.cli.main import SUBCOMMANDS

# Subcommands whose main() builds an argparse parser before doing anything else, and the
# arguments that lead it there (the listeners parse with argparse only with --listen).
ARGPARSE_ARGV: dict[str, list[str]] = {
    "adopt": ["HOME"],
    "check": [],
    "init": [],
    "passwd": ["USER"],
    "run": [],
    "service": [],
    "smtpd": ["--listen", "127.0.0.1:0"],
    "qmqpd": ["--listen", "127.0.0.1:0"],
    "qmtpd": ["--listen", "127.0.0.1:0"],
}


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("captured")
        self.parser = parser


def capture_parser(module: str, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser ``pyqmail.cli.MODULE.main(argv)`` builds; nothing after parsing runs."""
    mod = importlib.import_module(f"pyqmail.cli.{module}")
    original = argparse.ArgumentParser.parse_known_args

    def refuse(self: argparse.ArgumentParser, *a: Any, **k: Any) -> NoReturn:
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = refuse  # type: ignore[assignment,method-assign]
    try:
        mod.main(list(argv))
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"pyqmail.cli.{module}.main returned without parsing arguments")


def _esc(text: str) -> str:
    """Text safe in roff: backslashes, hyphens, and control characters at a line start."""
    out = []
    for line in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def _paragraphs(text: str) -> str:
    blocks = [b.strip() for b in text.strip().split("\n\n") if b.strip()]
    return "\n.PP\n".join(_esc(" ".join(b.split())) for b in blocks)


def _header(name: str, summary: str) -> list[str]:
    title = name.upper().replace(" ", "-")
    return [
        f'.TH {_esc(title)} 1 "" "pyqmail {__version__}" "pyqmail manual"',
        ".SH NAME",
        f"{_esc(name.replace(' ', '-'))} \\- {_esc(summary)}",
    ]


def page_from_parser(
    name: str, summary: str, parser: argparse.ArgumentParser, more: str = ""
) -> str:
    """man(7) text for ``name`` from its parser (usage, description, options, epilog), with
    ``more`` (the command module's docstring after its first line) in DESCRIPTION."""
    usage = " ".join(parser.format_usage().removeprefix("usage: ").split())
    lines = [*_header(name, summary), ".SH SYNOPSIS", ".nf", _esc(usage), ".fi"]
    description = "\n\n".join(t for t in (parser.description or "", more) if t.strip())
    if description:
        lines += [".SH DESCRIPTION", _paragraphs(description)]
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    positional = [a for a in options if not a.option_strings]
    optional = [a for a in options if a.option_strings]
    for title, actions in (("ARGUMENTS", positional), ("OPTIONS", optional)):
        if not actions:
            continue
        lines.append(f".SH {title}")
        for a in actions:
            if a.option_strings:
                metavar = "" if a.nargs == 0 else f" {a.metavar or a.dest.upper()}"
                term = ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings)
                term += f"\\fI{_esc(metavar)}\\fR" if metavar else ""
            else:
                term = f"\\fI{_esc(str(a.metavar or a.dest))}\\fR"
            lines += [".TP", term, _esc(a.help or "") if a.help != argparse.SUPPRESS else ""]
    if parser.epilog:
        lines += [".SH NOTES", _paragraphs(parser.epilog)]
    lines += [".SH SEE ALSO", "\\fBpyqmail\\fR(1)"]
    return "\n".join(lines) + "\n"


def page_from_docstring(name: str, summary: str, doc: str) -> str:
    """man(7) text for a qmail-style command: its module docstring."""
    first, _, rest = doc.strip().partition("\n")
    lines = [*_header(name, summary), ".SH SYNOPSIS", ".nf", _esc(first.strip()), ".fi"]
    if rest.strip():
        lines += [".SH DESCRIPTION", _paragraphs(rest)]
    lines += [".SH SEE ALSO", "\\fBpyqmail\\fR(1)"]
    return "\n".join(lines) + "\n"


def main_page() -> str:
    """pyqmail(1): the subcommands."""
    lines = _header("pyqmail", "a qmail-compatible mail transfer agent")
    lines += [".SH SYNOPSIS", "\\fBpyqmail\\fR \\fISUBCOMMAND\\fR [\\fIARGS\\fR...]"]
    lines += [".SH DESCRIPTION", _paragraphs(
        "Every qmail program keeps its name and interface; pyqmail SUBCOMMAND runs one. "
        "Every subcommand takes --home DIR (else PYQMAIL_HOME, else /var/qmail).")]  # fmt: skip
    lines.append(".SH SUBCOMMANDS")
    for sub, (_, text) in SUBCOMMANDS.items():
        lines += [
            ".TP",
            f"\\fB{_esc(sub)}\\fR",
            _esc(text) + f" (\\fBpyqmail\\-{_esc(sub)}\\fR(1))",
        ]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> page, for pyqmail and every subcommand."""
    out = {"pyqmail.1": main_page()}
    for sub, (module, text) in SUBCOMMANDS.items():
        name = f"pyqmail {sub}"
        doc = importlib.import_module(f"pyqmail.cli.{module}").__doc__ or name
        if sub in ARGPARSE_ARGV:
            parser = capture_parser(module, ARGPARSE_ARGV[sub])
            more = doc.strip().partition("\n")[2] if parser.description != doc else ""
            out[f"pyqmail-{sub}.1"] = page_from_parser(name, text, parser, more)
        else:
            out[f"pyqmail-{sub}.1"] = page_from_docstring(name, text, doc)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pyqmail.cli.manpage DIR", file=sys.stderr)
        return 100
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
