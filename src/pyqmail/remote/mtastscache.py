"""MTA-STS policy discovery for remote delivery: the TXT lookup, the HTTPS fetch and the
on-disk cache (RFC 8461 sections 3 and 5; the parsing is remote/mtasts.py's).

:meth:`MtaSts.policy` answers "which policy is in force for DOMAIN now":

1. ``_mta-sts.DOMAIN`` TXT through the configured resolver (pyqmail/resolver.py, so tests
   and split-horizon sites use the same server as the MX lookups).
2. A cached policy that has not expired and whose id is the TXT record's is used as it is.
3. Otherwise ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt`` is fetched: the host's
   A/AAAA records from the same resolver, TLS with the certificate verified for
   ``mta-sts.DOMAIN`` (the system CAs, or ``PYQMAIL_TLS_CAFILE`` / ``cafile``), HTTP status
   200 only (a redirect is a failure, section 3.3), ``Content-Type: text/plain``, at most
   64 KB, and ``timeout`` seconds for all of it. A good policy is cached for its max_age.
4. No TXT record, a failed lookup, or a failed fetch: the cached policy while it has not
   expired (section 5.1: an attacker who blocks the fetch gains nothing), else no policy.
   A failed fetch is not tried again for the same id for ``retry_after`` seconds.
5. A cached policy used past half its max_age is fetched again in the background, so that
   a domain receiving mail regularly never sees its policy expire (the moment an attacker
   who blocks the fetch would wait for); the delivery goes on with the cached one.

Concurrent deliveries to one domain share one fetch. The cache is HOME/mtasts/, one file
per domain (its A-label name) holding a JSON record (remote/mtasts.py ``Cached``),
replaced by rename; the directory is qmailr's (layout.py makes it; root mode's agent makes
it before it drops to qmailr when it is missing, :func:`prepare_dir`). Without a usable
directory nothing is cached on disk and every TXT id change or expiry fetches again.

``port`` is 443 (the RFC's); tests pass another one (RemoteAgent's ``mtasts_port``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.name

from pyqmail.home import Home, make_account_dir
from pyqmail.remote import mx, tls
from pyqmail.remote.mtasts import (
    MAX_POLICY_BYTES,
    POLICY_PATH,
    Cached,
    PolicyError,
    media_type_ok,
    parse_txt,
)

log = logging.getLogger("pyqmail.remote")

HTTPS_PORT = 443
FETCH_TIMEOUT = 20.0
RETRY_AFTER = 300.0
_MAX_RECORD = 4 * MAX_POLICY_BYTES


class FetchError(Exception):
    """The policy could not be fetched (the text says why)."""


def cache_dir(home: Home) -> Path:
    return home.root / "mtasts"


def prepare_dir(home: Home, uid: int, gid: int) -> None:
    """As root: make HOME/mtasts (0700, the remote delivery account's) if it is missing
    (home.make_account_dir)."""
    make_account_dir(home, "mtasts", uid, gid)


def domain_key(domain: str) -> str | None:
    """The domain as an A-label name in lower case (the cache file's name), or None when it
    cannot have a policy (an IP literal, a bad name)."""
    if not domain or domain.startswith("[") or mx.ip_literal(domain) is not None:
        return None
    try:
        name = dns.name.from_text(domain.rstrip(".")).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None
    if (
        "." not in name
        or name.startswith(".")
        or not all(c.isascii() and (c.isalnum() or c in "-._") for c in name)
    ):
        return None
    return name


def read_cached(home: Home, domain: str) -> Cached | None:
    """The cached record for ``domain`` (expired or not), or None (``pyqmail explain``)."""
    key = domain_key(domain)
    return _load(cache_dir(home), key) if key is not None else None


def _load(directory: Path, key: str) -> Cached | None:
    try:
        fd = os.open(directory / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            data = f.read(_MAX_RECORD)
        rec = Cached.load(data)
    except (OSError, ValueError):
        return None
    return rec if rec.domain == key else None


class _Https(http.client.HTTPSConnection):
    """An HTTPS connection to ``ip`` that names and verifies ``host`` (SNI, Host:, the
    certificate): the address comes from our resolver, not from getaddrinfo."""

    def __init__(self, host: str, ip: str, port: int, ctx: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._ip = ip
        self._ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        try:
            self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


def fetch_policy(
    host: str, ips: list[str], port: int, ctx: ssl.SSLContext, timeout: float
) -> bytes:
    """GET https://HOST/.well-known/mta-sts.txt from the first of ``ips`` that answers
    (blocking: run in a thread). Raises :class:`FetchError`."""
    deadline = time.monotonic() + timeout
    last = "no address"
    for ip in ips:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        conn = _Https(host, ip, port, ctx, left)
        try:
            try:
                conn.connect()
            except ssl.SSLError as e:
                raise FetchError(f"TLS with {ip}: {e.reason or e}") from e
            except OSError as e:
                last = f"{ip}: {e}"
                continue
            return _get(conn, deadline)
        finally:
            conn.close()
    raise FetchError(f"cannot connect ({last})")


def _get(conn: _Https, deadline: float) -> bytes:
    try:
        conn.request("GET", POLICY_PATH, headers={"Accept": "text/plain",
                                                  "Connection": "close",
                                                  "User-Agent": "pyqmail"})  # fmt: skip
        resp = conn.getresponse()
        if resp.status != 200:  # 3xx included: redirects are not followed (3.3)
            raise FetchError(f"HTTP status {resp.status}")
        if not media_type_ok(resp.getheader("Content-Type")):
            raise FetchError(f"Content-Type {resp.getheader('Content-Type')!r}, not text/plain")
        body = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FetchError("timed out")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read1(16384)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > MAX_POLICY_BYTES:
                raise FetchError(f"the policy is larger than {MAX_POLICY_BYTES} bytes")
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise FetchError(f"{type(e).__name__}: {e}") from e


class MtaSts:
    """The policies in force, for one RemoteAgent (see the module docstring)."""

    def __init__(
        self,
        directory: Path | None,
        resolver: Callable[[], dns.asyncresolver.Resolver],
        *,
        cafile: str | None = None,
        port: int = HTTPS_PORT,
        timeout: float = FETCH_TIMEOUT,
        retry_after: float = RETRY_AFTER,
        ipv6: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._resolver = resolver
        self._cafile = cafile
        self.port = port
        self.timeout = timeout
        self.retry_after = retry_after
        self.ipv6 = ipv6
        self._clock = clock
        self._mem: dict[str, Cached] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[Cached | None]] = {}
        self._ctx: ssl.SSLContext | None = None
        self.fetches = 0  # HTTPS fetches started (tests, statistics)

    async def policy(self, domain: str) -> Cached | None:
        """The policy in force for ``domain`` (any mode), or None. Never raises."""
        key = domain_key(domain)
        if key is None:
            return None
        cached = self._cached(key)
        ident = await self._txt_id(key)
        now = self._clock()
        usable = cached if cached is not None and cached.valid(now) else None
        if ident is None or (usable is not None and usable.id == ident):
            if usable is not None and now - usable.fetched > usable.policy.max_age / 2:
                self._start(key, usable.id)  # refreshed before it expires; not awaited
            return usable
        fut = self._start(key, ident)
        fresh = await asyncio.shield(fut) if fut is not None else None
        return fresh if fresh is not None else usable

    def _cached(self, key: str) -> Cached | None:
        rec = self._mem.get(key)
        if rec is None and self.directory is not None:
            rec = _load(self.directory, key)
            if rec is not None:
                self._mem[key] = rec
        return rec

    async def _txt_id(self, key: str) -> str | None:
        res = self._resolver()
        try:
            ans = await res.resolve(
                f"_mta-sts.{key}", "TXT", search=False,
                lifetime=min(res.lifetime, self.timeout),
            )  # fmt: skip
        except (dns.exception.DNSException, OSError, ValueError):
            return None  # none, or not now: the cached policy (if any) stands
        if ans.rrset is None:
            return None
        texts = [b"".join(r.strings).decode("ascii", "replace") for r in ans.rrset]
        return parse_txt(texts)

    def _start(self, key: str, ident: str) -> asyncio.Future[Cached | None] | None:
        """The fetch of ``key``'s policy for ``ident``: the one under way, or a new one;
        None while a failed one is paused."""
        k = (key, ident)
        fut = self._inflight.get(k)
        if fut is not None:
            return fut
        now = self._clock()
        if self._failed.get(k, 0.0) > now:
            return None
        if len(self._failed) > 10000:  # forget the failures whose pause is over
            self._failed = {f: t for f, t in self._failed.items() if t > now}
        fut = asyncio.ensure_future(self._fetch_and_store(key, ident))
        self._inflight[k] = fut
        fut.add_done_callback(lambda _f: self._inflight.pop(k, None))
        return fut

    async def _fetch_and_store(self, key: str, ident: str) -> Cached | None:
        self.fetches += 1
        host = f"mta-sts.{key}"
        try:
            found = await mx.host_addresses(self._resolver(), host, ipv6=self.ipv6)
            if not found.ips:
                raise FetchError(f"no address for {host}")
            if self._ctx is None:
                self._ctx = tls.verified_context(self._cafile)
            body = await asyncio.to_thread(
                fetch_policy, host, found.ips, self.port, self._ctx, self.timeout
            )
            rec = Cached.make(key, ident, body, self._clock())
        except (FetchError, PolicyError) as e:
            log.warning("MTA-STS: %s: no policy fetched from %s: %s", key, host, e)
            self._failed[(key, ident)] = self._clock() + self.retry_after
            return None
        except Exception as e:  # never a reason to fail a delivery
            log.warning("MTA-STS: %s: policy fetch error: %s", key, type(e).__name__)
            self._failed[(key, ident)] = self._clock() + self.retry_after
            return None
        self._failed.pop((key, ident), None)
        self._mem[key] = rec
        self._store(rec)
        return rec

    def _store(self, rec: Cached) -> None:
        if self.directory is None:
            return
        tmp = self.directory / f".{rec.domain}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb") as f:
                f.write(rec.dump())
            os.replace(tmp, self.directory / rec.domain)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
