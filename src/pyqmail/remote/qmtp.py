"""The QMTP client used for remote delivery where control/qmtproutes says so
(inject.md section 4).

Owns:

* :func:`deliver_qmtp` — one message to one host, one Outcome per recipient, with
  qmail-remote's kind of texts.
* :func:`qmtp_route` — control/qmtproutes for a host (smtproutes' syntax and lookup order).
* :func:`deliver_route` — a route's addresses tried in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from pyqmail import netstring
from pyqmail.control import Control, domain_keys
from pyqmail.mailbox import quote
from pyqmail.netstring import NetstringError
from pyqmail.outcome import Outcome
from pyqmail.remote import routes
from pyqmail.remote.routes import Route

PORT = 209
CHUNK = 65536


# -- the client --------------------------------------------------------------------------


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")


async def _attempt(
    host_ip: str,
    port: int,
    mess_path: Path | str,
    sender: bytes,
    recipients: list[bytes],
    timeouts: tuple[float, float],
) -> list[Outcome] | None:
    """One connection; None if it could not be made (the caller tries the next address)."""
    connect_timeout, data_timeout = timeouts
    try:
        size = os.path.getsize(mess_path)
        f = open(mess_path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        text = f"Unable to read message file: {e.strerror}. (#4.3.0)"
        return [Outcome.temp(text)] * len(recipients)
    got: list[bytes] = []
    try:
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(host_ip, port)
        except (OSError, TimeoutError):
            return None
        try:
            async with asyncio.timeout(data_timeout):
                writer.write(b"%d:\n" % (size + 1))
                while chunk := f.read(CHUNK):
                    writer.write(chunk)
                    await writer.drain()
                writer.write(b"," + netstring.encode(quote(sender)))
                writer.write(netstring.encode(netstring.encode_all([quote(r) for r in recipients])))
                await writer.drain()
                buf = bytearray()
                while len(got) < len(recipients):
                    item = netstring.decode_one(buf, 0, 1 << 16)
                    if item is None:
                        data = await reader.read(4096)
                        if not data:
                            break
                        buf += data
                        continue
                    got.append(item[0])
                    del buf[: item[1]]
        except (OSError, TimeoutError, NetstringError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    finally:
        f.close()
    return [_outcome(host_ip, got[i] if i < len(got) else None) for i in range(len(recipients))]


def _outcome(host_ip: str, reply: bytes | None) -> Outcome:
    if reply is None:
        return Outcome.temp(f"Connected to {host_ip} but connection died. (#4.4.2)")
    text = reply[1:].decode("utf-8", "replace")
    if reply[:1] == b"K":
        return Outcome.ok(f"{host_ip} accepted message./Remote host said: {text}")
    if reply[:1] == b"D":
        return Outcome.perm(f"{host_ip} does not like recipient./Remote host said: {text}")
    return Outcome.temp(f"{host_ip} does not like recipient./Remote host said: {text}")


def _no_connection(recipients: Sequence[object], ips: Sequence[str]) -> list[Outcome]:
    text = f"Sorry, I wasn't able to establish a QMTP connection to {', '.join(ips)}. (#4.4.1)"
    return [Outcome.temp(text)] * len(recipients)


async def deliver_qmtp(
    host_ip: str,
    port: int,
    mess_path: Path | str,
    sender: str | bytes,
    recipients: Sequence[str | bytes],
    timeouts: tuple[float, float] = (60.0, 1200.0),
) -> list[Outcome]:
    """Send the queued message at ``mess_path`` (LF lines) to one QMTP server.

    ``timeouts`` = (connect, each read or write) in seconds, as control/timeoutconnect and
    control/timeoutremote. Returns one Outcome per recipient, in order; a connection that
    fails or dies makes every unanswered recipient a temporary failure."""
    rcpts = [_b(r) for r in recipients]
    out = await _attempt(host_ip, port, mess_path, _b(sender), rcpts, timeouts)
    return _no_connection(rcpts, [host_ip]) if out is None else out


# -- control/qmtproutes ------------------------------------------------------------------


def qmtp_route(ctl: Control, host: str) -> Route | None:
    """control/qmtproutes for ``host``: smtproutes' syntax and lookup order (the host,
    each ``.suffix``, then the empty key; ``domain:`` = no QMTP route), default port 209.
    None: deliver by SMTP. Raises routes.RouteError for a bad port."""
    if not ctl.qmtproutes:
        return None
    for key in [*domain_keys(host), ""]:
        if key in ctl.qmtproutes:
            value = ctl.qmtproutes[key]
            if value and ":" not in value.rpartition("]")[2]:
                value += f":{PORT}"
            return routes.parse_relay(value)
    return None


async def deliver_route(
    route: Route,
    ips: Sequence[str],
    mess_path: Path | str,
    sender: str | bytes,
    recipients: Sequence[str | bytes],
    timeouts: tuple[float, float],
) -> list[Outcome]:
    """Deliver over QMTP to the first of ``ips`` (the route's addresses) that answers."""
    rcpts = [_b(r) for r in recipients]
    for ip in ips:
        out = await _attempt(ip, route.port, mess_path, _b(sender), rcpts, timeouts)
        if out is not None:
            return out
    return _no_connection(rcpts, list(ips) or [route.relay])
