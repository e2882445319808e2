"""Preprocessing of ``todo/N``: the envelope read, each recipient rewritten and routed.

Owns qmail-send's one-time decision per recipient (send.md 1): envnoathost for a bare
name, the percent hack, ``locals`` (local, unchanged), ``virtualdomains`` in all its forms
(whole address, domain, each ``.suffix`` longest first, the empty key; an empty value is an
exception = remote, unchanged; otherwise local as ``prepend-address``), else remote. Also
the reverse (``strip_virtual``) used to show a recipient in a bounce, and the todo envelope
parser. Addresses are ``str`` decoded from the queue's bytes with utf-8/surrogateescape,
so encoding them again gives back the exact bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pyqmail.control import Control, domain_keys, virtual_lookup
from pyqmail.home import BREAK
from pyqmail.send.schedule import LOCAL, REMOTE


class TodoError(Exception):
    """The todo envelope has a record qmail-send does not know; leave it for the next scan."""


def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Envelope:
    """A todo file's records: ``u`` uid, ``p`` qp, ``F`` sender, ``T`` recipients."""

    uid: int | None
    qp: int | None
    sender: str
    recipients: tuple[str, ...]


def parse_todo(data: bytes) -> Envelope:
    """Parse ``u..\\0p..\\0F..\\0T..\\0...``; raises TodoError for an unknown record."""
    uid: int | None = None
    qp: int | None = None
    sender = ""
    recipients: list[str] = []
    for rec in data.split(b"\0"):
        if not rec:
            continue
        kind, rest = rec[:1], rec[1:]
        if kind == b"T":
            recipients.append(decode(rest))
        elif kind == b"F":
            sender = decode(rest)
        elif kind == b"u":
            uid = int(rest) if rest.isdigit() else None
        elif kind == b"p":
            qp = int(rest) if rest.isdigit() else None
        else:
            raise TodoError(f"unknown record type {kind!r}")
    return Envelope(uid, qp, sender, tuple(recipients))


@dataclass(frozen=True, slots=True)
class Routing:
    """The control values the local/remote decision reads (re-read on HUP)."""

    envnoathost: str
    locals: frozenset[str]
    percenthack: frozenset[str]
    virtualdomains: Mapping[str, str]

    @classmethod
    def from_control(cls, ctl: Control) -> Routing:
        return cls(ctl.envnoathost, ctl.locals, ctl.percenthack, ctl.virtualdomains)

    def virtual_lookup(self, address: str) -> str | None:
        """The virtualdomains value for ``address`` by qmail's key order, None if no key."""
        return virtual_lookup(self.virtualdomains, address)

    def route(self, address: str) -> tuple[int, str]:
        """(channel, stored address) for one envelope recipient (send.md 1)."""
        if "@" not in address:
            address = address + "@" + self.envnoathost
        while True:
            at = address.rfind("@")
            domain = address[at + 1 :]
            local = address[:at]
            if domain.lower() not in self.percenthack or "%" not in local:
                break
            pct = local.rfind("%")
            address = local[:pct] + "@" + local[pct + 1 :]
        if domain.lower() in self.locals:
            return LOCAL, address
        prepend = self.virtual_lookup(address)
        if prepend is None or prepend == "":
            return REMOTE, address
        return LOCAL, prepend + BREAK + address

    def strip_virtual(self, recipient: str) -> str:
        """A stored recipient as the sender knew it: the virtualdomains prepend removed again.

        As qmail-send's bounce text does: keys are the domain, its ``.suffix``es and the
        empty key (not the whole address); an exception (empty value) stops the search.
        """
        at = recipient.rfind("@")
        if at < 0:
            return recipient
        domain = recipient[at + 1 :]
        vd = self.virtualdomains
        for key in [*domain_keys(domain), ""]:
            if key in vd:
                prepend = vd[key]
                if not prepend:
                    break
                if recipient.startswith(prepend + BREAK):
                    return recipient[len(prepend) + len(BREAK) :]
                break
        return recipient


def verp_sender(sender: str, recipient: str) -> str:
    """The sender passed for a delivery to ``recipient`` (send.md 2: ``pre@host-@[]``).

    ``pre@host-@[]`` becomes ``prebox=dom@host`` for ``box@dom``; anything else is unchanged.
    """
    if not sender.endswith("-@[]"):
        return sender
    base = sender[:-4]
    at = base.rfind("@")
    if at < 0:
        return sender
    rat = recipient.rfind("@")
    if rat < 0:
        return sender
    box, dom = recipient[:rat], recipient[rat + 1 :]
    return base[:at] + box + "=" + dom + base[at:]


def bounce_address(sender: str) -> str:
    """Where a bounce of a message from ``sender`` goes: VERP's ``-@[]`` stripped."""
    if sender.endswith("-@[]"):
        return sender[:-4]
    return sender
