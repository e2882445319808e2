"""qmail-smtpd under tcpserver: one SMTP session on stdin/stdout (fd 0 and fd 1).

Owns :func:`run_stdio` and what it needs of the file descriptors: output buffered until
the next read and written whole with the write timeout (:class:`_Writer`, qmail's
substdio), and the half-close with a short drain of the client's input at the end
(:func:`_drain`), so that a last reply is not destroyed by an RST. The conversation is
:class:`~pyqmail.smtp.protocol.SmtpServerConnection`, the queue side the listener's
``_Message`` committing with the contract's blocking form; the environment is the one tcpserver set.
rblsmtpd's job is done here too, before the greeting (``$RBLSMTPD`` from tcpserver's
environment, control/rbllist: smtp/rbl.py), and control/greylist's at RCPT.

The checks of incoming mail (control/authchecks: SPF at MAIL, DKIM and DMARC at the end of
DATA, the Authentication-Results header; smtp/authcheck.py, smtp/authspool.py) are the
listener's own code, run here on a private event loop per step (``asyncio.run``): their
DNS lookups are bounded by the same timeouts, and a slow DNS holds only this session; an
authenticated session skips them, as in the listener.
AUTH's password check (smtp/passwords.py: qmail-smtpd's ``CHECKPROG SUBPROG`` arguments,
control/checkpassword, control/authusers) runs here, blocking, as the session has nothing
else to do meanwhile; failures are recorded in HOME/greylist/authfail.sqlite
(smtp/authlimit.py: shared by every qmail-smtpd process) and logged on stderr with the
client's address and the user name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from pyqmail import cdb
from pyqmail.control import Control, ControlError, load
from pyqmail.home import Home
from pyqmail.outcome import Status
from pyqmail.queue import submit as qsubmit
from pyqmail.queue.contract import BlockingSubmitter
from pyqmail.resolver import make_resolver
from pyqmail.smtp import rbl, replies, tlsbio
from pyqmail.smtp.authcheck import AuthChecker, ConnectionChecks, Mode
from pyqmail.smtp.authlimit import FileFailures, failures_path
from pyqmail.smtp.authsenders import FILE as AUTHSENDERS
from pyqmail.smtp.authsenders import AuthSendersFile
from pyqmail.smtp.authspool import CheckingSubmitter
from pyqmail.smtp.greylist import Greylist, greylist_path
from pyqmail.smtp.passwords import PasswordCheck, Verdict
from pyqmail.smtp.protocol import (
    AuthNote,
    CheckPassword,
    CheckRcpt,
    Close,
    DataChunk,
    Limits,
    MailCheck,
    MessageAbort,
    MessageEnd,
    MessageStart,
    Pause,
    Send,
    SmtpServerConnection,
    StartTls,
)
from pyqmail.smtp.rbl import Block
from pyqmail.smtp.rcptcheck import RcptChecks, reply_for
from pyqmail.smtp.server import LINGER, _Message, smtp_reply
from pyqmail.smtp.session import CdbCache, Session, SessionError, local_addresses
from pyqmail.smtp.tls import SERVERCERT, CertStore

log = logging.getLogger("pyqmail.smtpd")


def run_stdio(
    home: Home,
    env: Mapping[str, str] | None = None,
    *,
    infd: int = 0,
    outfd: int = 1,
    limits: Limits | None = None,
    submitter: BlockingSubmitter | None = None,
    clock: Callable[[], float] = time.monotonic,
    origin: str = "network",
    rcpt_checks: RcptChecks | None = None,
    auth_checks: bool = False,
    passwords: PasswordCheck | None = None,
) -> int:
    """qmail-smtpd: one SMTP session on ``infd``/``outfd``. Returns qmail-smtpd's exit
    code: 0 after QUIT, 1 when the session ended any other way or could not start.

    ``rcpt_checks``: recipient checks at RCPT (smtp/rcptcheck.py; cli/smtpd.py makes them).
    ``auth_checks``: run the checks of incoming mail (control/authchecks) for a client
    that is not a relay client (qmail-smtpd: yes; ``sendmail -bs``: no).
    ``passwords``: AUTH's password sources (default: the home's control files).

    ``origin``: the Received wording of the queue (``uid`` for ``sendmail -bs``, whose
    qmail-smtpd runs as the caller, so qmail-queue writes "invoked by uid N")."""
    env = os.environ if env is None else env
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    out = _Writer(outfd)
    try:
        ctl = load(home)
        more = CdbCache(home.control / "morercpthosts.cdb").get()
        session = Session(
            ctl,
            env,
            morercpthosts=more,
            local_ips=local_addresses(),
            check_rcpt=rcpt_checks is not None,
        )
        certs = CertStore(home.control / SERVERCERT, warn=_stderr).load(warn_missing=False)
        checks = _auth_checks(home, ctl, session, env) if auth_checks else None
    except (ControlError, SessionError, OSError, cdb.CdbError) as e:
        print(f"qmail-smtpd: {e}", file=sys.stderr)
        with contextlib.suppress(_WriteFailed):
            out.write(replies.CONTROLS)
        _drain(infd, outfd)
        return 1
    try:
        sub = submitter or qsubmit.submitter(home, env=dict(env))
        # an authenticated session's messages skip the checks (plain): they are ours
        msg: _Message[Any] = _Message(
            CheckingSubmitter(sub, checks) if checks else sub, origin, plain=sub
        )
    except Exception as e:
        print(f"qmail-smtpd: unable to reach the queue: {e}", file=sys.stderr)
        with contextlib.suppress(_WriteFailed):
            out.write(replies.CONTROLS)
        _drain(infd, outfd)
        return 1
    grey = None
    if ctl.greylist > 0:
        grey = Greylist(greylist_path(home), ctl.greylist, expire=ctl.greylistexpire)
    hook = checks is not None and checks.policy.spf is not Mode.OFF
    if passwords is None:
        passwords = PasswordCheck(home)
    failures: FileFailures | None = None
    auth = passwords.available()
    if auth:
        failures = FileFailures(failures_path(home))
    conn = SmtpServerConnection(
        session,
        limits,
        tls=certs.offer,
        greylist=grey,
        mail_hook=hook,
        auth=auth,
        auth_failures=failures,
        authsenders=AuthSendersFile(home.control / AUTHSENDERS).get() if auth else None,
    )
    ip = session.remote_ip
    tls: tlsbio.BioTls | None = None
    timeout = float(ctl.timeoutsmtpd)
    block = _rbl_check(env, ctl.rbllist)
    if block is not None:  # rblsmtpd's conversation instead of SMTP, its 60 s alarm
        conn.block(block.reply())
        timeout = min(timeout, 60.0)
    out.timeout = timeout
    events = conn.greet()
    partial_since = 0.0
    try:
        while True:
            for ev in events:
                kind = type(ev)
                if kind is Send:
                    out.buffer(ev.data)  # type: ignore[union-attr]
                elif kind is DataChunk:
                    msg.write(ev.data)  # type: ignore[union-attr]
                elif kind is CheckRcpt:
                    assert rcpt_checks is not None
                    events = conn.rcpt_result(_check(rcpt_checks, ctl, env, ev, clock))  # type: ignore[arg-type]
                    break
                elif kind is MessageStart:
                    events = conn.start_result(msg.start(ev))  # type: ignore[arg-type]
                    break
                elif kind is MailCheck:
                    assert checks is not None
                    events = conn.mail_result(_check_mail(checks, ev))  # type: ignore[arg-type]
                    break
                elif kind is MessageEnd:
                    out.flush()
                    if checks is None:
                        events = conn.message_result(smtp_reply(msg.commit_blocking()))
                    else:
                        events = conn.message_result(asyncio.run(_checked_end(msg, checks)))
                    break
                elif kind is MessageAbort:
                    msg.abort()
                elif kind is CheckPassword:
                    out.flush()
                    ev = cast(CheckPassword, ev)
                    verdict = passwords.check(ev.user, ev.password, ip)
                    ok = None if verdict is Verdict.TEMP else verdict is Verdict.OK
                    events = conn.auth_result(ok)
                    break
                elif kind is Pause:
                    out.flush()
                    time.sleep(cast(Pause, ev).seconds)
                    events = conn.pause_over()
                    break
                elif kind is AuthNote:
                    _auth_log(cast(AuthNote, ev), ip)
                elif kind is StartTls and certs.context is not None:
                    out.flush()  # the 220 in clear; then nothing read before the handshake
                    try:
                        tls = tlsbio.handshake(certs.context, infd, outfd, timeout)
                    except tlsbio.TlsFailure:
                        return 1
                    out.encode = tls.encrypt
                    events = conn.tls_started(tls.info())
                    if early := tls.buffered():  # sent with the client's Finished
                        events += conn.receive_data(early)
                    break
                elif kind is Close:
                    out.flush()
                    _drain(infd, outfd)
                    # qmail-smtpd exits 0 after QUIT and 1 for every other end (EOF,
                    # read or write error, timeout, bare LF); tcpserver logs the status.
                    return 0 if conn.quit_seen else 1
            else:
                events = []
            if events:
                continue
            out.flush()
            wait = timeout
            if conn.partial:
                wait = min(wait, partial_since + min(timeout, 120.0) - clock())
            if wait <= 0 or not select.select([infd], [], [], wait)[0]:
                events = conn.timeout()
                continue
            try:
                data = os.read(infd, 65536)
            except OSError:
                data = b""
            if tls is not None and (data := tls.decrypt(data)) is None:  # type: ignore[assignment]
                events = []
                continue  # no whole TLS record yet
            was_partial = conn.partial
            events = conn.receive_data(data)
            if conn.partial and not was_partial:
                partial_since = clock()
    except _WriteFailed:
        msg.abort()
        return 1
    except Exception:
        log.exception("qmail-smtpd: unexpected error")
        msg.abort()
        with contextlib.suppress(_WriteFailed):
            out.write(replies.TEMP_ERROR)
        _drain(infd, outfd)
        return 1


def _auth_log(note: AuthNote, ip: str) -> None:
    """An AUTH attempt on stderr (tcpserver's log): the user as sent, never the password."""
    user = note.user.decode("utf-8", "replace").encode("unicode_escape").decode()
    print(f"qmail-smtpd: auth {note.mechanism} {user or '-'} from {ip} {note.result}",
          file=sys.stderr, flush=True)  # fmt: skip


def _rbl_check(env: Mapping[str, str], zones: tuple[tuple[str, str | None], ...]) -> Block | None:
    """rblsmtpd's decision (smtp/rbl.py): $RBLSMTPD from tcpserver's environment, else
    control/rbllist looked up for $TCPREMOTEIP; logged as rblsmtpd logs it."""
    checked = rbl.from_env(env)
    block = checked if isinstance(checked, Block) else None
    ip = env.get("TCPREMOTEIP", "")
    if checked is True and zones:
        try:
            block = asyncio.run(rbl.lookup(make_resolver(lifetime=rbl.TIMEOUT), ip, zones))
        except Exception as e:
            print(f"rblsmtpd: {ip}: lookup failed ({e}); not refused", file=sys.stderr)
    if block is not None:
        print(f"rblsmtpd: {ip} pid {os.getpid()}: {block.reply()[:-2].decode()}", file=sys.stderr)
    return block


def _auth_checks(
    home: Home, ctl: Control, session: Session, env: Mapping[str, str]
) -> ConnectionChecks | None:
    """The checks of incoming mail for this session, as the listener decides them
    (SmtpServer.auth_checks); None for a relay client, or with every check off."""
    ip = env.get("TCPREMOTEIP", "")
    if ctl.me is None or not ip:
        return None
    try:
        auth = AuthChecker(home.control, resolver=env.get("PYQMAIL_RESOLVER") or None)
    except Exception as e:  # no resolver configuration: the checks cannot run
        raise SessionError(f"checks of incoming mail: {e}") from e
    policy = auth.applies(relayclient=session.relayclient is not None)
    return None if policy is None else auth.connection(policy, ctl.me, ip)


def _check_mail(checks: ConnectionChecks, ev: MailCheck) -> bytes | None:
    """SPF at MAIL (its refusal under spf=enforce, else None); a crash is a 451."""
    try:
        return asyncio.run(checks.mail(ev.sender, ev.helo))
    except Exception:
        log.exception("qmail-smtpd: SPF check crashed")
        return replies.TEMP_ERROR


async def _checked_end(msg: _Message[Any], checks: ConnectionChecks) -> bytes:
    """The end of a checked message: its verdict, then the commit (or the refusal)."""
    try:
        refusal = await msg.verdict()
    except Exception:
        log.exception("qmail-smtpd: checks of incoming mail crashed")
        msg.abort()
        return replies.TEMP_ERROR
    if refusal is not None:
        msg.abort()
        _stderr(f"{checks.ip}: message refused: {refusal.decode('ascii', 'replace').strip()}")
        return refusal
    return smtp_reply(await msg.commit())


def _check(
    checks: RcptChecks,
    ctl: Control,
    env: Mapping[str, str],
    ev: CheckRcpt,
    clock: Callable[[], float],
) -> bytes | None:
    """The recipient check's reply (None: accept); a refusal waits out the floor."""
    start = clock()
    address = ev.address.decode("utf-8", "surrogateescape")
    try:
        status = checks.check(
            ctl, env, ev.sender.decode("utf-8", "surrogateescape"), address, ev.relayed
        )
    except Exception:
        log.exception("qmail-smtpd: recipient check failed")
        status = Status.TEMP
    reply = reply_for(status, address)
    if reply is not None:
        time.sleep(max(0.0, start + checks.floor - clock()))
    return reply


class _WriteFailed(Exception):
    pass


class _Writer:
    """Output buffered until the next read (qmail's substdio), then written whole."""

    def __init__(self, fd: int, timeout: float = 1200.0) -> None:
        self.fd = fd
        self.timeout = timeout  # qmail-smtpd's write timeout is timeoutsmtpd too
        self._out: list[bytes] = []
        self.encode: Callable[[bytes], bytes] | None = None  # TLS: plaintext -> ciphertext

    def buffer(self, data: bytes) -> None:
        self._out.append(data)

    def write(self, data: bytes) -> None:
        self._out.append(data)
        self.flush()

    def flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        if self.encode is not None:
            try:
                data = self.encode(data)
            except tlsbio.TlsFailure as e:
                raise _WriteFailed(str(e)) from e
        view = memoryview(data)
        while view:
            try:
                if not select.select([], [self.fd], [], self.timeout)[1]:
                    raise _WriteFailed("write timeout")
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError as e:
                raise _WriteFailed(str(e)) from e
            view = view[n:]


def _stderr(text: str) -> None:
    print(f"qmail-smtpd: {text}", file=sys.stderr)


def _drain(infd: int, outfd: int, limit: float = LINGER) -> None:
    """Half-close a socket and discard what the client still sends, for a moment.

    Closing a socket with unread input makes the kernel send RST, which can destroy our
    last reply before the client reads it.
    """
    try:
        s = socket.socket(fileno=os.dup(outfd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        s.close()
        return
    s.close()
    deadline = time.monotonic() + limit
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            if not select.select([infd], [], [], left)[0]:
                return
            if not os.read(infd, 65536):
                return
        except OSError as e:
            if e.errno != errno.EINTR:
                return
