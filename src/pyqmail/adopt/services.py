"""What a qmail run script starts: tcpserver's flags, rblsmtpd, the SMTP server and the rest.

:func:`read_service` reads a daemontools or runit ``run`` file (or qmail's ``rc``) with
:mod:`pyqmail.adopt.shellwords` and walks its ``exec`` chain the way each program in it
would take its arguments: ``env``, ``envdir`` (its files are read, never run),
``softlimit``, ``setuidgid``/``envuidgid``, runit's ``chpst``, ``tcpserver`` (ucspi-tcp's
options, the address and port) or runit's ``tcpsvd``, ``rblsmtpd``, ``recordio``/``fixcrio``,
and at the end ``qmail-smtpd`` (with a checkpassword program for the AUTH patches),
``qmail-qmqpd``, ``qmail-qmtpd``, ``qmail-start`` (the default delivery) or a logger.
Variables assigned earlier in the script resolve when they are literal or one of the
usual read-only substitutions (``cat FILE``, ``head -1 FILE``, ``id -u NAME``, ``id -g NAME``);
anything else is named in :attr:`Service.unresolved` and never run.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.adopt.shellwords import Command, ShellError, Sub, Var, Word, show, split_script

_SOFTLIMIT_OPTS = set("mdsloaprctf")  # every softlimit option takes a number
_TCPSERVER_FLAGS = set("qQvdDoOpPhHrR1UX46")
_TCPSERVER_ARGS = set("xtulbBcgiI")
_TCPSVD_FLAGS = set("hEpv")  # runit's ipsvd
_TCPSVD_ARGS = set("cCixtulb")
_CHPST_FLAGS = set("vP012")
_CHPST_ARGS = set("uUbe/nlLmdofcpr")
_RBL_FLAGS = set("bBcC")
_RBL_ARGS = set("rtaw")
_PASS_THROUGH = {"exec", "fghack", "pgrphack", "recordio", "fixcrio", "nice", "chpst-less"}
_LOGGERS = {"multilog", "splogger", "svlogd", "logger", "s6-log", "tai64n"}
_SERVERS = {"qmail-smtpd": "smtpd", "qmail-qmqpd": "qmqpd", "qmail-qmtpd": "qmtpd"}


@dataclass
class Tcpserver:
    """ucspi-tcp's tcpserver as the script runs it."""

    host: str
    port: str
    flags: set[str] = field(default_factory=set)
    options: dict[str, str] = field(default_factory=dict)

    @property
    def rules(self) -> str | None:
        return self.options.get("x")


@dataclass
class Service:
    """What one run script starts (see the module docstring)."""

    path: Path
    kind: str = "unknown"  # smtpd | qmqpd | qmtpd | send | log | unknown
    chain: list[str] = field(default_factory=list)  # program names, in exec order
    env: dict[str, str] = field(default_factory=dict)
    env_cleared: bool = False
    softlimit: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # setuidgid/envuidgid
    tcp: Tcpserver | None = None
    rbl: list[str] = field(default_factory=list)  # rblsmtpd's arguments as written
    program: str | None = None  # the server/qmail-start/rc as written
    args: list[str] = field(default_factory=list)  # its arguments
    defaultdelivery: str | None = None  # qmail-start's first argument, when literal
    defaultdelivery_text: str | None = None  # as written, when it is not literal
    logger: list[str] = field(default_factory=list)  # qmail-start's logger argv
    unresolved: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def checkpassword(self) -> str | None:
        """The AUTH patches' checkpassword program: qmail-smtpd's second argument."""
        return self.args[1] if self.kind == "smtpd" and len(self.args) >= 2 else None


def read_service(path: Path) -> Service:
    """Read the script at ``path`` (a ``run`` file or qmail's ``rc``)."""
    svc = Service(path)
    try:
        text = path.read_text(errors="replace")
        commands = split_script(text)
    except (OSError, ShellError) as e:
        svc.error = str(e)
        return svc
    variables: dict[str, str] = {}
    main: list[Word] | None = None
    for cmd in commands:
        if _assignments_only(cmd):
            for w in cmd.words:
                name, rhs = _assignment(w)
                resolved = _resolve(rhs, variables, svc, path.parent)
                if resolved is not None:
                    variables[name] = resolved
            continue
        head = show(cmd.words[0]) if cmd.words else ""
        if head in ("cd", "ulimit", "umask", "set", ":") or (
            head == "exec" and len(cmd.words) == 1
        ):
            continue
        main = list(cmd.words)  # the last real command is the one that stays running
    if main is None:
        svc.error = "no command found"
        return svc
    argv: list[str] = []
    for word in main:
        arg = _resolve(word, variables, svc, path.parent)
        argv.append(arg if arg is not None else show(word))
    _walk(argv, svc, path.parent, main)
    return svc


def _assignments_only(cmd: Command) -> bool:
    return bool(cmd.words) and all(_assignment(w)[0] for w in cmd.words)


def _assignment(w: Word) -> tuple[str, Word]:
    first = w[0] if w else ""
    if isinstance(first, str) and "=" in first:
        name, _, rest = first.partition("=")
        if name and (name[0].isalpha() or name[0] == "_") and name.replace("_", "a").isalnum():
            return name, ((rest,) if rest else ()) + tuple(w[1:])
    return "", w


def _resolve(w: Word, variables: dict[str, str], svc: Service, cwd: Path) -> str | None:
    out: list[str] = []
    for p in w:
        if isinstance(p, Var):
            if p.name not in variables:
                svc.unresolved.append("$" + p.name)
                return None
            out.append(variables[p.name])
        elif isinstance(p, Sub):
            value = _substitute(p.text, cwd)
            if value is None:
                svc.unresolved.append("`" + p.text + "`")
                return None
            out.append(value)
        else:
            out.append(p)
    return "".join(out)


def _substitute(text: str, cwd: Path) -> str | None:
    """The read-only command substitutions run scripts use; None for anything else."""
    try:
        cmds = split_script(text)
    except ShellError:
        return None
    if len(cmds) != 1:
        return None
    words = [show(w) for w in cmds[0].words]
    try:
        if len(words) == 2 and words[0] == "cat":
            return (cwd / words[1]).read_text().rstrip("\n")
        if (words[:2] == ["head", "-1"] and len(words) == 3) or words[:3] == ["head", "-n", "1"]:
            lines = (cwd / words[-1]).read_text().splitlines()
            return lines[0] if lines else ""
        if len(words) == 3 and words[0] == "id" and words[1] in ("-u", "-g"):
            pw = pwd.getpwnam(words[2])
            return str(pw.pw_uid if words[1] == "-u" else pw.pw_gid)
    except (OSError, KeyError):
        return None
    return None


def _walk(argv: list[str], svc: Service, cwd: Path, words: list[Word]) -> None:
    i = 0
    opts: dict[str, str]
    while i < len(argv):
        name = os.path.basename(argv[i])
        svc.chain.append(name)
        if name in _PASS_THROUGH:
            i += 1
        elif "=" in argv[i] and not name.startswith("/"):
            key, _, value = argv[i].partition("=")
            svc.env[key] = value
            i += 1
        elif name == "env":
            i += 1
            while i < len(argv) and (argv[i] in ("-", "-i") or "=" in argv[i]):
                if argv[i] in ("-", "-i"):
                    svc.env_cleared = True
                else:
                    key, _, value = argv[i].partition("=")
                    svc.env[key] = value
                i += 1
        elif name == "envdir" and i + 1 < len(argv):
            _read_envdir(cwd / argv[i + 1], svc)
            i += 2
        elif name in ("setuidgid", "envuidgid") and i + 1 < len(argv):
            svc.user = argv[i + 1]
            i += 2
        elif name == "argv0" and i + 2 < len(argv):
            i += 2
        elif name == "softlimit":
            i = _options(argv, i + 1, set(), _SOFTLIMIT_OPTS, svc.softlimit, set())
        elif name == "chpst":  # runit: -u user, -e envdir, -m/-d/-o/... limits
            opts = {}
            i = _options(argv, i + 1, _CHPST_FLAGS, _CHPST_ARGS, opts, set())
            if "e" in opts:
                _read_envdir(cwd / opts["e"], svc)
            if "u" in opts or "U" in opts:
                svc.user = opts.get("u", opts.get("U"))
            svc.softlimit.update({k: v for k, v in opts.items() if k in "mdofcpr"})
        elif name in ("tcpserver", "tcpsvd"):
            flags: set[str] = set()
            opts = {}
            fl, ar = (
                (_TCPSERVER_FLAGS, _TCPSERVER_ARGS)
                if name == "tcpserver"
                else (_TCPSVD_FLAGS, _TCPSVD_ARGS)
            )
            i = _options(argv, i + 1, fl, ar, opts, flags)
            if i + 1 >= len(argv):
                svc.error = "tcpserver without an address and a port"
                return
            svc.tcp = Tcpserver(argv[i], argv[i + 1], flags, opts)
            i += 2
        elif name == "rblsmtpd":
            start = i + 1
            i = _options(argv, start, _RBL_FLAGS, _RBL_ARGS, {}, set())
            svc.rbl = argv[start:i]
        elif name in _SERVERS:
            svc.kind = _SERVERS[name]
            svc.program, svc.args = argv[i], argv[i + 1 :]
            return
        elif name == "qmail-start":
            svc.kind = "send"
            svc.program, svc.args = argv[i], argv[i + 1 :]
            if len(argv) > i + 1:
                first = words[i + 1] if i + 1 < len(words) else None
                if first is not None and any(isinstance(p, (Var, Sub)) for p in first):
                    svc.defaultdelivery_text = show(first)
                else:
                    svc.defaultdelivery = argv[i + 1]
                svc.logger = argv[i + 2 :]
            else:
                svc.defaultdelivery = "./Mailbox"  # qmail-start's own default
            return
        elif name == "rc" or name.endswith("/rc"):
            svc.kind = "send"
            svc.program, svc.args = argv[i], argv[i + 1 :]
            return
        elif name in _LOGGERS:
            svc.kind = "log"
            svc.program, svc.args = argv[i], argv[i + 1 :]
            return
        else:
            svc.program, svc.args = argv[i], argv[i + 1 :]
            return


def _options(
    argv: list[str], i: int, flags: set[str], takes: set[str], opts: dict[str, str], seen: set[str]
) -> int:
    """getopt over argv[i:]: single-letter flags and options with an argument; the next index."""
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        if argv[i] == "--":
            return i + 1
        word, i = argv[i][1:], i + 1
        while word:
            letter, word = word[0], word[1:]
            if letter in takes:
                if not word and i < len(argv):
                    word, i = argv[i], i + 1
                opts[letter] = word
                break
            if letter in flags:
                seen.add(letter)
            else:
                return i - 1  # not an option of this program: stop here
    return i


def _read_envdir(d: Path, svc: Service) -> None:
    """envdir's rule: each file's first line sets the variable; an empty file removes it."""
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        svc.unresolved.append(f"envdir {d}: {e.strerror}")
        return
    for name in names:
        try:
            data = (d / name).read_bytes()
        except OSError:
            continue
        if not data:
            svc.env.pop(name, None)
            continue
        value = data.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")
        svc.env[name] = value.decode(errors="replace")


def user_ids(name: str) -> tuple[int, int] | None:
    """A setuidgid/-u name (or number) as (uid, gid), None if unknown."""
    if name.isdigit():
        return int(name), -1
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def group_id(name: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None
