"""Checks of incoming mail: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489), and the
Authentication-Results header (RFC 8601) that records them.

Who is checked: mail from the network, not relay clients (``RELAYCLIENT`` set) and not
authenticated users (the ``authenticated`` argument of :meth:`AuthChecker.applies`, for
when SMTP AUTH exists). ``control/authchecks`` sets a mode per check, one ``NAME=MODE``
line each (``spf``, ``dkim``, ``dmarc``; ``off``, ``tag`` or ``enforce``); ``tag`` is the
default, so with no file every message gets the header and nothing is refused:

* ``spf=enforce``: a MAIL FROM whose SPF result is ``fail`` gets ``550 5.7.23`` (RFC 7372),
  a temporary DNS error ``451 4.7.24``. HELO is checked as well (RFC 7208 2.3) and recorded,
  and it is the identity checked when MAIL FROM is empty (2.4); it is never refused alone.
* ``dkim=enforce``: a message whose DKIM signatures all fail gets ``550 5.7.20`` after DATA
  (an unsigned message passes: RFC 6376 6.1 treats it alike with a failed one otherwise).
* ``dmarc=enforce``: a DMARC ``fail`` whose policy is ``p=reject`` (``sp=`` for a subdomain)
  gets ``550 5.7.1`` after DATA; ``quarantine`` and ``none`` are tagged only. ``pct=`` is
  ignored: every failing message gets the policy (RFC 7489 6.6.4 lets the sender sample;
  a receiver that applies it always is stricter, never looser). No reports are sent.
* under ``enforce`` a ``temperror`` that could change the verdict is ``451 4.7.1``; under
  ``tag`` it is written into the header.

DNS: every lookup uses :mod:`pyqmail.resolver` (``PYQMAIL_RESOLVER`` or resolv.conf) with a
lifetime. DMARC's TXT lookups are async. pyspf and dkimpy are synchronous: they run in a
small thread pool of this module's own (so a hostile DNS server cannot take the loop's
default executor), each run bounded twice: by the library's own budget (pyspf's
``querytime``, spent across its lookups; each dkimpy lookup's ``lifetime``) and by an
``asyncio.wait_for`` around it, after which the session carries on with ``temperror``
(the thread finishes its last lookup and is reused). The event loop never waits on DNS.
pyspf's limits hold: 10 DNS-querying terms and 2 void lookups (RFC 7208 4.6.4) give
``permerror``. pyspf asks DNS through its module function ``DNSLookup``; this module sets it
once to :func:`_spf_dns`, which uses the resolver of the calling thread's check and falls
back to pyspf's own function in any thread that is not running one.

DKIM needs the whole message: it is verified from the spooled copy (smtp/authspool.py) when
that is at most ``verify_max`` bytes (10 MiB); a bigger message gets ``dkim=policy`` (not
verified) and DMARC then rests on SPF. At most ``max_sigs`` (5) signatures are verified.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import enum
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import authres  # type: ignore[import-untyped]
import authres.dmarc  # type: ignore[import-untyped]
import dkim  # type: ignore[import-untyped]
import dns.asyncresolver
import dns.exception
import dns.resolver
import spf  # type: ignore[import-untyped]
from publicsuffixlist import PublicSuffixList  # type: ignore[import-untyped]

from pyqmail import resolver as qresolver

log = logging.getLogger("pyqmail.authcheck")

SPF_TIME = 10.0  # seconds for one SPF evaluation, all its lookups together
DNS_LIFETIME = 5.0  # seconds for one DNS query (retries included)
DKIM_TIME = 15.0  # seconds for verifying one message's signatures
VERIFY_MAX = 10 << 20  # bytes: a bigger message's DKIM signatures are not verified
MAX_SIGS = 5  # DKIM signatures verified per message
MAX_SPF = 20  # SPF evaluations per connection; more MAIL commands get temperror
POOL_THREADS = 8

SPF_FAIL = b"550 5.7.23 SPF validation failed for the sender (#5.7.23)\r\n"
SPF_TEMP = b"451 4.7.24 temporary DNS error in SPF validation; try again later (#4.7.24)\r\n"
DKIM_FAIL = b"550 5.7.20 no passing DKIM signature found (#5.7.20)\r\n"
DMARC_REJECT = b"550 5.7.1 message refused by the sender domain's DMARC policy (#5.7.1)\r\n"
AUTH_TEMP = b"451 4.7.1 temporary DNS error in message authentication; try again later\r\n"


class Mode(enum.Enum):
    OFF = "off"
    TAG = "tag"
    ENFORCE = "enforce"


@dataclass(frozen=True, slots=True)
class Policy:
    """The modes of ``control/authchecks``."""

    spf: Mode = Mode.TAG
    dkim: Mode = Mode.TAG
    dmarc: Mode = Mode.TAG

    @property
    def active(self) -> bool:
        return any(m is not Mode.OFF for m in (self.spf, self.dkim, self.dmarc))


def parse_policy(text: str) -> Policy:
    """``spf=enforce`` lines; an unknown name or mode, or a comment, is ignored (logged)."""
    modes = {"spf": Mode.TAG, "dkim": Mode.TAG, "dmarc": Mode.TAG}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if not eq or name not in modes or value not in {m.value for m in Mode}:
            log.warning("control/authchecks: ignored line %r", raw[:80])
            continue
        modes[name] = Mode(value)
    return Policy(modes["spf"], modes["dkim"], modes["dmarc"])


class PolicyFile:
    """``control/authchecks``, re-read when it changes (looked at every ``ttl`` seconds)."""

    def __init__(self, path: Path, ttl: float = 1.0) -> None:
        self.path = path
        self.ttl = ttl
        self._policy = Policy()
        self._key: tuple[int, int] | None = None
        self._at = -1e9

    def get(self) -> Policy:
        now = time.monotonic()
        if now - self._at < self.ttl:
            return self._policy
        self._at = now
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._policy, self._key = Policy(), None
            return self._policy
        except OSError as e:
            log.warning("control/authchecks: %s (keeping the last modes)", e)
            return self._policy
        key = (st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                self._policy = parse_policy(self.path.read_text("utf-8", "replace"))
                self._key = key
            except OSError as e:
                log.warning("control/authchecks: %s (keeping the last modes)", e)
        return self._policy


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str  # RFC 7208 2.6: none neutral pass fail softfail temperror permerror
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked ("" when there was none)
    address: str  # what the header names: the sender, or the HELO name


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str  # pass fail neutral policy temperror permerror
    domain: str = ""  # d=
    selector: str = ""  # s=


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # none pass fail temperror permerror
    from_domain: str = ""
    policy: str = ""  # the policy that applies to this message (p= or sp=)


@dataclass(slots=True)
class Verdict:
    """What the checks of one message found, and the reply if they refuse it."""

    spf: list[SpfResult] = field(default_factory=list)
    dkim: list[DkimResult] = field(default_factory=list)
    dmarc: DmarcResult | None = None
    refusal: bytes | None = None


# -- the thread pool and DNS -------------------------------------------------------------

_T = TypeVar("_T")
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="authcheck")
        return _POOL


async def _bounded(fn: Callable[[], _T], limit: float, executor: ThreadPoolExecutor) -> _T:
    """``fn()`` in the pool; TimeoutError after ``limit`` seconds (the thread runs on)."""
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.run_in_executor(executor, fn), limit)


_PYSPF_DNS = spf.DNSLookup


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    """pyspf's ``DNSLookup`` over this thread's resolver (same answers as pyspf's own)."""
    res: dns.resolver.Resolver | None = getattr(_LOCAL, "resolver", None)
    if res is None:
        return list(_PYSPF_DNS(name, qtype, strict, timeout))
    try:
        ans = res.resolve(
            name, qtype, lifetime=max(float(timeout), 0.05), raise_on_no_answer=False, search=False
        )
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.DNSException as e:
        raise spf.TempError(f"DNS {e}") from None
    out: list[Any] = []
    for rdata in ans.rrset or ():
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


spf.DNSLookup = _spf_dns

_SPF_NAMES = {"error": "temperror", "unknown": "permerror", "": "none"}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")  # fmt: skip


def is_domain(name: str) -> bool:
    """A syntactically plausible FQDN (two labels at least), the only HELO worth checking."""
    return _DOMAIN.match(name) is not None


def spf_check(res: dns.resolver.Resolver, ip: str, sender: str, helo: str, budget: float) -> str:
    """pyspf's result for ``sender`` (``postmaster@helo`` for HELO) from ``ip`` (blocking)."""
    _LOCAL.resolver = res
    try:
        q = spf.query(i=ip, s=sender, h=helo, timeout=budget, querytime=budget)
        result = str(q.check()[0]).lower()
    except Exception:  # pyspf raises on inputs it cannot parse (a malformed IP, ...)
        log.warning("SPF check of %r from %s failed", sender[:100], ip, exc_info=True)
        result = "permerror"
    finally:
        _LOCAL.resolver = None
    return _SPF_NAMES.get(result, result)


def _dkim_verify(
    message: bytes, res: dns.resolver.Resolver, max_sigs: int, lifetime: float
) -> list[DkimResult]:
    """dkimpy's verification of up to ``max_sigs`` signatures (blocking).

    Results (RFC 8601 2.7.1): ``pass``; ``fail`` when the key is there and the body hash
    or the signature do not match; ``permerror`` when the signature cannot be verified at
    all: a malformed field, h= without From (RFC 6376 6.1.1: the field is ignored; dkimpy
    does not check it), no key, a key record that is revoked (empty p=) or unusable
    (6.1.2), a key under 1024 bits (RFC 8301); ``temperror`` for a DNS failure."""
    last = [""]  # what the last key lookup found: "", "key", "badkey", "nokey", "temp"

    def txt(name: bytes, timeout: float = lifetime) -> bytes | None:
        try:
            ans = res.resolve(
                name.decode("ascii"), "TXT", lifetime=min(float(timeout), lifetime),
                raise_on_no_answer=False, search=False,
            )  # fmt: skip
        except (UnicodeDecodeError, dns.resolver.NXDOMAIN, dns.name.LabelTooLong):
            last[0] = "nokey"
            return None
        except dns.exception.DNSException as e:
            last[0] = "temp"
            raise dkim.DnsTimeoutError(str(e)) from None
        if not ans.rrset:
            last[0] = "nokey"
            return None
        value = b"".join(next(iter(ans.rrset)).strings)
        try:
            dkim.evaluate_pk(name, value)  # dkimpy's own parse: it says only False after
            last[0] = "key"
        except Exception:  # KeyFormatError, binascii.Error: revoked or unusable
            last[0] = "badkey"
        return value

    try:
        d = dkim.DKIM(message, timeout=lifetime)
    except dkim.DKIMException:
        return [DkimResult("permerror")]
    fields = [value for name, value in d.headers if name.lower() == b"dkim-signature"]
    out: list[DkimResult] = []
    for idx in range(min(len(fields), max_sigs)):
        last[0] = ""
        tags = _tags(fields[idx])
        try:
            if tags is not None and b"from" not in _signed_names(tags.get(b"h", b"from")):
                result = "permerror"  # RFC 6376 6.1.1: From not signed
            else:
                ok = d.verify(idx=idx, dnsfunc=txt)
                temp_or_key = {"temp": "temperror", "nokey": "permerror", "badkey": "permerror"}
                result = "pass" if ok else temp_or_key.get(last[0], "fail")
        except dkim.KeyFormatError:  # a key under 1024 bits, a digest too large for it
            result = "permerror"
        except dkim.DKIMException:  # after the key: a mismatch (body hash); before: malformed
            result = "fail" if last[0] == "key" else "permerror"
        except Exception:
            log.warning("DKIM verification crashed", exc_info=True)
            result = "temperror"
        sig = getattr(d, "signature_fields", None) or tags or {}
        out.append(
            DkimResult(result, _printable(sig.get(b"d", b"")), _printable(sig.get(b"s", b"")))
        )
        d.signature_fields = {}
    return out


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    """A DKIM-Signature field's tags, by dkimpy's parser; None when it cannot parse them."""
    try:
        return dict(dkim.util.parse_tag_value(value))
    except Exception:
        return None


def _signed_names(h: bytes) -> list[bytes]:
    return [name.strip().lower() for name in h.split(b":")]


def _printable(value: bytes) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", value.decode("latin-1"))[:255].lower()


# -- DMARC -----------------------------------------------------------------------------

_PSL: PublicSuffixList | None = None


def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 3.2) from the public suffix list."""
    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return str(_PSL.privatesuffix(domain) or domain)


def aligned(a: str, b: str, strict: bool) -> bool:
    """Identifier alignment (RFC 7489 3.1): the same name, or (relaxed) organisation."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if strict else org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"


_POLICIES = ("none", "quarantine", "reject")
_DMARC_V = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")


def parse_dmarc(text: str) -> DmarcRecord | None:
    """A DMARC record (RFC 7489 6.3/6.4); None when it has no valid ``p=`` (permerror)."""
    if not _DMARC_V.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip().lower())
    p = tags.get("p")
    if p not in _POLICIES:
        return None
    sp = tags.get("sp")
    return DmarcRecord(
        p,
        sp if sp in _POLICIES else None,
        "s" if tags.get("adkim") == "s" else "r",
        "s" if tags.get("aspf") == "s" else "r",
    )


class _TempError(Exception):
    pass


async def _dmarc_txt(res: dns.asyncresolver.Resolver, domain: str) -> list[str]:
    """The ``v=DMARC1`` TXT records at ``_dmarc.domain``; _TempError for a DNS failure."""
    try:
        ans = await res.resolve(f"_dmarc.{domain}", "TXT", raise_on_no_answer=False, search=False)
    except (dns.resolver.NXDOMAIN, dns.name.NameTooLong, dns.name.LabelTooLong):
        return []
    except dns.exception.DNSException as e:
        raise _TempError(str(e)) from None
    texts = [b"".join(r.strings).decode("latin-1") for r in ans.rrset or ()]
    return [t for t in texts if _DMARC_V.match(t)]


async def dmarc_policy(
    res: dns.asyncresolver.Resolver, from_domain: str
) -> tuple[DmarcRecord | None, bool, str]:
    """(record, found at the organisational domain, result) for RFC 7489 6.6.3's discovery;
    result is "" when a record applies, else "none", "temperror" or "permerror"."""
    org = org_domain(from_domain)
    for domain, at_org in ((from_domain, False), (org, True)):
        if at_org and org == from_domain:
            break
        try:
            found = await _dmarc_txt(res, domain)
        except _TempError:
            return None, False, "temperror"
        if len(found) > 1:
            return None, False, "permerror"
        if found:
            rec = parse_dmarc(found[0])
            return rec, at_org, "" if rec is not None else "permerror"
    return None, False, "none"


def from_domain(header: bytes) -> str | None:
    """The one RFC5322.From domain (RFC 7489 6.6.1), or None when there is not exactly one."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(header)
        values = msg.get_all("From") or []
        if len(values) != 1 or len(str(values[0])) > 4096:
            return None
        domains = {a.domain.lower().rstrip(".") for a in values[0].addresses}
    except Exception:  # the stdlib's header parser on hostile input
        return None
    if len(domains) != 1:
        return None
    domain = domains.pop()
    return domain if domain.isascii() and is_domain(domain) else None


def evaluate_dmarc(
    fd: str, rec: DmarcRecord, at_org: bool, spf_res: SpfResult | None, dkims: Sequence[DkimResult]
) -> DmarcResult:
    """pass when an aligned SPF or DKIM pass exists (RFC 7489 4.2), else fail (or temperror
    when a temporary error could have hidden a pass)."""
    policy = (rec.sp or rec.p) if at_org else rec.p
    spf_pass = spf_res is not None and spf_res.result == "pass"
    if spf_pass and spf_res is not None and aligned(spf_res.domain, fd, rec.aspf == "s"):
        return DmarcResult("pass", fd, policy)
    for d in dkims:
        if d.result == "pass" and aligned(d.domain, fd, rec.adkim == "s"):
            return DmarcResult("pass", fd, policy)
    temp = (spf_res is not None and spf_res.result == "temperror") or any(
        d.result == "temperror" for d in dkims
    )
    return DmarcResult("temperror" if temp else "fail", fd, policy)


# -- the header ------------------------------------------------------------------------


def build_header(me: str, v: Verdict) -> bytes:
    """One Authentication-Results field, with authres, one result per line (RFC 8601)."""
    results: list[Any] = []
    for s in v.spf:
        if s.identity == "mailfrom":
            results.append(
                authres.SPFAuthenticationResult(result=s.result, smtp_mailfrom=s.address)
            )
        else:
            results.append(authres.SPFAuthenticationResult(result=s.result, smtp_helo=s.address))
    for d in v.dkim:
        if d.domain:
            results.append(authres.DKIMAuthenticationResult(
                result=d.result, header_d=d.domain, header_s=d.selector or None))  # fmt: skip
        else:
            results.append(authres.DKIMAuthenticationResult(result=d.result))
    if v.dmarc is not None:
        m = v.dmarc
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=m.result, header_from=m.from_domain or None, policy=m.policy or None
            )
        )
    head = str(authres.AuthenticationResultsHeader(authserv_id=me))  # "...: me; none"
    if results:
        head = head.rsplit(";", 1)[0] + ";\n\t" + ";\n\t".join(str(r) for r in results)
    return head.encode("ascii", "replace") + b"\n"


# -- the checker -----------------------------------------------------------------------


class AuthChecker:
    """What the SMTP listener keeps: the policy file, the resolvers, the pool.

    ``resolver`` is ``IP[:PORT]`` (default ``PYQMAIL_RESOLVER``, else resolv.conf)."""

    def __init__(
        self,
        control_dir: Path,
        *,
        resolver: str | None = None,
        lifetime: float = DNS_LIFETIME,
        spf_time: float = SPF_TIME,
        dkim_time: float = DKIM_TIME,
        verify_max: int = VERIFY_MAX,
        max_sigs: int = MAX_SIGS,
        ttl: float = 1.0,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.policy_file = PolicyFile(control_dir / "authchecks", ttl)
        self.async_resolver = qresolver.make_resolver(resolver, lifetime=lifetime)
        self.sync_resolver = qresolver.make_sync_resolver(resolver, lifetime=lifetime)
        self.lifetime = lifetime
        self.spf_time = spf_time
        self.dkim_time = dkim_time
        self.verify_max = verify_max
        self.max_sigs = max_sigs
        self.executor = executor or _pool()

    def applies(self, *, relayclient: bool, authenticated: bool = False) -> Policy | None:
        """The policy for a connection; None when nothing is checked (relay client,
        authenticated user, every check off)."""
        if relayclient or authenticated:
            return None
        policy = self.policy_file.get()
        return policy if policy.active else None

    def connection(self, policy: Policy, me: str, ip: str) -> ConnectionChecks:
        return ConnectionChecks(self, policy, me, ip)

    async def spf(self, ip: str, sender: str, helo: str) -> str:
        fn = lambda: spf_check(self.sync_resolver, ip, sender, helo, self.spf_time)  # noqa: E731
        try:
            return await _bounded(fn, self.spf_time + 2 * self.lifetime, self.executor)
        except TimeoutError:
            return "temperror"

    async def dkim(self, message: Callable[[], bytes]) -> list[DkimResult]:
        def run() -> list[DkimResult]:
            return _dkim_verify(message(), self.sync_resolver, self.max_sigs, self.lifetime)

        try:
            return await _bounded(run, self.dkim_time, self.executor)
        except TimeoutError:
            return [DkimResult("temperror")]


class ConnectionChecks:
    """The checks of one connection: SPF at MAIL (kept for the header), the rest at the
    end of DATA (:meth:`message`)."""

    def __init__(self, checker: AuthChecker, policy: Policy, me: str, ip: str) -> None:
        self.checker = checker
        self.policy = policy
        self.me = me
        self.ip = ip
        self._helo_cache: tuple[str, SpfResult] | None = None
        self.spf_results: list[SpfResult] = []
        self.spf_budget = MAX_SPF  # a client looping on MAIL must not make us its DNS cannon

    async def _spf(self, sender: str, helo: str) -> str:
        if self.spf_budget <= 0:
            return "temperror"
        self.spf_budget -= 1
        return await self.checker.spf(self.ip, sender, helo)

    async def mail(self, sender: bytes, helo: bytes | None) -> bytes | None:
        """SPF for MAIL FROM and HELO; the refusal under ``spf=enforce``, else None.

        At most ``MAX_SPF`` evaluations per connection: past them the result is
        ``temperror`` (a 451 under enforce), so one connection cannot keep us querying."""
        self.spf_results = []
        if self.policy.spf is Mode.OFF:
            return None
        h = (helo or b"").decode("ascii", "replace").strip()
        results: list[SpfResult] = []
        helo_res: SpfResult | None = None
        if is_domain(h):
            if self._helo_cache is not None and self._helo_cache[0] == h:
                helo_res = self._helo_cache[1]
            else:
                got = await self._spf("postmaster@" + h, h)
                helo_res = SpfResult(got, "helo", h.lower().rstrip("."), h)
                self._helo_cache = (h, helo_res)
            results.append(helo_res)
        s = sender.decode("ascii", "replace")
        if s:
            domain = s.rpartition("@")[2].lower().rstrip(".")
            got = await self._spf(s, h or domain) if is_domain(domain) else "none"
            mf = SpfResult(got, "mailfrom", domain, s)
        elif helo_res is not None:  # RFC 7208 2.4: the HELO identity stands for <>
            mf = SpfResult(helo_res.result, "mailfrom", helo_res.domain, "postmaster@" + h)
        else:
            mf = SpfResult("none", "mailfrom", "", "<>")
        results.insert(0, mf)
        self.spf_results = results
        if self.policy.spf is Mode.ENFORCE:
            if mf.result == "fail":
                return SPF_FAIL
            if mf.result == "temperror":
                return SPF_TEMP
        return None

    async def message(self, header: bytes, body: Callable[[], bytes] | None) -> Verdict:
        """DKIM and DMARC for a message whose header section is ``header``; ``body()``
        gives the whole message for DKIM (None: too big to verify)."""
        policy = self.policy
        v = Verdict(spf=list(self.spf_results))
        mf = next((s for s in v.spf if s.identity == "mailfrom"), None)
        if policy.dkim is not Mode.OFF or policy.dmarc is not Mode.OFF:
            if body is None:
                v.dkim = [DkimResult("policy")]
            elif b"dkim-signature:" in header.lower():
                v.dkim = await self.checker.dkim(body)
            else:
                v.dkim = [DkimResult("none")]
        if policy.dmarc is not Mode.OFF:
            v.dmarc = await self._dmarc(header, mf, v.dkim)
        v.refusal = self._refusal(v)
        if policy.dkim is Mode.OFF:
            v.dkim = []
        return v

    async def _dmarc(
        self, header: bytes, mf: SpfResult | None, dkims: Sequence[DkimResult]
    ) -> DmarcResult:
        fd = from_domain(header)
        if fd is None:
            return DmarcResult("permerror")
        try:
            rec, at_org, result = await asyncio.wait_for(
                dmarc_policy(self.checker.async_resolver, fd), 3 * self.checker.lifetime
            )
        except TimeoutError:
            return DmarcResult("temperror", fd)
        if rec is None:
            return DmarcResult(result, fd)
        return evaluate_dmarc(fd, rec, at_org, mf, dkims)

    def _refusal(self, v: Verdict) -> bytes | None:
        policy = self.policy
        if policy.dmarc is Mode.ENFORCE and v.dmarc is not None:
            if v.dmarc.result == "fail" and v.dmarc.policy == "reject":
                return DMARC_REJECT
            if v.dmarc.result == "temperror" and v.dmarc.policy in ("", "reject"):
                return AUTH_TEMP  # the record is unknown, or says reject
        if policy.dkim is Mode.ENFORCE and v.dkim:
            results = {d.result for d in v.dkim}
            if "pass" not in results:
                if "temperror" in results:
                    return AUTH_TEMP
                if results & {"fail", "permerror"}:
                    return DKIM_FAIL
        return None
