"""qmail's sendmail wrapper: sendmail's options turned into a qmail-inject call.

Owns the option parsing (getopt ``vimte:f:p:o:B:F:EJxb:``, inject.md section 2) and the
plan it leads to; the command (cli/sendmail.py) carries the plan out. Pure: no I/O.

* default: ``qmail-inject -a [-f SENDER] -- ARGS`` (recipients = the arguments only);
  ``-t``: ``-H`` (header recipients and the arguments); zero recipients is allowed;
* ``-f SENDER`` also makes the From: match it: QMAILNAME, MAILNAME, NAME, QMAILHOST and
  MAILHOST are removed and QMAILUSER/QMAILHOST are set from the address;
* ``-F NAME`` sets MAILNAME (overridden by -f, as in qmail);
* ``-bs`` runs the SMTP server on stdin/stdout, first setting RELAYCLIENT= DATABYTES=0
  PROTO=TCP and the TCP* variables of a local client when PROTO is unset;
* ``-bp`` (or being called ``mailq``) lists the queue; ``-bm`` is the default;
* ``-i -oi -od? -oe? -om -v -m -x -e? -p? -B? -E -J`` are accepted and ignored;
* anything else is a usage error (exit 100).

A lone ``.`` line does not end the input: qmail-inject always reads to EOF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pyqmail.inject.getopt import Getopt, GetoptError

USAGE = "usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]"
_FLAGS = "vimtEJx"
_WITH_ARG = "efpoBFb"

SMTP_ENV = {
    "RELAYCLIENT": "",
    "DATABYTES": "0",
    "PROTO": "TCP",
    "TCPLOCALIP": "127.0.0.1",
    "TCPLOCALHOST": "localhost",
    "TCPREMOTEIP": "127.0.0.1",
    "TCPREMOTEHOST": "localhost",
    "TCPREMOTEINFO": "sendmail-bs",
}


class UsageError(Exception):
    """A bad option; ``str()`` is getopt's complaint (may be empty)."""


@dataclass
class Plan:
    """What the sendmail command does."""

    action: str  # "inject", "smtp" or "qread"
    args: list[str] = field(default_factory=list)  # qmail-inject's arguments
    setenv: dict[str, str] = field(default_factory=dict)
    unsetenv: list[str] = field(default_factory=list)


def plan(argv: Sequence[str], env: Mapping[str, str], prog: str = "sendmail") -> Plan:
    """Parse sendmail's arguments. Raises UsageError."""
    if prog.endswith("mailq"):
        return Plan("qread")
    if prog.endswith("newaliases"):
        raise UsageError("newaliases: qmail does not use aliases: use fastforward instead")
    flag_t = False
    sender: str | None = None
    name: str | None = None
    smtp = False
    qread = False
    g = Getopt(argv, _FLAGS, _WITH_ARG)
    try:
        for c, value in g:
            if c == "t":
                flag_t = True
            elif c == "f":
                sender = value
            elif c == "F":
                name = value
            elif c == "b":
                if value == "s":
                    smtp = True
                elif value == "p":
                    qread = True
                elif value != "m":
                    raise UsageError("")
    except GetoptError as e:
        raise UsageError(str(e)) from e
    rest = g.rest
    if qread:
        return Plan("qread")
    if smtp:
        return Plan("smtp", setenv={} if "PROTO" in env else dict(SMTP_ENV))
    p = Plan("inject")
    if name is not None:
        p.setenv["MAILNAME"] = name
    p.args = ["-H" if flag_t else "-a"]
    if sender is not None:
        p.args += ["-f", sender]
        p.unsetenv = ["QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"]
        p.setenv.pop("MAILNAME", None)
        at = sender.rfind("@")
        if at >= 0:
            p.setenv["QMAILUSER"] = sender[:at]
            p.setenv["QMAILHOST"] = sender[at + 1 :]
        else:
            p.setenv["QMAILUSER"] = sender
    p.args += ["--", *rest]
    return p
