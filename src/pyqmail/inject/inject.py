"""qmail-inject: fix up a message's header, work out its envelope, and queue it.

Owns qmail-inject's whole job (inject.md section 1): the options ``-a -h -A -H -n -N -f``,
the environment (QMAILUSER, QMAILNAME, QMAILHOST, QMAILSUSER, QMAILSHOST, QMAILINJECT,
QMAILMFTFILE, QMAILDEFAULTDOMAIN/HOST, QMAILPLUSDOMAIN, QMAILIDHOST and the MAIL*/USER
fall-backs), the generated fields (Date, Message-ID, From, Cc/Resent-Cc, Resent-*,
Mail-Followup-To), the removed fields (Bcc, Resent-Bcc, Return-Path, Content-Length) and
the envelope (sender from -f, Return-Path or the default; recipients by mode).

Only the header is held in memory; the body is copied from the input to the queue in
fixed-size chunks, so a 50 MB message costs 64 KB. Failures are :class:`InjectError`
values with qmail-inject's exit code (100 permanent, 111 temporary) and message.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from pyqmail.control import Control, ControlError, load
from pyqmail.home import Home
from pyqmail.inject import address
from pyqmail.inject.address import ParseError, Rewriter
from pyqmail.inject.getopt import Getopt, GetoptError
from pyqmail.inject.headers import (
    RECIPIENT_FIELDS,
    RESENT_FIELDS,
    SENDER_FIELDS,
    Header,
    read_header,
)
from pyqmail.qdate import date822
from pyqmail.queue.codes import qq_result
from pyqmail.queue.contract import QueueError, Reply
from pyqmail.queue.submit import QueueSubmitter, submitter

CHUNK = 65536


class InjectError(Exception):
    """A failure with qmail-inject's exit code; ``str()`` is the text after ``fatal:``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Sink(Protocol):
    """Where the message goes: a queue submission (queue/contract.py), or stdout for -n."""

    def write(self, data: bytes) -> None: ...
    def commit_blocking(self, sender: bytes, recipients: Sequence[bytes]) -> Reply: ...
    def abort(self) -> None: ...


@dataclass
class Options:
    """qmail-inject's command line."""

    mode: str = "A"  # a: args only, h: header only, A: args else header, H: both
    sender: str | None = None  # -f
    print_only: bool = False  # -n
    args: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str]) -> Options:
    """getopt ``aAhHnNf:``; options stop at ``--`` or the first non-option.

    Raises InjectError(100) with getopt's message for a bad option."""
    opts = Options()
    g = Getopt(argv, "aAhHnN", "f")
    try:
        for c, value in g:
            if c in "aAhH":
                opts.mode = c
            elif c == "n":
                opts.print_only = True
            elif c == "N":
                opts.print_only = False
            else:  # f
                opts.sender = value
    except GetoptError as e:
        raise InjectError(100, str(e)) from e
    opts.args = g.rest
    return opts


def _env(env: Mapping[str, str], *names: str) -> str | None:
    for n in names:
        if n in env:
            return env[n]
    return None


def _user(env: Mapping[str, str]) -> str:
    """QMAILUSER, MAILUSER, USER, LOGNAME (set but empty counts), else ``anonymous``."""
    user = _env(env, "QMAILUSER", "MAILUSER", "USER", "LOGNAME")
    return "anonymous" if user is None else user


@dataclass(frozen=True)
class Settings:
    """Everything qmail-inject takes from control files and the environment."""

    rw: Rewriter
    idhost: str
    user: str
    host: str | None
    name: str | None
    suser: str | None
    shost: str | None
    flags: str
    mftfile: str | None

    @classmethod
    def from_env(cls, ctl: Control, env: Mapping[str, str]) -> Settings:
        rw = Rewriter(
            env.get("QMAILDEFAULTHOST", ctl.defaulthost),
            env.get("QMAILDEFAULTDOMAIN", ctl.defaultdomain),
            env.get("QMAILPLUSDOMAIN", ctl.plusdomain),
        )
        return cls(
            rw=rw,
            idhost=env.get("QMAILIDHOST", ctl.idhost),
            user=_user(env),
            host=_env(env, "QMAILHOST", "MAILHOST"),
            name=_env(env, "QMAILNAME", "MAILNAME", "NAME"),
            suser=env.get("QMAILSUSER"),
            shost=env.get("QMAILSHOST"),
            flags=env.get("QMAILINJECT", ""),
            mftfile=env.get("QMAILMFTFILE"),
        )


@dataclass
class Prepared:
    """The rewritten header (ready to write) and the envelope."""

    header: bytes
    sender: str
    recipients: list[str]


_NOT_FOLDING = re.compile(rb"\r|\n(?![ \t])")


def _one_field(field: bytes) -> bytes:
    """A header field we write never starts another one.

    Its text comes partly from the caller (QMAILNAME, QMAILUSER, QMAILHOST, QMAILIDHOST,
    QMAILDEFAULTHOST, sendmail's -f and -F): a CR, or a LF not followed by a space or
    tab (so not folding), would let it add fields such as ``Bcc:``. Both become spaces.
    notqmail writes them backslash-escaped, which still starts a new header line.
    """
    return _NOT_FOLDING.sub(b" ", field)


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _mft_list(path: str) -> set[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:  # qmail-inject ignores a missing or unreadable list file
        return set()
    out = set()
    for line in data.split(b"\n"):
        line = line.strip()
        if line and not line.startswith(b"#"):
            out.add(_s(line).lower())
    return out


def _default_from(s: Settings) -> str:
    host = s.rw.host(s.host) if s.host else s.rw.default_host()
    addr = address.local_text(s.user) + "@" + host
    if not s.name:
        return addr
    if "c" in s.flags:
        return f"{addr} ({address.quote(s.name)})"
    return f'"{address.quote(s.name)}" <{addr}>'


def _default_sender(s: Settings, now: float, pid: int) -> str:
    user = s.suser if s.suser is not None else s.user
    host = s.shost if s.shost is not None else s.host
    if "m" in s.flags:
        user += f"-{int(now)}.{pid}"
    if "r" in s.flags:
        user += "-"
    sender = s.rw.raw(user + "@" + (host or ""))
    return sender + "-@[]" if "r" in s.flags else sender


def _message_id(s: Settings, now: float, pid: int) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return f"<{stamp}.{pid}.qmail@{s.idhost}>"


def prepare(
    header: Header,
    opts: Options,
    s: Settings,
    *,
    now: float | None = None,
    pid: int | None = None,
) -> Prepared:
    """Rewrite the header and compute the envelope. Raises InjectError."""
    now = time.time() if now is None else now
    pid = os.getpid() if pid is None else pid
    keys = {f.key for f in header.fields}
    resent = bool(keys & RESENT_FIELDS)
    drop = {"bcc", "resent-bcc", "return-path", "content-length"}
    if "f" in s.flags:
        drop.add("from")
    if "i" in s.flags:
        drop.add("message-id")
    out: list[bytes] = []
    header_rcpts: list[str] = []
    tocc: list[str] = []
    return_path: str | None = None
    wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else (
        "to", "cc", "bcc", "apparently-to")  # fmt: skip
    for f in header.fields:
        k = f.key
        if k not in SENDER_FIELDS and k not in RECIPIENT_FIELDS:
            if k not in drop:
                out.append(f.raw)
            continue
        if k == "return-path" and "s" in s.flags:
            continue
        try:
            res = address.rewrite_list(_s(f.value), s.rw)
        except ParseError as e:
            if k in RECIPIENT_FIELDS:  # tolerated since notqmail 1.08: left as is
                if k not in drop:
                    out.append(f.raw)
                if k in wanted:  # what was read before the error still counts
                    header_rcpts.extend(reversed(e.addresses))
                continue
            line = _s(f.raw).rstrip("\n")
            raise InjectError(100, f"unable to parse this line:\n{line}") from e
        if k == "return-path":
            if return_path is None:
                return_path = address.parse_return_path(_s(f.value), s.rw)
            continue
        if k in RECIPIENT_FIELDS:
            if k in wanted:
                header_rcpts.extend(reversed(res.addresses))
            if k in ("to", "cc"):
                tocc.extend(reversed(res.addresses))
        if k not in drop:
            out.append(_one_field(_b(address.fold(_s(f.name), res.items))) + b"\n")

    gen: list[str] = []
    if resent:
        if "resent-date" not in keys:
            gen.append(f"Resent-Date: {date822(now)}")
        if "resent-message-id" not in keys:
            gen.append(f"Resent-Message-ID: {_message_id(s, now, pid)}")
        if "resent-from" not in keys:
            gen.append(f"Resent-From: {_default_from(s)}")
        if not keys & {"resent-to", "resent-cc"}:
            gen.append("Resent-Cc: recipient list not shown: ;")
    else:
        if "date" not in keys:
            gen.append(f"Date: {date822(now)}")
        if "message-id" not in keys or "i" in s.flags:
            gen.append(f"Message-ID: {_message_id(s, now, pid)}")
        if "from" not in keys or "f" in s.flags:
            gen.append(f"From: {_default_from(s)}")
        if not keys & {"to", "cc"}:
            gen.append("Cc: recipient list not shown: ;")
        if s.mftfile and "mail-followup-to" not in keys:
            lists = _mft_list(s.mftfile)
            if any(a.lower() in lists for a in tocc):
                gen.append("Mail-Followup-To: " + ",\n  ".join(reversed(tocc)))

    if opts.sender is not None:
        sender = s.rw.raw(opts.sender)
    elif return_path is not None:
        sender = return_path + "-@[]" if "r" in s.flags and return_path else return_path
    else:
        sender = _default_sender(s, now, pid)

    args = [s.rw.raw(a) for a in opts.args]
    mode = opts.mode
    if mode == "A":
        mode = "a" if opts.args else "h"
    recipients = {"a": args, "h": header_rcpts, "H": args + header_rcpts}[mode]
    text = b"".join(_one_field(_b(g)) + b"\n" for g in gen) + b"".join(out)
    return Prepared(text + header.separator + header.body_start, sender, recipients)


def return_path_line(sender: str) -> bytes:
    """``-n``'s first line: the sender in angle brackets, local part quoted if needed."""
    at = sender.rfind("@")
    if not sender:
        shown = ""
    elif at < 0:
        shown = address.local_text(sender, '"\\')
    else:
        shown = address.local_text(sender[:at], '"\\') + sender[at:]
    return _b(f"Return-Path: <{shown}>\n")


def inject(
    stream: BinaryIO,
    opts: Options,
    s: Settings,
    sink: Sink,
    *,
    now: float | None = None,
    pid: int | None = None,
) -> int:
    """Read the message from ``stream`` into ``sink``; returns the queue's message number
    (0 for -n). Raises InjectError; the sink is aborted on any failure."""
    try:
        header = read_header(stream)
    except OSError as e:
        raise InjectError(111, "read error") from e
    prepared = prepare(header, opts, s, now=now, pid=pid)
    try:
        if opts.print_only:
            sink.write(return_path_line(prepared.sender))
        sink.write(prepared.header)
        last = prepared.header[-1:]
        while True:
            try:
                chunk = stream.read(CHUNK)
            except OSError as e:
                raise InjectError(111, "read error") from e
            if not chunk:
                break
            sink.write(chunk)
            last = chunk[-1:]
        if last not in (b"", b"\n"):
            sink.write(b"\n")  # qmail-inject ends an unterminated last line
        reply = sink.commit_blocking(_b(prepared.sender), [_b(r) for r in prepared.recipients])
        if not reply.ok:
            raise reply.error()
        return reply.msgnum
    except BaseException:
        sink.abort()
        raise


class _Stdout:
    """-n: the message goes to ``out`` instead of the queue."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def write(self, data: bytes) -> None:
        self.out.write(data)

    def commit_blocking(self, sender: bytes, recipients: Sequence[bytes]) -> Reply:
        self.out.flush()
        return Reply(0)

    def abort(self) -> None:
        self.out.flush()


def run(home: Home, opts: Options, stream: BinaryIO, out: BinaryIO, env: Mapping[str, str]) -> None:
    """qmail-inject's job once its options are parsed: the controls, the settings from
    ``env``, then the message from ``stream`` into the queue (QMAILQUEUE, mini-qmail's
    QMQP or the local queue: queue/submit.py decides), or onto ``out`` for -n. Raises
    InjectError with qmail-inject's exit code and the text after ``fatal:``."""
    try:
        ctl = load(home)
    except ControlError as e:
        raise InjectError(111, f"unable to read controls: {e}") from e
    settings = Settings.from_env(ctl, env)
    try:
        sink: Sink
        if opts.print_only:
            sink = _Stdout(out)
        else:
            # QMAILQUEUE, mini-qmail's QMQP or the local queue: queue/submit.py decides
            sub = submitter(home, qmqpservers=ctl.qmqpservers)
            if isinstance(sub, QueueSubmitter):  # local injection is DKIM-signed (dkim.py)
                sink = sub.begin(origin="uid", sign=True)
            else:
                sink = sub.begin(origin="uid")
        inject(stream, opts, settings, sink)
    except QueueError as e:
        letter, text = qq_result(e.code, e.custom)
        raise InjectError(100 if letter == "D" else 111, text) from e
    except MemoryError as e:
        raise InjectError(111, "out of memory") from e
    except OSError as e:
        raise InjectError(111, f"unable to queue the message: {e.strerror or e}") from e
