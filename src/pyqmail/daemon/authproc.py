"""Root mode's password process: SMTP AUTH's checks, away from the network-facing qmaild.

In root mode the listeners run as qmaild, which parses everything a client sends; the
password hashes (control/authusers) must not be readable by it, or one hole in the
listener would hand every hash to an attacker. So, before it drops, the smtpd part forks
:class:`AuthProcess`, which drops at once to qmailp:nofiles (qmail's account for password
lookups, the one qmail-getpw runs as) with no other groups, and does nothing but
smtp/passwords.py's :class:`~pyqmail.smtp.passwords.PasswordCheck`: control/authusers
(mode 0600, owned by qmailp: ``pyqmail passwd`` makes it so) and the checkpassword
program of control/checkpassword, run as qmailp (a program that needs more, such as
checkpassword-pam reading /etc/shadow, is installed setuid as under qmail-smtpd).

The protocol on the socket pair, which only the smtpd part holds: a request is
``!IBHH`` (id, lengths of the client's address, user and password) and those bytes; the
answer is ``!I`` id and one letter, ``K`` (right), ``D`` (wrong) or ``Z`` (not checked).
Requests are checked in threads, at most ``MAX_CHECKS`` at once (each argon2
verification takes 64 MiB; PasswordCheck itself allows two); the answers come back as
they finish. :class:`AuthClient` is the smtpd part's side, blocking and thread-safe (the
listener asks from worker threads); a dead password process answers ``Z`` (454), never
a success.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
import threading

from pyqmail.home import Home, Ids
from pyqmail.smtp.passwords import MAX_PASSWORD, MAX_USER, PasswordCheck, Verdict
from pyqmail.sockio import recv_exact

log = logging.getLogger("pyqmail.smtpd")

MAX_CHECKS = 8
_REQ = struct.Struct("!IBHH")
_ANS = struct.Struct("!Ic")
_LETTER = {Verdict.OK: b"K", Verdict.BAD: b"D", Verdict.TEMP: b"Z"}
_VERDICT = {v: k for k, v in _LETTER.items()}


class AuthProcess:
    """The child; ``start()`` forks it (before any thread exists) and returns the client."""

    def __init__(self, home: Home, ids: Ids) -> None:
        self.home = home
        self.ids = ids
        self.pid = 0

    def start(self) -> AuthClient:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            code = 111
            try:
                mine.close()
                code = self._main(theirs)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    print(f"alert: password process: {type(e).__name__}", file=sys.stderr)
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        return AuthClient(mine, self.home)

    def _main(self, sock: socket.socket) -> int:
        with contextlib.suppress(ImportError):
            import argon2  # noqa: F401  # before the drop: qmailp may not read the venv
        os.setgroups([])
        os.setgid(self.ids.gid("nofiles"))
        os.setuid(self.ids.uid("passwd"))
        if os.getuid() == 0 or os.geteuid() == 0:
            return 111
        return serve(sock, PasswordCheck(self.home))


def serve(sock: socket.socket, check: PasswordCheck) -> int:
    """Answer requests until the smtpd part closes its end."""
    slots = threading.BoundedSemaphore(MAX_CHECKS)
    send_lock = threading.Lock()

    def one(ident: int, ip: str, user: bytes, password: bytes) -> None:
        try:
            try:
                verdict = check.check(user, password, ip)
            except Exception:
                verdict = Verdict.TEMP
            with send_lock, contextlib.suppress(OSError):
                sock.sendall(_ANS.pack(ident, _LETTER[verdict]))
        finally:
            slots.release()

    while True:
        head = recv_exact(sock, _REQ.size)
        if head is None:
            return 0
        ident, nip, nuser, npw = _REQ.unpack(head)
        if nuser > MAX_USER or npw > MAX_PASSWORD:
            return 111  # only the smtpd part writes here: it never sends this
        body = recv_exact(sock, nip + nuser + npw)
        if body is None:
            return 0
        ip = body[:nip].decode("ascii", "replace")
        user, password = body[nip : nip + nuser], body[nip + nuser :]
        slots.acquire()
        threading.Thread(target=one, args=(ident, ip, user, password), daemon=True).start()


class AuthClient:
    """The smtpd part's side (smtp/server.py's PasswordChecker)."""

    def __init__(self, sock: socket.socket, home: Home) -> None:
        self.sock = sock
        self.local = PasswordCheck(home)  # for available(): stats only, no reads
        self._lock = threading.Lock()
        self._next = 0
        self._waiting: dict[int, tuple[threading.Event, list[Verdict]]] = {}
        self._dead = False
        self._reader = threading.Thread(target=self._read, name="auth-answers", daemon=True)
        self._started = False

    def available(self) -> bool:
        return self.local.available()

    def check(self, user: bytes, password: bytes, remote_ip: str = "") -> Verdict:
        if len(user) > MAX_USER or len(password) > MAX_PASSWORD:
            return Verdict.BAD
        ip = remote_ip.encode("ascii", "replace")[:255]
        done = threading.Event()
        box: list[Verdict] = []
        with self._lock:
            if self._dead:
                return Verdict.TEMP
            if not self._started:
                self._started = True
                self._reader.start()
            self._next = (self._next + 1) & 0xFFFFFFFF
            ident = self._next
            self._waiting[ident] = (done, box)
            try:
                self.sock.sendall(
                    _REQ.pack(ident, len(ip), len(user), len(password)) + ip + user + password
                )
            except OSError:
                self._waiting.pop(ident, None)
                self._lost()
                return Verdict.TEMP
        done.wait()
        return box[0] if box else Verdict.TEMP

    def _read(self) -> None:
        while True:
            try:
                got = recv_exact(self.sock, _ANS.size)
            except OSError:
                got = None
            if got is None:
                with self._lock:
                    self._lost()
                return
            ident, letter = _ANS.unpack(got)
            with self._lock:
                waiter = self._waiting.pop(ident, None)
            if waiter is not None:
                waiter[1].append(_VERDICT.get(letter, Verdict.TEMP))
                waiter[0].set()

    def _lost(self) -> None:
        """The password process is gone: every waiting check is a temporary failure."""
        if not self._dead:
            log.warning("the password process is gone: AUTH answers 454 until a restart")
        self._dead = True
        waiting, self._waiting = self._waiting, {}
        for done, _box in waiting.values():
            done.set()
