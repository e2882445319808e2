"""RemoteAgent: qmail-remote's whole job as one asyncio coroutine per message and host.

It reads the control snapshot, picks the relay (remote/routes.py) or the MX addresses
(remote/mx.py, with the self-MX rule), skips addresses tcpto marks as down, connects with
``timeoutconnect`` (from control/outgoingip / outgoingip6 when set), and drives the sans-IO
:class:`~pyqmail.smtp.client.ClientSession` with ``timeoutremote`` on every read and write.
All recipients of a message for one host go over one connection; the result is
qmail-remote's reports (:class:`SessionResult`), and :func:`fold` turns them into one
:class:`Outcome` per recipient exactly the way qmail-rspawn folds them (send.md section 7).

Invariants: every connection opened is closed (or aborted) before ``deliver`` returns,
whatever happens; no exception leaves ``deliver`` (an unexpected one is a temporary
failure); a message counts as delivered only on a 2xx reply after the final dot.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import dns.asyncresolver

from pyqmail.control import Control, ControlCache, ControlError
from pyqmail.home import Home
from pyqmail.outcome import Outcome, Status
from pyqmail.remote import dane, mtasts, mx, routes, smarthost, tls
from pyqmail.remote.mtastscache import HTTPS_PORT, MtaSts, cache_dir
from pyqmail.remote.pool import ConnectionPool, Idle
from pyqmail.remote.smarthost import IMPLICIT_TLS_PORT, Relay, SmarthostError, Smarthosts
from pyqmail.remote.tcpto import Tcpto
from pyqmail.remote.transmit import DataEncoder, has_8bit
from pyqmail.smtp.client import (
    Action,
    ClientSession,
    Done,
    Reply,
    ReplyParser,
    Send,
    SendBody,
    SessionResult,
    StartTls,
    TlsMode,
)
from pyqmail.smtp.clientauth import ClientAuth

CHUNK = 65536

log = logging.getLogger("pyqmail.remote")  # MTA-STS testing-mode failures

NO_CONNECTION = b"Sorry, I wasn't able to establish an SMTP connection. (#4.4.1)\n"
CONTROL_FAILED = b"Unable to read control files. (#4.3.0)\n"
READ_FAILED = b"Unable to read message. (#4.3.0)\n"
SMARTHOST_FAILED = (
    b"Unable to use control/smtproutesauth or control/smtproutestls; see pyqmail check. (#4.3.0)\n"
)
INTERNAL = b"Internal error in remote delivery; will try again. (#4.3.0)\n"


def _only(letter: str, text: bytes) -> SessionResult:
    return SessionResult((), (letter, text), quit=False)


def fold(result: SessionResult, count: int) -> list[Outcome]:
    """One Outcome per recipient from qmail-remote's reports, as qmail-rspawn does it.

    The message report gives K=1, Z=0, D=-1; a recipient's ``s`` makes it 0, ``h`` -1,
    ``r`` keeps the message's value. The text is the recipient report's, followed by the
    message report's when the message result is not better than the recipient's.

    qmail-send runs qmail-remote once per recipient, so a recipient the server refused
    at RCPT gets the message report of its own run, ``Giving up on IP.``, whatever
    happened to the others sharing this connection (send.md section 6's bounce shows it).
    """
    mletter, mtext = result.message
    value = {"K": 1, "Z": 0}.get(mletter, -1)
    giving_up = b"Giving up on " + result.ip.encode() + b".\n"
    out = []
    for i in range(count):
        if i < len(result.recipients):
            letter, text = result.recipients[i]
            own = {"s": 0, "h": -1}.get(letter, value)
            if i in result.refused:
                full = text + giving_up
            else:
                full = text + mtext if value <= own else text
        else:
            own, full = value, mtext
        status = Status.OK if own == 1 else Status.TEMP if own == 0 else Status.PERM
        out.append(Outcome(status, full.decode("utf-8", "replace")))
    return out


class _Dropped(Exception):
    """The connection closed or a read/write timed out."""


class _Stale(Exception):
    """A kept connection answered 421 before anything else: it is no longer usable."""


def _read_line_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            line = f.readline().rstrip(b" \t\r\n")
    except OSError:
        return None
    return line.decode("ascii", "replace") or None


class RemoteAgent:
    """Delivers messages to remote SMTP servers; many ``deliver`` calls may run at once.

    ``port`` is the port for MX / address-record delivery (25; tests use another);
    an smtproutes route to ``implicit_tls_port`` (465, RFC 8314) starts TLS before the
    greeting;
    ``resolver`` defaults to :func:`pyqmail.remote.mx.make_resolver` (PYQMAIL_RESOLVER or
    resolv.conf); ``own_ips`` defaults to this host's interface addresses;
    ``mtasts_port`` is the HTTPS port MTA-STS policies are fetched from (443; tests only
    use another).
    """

    def __init__(
        self,
        home: Home,
        ctl: ControlCache,
        *,
        port: int = routes.SMTP_PORT,
        resolver: dns.asyncresolver.Resolver | None = None,
        own_ips: Iterable[str] | None = None,
        ipv6: bool = True,
        rng: random.Random | None = None,
        tls_cafile: str | None = None,
        tcpto: Tcpto | None = None,
        control_ttl: float = 1.0,
        idle_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        implicit_tls_port: int = IMPLICIT_TLS_PORT,
        mtasts_port: int = HTTPS_PORT,
    ) -> None:
        self.home = home
        self.ctl = ctl
        self.port = port
        self._resolver = resolver
        self._dane: bool | None = None  # the resolver is on loopback: its AD bit counts
        self._own_ips = frozenset(own_ips) if own_ips is not None else None
        self.ipv6 = ipv6
        self._rng = rng or random.Random()
        self._cafile = tls_cafile
        self.tcpto = tcpto or Tcpto(home.queue / "lock" / "tcpto")
        self.pool = ConnectionPool(idle_timeout)
        self._ttl = control_ttl
        self._clock = clock
        self._ctl_at = -1e9
        self._ctl: Control | None = None
        self._plain_ctx: ssl.SSLContext | None = None
        self._verify_ctx: ssl.SSLContext | None = None
        self.smarthosts = Smarthosts(home)
        self.implicit_tls_port = implicit_tls_port
        self.mtasts = MtaSts(
            cache_dir(home), lambda: self.resolver, cafile=tls_cafile, port=mtasts_port,
            ipv6=ipv6,
        )  # fmt: skip

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            self._resolver = mx.make_resolver()
        if self._dane is None:  # once: ask with DO/AD when the resolver is trusted
            self._dane = dane.ask_dnssec(self._resolver)
        return self._resolver

    @property
    def dane_enabled(self) -> bool:
        """DANE applies (RFC 7672): the resolver is on loopback, so its AD bit counts."""
        _ = self.resolver
        return bool(self._dane)

    @property
    def own_ips(self) -> frozenset[str]:
        if self._own_ips is None:
            self._own_ips = mx.own_addresses()
        return self._own_ips

    def _control(self) -> Control:
        """The control snapshot, checked for changes at most every ``control_ttl`` seconds
        (each check stats every control file; at 1,000 deliveries/s that adds up)."""
        now = self._clock()
        if self._ctl is None or now - self._ctl_at >= self._ttl:
            self._ctl = self.ctl.get()
            self._ctl_at = now
        return self._ctl

    async def close(self) -> None:
        """QUIT and close the connections kept between messages (at shutdown)."""
        self.pool.close()

    def reset_tcpto(self) -> None:
        """Zero lock/tcpto, as qmail-rspawn does when qmail starts."""
        try:
            self.tcpto.clear()
        except OSError:
            pass

    async def deliver(self, mess: Path, sender: str, recipients: list[str]) -> list[Outcome]:
        """Deliver ``mess`` to ``recipients`` (all at one host). One Outcome per recipient."""
        if not recipients:
            return []
        host = recipients[0].rpartition("@")[2]
        qmtp = await self._qmtp(mess, host, sender, recipients)
        if qmtp is not None:
            return qmtp
        enc = [r.encode("utf-8", "surrogateescape") for r in recipients]
        try:
            f = open(mess, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError:
            return fold(_only("Z", READ_FAILED), len(recipients))
        with f:
            result = await self.transmit(f, host, sender.encode("utf-8", "surrogateescape"), enc)
        return fold(result, len(recipients))

    async def _qmtp(
        self, mess: Path, host: str, sender: str, recipients: list[str]
    ) -> list[Outcome] | None:
        """QMTP delivery when control/qmtproutes has a route for ``host`` (docs/inject.md);
        None: no route, use SMTP."""
        try:
            ctl = self._control()
        except ControlError:
            return None  # the SMTP path reports it
        if not ctl.qmtproutes:
            return None
        # Imported here: most sites have no qmtproutes.
        from pyqmail.remote import qmtp

        try:
            route = qmtp.qmtp_route(ctl, host)
        except routes.RouteError:
            return [Outcome.temp(CONTROL_FAILED.decode())] * len(recipients)
        if route is None:
            return None
        try:
            addrs = await mx.relay_addresses(self.resolver, route.relay, ipv6=self.ipv6)
        except mx.DnsFailure as e:
            return [e.outcome] * len(recipients)
        try:
            return await qmtp.deliver_route(
                route, [a.ip for a in addrs], mess, sender, recipients,
                (max(ctl.timeoutconnect, 1), max(ctl.timeoutremote, 1)),
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:
            return [Outcome.temp(INTERNAL.decode())] * len(recipients)

    async def transmit(
        self, message: BinaryIO, host: str, sender: bytes, recipients: list[bytes]
    ) -> SessionResult:
        """qmail-remote HOST SENDER RECIP...: the reports qmail-remote would print."""
        try:
            return await self._transmit(message, host, sender, recipients)
        except asyncio.CancelledError:
            raise
        except Exception:  # translated once, here: an unexpected error is temporary
            return _only("Z", INTERNAL)

    async def _transmit(
        self, message: BinaryIO, host: str, sender: bytes, recipients: list[bytes]
    ) -> SessionResult:
        try:
            ctl = self._control()
        except ControlError:
            return _only("Z", CONTROL_FAILED)
        helo = ctl.helohost
        if helo is None:
            return _only("Z", CONTROL_FAILED)
        try:
            route = routes.lookup(ctl.smtproutes, host)
        except routes.RouteError:
            return _only("Z", CONTROL_FAILED)
        relay: Relay | None = None
        if route is not None:
            try:
                relay = self.smarthosts.relay(route)
            except ControlError:
                return _only("Z", CONTROL_FAILED)
            except SmarthostError:
                return _only("Z", SMARTHOST_FAILED)
        try:
            if route is not None:
                addrs = await mx.relay_addresses(self.resolver, route.relay, ipv6=self.ipv6)
                port = route.port
            else:
                found = await mx.mx_addresses(self.resolver, host, ipv6=self.ipv6, rng=self._rng)
                names = [n for n in (ctl.me, ctl.localiphost) if n] + sorted(ctl.locals)
                addrs = mx.eligible(found, self.own_ips, names)
                port = self.port
        except mx.DnsFailure as e:
            o = e.outcome
            return _only(o.status.value, o.text.encode())
        # MTA-STS (remote/mtasts.py) for MX delivery only: a route is the postmaster's choice.
        listed = tls.tls_required(ctl, host)
        policy = await self.mtasts.policy(host) if route is None else None
        plan = mtasts.plan(policy, host, addrs, listed)
        if plan.refused is not None:
            return _only("Z", plan.refused)
        addrs, label, sts = plan.addrs, plan.label, plan.mode
        required = listed or sts is not mtasts.Mode.NONE or relay is not None
        mode = TlsMode.REQUIRED if required else TlsMode.OPPORTUNISTIC
        # A domain that requires TLS verifies the MX name: its connections are its own.
        # An authenticated relay connection is kept under a key of its own (the relay,
        # the user), so that neither kind is ever taken for the other.
        authed = relay is not None and relay.creds is not None
        reusable = mode is not TlsMode.REQUIRED or authed
        implicit = route is not None and port == self.implicit_tls_port
        pool_helo = helo + relay.pool_tag() if relay is not None and authed else helo
        keep_as = pool_helo if reusable else None
        last: SessionResult | None = None
        use_dane = route is None and self.dane_enabled
        tlsa: dict[str, dane.HostPolicy] = {}
        for addr in addrs:
            # DANE (remote/dane.py) for a validated MX host: its TLSA records decide its
            # TLS, before MTA-STS (RFC 8461 section 2); a failure tries the next MX.
            hp = dane.NO_DANE
            if use_dane and addr.secure:
                if addr.name not in tlsa:
                    tlsa[addr.name] = await dane.lookup(self.resolver, addr.name)
                hp = tlsa[addr.name]
                if hp.kind is dane.Kind.FAIL:
                    last = _only("Z", hp.failure_text())
                    continue
                if hp.kind is dane.Kind.ENCRYPT and (listed or sts is mtasts.Mode.ENFORCE):
                    hp = dane.NO_DANE  # verified TLS is required anyway: keep that
            if hp.kind is not dane.Kind.NONE:
                if self.tcpto.is_down(addr.ip):
                    continue
                conn = await self._connect(ctl, addr.ip, port)
                if conn is None:
                    continue
                result = await self._dialogue(
                    conn, ctl, addr, port, helo, sender, recipients, message,
                    TlsMode.REQUIRED, hp.label, dane_host=hp,
                )  # fmt: skip
                assert result is not None
                if mtasts.tls_failed(result.message[1], hp.label):
                    last = result  # RFC 7672 2.2: this MX fails; the next one
                    continue
                return result
            if reusable:
                while (idle := self.pool.get((addr.ip, port, pool_helo))) is not None:
                    kept = await self._dialogue(
                        (idle.reader, idle.writer), ctl, addr, port, helo, sender,
                        recipients, message, mode, host, reused=idle, relay=relay,
                        pool_helo=keep_as,
                    )  # fmt: skip
                    if kept is not None:
                        return kept
            if self.tcpto.is_down(addr.ip):
                continue
            conn = await self._connect(ctl, addr.ip, port)
            if conn is None:
                continue
            if implicit:
                ok, err = await self._start_tls(
                    conn[1], addr, required, max(ctl.timeoutremote, 1), relay
                )
                if not ok:
                    conn[1].transport.abort()
                    why = f"the TLS handshake failed ({err or 'no detail'}) on port {port}"
                    if required:
                        for_ = relay.required_for if relay is not None else host
                        why += f"; TLS is required for {for_}"
                    return _only("Z", f"Connected to {addr.ip} but {why}. (#4.7.5)\n".encode())
            result = await self._dialogue(
                conn, ctl, addr, port, helo, sender, recipients, message, mode, label,
                relay=relay, implicit=implicit, pool_helo=keep_as,
            )  # fmt: skip
            if (
                sts is not mtasts.Mode.NONE
                and result is not None
                and mtasts.tls_failed(result.message[1], label)
            ):
                if sts is mtasts.Mode.ENFORCE:
                    last = result  # RFC 8461 5.1: this MX fails the policy; the next one
                    continue
                if listed:  # testing, but control/tlsdestinations requires TLS anyway
                    return result
                why = result.message[1].split(b"\n", 1)[0].decode("utf-8", "replace")
                log.warning("MTA-STS (testing) %s: %s; delivering anyway", host, why)
                conn = await self._connect(ctl, addr.ip, port)
                if conn is None:
                    continue
                result = await self._dialogue(
                    conn, ctl, addr, port, helo, sender, recipients, message,
                    TlsMode.OPPORTUNISTIC, host,
                )  # fmt: skip
            if result is not None and result.tls_fallback:
                # The handshake broke the connection; policy allows plaintext: once more.
                conn = await self._connect(ctl, addr.ip, port)
                if conn is None:
                    return result
                result = await self._dialogue(
                    conn, ctl, addr, port, helo, sender, recipients, message, TlsMode.OFF, host,
                    pool_helo=keep_as,
                )  # fmt: skip
            assert result is not None  # only a kept connection can come back as None
            return result
        return last if last is not None else _only("Z", NO_CONNECTION)

    async def _connect(
        self, ctl: Control, ip: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
        src = source_address(self.home, family)
        local = (src, 0) if src else None
        timed_out = False
        try:
            async with asyncio.timeout(max(ctl.timeoutconnect, 1)):
                conn = await asyncio.open_connection(ip, port, local_addr=local, limit=CHUNK)
        except TimeoutError:
            timed_out = True
        except OSError as e:
            timed_out = e.errno == errno.ETIMEDOUT
        else:
            self.tcpto.record(ip, False)
            return conn
        self.tcpto.record(ip, timed_out)
        return None

    async def _dialogue(
        self,
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        ctl: Control,
        addr: mx.Address,
        port: int,
        helo: str,
        sender: bytes,
        recipients: list[bytes],
        message: BinaryIO,
        mode: TlsMode,
        domain: str,
        reused: Idle | None = None,
        relay: Relay | None = None,
        implicit: bool = False,
        pool_helo: str | None = None,
        dane_host: dane.HostPolicy | None = None,
    ) -> SessionResult | None:
        """Run one transaction on ``conn``. None: a kept connection (``reused``) was found
        dead before the server said anything about this message; use a new one.
        ``relay``: the smarthost's TLS trust and credentials; ``implicit``: TLS is already
        on (port 465); ``pool_helo``: the pool key's last part, None: never keep it;
        ``dane_host``: the MX host's TLSA records decide the TLS check (never kept either)."""
        reader, writer = conn
        timeout = max(ctl.timeoutremote, 1)
        creds = relay.creds if relay is not None else None
        session = ClientSession(
            addr.ip,
            helo.encode("utf-8", "surrogateescape"),
            sender,
            list(recipients),
            tls=mode,
            tls_required_for=relay.required_for if relay is not None else domain,
            is_8bit=lambda: _scan_8bit(message),
            auth=ClientAuth(creds) if creds is not None else None,
            implicit_tls=implicit,
        )
        parser = ReplyParser()
        replies: deque[Reply] = deque()
        tls_on = reused.tls if reused is not None else implicit
        keep = False

        async def next_reply() -> Reply:
            while not replies:
                async with asyncio.timeout(timeout):
                    data = await reader.read(CHUNK)
                if not data:
                    raise _Dropped
                replies.extend(parser.feed(data))
            reply = replies.popleft()
            if reused is not None and session.replies_seen == 0 and reply.code == 421:
                raise _Stale  # the server timed the kept connection out
            return reply

        async def write(data: bytes) -> None:
            writer.write(data)
            async with asyncio.timeout(timeout):
                await writer.drain()

        try:
            if reused is None:
                actions: deque[Action] = deque(session.reply(await next_reply()))
            else:
                actions = deque(session.resume(reused.caps, reused.tls))
            while True:
                if not actions:
                    actions.extend(session.reply(await next_reply()))
                    continue
                act = actions.popleft()
                if isinstance(act, Send):
                    await write(act.data)
                elif isinstance(act, StartTls):
                    # Anything the server sent before the handshake is discarded (no
                    # plaintext injected into the TLS session, CVE-2011-0411 style).
                    replies.clear()
                    parser = ReplyParser()
                    ok, err = await self._start_tls(
                        writer, addr, act.verify, timeout, relay, dane_host
                    )
                    tls_on = ok
                    actions.extend(session.tls_done(ok, err))
                elif isinstance(act, SendBody):
                    if not await self._send_body(message, write):
                        return _only("Z", READ_FAILED)
                    session.body_sent()
                elif isinstance(act, Done):
                    res = act.result
                    if (
                        res.message[0] == "K"
                        and pool_helo is not None
                        and not replies
                        and parser.idle
                    ):
                        uses = reused.uses + 1 if reused is not None else 1
                        conn_idle = Idle(reader, writer, session.caps, tls_on, uses)
                        keep = self.pool.put((addr.ip, port, pool_helo), conn_idle)
                    if res.quit and not keep:
                        writer.write(b"QUIT\r\n")  # its reply is never awaited (qmail)
                    return res
        except _Stale:
            return None
        except (_Dropped, TimeoutError, OSError, EOFError, ssl.SSLError):
            if reused is not None and session.replies_seen == 0:
                return None
            return session.connection_lost()
        finally:
            if not keep:
                self._close(writer, tls_on)

    async def _start_tls(
        self,
        writer: asyncio.StreamWriter,
        addr: mx.Address,
        verify: bool,
        timeout: int,
        relay: Relay | None = None,
        dane_host: dane.HostPolicy | None = None,
    ) -> tuple[bool, str]:
        pins: frozenset[bytes] = frozenset()
        name: str | None
        if dane_host is not None:
            # DANE-EE: the TLSA records are the trust; no chain, name or date check. The
            # MX name goes out as SNI (RFC 7672 8.1), unchecked (check_hostname is off).
            if self._plain_ctx is None:
                self._plain_ctx = tls.opportunistic_context()
            ctx, name = self._plain_ctx, addr.name
        elif relay is not None and relay.trust is not None:  # control/smtproutestls
            try:
                ctx = self.smarthosts.context(relay.trust)
            except (OSError, ssl.SSLError) as e:
                return False, f"cannot use the CA file of control/smtproutestls: {e}"
            pins, name = relay.trust.pins, addr.name
        elif verify:
            if self._verify_ctx is None:
                self._verify_ctx = tls.verified_context(self._cafile)
            ctx, name = self._verify_ctx, addr.name
        else:
            if self._plain_ctx is None:
                self._plain_ctx = tls.opportunistic_context()
            ctx, name = self._plain_ctx, None
        try:
            await writer.start_tls(ctx, server_hostname=name, ssl_handshake_timeout=timeout)
        except (ssl.SSLError, ssl.CertificateError) as e:
            return False, getattr(e, "reason", None) or str(e)
        except (OSError, TimeoutError, ConnectionError) as e:
            return False, type(e).__name__
        if pins:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if not smarthost.pin_matches(der, pins):
                writer.transport.abort()  # a TLS session we will not use: no close_notify
                return False, "the certificate does not match the pin in control/smtproutestls"
        if dane_host is not None and dane_host.kind is dane.Kind.AUTH:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            if not dane.matches(der, dane_host.records):
                writer.transport.abort()
                return False, "the certificate matches none of the DANE TLSA records"
        return True, ""

    @staticmethod
    async def _send_body(message: BinaryIO, write: Callable[[bytes], Awaitable[None]]) -> bool:
        enc = DataEncoder()
        try:
            message.seek(0)
        except OSError:
            return False
        buf = bytearray()
        while True:
            try:
                chunk = message.read(CHUNK)
            except OSError:
                return False
            if not chunk:
                break
            buf += enc.feed(chunk)
            if len(buf) >= CHUNK:
                await write(bytes(buf))
                buf.clear()
        await write(bytes(buf + enc.finish()))
        return True

    @staticmethod
    def _close(writer: asyncio.StreamWriter, tls_on: bool) -> None:
        transport = writer.transport
        if transport.is_closing():
            return
        if tls_on or transport.get_write_buffer_size():
            # A TLS close waits for the peer's close_notify; we never wait for the peer.
            transport.abort()
        else:
            transport.close()


def _scan_8bit(message: BinaryIO) -> bool:
    try:
        message.seek(0)
        while chunk := message.read(CHUNK):
            if has_8bit(chunk):
                return True
    except OSError:
        return False
    return False


def source_address(home: Home, family: int) -> str | None:
    """The configured outgoing address for ``family`` (control/outgoingip[6])."""
    name = "outgoingip6" if family == socket.AF_INET6 else "outgoingip"
    return _read_line_file(home.control_file(name))
