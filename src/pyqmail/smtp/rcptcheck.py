"""Recipient checks at RCPT time, so that mail for no one is refused, not bounced later.

qmail accepts every recipient in rcpthosts and bounces the unknown ones after the fact
(backscatter, smtpd.md section 8). pyqmail answers ``550`` at RCPT instead, from three
sources (docs/rcptcheck.md):

1. **Local addresses** (locals, virtualdomains): the verdict of local delivery itself,
   injected as a :class:`LocalRecipients` by daemon/ and cli/ (smtp/ may not import
   local/ or send/); on unless ``control/rcptchecks`` is 0. Relay clients' recipients in
   local domains are checked too: a typo from a user's mail program is refused while the
   user is still there to read it, instead of coming back as a bounce.
2. **control/validrcptto** (and validrcptto.cdb, compiled by ``pyqmail newvalidrcptto``):
   for domains delivered by something else. When either file exists, a recipient of a
   client that may not relay, in no local domain, must be listed: the address, or
   ``@domain`` for a whole domain. Lines are compared lower-cased.
3. **$RCPTCHECK** (from tcprules or the environment): a program run for each recipient
   still accepted (a relay client's non-local recipients excepted), with $RECIPIENT,
   $SENDER and $TCPREMOTEIP in a minimal environment, never through a shell, with a
   time limit: exit 0 accepts, 100 refuses, anything else (111, a crash, the limit)
   defers.

The client learns accept, refuse or try later and nothing more: every refusal is the
same ``550`` line, every deferral the same ``451``, and both are sent no sooner than
:attr:`RcptChecks.floor` seconds after the check began, so a missing user and a missing
.qmail file (or a list miss) cannot be told apart by time either. Accepts are not delayed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from pyqmail import srs
from pyqmail.control import Control, morercpthosts_keys
from pyqmail.home import Home
from pyqmail.listener import CdbCache
from pyqmail.outcome import Outcome, Status

REFUSE_FLOOR = 0.05  # seconds: no refusal or deferral goes out sooner after the check began
PROGRAM_TIMEOUT = 20.0  # seconds an $RCPTCHECK program may take; then the recipient is deferred

NO_SUCH_USER = b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"
CHECK_LATER = b"451 sorry, I can't check that recipient now; try again later (#4.3.0)\r\n"
SRS_REFUSED = b"550 sorry, that SRS address is forged or has expired (#5.7.1)\r\n"


class LocalRecipients(Protocol):
    """What smtp/ needs from local delivery (send/rcptverdict.py's RecipientVerdicts)."""

    def local_part(self, ctl: Control, address: str) -> str | None:
        """The local part delivery would use, None if ``address`` is not local."""
        ...

    def verdict(self, ctl: Control, address: str) -> Outcome | None:
        """Delivered (OK), bounced (PERM), deferred (TEMP); None if not local."""
        ...

    def answers_now(self, ctl: Control, address: str) -> bool:
        """False if ``verdict`` would wait for another process (root mode's lookup)."""
        ...


def reply_for(status: Status, address: str = "") -> bytes | None:
    """The RCPT reply for a verdict on ``address``; None: accept (the caller says 250).
    A refused SRS address (SRS0=/SRS1=: a bounce to a forwarded sender that does not
    check out, docs/srs.md) says so with 5.7.1 instead of "no mailbox"."""
    if status is Status.OK:
        return None
    if status is Status.PERM:
        at = address.rfind("@")
        return SRS_REFUSED if srs.is_srs(address[:at] if at >= 0 else address) else NO_SUCH_USER
    return CHECK_LATER


class RcptChecks:
    """The three checks for one home. :meth:`check` is synchronous; :meth:`blocking`
    says whether it may take long (a program, or a lookup in another process that is
    not cached), so that an event loop runs it in a thread."""

    def __init__(
        self,
        home: Home,
        local: LocalRecipients | None,
        *,
        floor: float = REFUSE_FLOOR,
        program_timeout: float = PROGRAM_TIMEOUT,
    ) -> None:
        self.home = home
        self.local = local
        self.floor = floor
        self.program_timeout = program_timeout
        # Both looked at (one stat each) per recipient they apply to, so an edit or a
        # newvalidrcptto counts from the next RCPT on.
        self._valid = CdbCache(home.control / "validrcptto.cdb")
        self._text = _ListFile(home.control / "validrcptto")

    def blocking(self, env: Mapping[str, str], ctl: Control, address: str) -> bool:
        if env.get("RCPTCHECK"):
            return True
        local = self.local
        return local is not None and ctl.rcptchecks != 0 and not local.answers_now(ctl, address)

    def check(
        self, ctl: Control, env: Mapping[str, str], sender: str, address: str, relayed: bool
    ) -> Status:
        """The verdict for one recipient (after rcpthosts and RELAYCLIENT's suffix)."""
        local = self.local
        if local is not None:
            is_local = local.local_part(ctl, address) is not None
        else:
            is_local = address[address.rfind("@") + 1 :].lower() in ctl.locals
        if is_local:
            if local is not None and ctl.rcptchecks != 0:
                got = local.verdict(ctl, address)
                if got is not None and got.status is not Status.OK:
                    return got.status
        elif relayed:
            return Status.OK  # a relay client's mail for elsewhere is not ours to judge
        else:
            listed = self._validrcptto(ctl, address)
            if listed is not Status.OK:
                return listed
        program = env.get("RCPTCHECK")
        if program:
            return self._program(program, env, sender, address)
        return Status.OK

    def _validrcptto(self, ctl: Control, address: str) -> Status:
        try:
            reader = self._valid.get()
        except OSError:
            return Status.TEMP
        try:
            text = self._text.get()
        except OSError:
            return Status.TEMP
        if reader is None and text is None:
            return Status.OK
        low = address.lower()
        at = low.rfind("@")
        keys = [low] if at < 0 else [low, low[at:]]
        for key in keys:
            if text is not None and key in text:
                return Status.OK
            if reader is not None:
                try:
                    if reader.get(key.encode("utf-8", "surrogateescape")) is not None:
                        return Status.OK
                except Exception:
                    return Status.TEMP
        return Status.PERM

    def _program(self, program: str, env: Mapping[str, str], sender: str, address: str) -> Status:
        path = Path(program)
        if not path.is_absolute():
            path = self.home.root / path  # as QMAILQUEUE: relative to the home
        child_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "RECIPIENT": address,
            "SENDER": sender,
            "TCPREMOTEIP": env.get("TCPREMOTEIP", "unknown"),
        }
        try:
            proc = subprocess.Popen(
                [str(path)],
                env=child_env,
                cwd=self.home.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except (OSError, ValueError):
            return Status.TEMP
        try:
            code = proc.wait(self.program_timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
            return Status.TEMP
        if code == 0:
            return Status.OK
        if code == 100:
            return Status.PERM
        return Status.TEMP


class _ListFile:
    """control/validrcptto as a set of lowercased lines, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self._value: frozenset[str] | None = None

    def get(self) -> frozenset[str] | None:
        """The lines, None if the file does not exist. OSError if it cannot be read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key = self._value = None
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            raw = self.path.read_bytes()
            self._value = frozenset(
                k.decode("utf-8", "surrogateescape") for k in morercpthosts_keys(raw)
            )
            self._key = key
        return self._value
