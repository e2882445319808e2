"""``pyqmail explain``: what would happen to mail for an address, or from a client, and why.

Read only. Every answer comes from the code that makes the decision for real, never a
second copy of a lookup:

- RCPT TO: smtp/session.py's ``Session.rcpt_allowed`` (rcpthosts, morercpthosts.cdb) and
  its reply text from smtp/replies.py;
- local, virtual or remote: send/todo.py's ``Routing.route`` (locals, percenthack,
  virtualdomains), as qmail-send decides at preprocessing;
- an SRS address (docs/srs.md): pyqmail/srs.py's reversal and qmail-local's refusal text
  (local/qlocal.py's ``srs_refusal``);
- local: local/users.py (users/cdb, then qmail-getpw's passwd rule and the alias user),
  local/dotqmail.py's ``choose`` (which .qmail file) and ``parse`` (its lines), and
  qmail-local's rules for a missing file (local/qlocal.py): a bounce for an extension, else
  control/defaultdelivery;
- remote: remote/qmtp.py's ``qmtp_route`` (qmtproutes), remote/routes.py's ``lookup``
  (smtproutes), remote/mx.py (the same resolver and MX ordering as delivery, with a time
  limit; DNS is asked only when delivery would ask it), remote/tls.py (tlsdestinations),
  remote/mtastscache.py's cached MTA-STS policy (the cache only: no lookup, no fetch)
  and destlimits.py (control/destinationlimits, with send/limits.py's back-off);
- a client: tcprules.py's ``find``/``decide``/``explain`` on control/tcp.smtp.cdb (the
  report is tcprulescheck's), and the SMTP limits that then apply.

The result is a list of lines; ``refused`` says whether mail would be refused or bounced.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.asyncresolver

from pyqmail import cdb, destlimits, netaddr, srs, tcprules
from pyqmail.control import Control, ControlError, load
from pyqmail.home import Home
from pyqmail.local import dotqmail, users
from pyqmail.local.dotqmail import Instruction, Kind
from pyqmail.local.qlocal import srs_refusal
from pyqmail.local.spawner import split_recipient
from pyqmail.remote import dane, mtasts, mtastscache, mx, routes, smarthost, tls
from pyqmail.send.limits import BACKOFF_FIRST, BACKOFF_MAX
from pyqmail.send.schedule import LOCAL
from pyqmail.send.todo import Routing
from pyqmail.smtp import rcptcheck, replies
from pyqmail.smtp.protocol import Limits
from pyqmail.smtp.session import Session, SessionError

DNS_TIMEOUT = 5.0
Lookup = Callable[[dns.asyncresolver.Resolver], Awaitable[list[mx.Address]]]


@dataclass
class Explanation:
    lines: list[str] = field(default_factory=list)
    refused: bool = False

    def say(self, text: str) -> None:
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _reply(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\r\n")


def _more(home: Home) -> cdb.Reader | None:
    path = home.control / "morercpthosts.cdb"
    try:
        return cdb.Reader.open(path)
    except FileNotFoundError:
        return None


def describe(ins: Instruction, home_dir: str) -> str:
    """What qmail-local does with one .qmail line."""
    if ins.kind is Kind.MAILDIR:
        return f"deliver into the Maildir {os.path.join(home_dir, ins.arg)}"
    if ins.kind is Kind.MBOX:
        return f"append to the mbox file {os.path.join(home_dir, ins.arg)}"
    if ins.kind is Kind.PROGRAM:
        return f"run the program `{ins.arg}` (as the user, in {home_dir})"
    if ins.kind is Kind.FORWARD:
        return f"forward to <{ins.arg}>"
    return "+list: the lines after this one only forward"


def explain_address(
    home: Home,
    address: str,
    *,
    dns: bool = True,
    resolver: dns.asyncresolver.Resolver | None = None,
    timeout: float = DNS_TIMEOUT,
) -> Explanation:
    """What pyqmail would do with mail for ``address``."""
    ex = Explanation()
    try:
        ctl = load(home)
    except ControlError as e:
        ex.say(f"control files cannot be read: {e}: mail would be deferred (451)")
        ex.refused = True
        return ex
    ex.say(f"address: <{address}>")
    _rcpt(home, ctl, address, ex)
    channel, stored = Routing.from_control(ctl).route(address)
    domain = stored.rpartition("@")[2]
    if channel == LOCAL:
        prepend = None
        if address.rpartition("@")[2].lower() not in ctl.locals:
            prepend = Routing.from_control(ctl).virtual_lookup(address)
        if prepend:
            ex.say(
                f"delivery: virtual: control/virtualdomains gives the prefix {prepend!r}; "
                f"delivered locally as <{stored}>"
            )
        else:
            ex.say(f"delivery: local: control/locals lists {domain}")
        _local(home, ctl, stored, ex)
    else:
        ex.say(f"delivery: remote: {domain} is not in control/locals or control/virtualdomains")
        _remote(ctl, domain, ex, dns=dns, resolver=resolver, timeout=timeout, home=home)
        _mtasts(home, ctl, domain, ex)
    return ex


def _rcpt(home: Home, ctl: Control, address: str, ex: Explanation) -> None:
    try:
        session = Session(ctl, {}, morercpthosts=_more(home))
    except (SessionError, OSError, cdb.CdbError) as e:
        ex.say(f"RCPT TO: the SMTP server cannot start a session: {e}")
        return
    if ctl.rcpthosts is None:
        ex.say("RCPT TO: accepted from anyone: there is no control/rcpthosts (an open relay)")
    elif session.rcpt_allowed(address.encode("utf-8", "surrogateescape")):
        ex.say("RCPT TO: accepted from any client: its domain is in rcpthosts/morercpthosts")
    else:
        ex.say(
            "RCPT TO: refused to clients without RELAYCLIENT: "
            + _reply(replies.NOT_RCPTHOSTS)
            + "; accepted from relay clients (RELAYCLIENT set by tcprules)"
        )


def _local(home: Home, ctl: Control, stored: str, ex: Explanation) -> None:
    split = split_recipient(stored)
    if split is None:
        ex.say("bounce: Sorry, address must include host name. (#5.1.3)")
        ex.refused = True
        return
    local, _ = split
    if not local:
        ex.say("accepted and dropped: an empty local part is qmail-lspawn's trash address")
        return
    try:
        info = users.lookup_cdb(home.users / "cdb", local)
        source = "users/assign (users/cdb)"
        if info is None:
            info = users.getpw(local, home)
            source = (
                "the alias user"
                if info.user == "alias" or (info.dash == "-" and info.ext == local)
                else "the passwd file (qmail-getpw)"
            )
    except users.UserError as e:
        ex.say(f"user: lookup fails: {e.text}")
        ex.refused = e.code == 100
        return
    except (OSError, cdb.CdbError) as e:
        ex.say(f"user: users/cdb cannot be read ({e}): delivery would be deferred")
        return
    ex.say(f"user: {info.user} (uid {info.uid}, gid {info.gid}) from {source}")
    if source == "the alias user":
        ex.say(f"  no account owns {local!r}: the alias user's .qmail files decide")
    if srs.is_srs(local) and _srs(home, local, ex):
        return
    ex.say(f"home: {info.home}")
    ex.say(f"extension: dash {info.dash!r}, ext {info.ext!r}")
    dd = ctl.defaultdelivery
    if os.geteuid() == 0 and info.uid != 0 and not home.single_user:
        _as_user(info, lambda sub: _dot_qmail(info, dd, sub), ex)
    else:
        _dot_qmail(info, dd, ex)


def _srs(home: Home, local: str, ex: Explanation) -> bool:
    """An SRS local part with control/srs present: what delivery does with it before any
    .qmail file (True), or False when SRS is off (an ordinary local part)."""
    try:
        config = srs.load(home.control)
    except PermissionError:
        ex.say("SRS: control/srs cannot be read by this user (run explain as root); "
               "delivery forwards a valid SRS address and refuses a forged one")  # fmt: skip
        return True
    except (OSError, srs.ConfigError) as e:
        ex.say(f"SRS: control/srs is unusable ({e}): delivery would be deferred")
        return True
    if config is None:
        return False
    refusal = srs_refusal(config, local, time.time())
    if refusal is not None:
        ex.say(f"SRS: refused at RCPT ({_reply(rcptcheck.SRS_REFUSED)}) and in delivery: "
               + refusal)  # fmt: skip
        ex.refused = True
        return True
    target = config.reverse(local)
    ex.say(f"SRS: a valid SRS address of ours (hash and age check out): delivery forwards "
           f"it to <{target}>, with the same envelope sender, before any .qmail file")  # fmt: skip
    return True


def _as_user(info: users.UserInfo, job: Callable[[Explanation], None], ex: Explanation) -> None:
    """Run ``job`` in a child that has dropped to the user's uid and gid first, as local
    delivery does: root never follows a path in a directory the user owns."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its result is tested through the parent
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(info.gid)
            os.setuid(info.uid)
            sub = Explanation()
            job(sub)
            data = json.dumps({"lines": sub.lines, "refused": sub.refused}).encode()
            while data:
                data = data[os.write(wfd, data) :]
        except BaseException:
            code = 111
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        ex.say(f"the .qmail files could not be read as {info.user} (uid {info.uid})")
        return
    got = json.loads(data)
    ex.lines += got["lines"]
    ex.refused = ex.refused or bool(got["refused"])


def _dot_qmail(info: users.UserInfo, defaultdelivery: str, ex: Explanation) -> None:
    """Which .qmail file qmail-local would use for ``info``, and what each line does."""
    try:
        hfd = os.open(info.home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        ex.say(
            f"the home cannot be opened ({e.strerror}): qmail-local would defer the "
            f"delivery (Unable to switch to {info.home}. (#4.3.0))"
        )
        return
    try:
        chosen = dotqmail.choose(info.dash, info.ext, hfd)
    except dotqmail.DotQmailError as e:
        ex.say(f".qmail: {e}: delivery would be deferred")
        return
    finally:
        os.close(hfd)
    if chosen.name is None and info.dash:
        base = ".qmail" + info.dash + dotqmail.safe_ext(info.ext)
        ex.say(f".qmail: neither {base} nor a matching -default file exists")
        ex.say("bounce: Sorry, no mailbox here by that name. (#5.1.1)")
        ex.refused = True
        return
    content = chosen.content
    if chosen.name is None or not content:
        why = "there is no .qmail" if chosen.name is None else f"{chosen.name} is empty"
        ex.say(f".qmail: {why}: control/defaultdelivery applies")
        content = defaultdelivery.encode("utf-8", "surrogateescape")
    else:
        path = os.path.join(info.home, chosen.name)
        ex.say(
            f".qmail: {path}" + (" (forward only: the x bit is set)" if chosen.forward_only else "")
        )
        if chosen.default is not None:
            ex.say(f"  DEFAULT={chosen.default!r}")
    try:
        instructions = dotqmail.parse(content)
    except dotqmail.DotQmailError as e:
        ex.say(f"  {e}: delivery would be deferred")
        return
    for line in content.decode("utf-8", "surrogateescape").splitlines():
        ex.say(f"  line: {line}")
    for ins in instructions:
        ex.say(f"  -> {describe(ins, info.home)}")
    if not instructions:
        ex.say("  -> no delivery instruction: the message is accepted and dropped")


def _remote(
    ctl: Control,
    domain: str,
    ex: Explanation,
    *,
    dns: bool,
    resolver: dns.asyncresolver.Resolver | None,
    timeout: float,
    home: Home | None = None,
) -> None:
    route: routes.Route | None = None
    via = "SMTP"
    try:
        if ctl.qmtproutes:
            from pyqmail.remote import qmtp

            route = qmtp.qmtp_route(ctl, domain)
            via = "QMTP"
        if route is None:
            via = "SMTP"
            route = routes.lookup(ctl.smtproutes, domain)
    except routes.RouteError as e:
        ex.say(f"route: the route file is broken ({e}): delivery would be deferred")
        return
    lookup: Lookup | None = None
    if route is not None:
        table = "qmtproutes" if via == "QMTP" else "smtproutes"
        port = f":{route.port}" if route.port else ""
        ex.say(f"route: control/{table}: {via} to the relay {route.relay}{port}")
        relay = route.relay
        if mx.ip_literal(relay) is not None:
            ex.say("DNS: not asked (the relay is an IP address)")
        else:
            lookup = functools.partial(_relay, relay)
    else:
        ex.say("route: no smtproutes entry: the MX records of " + domain)
        lookup = functools.partial(_mx, domain)
    if lookup is not None:
        if not dns:
            ex.say("DNS: not asked (--no-dns)")
        else:
            _dns(lookup, ex, resolver, timeout, with_dane=route is None)
    _limits(ctl, domain, ex)
    if via == "SMTP" and route is not None and home is not None and _smarthost(home, route, ex):
        return
    if via == "SMTP":
        if tls.tls_required(ctl, domain):
            ex.say("TLS: required and verified (control/tlsdestinations lists it)")
        else:
            ex.say("TLS: opportunistic STARTTLS (not in control/tlsdestinations)")


def _smarthost(home: Home, route: routes.Route, ex: Explanation) -> bool:
    """The relay's AUTH and TLS (remote/smarthost.py); True if that says it all."""
    try:
        relay = smarthost.load(home).relay(route)
    except (ControlError, smarthost.SmarthostError) as e:
        ex.say(f"AUTH: the smarthost files cannot be used ({e}): delivery would be deferred")
        return True
    if relay is None:
        return False
    if relay.creds is not None:
        user = relay.creds.user.decode("utf-8", "replace")
        ex.say(f"AUTH: as {user} (control/smtproutesauth), only after TLS")
    how = "the system's CAs and the relay's name"
    if relay.trust is not None:
        how = f"the CA file {relay.trust.cafile}" if relay.trust.cafile else "a pinned key"
    ex.say(f"TLS: required, the certificate verified by {how}")
    return True


def _mtasts(home: Home, ctl: Control, domain: str, ex: Explanation) -> None:
    try:
        routed = routes.lookup(ctl.smtproutes, domain) is not None
        if ctl.qmtproutes and not routed:
            from pyqmail.remote import qmtp

            routed = qmtp.qmtp_route(ctl, domain) is not None
    except routes.RouteError:
        return
    if routed:
        ex.say("MTA-STS: not applied (delivery follows a route, not the MX records)")
        return
    if mtastscache.domain_key(domain) is None:
        return
    rec = mtastscache.read_cached(home, domain)
    if rec is None:
        ex.say(f"MTA-STS: no cached policy; delivery looks up _mta-sts.{domain} (TXT)")
        return
    p = rec.policy
    state = "expired" if not rec.valid(time.time()) else "in force"
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec.expires))
    ex.say(f"MTA-STS: cached policy id {rec.id}, mode {p.mode.value}, {state} until {until}")
    if p.mx:
        ex.say(f"  mx: {' '.join(p.mx)}")
    if state == "in force" and p.mode is mtasts.Mode.ENFORCE:
        ex.say("  only these MX hosts, with STARTTLS and a verified certificate, else deferred")


def _limits(ctl: Control, domain: str, ex: Explanation) -> None:
    """control/destinationlimits as the scheduler looks it up (destlimits.py, limits.py)."""
    lim = destlimits.parse(ctl.raw_lists.get("destinationlimits", ())).lookup(domain)
    if lim.line:
        share = (
            "each domain counted on its own"
            if lim.pattern == "*"
            else "shared by every domain the line matches"
            if lim.pattern.startswith(".")
            else ""
        )
        ex.say(f"limits: control/destinationlimits line {lim.line} ({lim.pattern}): "
               f"{lim.describe()}" + (f" ({share})" if share else ""))  # fmt: skip
    else:
        ex.say(f"limits: no control/destinationlimits line for {domain}: no per-destination limit")
    ex.say(f"  a deferral with a 421 or 4.7.x reply holds every delivery to it for "
           f"{BACKOFF_FIRST / 60:g} min, doubling up to {BACKOFF_MAX / 3600:g} h")  # fmt: skip


async def _relay(relay: str, res: dns.asyncresolver.Resolver) -> list[mx.Address]:
    return await mx.relay_addresses(res, relay)


async def _mx(domain: str, res: dns.asyncresolver.Resolver) -> list[mx.Address]:
    return await mx.mx_addresses(res, domain)


def _dns(
    lookup: Lookup,
    ex: Explanation,
    resolver: dns.asyncresolver.Resolver | None,
    timeout: float,
    *,
    with_dane: bool = False,
) -> None:
    """The lookup's addresses; ``with_dane`` (MX delivery): the TLSA state of each MX host
    as delivery would see it (remote/dane.py), in the same time limit."""
    res = resolver if resolver is not None else mx.make_resolver(lifetime=timeout)
    trusted = with_dane and dane.ask_dnssec(res)

    async def run() -> tuple[list[mx.Address], dict[str, dane.HostPolicy]]:
        async def both() -> tuple[list[mx.Address], dict[str, dane.HostPolicy]]:
            found = await lookup(res)
            names = list(dict.fromkeys(a.name for a in found if a.secure)) if trusted else []
            got = await asyncio.gather(*(dane.lookup(res, n) for n in names))
            return found, dict(zip(names, got, strict=True))

        return await asyncio.wait_for(both(), timeout)

    try:
        addrs, tlsa = asyncio.run(run())
    except mx.DnsFailure as e:
        ex.say(f"DNS: {e.outcome.text.strip()}")
        ex.refused = ex.refused or e.outcome.status.value == "D"
        return
    except (TimeoutError, OSError) as e:
        ex.say(f"DNS: no answer within {timeout:g} s ({type(e).__name__}): would be deferred")
        return
    for a in addrs:
        pref = f"MX {a.pref} " if a.pref else ""
        ex.say(f"DNS: {pref}{a.name} -> {a.ip}")
    if not with_dane:
        return
    if not trusted:
        ex.say("DANE: off (the resolver is not on loopback: its AD bit is not trusted)")
        return
    for name in dict.fromkeys(a.name for a in addrs if mx.ip_literal(a.name) is None):
        hp = tlsa.get(name)
        if hp is None:
            ex.say(f"DANE: {name}: not used (its MX or address records are not DNSSEC-validated)")
        else:
            ex.say(f"DANE: {name}: {_DANE_STATE[hp.kind]}")


_DANE_STATE = {
    dane.Kind.NONE: "validated, no TLSA records: delivery as without DANE",
    dane.Kind.AUTH: "TLSA records (DANE-EE): TLS required, the certificate must match one",
    dane.Kind.ENCRYPT: "only unusable TLSA records: TLS required, not authenticated",
    dane.Kind.FAIL: "the TLSA lookup failed: this MX would be skipped (#4.7.5)",
}


def explain_client(home: Home, ip: str, helo: str | None = None) -> Explanation:
    """What control/tcp.smtp.cdb decides for a client at ``ip``, and the limits then."""
    ex = Explanation()
    path = home.control / "tcp.smtp.cdb"
    env: dict[str, str] = {}
    try:
        with cdb.Reader.open(path) as reader:
            hit = tcprules.find(reader, ip)
            decision = tcprules.lookup(reader, ip)
        ex.say(f"rules: {path}")
        for line in tcprules.explain(hit).decode("utf-8", "replace").splitlines():
            ex.say(f"  {line}")
        env = dict(decision.env)
        allow = decision.allow
    except FileNotFoundError:
        ex.say(f"rules: no {path}: every client is allowed")
        allow = True
        if netaddr.is_loopback(ip):
            ex.say('  pyqmail run lets a loopback client relay then (RELAYCLIENT="")')
            env["RELAYCLIENT"] = ""
    except (OSError, cdb.CdbError) as e:
        ex.say(f"rules: {path} cannot be read ({e}): the connection would be dropped")
        ex.refused = True
        return ex
    if not allow:
        ex.say("decision: deny: the connection is dropped before the greeting")
        ex.refused = True
        return ex
    ex.say("decision: allow")
    for k, v in sorted(env.items()):
        ex.say(f"  {k}={v!r}")
    if "RELAYCLIENT" in env:
        ex.say(f"  RELAYCLIENT: may relay to any domain (the suffix {env['RELAYCLIENT']!r} is "
               "appended to each recipient)")  # fmt: skip
    else:
        ex.say("  no RELAYCLIENT: only recipients in rcpthosts/morercpthosts are accepted")
    if helo is not None:
        ex.say(f"HELO {helo}: recorded in the Received line; qmail does not check it")
    try:
        ctl = load(home)
    except ControlError as e:
        ex.say(f"limits: control files cannot be read: {e}")
        return ex
    databytes = int(env["DATABYTES"]) if env.get("DATABYTES", "").isdigit() else ctl.databytes
    lim = Limits()
    size = f"{databytes} bytes" if databytes else "unlimited"
    ex.say(f"limits: message size {size} (databytes/DATABYTES), "
           f"{lim.max_rcpts} recipients per message, timeout {ctl.timeoutsmtpd} s, "
           f"{lim.max_errors} errors before 421")  # fmt: skip
    from pyqmail.smtp.server import SmtpServer

    params = inspect.signature(SmtpServer.__init__).parameters
    ex.say(f"limits: {params['max_per_ip'].default} connections per client address, "
           f"{params['max_conns'].default} in all (pyqmail run's defaults)")  # fmt: skip
    return ex
