"""The client side of SMTP AUTH (RFC 4954) for a smarthost, without I/O.

:class:`ClientAuth` picks a mechanism from the server's EHLO ``AUTH`` line and produces the
lines to send; :class:`~pyqmail.smtp.client.ClientSession` drives it after the TLS
handshake (it never starts AUTH on a plaintext connection). Mechanisms, best first:

- ``PLAIN`` (RFC 4616) with the initial response on the AUTH line:
  ``AUTH PLAIN base64(NUL user NUL password)``;
- ``LOGIN`` (the de-facto mechanism some servers offer alone): ``AUTH LOGIN``, then the
  user and the password, each base64, in answer to the server's two 334 challenges.

CRAM-MD5 and the other challenge mechanisms are not offered: under TLS they add nothing.

The password never appears in a ``repr``, and :meth:`ClientAuth.scrub` removes it (and
every base64 form this module sent) from a server reply before that reply is quoted in a
report, so neither a log line nor a bounce can carry it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

MECHANISMS = (b"PLAIN", b"LOGIN")  # in order of preference
HIDDEN = b"[hidden]"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and a password (bytes as written in the control file)."""

    user: bytes
    password: bytes = field(repr=False)


def auth_mechanisms(ehlo_text: bytes) -> frozenset[bytes]:
    """The mechanisms an EHLO reply names on its ``AUTH`` lines (upper case); also the
    old ``AUTH=LOGIN PLAIN`` form some servers still send."""
    mechs: set[bytes] = set()
    for line in ehlo_text.split(b"\n")[1:]:
        words = line[4:].strip().upper().split()
        if not words:
            continue
        if words[0] == b"AUTH":
            mechs.update(words[1:])
        elif words[0].startswith(b"AUTH="):
            mechs.update([words[0][5:], *words[1:]])
    mechs.discard(b"")
    return frozenset(mechs)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class ClientAuth:
    """One AUTH exchange: :meth:`start`, then :meth:`answer` each 334 challenge."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.mechanism: bytes | None = None
        self._steps: list[bytes] = []

    def __repr__(self) -> str:
        return f"ClientAuth(user={self.creds.user!r}, mechanism={self.mechanism!r})"

    @staticmethod
    def choose(offered: frozenset[bytes]) -> bytes | None:
        """The best mechanism both sides know, or None."""
        for mech in MECHANISMS:
            if mech in offered:
                return mech
        return None

    def start(self, offered: frozenset[bytes]) -> bytes | None:
        """The AUTH command line (with CRLF), or None when no mechanism fits."""
        mech = self.choose(offered)
        if mech is None:
            return None
        self.mechanism = mech
        user, password = self.creds.user, self.creds.password
        if mech == b"PLAIN":
            response = _b64(b"\0" + user + b"\0" + password)
            # a server that wants the response after an empty challenge gets it again
            self._steps = [response]
            return b"AUTH PLAIN " + response + b"\r\n"
        self._steps = [_b64(user), _b64(password)]
        return b"AUTH LOGIN\r\n"

    def answer(self) -> bytes:
        """The line answering the next 334 challenge; ``*`` (cancel, RFC 4954 section 4)
        when the server asks more than the mechanism has to say."""
        if not self._steps:
            return b"*\r\n"
        return self._steps.pop(0) + b"\r\n"

    def scrub(self, text: bytes) -> bytes:
        """``text`` without the password or any base64 form of what was sent."""
        password = self.creds.password
        secrets = [
            _b64(b"\0" + self.creds.user + b"\0" + password),
            _b64(password),
            password,
        ]
        for secret in secrets:
            if len(secret) >= 4:  # (a shorter password would blank out ordinary words)
                text = text.replace(secret, HIDDEN)
        return text
