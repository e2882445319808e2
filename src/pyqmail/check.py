"""``pyqmail check``: lint a home's configuration, the mistakes qmail lets pass silently.

Each :class:`Problem` names the file (relative to the home), the line when there is
one, what is wrong and how to fix it. Errors make ``pyqmail check`` exit non-zero;
warnings are printed but do not. What is an error:

- a control file that cannot be read (qmail then fails every connection or delivery);
- every :class:`pyqmail.control.Finding` (a value qmail silently ignores or caps);
- no ``me`` (qmail-send refuses to start, qmail-smtpd answers 421);
- no ``rcpthosts``: qmail-smtpd then accepts mail for any domain, an open relay;
- a ``locals`` or ``virtualdomains`` domain that neither rcpthosts nor
  morercpthosts.cdb lists (SMTP refuses mail for it);
- morercpthosts newer than morercpthosts.cdb, or no cdb at all (run qmail-newmrh);
- control/tcp.smtp (and tcp.qmtp) rules that set RELAYCLIENT for every client (the
  default rule ``:allow,RELAYCLIENT=...``, or ``=:`` which any client with a PTR name
  matches), a tcp.qmqp that allows every client (QMQP has no recipient check), a rules
  line tcprules refuses, a rules file newer than its cdb;
- users/assign newer than users/cdb (run qmail-newu), a line qmail-newu refuses (found by
  bisecting with its own parser), no final ``.``, a uid/gid that is not a number, a home
  that is not absolute;
- a qmqpservers line that is not an IPv4 address, an smtproutes port that is not a
  number, a destinationlimits line that is not ``domain:concurrency:per-minute``.

control/smtproutesauth (remote/smarthost.py): an error if it is readable by group or
other, or (root mode) not qmailr's; a line of it or of smtproutestls that cannot be parsed.

SMTP AUTH (smtp/passwords.py): control/authusers readable by group or other is a warning
(a line that is not ``user:$argon2...`` too), not qmailp's in root mode an error;
control/checkpassword naming no executable program is an error.

control/servercert.pem (smtp/tls.py): an error if it cannot be used (no STARTTLS), has
expired, or (root mode) is not qmaild's; a warning if it is self-signed, expires within
30 days, or is readable by group or other.

control/srs (pyqmail/srs.py, docs/srs.md): an error for a missing or short secret, a
missing or malformed domain, a domain not in locals, a file root cannot read; a warning
if it is world-readable in a multi-user home, or this uid may not read it (not checked).

Warnings: an empty rcpthosts, unknown files in control/ (with the nearest known name),
no alias/.qmail-postmaster, no queue/, a concurrency of 0 (also a 0 in
destinationlimits), ``./Maildir`` without ``/`` in defaultdelivery, virtualdomains lines
shadowed by locals.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pyqmail import cdb, destlimits, dkim, policy, srs, tcprules
from pyqmail.control import KNOWN_FILES, Control, ControlError, load, read_file
from pyqmail.home import Home
from pyqmail.remote import smarthost
from pyqmail.smtp import authsenders, passwords, qmqpd, tls

# read by smtp/tls.py, smtp/passwords.py, smtp/authsenders.py, remote/smarthost.py, the SRS
# code (pyqmail/srs.py) and daemon/http.py, not control.py
_OTHER_FILES = KNOWN_FILES | {
    tls.SERVERCERT,
    passwords.AUTHUSERS,
    passwords.CHECKPASSWORD,
    authsenders.FILE,
    smarthost.AUTHFILE,
    smarthost.TLSFILE,
    srs.FILE,
    "httpauth",
}


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: where (file relative to the home, line or 0), what, and the fix."""

    severity: Severity
    file: str
    line: int
    message: str
    fix: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{self.severity.value}: {where}: {self.message}"
        return f"{text}; fix: {self.fix}" if self.fix else text


_RULES_FILES = ("tcp.smtp", "tcp.qmtp", "tcp.qmqp")
# SMTP and QMTP consult rcpthosts unless RELAYCLIENT is set; QMQP has no recipient check
# at all, so every client its rules allow may relay.
_RELAY_RULES = ("tcp.smtp", "tcp.qmtp", "tcp.qmqp")
_OPEN_BY_ALLOW = ("tcp.qmqp",)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _opens_relay(d: tcprules.Decision, by_allow: bool) -> bool:
    return d.allow and (by_allow or "RELAYCLIENT" in d.env)


class _Checker:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.problems: list[Problem] = []

    def error(self, file: str, line: int, message: str, fix: str = "") -> None:
        self.problems.append(Problem(Severity.ERROR, file, line, message, fix))

    def warning(self, file: str, line: int, message: str, fix: str = "") -> None:
        self.problems.append(Problem(Severity.WARNING, file, line, message, fix))

    # -- control/ -------------------------------------------------------------------

    def readable(self) -> None:
        """Every known file that exists must be readable (qmail fails temporarily)."""
        for name in sorted(KNOWN_FILES):
            if name.endswith((".cdb", ".tmp")) or name in _RULES_FILES:
                continue  # the rules files are checked by rules()
            try:
                read_file(self.home, name)
            except ControlError as e:
                self.error(
                    f"control/{name}",
                    0,
                    f"cannot be read ({e.err.strerror or e.err}); qmail then fails every "
                    "connection or delivery that reads it",
                    f"make control/{name} a readable file (chmod 644)",
                )

    def unknown_files(self) -> None:
        try:
            names = sorted(os.listdir(self.home.control))
        except OSError:
            return
        for name in names:
            if (
                name in _OTHER_FILES
                or name == dkim.DIR
                or name.endswith((".tmp", ".cdb"))
                or name.startswith(".")
            ):
                continue
            near = difflib.get_close_matches(name, sorted(KNOWN_FILES), n=1, cutoff=0.8)
            hint = f"did you mean control/{near[0]}?" if near else "remove it if it is unused"
            self.warning(f"control/{name}", 0, "no part of qmail or pyqmail reads this file",
                         hint)  # fmt: skip

    def servercert(self) -> None:
        path = self.home.control / tls.SERVERCERT
        reader = None
        if not self.home.single_user and os.geteuid() == 0:
            with contextlib.suppress(Exception):
                reader = (self.home.ids().uid("daemon"), self.home.ids().gid("nofiles"))
        for p in tls.cert_problems(path, reader=reader):
            add = self.error if p.error else self.warning
            add(f"control/{tls.SERVERCERT}", 0, p.message, p.fix)

    def smarthosts(self) -> None:
        """smtproutesauth holds passwords: qmailr's (root mode), mode 0600; both files
        must parse, or every routed delivery is deferred."""
        reader = None
        if not self.home.single_user and os.geteuid() == 0:
            with contextlib.suppress(Exception):
                reader = self.home.ids().uid("remote")
        for p in smarthost.file_problems(self.home, reader):
            add = self.error if p.error else self.warning
            add(f"control/{p.file}", p.line, p.message, p.fix)

    def srs(self, ctl: Control | None) -> None:
        """control/srs (docs/srs.md): a secret long enough, a domain, the domain in locals
        (and so in rcpthosts), and the secret out of the users' reach."""
        name = f"control/{srs.FILE}"
        path = self.home.control / srs.FILE
        try:
            raw = srs.read(self.home.control)
        except PermissionError:
            self.warning(name, 0, f"cannot be read by uid {os.geteuid()}, so it was not checked",
                         "run pyqmail check as root")  # fmt: skip
            return
        except OSError as e:
            self.error(name, 0, f"cannot be read ({e.strerror or e}): every forward and every "
                       "SRS address is deferred", "make it a file root can read")  # fmt: skip
            return
        if raw is None:
            return
        for line, message in srs.problems(raw):
            fix = {1: f"write a random secret of at least {srs.MIN_SECRET} characters "
                      "(e.g. `head -c 24 /dev/urandom | base64`) on the first line",
                   2: "write the domain of the SRS addresses on the second line"}[line]  # fmt: skip
            self.error(name, line, message, fix)
        try:
            config = srs.parse(raw)
        except srs.ConfigError:
            return  # reported above
        if ctl is not None and config.domain not in ctl.locals:
            self.error(name, 2, f"the SRS domain {config.domain} is not in control/locals: "
                       "bounces to SRS addresses would not be delivered here",
                       f"add {config.domain} to control/locals and control/rcpthosts")  # fmt: skip
        try:
            mode = path.stat().st_mode
        except OSError:
            return
        if mode & 0o004 and not self.home.single_user:
            self.warning(name, 0, "every local user can read the SRS secret and sign SRS "
                         "addresses that this host forwards anywhere",
                         f"chown root:qmail {path} && chmod 640 {path}")  # fmt: skip

    def smtp_auth(self) -> None:
        """control/authusers: private (0600; in root mode qmailp's, the password process's
        account: daemon/authproc.py), every line ``user:$argon2...``; control/checkpassword:
        its program exists and may be run."""
        name = f"control/{passwords.AUTHUSERS}"
        path = self.home.control / passwords.AUTHUSERS
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            self.error(name, 0, f"cannot be looked at ({e.strerror})")
            st = None
        if st is not None:
            owner = None
            if not self.home.single_user and os.geteuid() == 0:
                with contextlib.suppress(Exception):
                    owner = self.home.ids().uid("passwd")
            if owner is not None and st.st_uid != owner:
                self.error(
                    name,
                    0,
                    "is not qmailp's: the password process cannot read it, and AUTH answers 454",
                    f"chown qmailp {path}; chmod 600 {path}",
                )
            if st.st_mode & 0o077:
                self.warning(name, 0, "password hashes readable by group or other accounts",
                             f"chmod 600 {path} (pyqmail passwd writes it so)")  # fmt: skip
            with contextlib.suppress(OSError):
                for n, line in enumerate(path.read_bytes().splitlines(), 1):
                    text = line.strip()
                    if not text or text.startswith(b"#"):
                        continue
                    if not passwords.parse_authusers(text):
                        self.warning(name, n, "not a user:$argon2id$... line: ignored",
                                     "set the password with: pyqmail passwd USER")  # fmt: skip
        program = passwords.program_of(self.home)
        if program is not None and not os.access(program[0], os.X_OK):
            self.error(f"control/{passwords.CHECKPASSWORD}", 1,
                       f"{program[0]} is not an executable program: AUTH answers 454",
                       "name the checkpassword program by its absolute path")  # fmt: skip

    def dkim_records(self, notes: list[str]) -> None:
        """Each DKIM signing key against its published TXT record; DNS that does not
        answer is only a note (a laptop offline, a split-horizon resolver)."""
        if not dkim.has_keys(self.home):
            return
        for c in dkim.check_records(self.home, dkim.resolver(lifetime=3.0)):
            sel, _, domain = c.record.name.partition("._domainkey.")
            where = f"control/dkim/{domain}/{sel}.key"
            publish = f'publish TXT {c.record.name} "{c.record.value}"'
            if c.state == "missing":
                self.warning(where, 0, f"no DKIM record {c.record.name} in DNS: receivers "
                             "cannot verify its signatures", publish)  # fmt: skip
            elif c.state == "mismatch":
                self.warning(where, 0, f"the DKIM record {c.record.name} publishes another "
                             f"key ({c.detail}...): its signatures fail", publish)  # fmt: skip
            elif c.state == "badkey":
                self.warning(where, 0, f"not a usable DKIM key: {c.detail}",
                             f"make another: pyqmail dkim keygen {domain}")  # fmt: skip
            elif c.state == "unreachable":
                notes.append(f"DKIM record {c.record.name} not checked: DNS did not answer")

    def findings(self, ctl: Control) -> None:
        for f in ctl.findings:
            self.error(f"control/{f.file}", f.line, f.message, f.fix)

    def me(self, ctl: Control) -> None:
        if ctl.me is None:
            self.error(
                "control/me",
                0,
                "missing: qmail-send refuses to start and qmail-smtpd answers 421",
                "write this host's fully qualified name into control/me",
            )
        elif not ctl.me:
            self.error("control/me", 1, "empty: this host has no name",
                       "write this host's fully qualified name into control/me")  # fmt: skip

    def _morercpthosts(self) -> cdb.Reader | None:
        path = self.home.control / "morercpthosts.cdb"
        try:
            return cdb.Reader.open(path)
        except FileNotFoundError:
            return None
        except (OSError, cdb.CdbError) as e:
            self.error("control/morercpthosts.cdb", 0,
                       f"cannot be read ({e}); qmail-smtpd answers 421 to every client",
                       "run qmail-newmrh")  # fmt: skip
            return None

    def relay(self, ctl: Control) -> None:
        if ctl.rcpthosts is None:
            self.error(
                "control/rcpthosts",
                0,
                "missing: qmail-smtpd accepts mail for every domain and relays it "
                "anywhere (an open relay)",
                "list every domain this host receives mail for in control/rcpthosts "
                "(at least the lines of control/locals and control/virtualdomains)",
            )
        mrh = self._morercpthosts()
        try:
            self._domains_listed(ctl, mrh)
        finally:
            if mrh is not None:
                mrh.close()
        self._newmrh_fresh()

    def _listed(self, ctl: Control, mrh: cdb.Reader | None, domain: str) -> bool:
        """Would SMTP and QMTP take mail for ``domain`` from a client that may not relay?"""
        probe = b"x@" + domain.encode("utf-8", "surrogateescape")
        return policy.RcptHosts.of(ctl, mrh).allowed(probe)

    def _domains_listed(self, ctl: Control, mrh: cdb.Reader | None) -> None:
        if ctl.rcpthosts is None:
            return
        if not ctl.rcpthosts and mrh is None:
            self.warning("control/rcpthosts", 0, "empty: SMTP accepts mail for no domain",
                         "list the domains this host receives mail for")  # fmt: skip
        locals_lines = ctl.raw_lists.get("locals", ())
        if ctl.sources.get("locals") == "me" and ctl.me:
            locals_lines = ((ctl.me, 0),)
        for domain, n in locals_lines:
            if not self._listed(ctl, mrh, domain):
                self.error(
                    "control/locals",
                    n,
                    f"local domain {domain} is not in rcpthosts: SMTP refuses mail for it",
                    f"add {domain.lower()} to control/rcpthosts",
                )
        for line, n in ctl.raw_lists.get("virtualdomains", ()):
            key, sep, value = line.partition(":")
            if not sep or not key or not value:
                continue  # no colon (a Finding), the catch-all, or an exception
            domain = key[key.rfind("@") + 1 :]
            probe = "x" + domain if domain.startswith(".") else domain
            if not self._listed(ctl, mrh, probe):
                self.error(
                    "control/virtualdomains",
                    n,
                    f"virtual domain {domain} is not in rcpthosts: SMTP refuses mail for it",
                    f"add {domain.lower()} to control/rcpthosts",
                )

    def _newmrh_fresh(self) -> None:
        src = _mtime(self.home.control / "morercpthosts")
        dst = _mtime(self.home.control / "morercpthosts.cdb")
        if src is not None and dst is None:
            self.error("control/morercpthosts", 0,
                       "is not compiled: qmail-smtpd reads only morercpthosts.cdb",
                       "run qmail-newmrh")  # fmt: skip
        elif src is not None and dst is not None and dst < src:
            self.error("control/morercpthosts", 0,
                       "is newer than morercpthosts.cdb: the change is not in effect",
                       "run qmail-newmrh")  # fmt: skip

    def qmqpservers(self, ctl: Control) -> None:
        for line, n in ctl.raw_lists.get("qmqpservers", ()):
            try:
                ipaddress.IPv4Address(line)
            except ValueError:
                self.error("control/qmqpservers", n,
                           f"{line!r} is not an IPv4 address; qmail-qmqpc skips it",
                           "write one dotted-quad IPv4 address per line")  # fmt: skip

    def smtproutes(self, ctl: Control) -> None:
        for name in ("smtproutes", "qmtproutes"):
            for line, n in ctl.raw_lists.get(name, ()):
                parts = line.split(":")
                if len(parts) >= 3 and not parts[2].isdigit():
                    self.error(f"control/{name}", n,
                               f"port {parts[2]!r} in {line!r} is not a number",
                               "write domain:relay:port with a decimal port")  # fmt: skip

    def destinationlimits(self, ctl: Control) -> None:
        lines = ctl.raw_lists.get("destinationlimits", ())
        if not lines:
            return
        table = destlimits.parse(lines)
        for bad in table.bad:
            self.error("control/destinationlimits", bad.line,
                       f"{bad.text!r}: {bad.reason}",
                       "write domain:concurrency:messages-per-minute (an empty field: "
                       "no limit)")  # fmt: skip
        entries = [(k, *v) for k, v in table.table.items()]
        if table.default is not None:
            entries.append(("*", *table.default))
        for key, conc, rate, n in sorted(entries, key=lambda e: e[3]):
            if conc == 0 or rate == 0:
                self.warning("control/destinationlimits", n,
                             f"a limit of 0 puts deliveries to {key} on hold: nothing is sent",
                             "write a positive number, or an empty field for no limit")  # fmt: skip

    # -- tcprules -------------------------------------------------------------------

    def rules(self) -> None:
        for name in _RULES_FILES:
            self._rules_file(name)

    def _rules_file(self, name: str) -> None:
        c = self.home.control
        src, dst = c / name, c / f"{name}.cdb"
        rel = f"control/{name}"
        compile_cmd = f"run: tcprules {dst} {c / name}.tmp < {src}"
        try:
            text = src.read_bytes()
        except FileNotFoundError:
            text = None
        except OSError as e:
            self.error(rel, 0, f"cannot be read ({e.strerror})", f"make {rel} readable")
            text = None
        flagged = False
        if text is not None:
            rules: list[tcprules.Rule] = []
            for n, line in tcprules.iter_lines(text):
                try:
                    rule = tcprules.parse_line(line, n) if line else None
                except tcprules.RulesError as e:
                    self.error(rel, n, "tcprules cannot parse this line: "
                               + e.line.decode("utf-8", "backslashreplace"),
                               'write address:allow or address:deny[,VAR="value"...]')  # fmt: skip
                    continue
                if rule is not None:
                    rules.append(rule)
            if name in _RELAY_RULES:
                seen: set[bytes] = set()
                for rule in rules:
                    if rule.address in seen:
                        continue  # tcpserver uses the first rule for a key
                    seen.add(rule.address)
                    flagged = self._relay_rule(rel, rule, name in _OPEN_BY_ALLOW) or flagged
            s, d = _mtime(src), _mtime(dst)
            if d is None:
                self.error(rel, 0, f"is not compiled: {name}.cdb does not exist", compile_cmd)
            elif s is not None and d < s:
                self.error(rel, 0, f"is newer than {name}.cdb: the change is not in effect",
                           compile_cmd)  # fmt: skip
        if name in _RELAY_RULES:
            self._relay_cdb(f"control/{name}.cdb", dst, flagged, name in _OPEN_BY_ALLOW)

    def _relay_rule(self, rel: str, rule: tcprules.Rule, by_allow: bool) -> bool:
        """Report a rule that lets everyone relay; True if it did."""
        if rule.address not in (b"", b"="):
            return False
        d = tcprules.decide(rule.address, rule.value)
        if not _opens_relay(d, by_allow):
            return False
        who = "every client" if rule.address == b"" else "every client with a PTR name"
        which = "the default rule" if rule.address == b"" else "the rule ="
        if by_allow:
            self.error(rel, rule.lineno,
                       f"{which} allows {who}, and QMQP has no recipient check: an open relay",
                       "allow only your own hosts (10.0.0.:allow) and end with :deny")  # fmt: skip
            return True
        self.error(
            rel,
            rule.lineno,
            f"{which} sets RELAYCLIENT for {who}: an open relay",
            "set RELAYCLIENT only on rules for your own addresses "
            '(127.0.0.1:allow,RELAYCLIENT=""), and :allow without it',
        )
        return True

    def _relay_cdb(self, rel: str, path: Path, source_flagged: bool, by_allow: bool) -> None:
        try:
            reader = cdb.Reader.open(path)
        except FileNotFoundError:
            return
        except (OSError, cdb.CdbError) as e:
            self.error(rel, 0, f"cannot be read ({e}); tcpserver drops every connection",
                       "recompile it with tcprules")  # fmt: skip
            return
        with reader:
            for key in (b"", b"="):
                value = reader.get(key)
                if value is None:
                    continue
                d = tcprules.decide(key, value)
                if _opens_relay(d, by_allow) and not source_flagged:
                    self.error(rel, 0, f"the compiled rule {key.decode()!r} lets every client "
                               "relay: an open relay",
                               "recompile it from rules without that default")  # fmt: skip

    # -- users/ and the rest --------------------------------------------------------

    def users(self) -> None:
        src = _mtime(self.home.users / "assign")
        dst = _mtime(self.home.users / "cdb")
        if src is not None and dst is None:
            self.error("users/assign", 0, "is not compiled: users/cdb does not exist",
                       "run qmail-newu")  # fmt: skip
        elif src is not None and dst is not None and dst < src:
            self.error("users/assign", 0, "is newer than users/cdb: the change is not in effect",
                       "run qmail-newu")  # fmt: skip
        if src is not None:
            self._assign_format()

    def _assign_format(self) -> None:
        """users/assign as qmail-newu reads it (pyqmail.local.users.compile_assign)."""
        from pyqmail.local.users import AssignError, compile_assign

        try:
            data = (self.home.users / "assign").read_bytes()
        except OSError as e:
            self.error("users/assign", 0, f"cannot be read ({e.strerror})",
                       "make users/assign readable")  # fmt: skip
            return
        try:
            compile_assign(data)
        except AssignError:
            pass
        else:
            self._assign_fields(data)
            return
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()

        def fails(k: int) -> bool:  # do the first k lines, then ".", fail?
            try:
                compile_assign(b"".join(x + b"\n" for x in lines[:k]) + b".\n")
            except AssignError:
                return True
            return False

        lo, hi = 0, len(lines)
        if not fails(hi):
            self.error("users/assign", 0, "has no final line '.': qmail-newu refuses it",
                       "end the file with a line holding a single '.'")  # fmt: skip
            return
        while lo < hi:  # the first k for which the prefix fails: line k is bad
            mid = (lo + hi) // 2
            if fails(mid):
                hi = mid
            else:
                lo = mid + 1
        self.error("users/assign", lo, "qmail-newu cannot parse this line (bad format)",
                   "write =local:user:uid:gid:home:dash:ext: or "
                   "+prefix:user:uid:gid:home:dash:prefix:")  # fmt: skip

    def _assign_fields(self, data: bytes) -> None:
        for n, line in enumerate(data.split(b"\n"), 1):
            if line.startswith(b"."):
                return
            fields = line.split(b":")
            if len(fields) < 5:
                continue
            for what, value in (("uid", fields[2]), ("gid", fields[3])):
                if not value.isdigit():
                    self.error("users/assign", n,
                               f"{what} {value.decode('utf-8', 'replace')!r} is not a number",
                               f"write the numeric {what}")  # fmt: skip
            if not fields[4].startswith(b"/"):
                self.error("users/assign", n, "the home directory is not an absolute path",
                           "write the home directory starting with /")  # fmt: skip

    def aliases(self) -> None:
        if not (self.home.alias / ".qmail-postmaster").exists():
            self.warning(
                "alias/.qmail-postmaster",
                0,
                "missing: mail to postmaster (RFC 5321 requires it) bounces",
                "create it, e.g. with the line ./Maildir/ or &admin@example.com",
            )

    def queue(self) -> None:
        if not self.home.queue.is_dir():
            self.warning("queue", 0, "missing: no mail can be queued",
                         f"create it with: pyqmail init {self.home.root}")  # fmt: skip

    def delivery(self, ctl: Control) -> None:
        """Settings that are valid but rarely what was meant."""
        for name in ("concurrencylocal", "concurrencyremote"):
            if getattr(ctl, name) == 0 and ctl.sources.get(name) == "file":
                channel = name[len("concurrency") :]
                self.warning(f"control/{name}", 1,
                             f"0 puts {channel} deliveries on hold: nothing is delivered",
                             "write a positive number to deliver again")  # fmt: skip
        if ctl.sources.get("defaultdelivery") == "file":
            for n, line in enumerate(ctl.defaultdelivery.splitlines(), 1):
                if line.rstrip() in ("./Maildir", "Maildir", "~/Maildir"):
                    self.warning("control/defaultdelivery", n,
                                 f"{line.rstrip()!r} without a final '/' is an mbox file, "
                                 "not a maildir", "write ./Maildir/ for a maildir")  # fmt: skip
        for line, n in ctl.raw_lists.get("virtualdomains", ()):
            key = line.partition(":")[0].lower()
            if "@" not in key and key in ctl.locals:
                self.warning("control/virtualdomains", n,
                             f"{key} is also in locals, which wins: this line is never used",
                             f"remove {key} from control/locals or from this file")  # fmt: skip


def check(home: Home, *, dns_notes: list[str] | None = None) -> list[Problem]:
    """Every problem found in ``home``, errors and warnings, in a stable order.

    ``dns_notes``: given, the published DKIM records are checked too (DNS queries), and
    what could not be checked is appended there."""
    ch = _Checker(home)
    if not home.control.is_dir():
        ch.error("control", 0, "no control directory: this is not a qmail home",
                 f"create one with: pyqmail init {home.root}")  # fmt: skip
        return ch.problems
    ch.readable()
    try:
        ctl = load(home)
    except ControlError:
        ctl = None  # already reported by readable()
    if ctl is not None:
        ch.findings(ctl)
        ch.me(ctl)
        ch.relay(ctl)
        ch.qmqpservers(ctl)
        ch.smtproutes(ctl)
        ch.destinationlimits(ctl)
        ch.delivery(ctl)
    ch.rules()
    ch.users()
    ch.aliases()
    ch.queue()
    ch.unknown_files()
    ch.servercert()
    ch.smarthosts()
    ch.srs(ctl)
    ch.smtp_auth()
    if dns_notes is not None:
        ch.dkim_records(dns_notes)
    return ch.problems


def notes(home: Home) -> list[str]:
    """How the home behaves by default where no file says otherwise: not problems, but
    what an operator may not expect. Printed by ``pyqmail check`` and at ``pyqmail run``'s
    start."""
    out: list[str] = []
    if home.control.is_dir() and (note := qmqpd.loopback_only_note(home)) is not None:
        out.append(note)
    return out


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity is Severity.ERROR]
