"""``pyqmail run --http ADDR:PORT``: Prometheus metrics at ``/metrics`` and a status page at ``/``.

Owns the daemon's HTTP door, read-only, GET and HEAD only:

* ``/metrics``: prometheus-client's text format from a registry of our own (never the
  global one), filled at scrape time by :class:`_Collector` from plain-data counters: the
  SMTP listener's :class:`~pyqmail.smtp.sessionlog.SmtpStats`, the scheduler's
  :class:`~pyqmail.send.stats.SendStats`, and the queue counted as qmail-qstat counts it
  (``queue.reader.count``, in a worker thread);
* ``/``: an HTML page (no script) with the queue now and over the last hour, delivery
  rates, the top deferred destinations with their last error, the recent deliveries.

Security (a new door): the default address is loopback; a non-loopback address needs
``control/httpauth`` (lines ``user:$argon2id$...``, checked with argon2-cffi) or the daemon
refuses to start (:func:`check_http`); with the file present every request needs those
credentials (HTTP Basic), whatever its origin. The path is matched exactly against two
names (a query string is ignored, never used as a file name); every value that came from
mail is HTML-escaped; responses carry a Content-Security-Policy that allows no script,
no frame and nothing from elsewhere. Requests are bounded (8 KiB of head, 10 s, 32 at once).

Root mode (daemon/split.py): this server runs in the send part, as qmails, which owns the
scheduler's numbers and may read the queue's directories (group qmail); the smtpd part
sends its SmtpStats snapshot over a socket pair (:class:`StatsFeed`), so no file is shared
and no process writes into another's memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import html
import json
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pyqmail import netaddr
from pyqmail.home import Home
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import QueueCounts, count
from pyqmail.send.stats import BUCKETS, SendStats

HEAD_LIMIT = 8192
MAX_CLIENTS = 32  # requests served at once; more are closed unanswered
REQUEST_TIMEOUT = 10.0
SAMPLE_INTERVAL = 60.0  # the page's queue history: one sample a minute, an hour kept
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; script-src 'none'; "
    "frame-ancestors 'none'; form-action 'none'; base-uri 'none'"
)
SmtpSnapshot = Callable[[], Mapping[str, object]]


class HttpError(Exception):
    """The HTTP server cannot start as asked; the text says why."""


def is_loopback_host(host: str) -> bool:
    return host == "localhost" or netaddr.is_loopback(host)


class HttpAuth:
    """control/httpauth: ``user:ARGON2-HASH`` lines; ``check`` takes an Authorization header."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        from argon2 import PasswordHasher  # argon2-cffi: required once the file exists

        self._hasher = PasswordHasher()

    @classmethod
    def load(cls, path: Path) -> HttpAuth | None:
        """None when the file does not exist; HttpError when it is unusable."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise HttpError(f"unable to read {path}: {e.strerror}") from e
        users: dict[str, str] = {}
        for line in text.splitlines():
            user, sep, digest = line.strip().partition(":")
            if line.strip() and not line.startswith("#"):
                if not sep or not digest.startswith("$argon2"):
                    raise HttpError(f"{path}: a line is not user:$argon2...$hash")
                users[user] = digest
        if not users:
            raise HttpError(f"{path} names no user")
        try:
            return cls(users)
        except ImportError as e:
            raise HttpError(f"{path} needs argon2-cffi, which is not installed") from e

    def check(self, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = raw.partition(":")
        digest = self.users.get(user)
        if digest is None:
            return False
        try:
            return bool(self._hasher.verify(digest, password))
        except Exception:  # argon2's VerifyMismatchError, InvalidHash...
            return False


def check_http(home: Home, host: str) -> HttpAuth | None:
    """The credentials for ``--http HOST``; HttpError when a non-loopback address has none."""
    auth = HttpAuth.load(home.control / "httpauth")
    if auth is None and not is_loopback_host(host):
        raise HttpError(
            f"--http {host}: refusing a non-loopback address without control/httpauth "
            "(user:$argon2id$... lines)"
        )
    return auth


class StatsFeed:
    """Root mode: the smtpd part's counters, sent every ``interval`` seconds as one JSON
    line over a socket pair, and the latest one as the HTTP process sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.latest: Mapping[str, object] = {}

    async def send_forever(self, snapshot: SmtpSnapshot, interval: float = 2.0) -> None:
        """In the smtpd part: write the snapshot now and then (a lost reader ends it)."""
        self.sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=self.sock)
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                writer.write(json.dumps(snapshot()).encode() + b"\n")
                await writer.drain()
                await asyncio.sleep(interval)

    async def read_forever(self) -> None:
        """In the HTTP process: keep the last snapshot (bounded lines)."""
        self.sock.setblocking(False)
        reader, _ = await asyncio.open_connection(sock=self.sock, limit=1 << 20)
        with contextlib.suppress(OSError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            while line := await reader.readline():
                obj = json.loads(line)
                if isinstance(obj, dict):
                    self.latest = obj


class _Collector:
    """Builds the families at scrape time from the latest numbers (see the module docstring)."""

    def __init__(self, server: StatusServer) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        srv = self.server
        smtp = srv.smtp_snapshot()
        q = srv.queue_now
        g = GaugeMetricFamily(
            "pyqmail_queue_messages",
            "Messages in the queue by state (qmail-qstat: queued = all, todo = not yet "
            "preprocessed)",
            labels=["state"],
        )
        g.add_metric(["queued"], q.messages if q else 0)
        g.add_metric(["todo"], q.unprocessed if q else 0)
        yield g
        yield _counter("pyqmail_smtp_connections", "SMTP connections by rules decision",
                       "decision", smtp.get("connections"))  # fmt: skip
        yield _counter("pyqmail_smtp_messages", "SMTP messages by result (accepted = queued, 250)",
                       "result", smtp.get("messages"), ("accepted", "refused"))  # fmt: skip
        yield _counter("pyqmail_smtp_recipients", "SMTP RCPT commands by result: accepted, or "
                       "the refusal's reason", "result", smtp.get("rcpts"),
                       ("accepted", "rcpthosts"))  # fmt: skip
        tls = CounterMetricFamily("pyqmail_smtp_tls_sessions", "SMTP sessions that used TLS")
        tls.add_metric([], _num(smtp.get("tls")))
        yield tls
        yield _counter("pyqmail_smtp_auth", "SMTP AUTH attempts by result", "result",
                       smtp.get("auth"), ("success", "failure"))  # fmt: skip
        st = srv.send_stats
        if st is None:
            return
        d = CounterMetricFamily("pyqmail_deliveries", "Delivery results by channel and result",
                                labels=["channel", "result"])  # fmt: skip
        for ch in ("local", "remote"):
            for res in ("success", "deferral", "failure"):
                d.add_metric([ch, res], st.deliveries.get((ch, res), 0))
        yield d
        total, cum = 0, []
        for i, bound in enumerate(BUCKETS):
            total += st.buckets[i]
            cum.append((repr(bound), total))
        total += st.buckets[-1]
        cum.append(("+Inf", total))
        yield HistogramMetricFamily(
            "pyqmail_delivery_delay_seconds",
            "Time from a message's acceptance to each final delivery (success or failure)",
            buckets=cum,
            sum_value=st.delay_sum,
        )
        dd = CounterMetricFamily("pyqmail_deferrals", "Deferred deliveries by destination "
                                 "(the 50 most deferred)", labels=["destination"])  # fmt: skip
        for dest, info in st.top_deferred(50):
            dd.add_metric([dest], info.count)
        yield dd
        hb = GaugeMetricFamily("pyqmail_remote_held_back", "Messages waiting for room at a "
                               "destination (control/destinationlimits or a back-off)")  # fmt: skip
        hb.add_metric([], st.held_back)
        yield hb
        ht = CounterMetricFamily("pyqmail_remote_held", "Remote deliveries held back at "
                                 "their destination's limit (not failures)")  # fmt: skip
        ht.add_metric([], st.held_total)
        yield ht
        bo = CounterMetricFamily("pyqmail_destination_backoffs", "Back-offs begun or "
                                 "lengthened by 421/4.7.x replies, by destination",
                                 labels=["destination"])  # fmt: skip
        for dest, n in sorted(st.backoffs.items(), key=lambda kv: (-kv[1], kv[0]))[:50]:
            bo.add_metric([dest], n)
        yield bo


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) else 0.0


def _counter(
    name: str, doc: str, label: str, values: object, always: Iterable[str] = ()
) -> CounterMetricFamily:
    fam = CounterMetricFamily(name, doc, labels=[label])
    got = dict(values) if isinstance(values, dict) else {}
    for k in always:
        got.setdefault(k, 0)
    for k, v in sorted(got.items()):
        fam.add_metric([str(k)], _num(v))
    return fam


class StatusServer:
    """The HTTP server (see the module docstring). ``start`` binds; ``close`` stops it."""

    def __init__(
        self,
        home: Home,
        *,
        smtp_snapshot: SmtpSnapshot,
        send_stats: SendStats | None,
        auth: HttpAuth | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = home
        self.paths = QueuePaths(home.queue)
        self.smtp_snapshot = smtp_snapshot
        self.send_stats = send_stats
        self.auth = auth
        self._clock = clock
        self.queue_now: QueueCounts | None = None
        self.history: deque[tuple[float, int]] = deque(maxlen=60)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]
        self._server: asyncio.AbstractServer | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.clients = 0

    async def start(
        self, host: str, port: int, *, sock: socket.socket | None = None
    ) -> asyncio.AbstractServer:
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=HEAD_LIMIT)
        else:
            self._server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        self._sampler = asyncio.get_running_loop().create_task(self._sample_forever())
        return self._server

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def refresh_queue(self) -> QueueCounts:
        """Count the queue as qmail-qstat does (file work: in a worker thread)."""
        self.queue_now = await asyncio.to_thread(count, self.paths)
        return self.queue_now

    async def _sample_forever(self) -> None:
        while True:
            q = await self.refresh_queue()
            self.history.append((self._clock(), q.messages))
            await asyncio.sleep(SAMPLE_INTERVAL)

    # -- requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS:
            writer.close()
            return
        self.clients += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self.clients -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status, ctype, body, head_only = await self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, ValueError):  # fmt: skip
            status, ctype, body, head_only = (
                "400 Bad Request",
                "text/plain",
                b"bad request\n",
                False,
            )
        except Exception:  # never a traceback to the client
            status, ctype, body, head_only = "500 Internal Server Error", "text/plain", b"", False
        extra = 'WWW-Authenticate: Basic realm="pyqmail"\r\n' if status.startswith("401") else ""
        writer.write(
            (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Security-Policy: {CSP}\r\nX-Content-Type-Options: nosniff\r\n"
                f"Cache-Control: no-store\r\nReferrer-Policy: no-referrer\r\n{extra}"
                "Connection: close\r\n\r\n"
            ).encode()
            + (b"" if head_only else body)
        )
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        writer.close()

    async def _answer(self, head: bytes) -> tuple[str, str, bytes, bool]:
        if len(head) > HEAD_LIMIT:
            raise ValueError("head too long")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"read-only\n", False
        if self.auth is not None and not await asyncio.to_thread(
            self.auth.check, headers.get("authorization")
        ):
            return "401 Unauthorized", "text/plain", b"credentials needed\n", method == "HEAD"
        path = target.split("?", 1)[0]  # the query is never used
        if path == "/metrics":
            await self.refresh_queue()
            body = generate_latest(self.registry)
            return "200 OK", "text/plain; version=0.0.4; charset=utf-8", body, method == "HEAD"
        if path == "/":
            await self.refresh_queue()
            return "200 OK", "text/html; charset=utf-8", self.page().encode(), method == "HEAD"
        return "404 Not Found", "text/plain", b"not found\n", method == "HEAD"

    # -- the page

    def page(self) -> str:
        """The status page; every value from mail goes through ``html.escape``."""
        e = html.escape
        q = self.queue_now or QueueCounts(0, 0)
        now = self._clock()
        st = self.send_stats
        smtp = self.smtp_snapshot()
        msgs = smtp.get("messages")
        accepted = int(_num(msgs.get("accepted"))) if isinstance(msgs, dict) else 0
        hist = [n for _, n in self.history] or [q.messages]
        out = [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            "<title>pyqmail status</title><style>body{font-family:sans-serif;margin:2em}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;"
            "text-align:left}</style></head><body>",
            f"<h1>pyqmail status</h1><p>at {e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now)))}</p>",  # noqa: E501
            '<h2>Queue</h2><table id="queue">',
            f'<tr><th>messages in queue</th><td id="queue-messages">{q.messages}</td></tr>',
            "<tr><th>queued, not yet preprocessed</th>"
            f'<td id="queue-todo">{q.unprocessed}</td></tr>',
            f'<tr><th>queue over the last hour (min / max)</th><td id="queue-hour">'
            f"{min(hist)} / {max(hist)}</td></tr>",
            f'<tr><th>messages accepted by SMTP</th><td id="smtp-accepted">{accepted}</td></tr>',
            "</table>",
        ]
        if st is not None:
            out.append("<h2>Deliveries</h2><table id=\"deliveries\"><tr><th>channel</th>"
                       "<th>success</th><th>deferral</th><th>failure</th></tr>")  # fmt: skip
            for ch in ("local", "remote"):
                cells = "".join(f"<td>{st.deliveries.get((ch, r), 0)}</td>"
                                for r in ("success", "deferral", "failure"))  # fmt: skip
                out.append(f"<tr><th>{ch}</th>{cells}</tr>")
            out.append(f"</table><p>final deliveries per minute, last hour: "
                       f"<span id=\"rate\">{st.per_minute():.2f}</span></p>")  # fmt: skip
            out.append(f"<p>remote messages held back at a destination's limit: "
                       f"<span id=\"held-back\">{st.held_back}</span></p>")  # fmt: skip
            out.append("<h2>Top deferred destinations</h2><table id=\"deferred\"><tr>"
                       "<th>destination</th><th>deferrals</th><th>last</th>"
                       "<th>last error</th></tr>")  # fmt: skip
            for dest, d in st.top_deferred(10):
                when = time.strftime("%H:%M:%S", time.gmtime(d.last))
                out.append(f"<tr><td>{e(dest)}</td><td>{d.count}</td><td>{when}</td>"
                           f"<td>{e(d.error)}</td></tr>")  # fmt: skip
            out.append("</table><h2>Recent deliveries</h2><table id=\"recent\"><tr><th>time</th>"
                       "<th>msg</th><th>channel</th><th>recipient</th><th>result</th>"
                       "<th>text</th></tr>")  # fmt: skip
            for r in reversed(st.recent):
                when = time.strftime("%H:%M:%S", time.gmtime(r.when))
                out.append(f"<tr><td>{when}</td><td>{r.msg}</td><td>{r.channel}</td>"
                           f"<td>{e(r.recipient)}</td><td>{e(r.result)}</td>"
                           f"<td>{e(r.text)}</td></tr>")  # fmt: skip
            out.append("</table>")
        out.append('<p><a href="/metrics">metrics</a></p></body></html>\n')
        return "".join(out)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket for ``--http`` (root mode binds it before the drop)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=64)


def parse_http(text: str) -> tuple[str, int]:
    """``--http`` value: ``PORT`` (loopback), ``ADDR:PORT`` or ``[V6]:PORT``."""
    from pyqmail.listener import parse_listen

    if text.isdigit():
        return "127.0.0.1", int(text)
    return parse_listen(text)
