"""qmail-local's whole job (local.md section 3): one recipient, one message, one exit code.

:func:`run` is the algorithm: safety checks on the home, the loop check, the .qmail
lookup, the instructions in order (mbox, maildir and programs at once, forwards collected
and queued together at the end), and the ``did F+W+P`` / ``qp N`` report. It writes the
report to ``out`` and errors to ``err`` (the spawner points both at one pipe) and returns
qmail-local's exit code: 0, 100 (permanent) or 111 (temporary).

Everything it may need is imported with the module, not on first use: in the spawner's
workers it runs after the drop to the user's ids, when the interpreter's own library may
no longer be readable (a Python installed under /root, say).

It never changes the process's cwd: the home is held as a directory descriptor and every
user path is opened relative to it, so it can run inside a test process as well as in
the spawner's per-delivery child, which has already dropped to the user's ids.

:func:`outcome_of` maps an exit status and a report to an Outcome exactly as
qmail-lspawn does (send.md 7); :func:`deliver` runs :func:`run` and applies it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pyqmail import srs as srs_scheme
from pyqmail.control import ControlError
from pyqmail.control import load as load_control
from pyqmail.home import Home
from pyqmail.inject.getopt import Getopt, GetoptError
from pyqmail.local import dotqmail, maildir, mbox, program
from pyqmail.local.dotqmail import DotQmailError, Kind
from pyqmail.local.failure import PERM, TEMP, DeliveryFailure, strerror
from pyqmail.local.forward import forward
from pyqmail.outcome import Outcome
from pyqmail.qdate import mbox_date

TRUNCREPORT = 3000  # qmail-lspawn keeps this much of qmail-local's output
TRUNCMESS = b"\nError report too long, sorry.\n"

# Where the SRS configuration comes from (docs/srs.md): the raw bytes of control/srs, None
# when there is none (SRS is off); it may raise OSError. The spawner passes what it read
# as root (the secret need not be readable by the users); the default reads the file.
SrsSource = Callable[[], bytes | None]


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Request:
    """qmail-local's arguments: ``user home local dash ext domain sender defaultdelivery``."""

    user: str
    home: str
    local: str
    dash: str
    ext: str
    host: str
    sender: str
    defaultdelivery: str
    dry_run: bool = False
    program_timeout: float | None = program.DEFAULT_TIMEOUT  # None: the caller's business
    lock_timeout: float = 30.0
    maildir_timeout: float | None = maildir.MAILDIR_TIMEOUT  # None: the caller's business


# --- header lines (local.md 3.5) ---------------------------------------------------------

_QUOTE_OK = frozenset(
    b"!#$%&'*+-./0123456789=?ABCDEFGHIJKLMNOPQRSTUVWXYZ^_`abcdefghijklmnopqrstuvwxyz{|}~"
)


# RFC 6532 section 3.2: UTF-8 is atom text (a sender that came with SMTPUTF8); other
# 8-bit bytes are quoted, as qmail quotes them
_QUOTE_OK_UTF8 = _QUOTE_OK | frozenset(range(128, 256))


def _quote_need(box: bytes) -> bool:
    ok = _QUOTE_OK if box.isascii() or not _is_utf8(box) else _QUOTE_OK_UTF8
    if not box or any(ch not in ok for ch in box):
        return True
    return box.startswith(b".") or box.endswith(b".") or b".." in box


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def quote_address(addr: bytes) -> bytes:
    """qmail's quote2: RFC 821-quote the box part (before the last ``@``) when needed."""
    if not addr:
        return addr
    at = addr.rfind(b"@")
    box, rest = (addr, b"") if at < 0 else (addr[:at], addr[at:])
    if _quote_need(box):
        out = bytearray(b'"')
        for ch in box:
            if ch in b'\r\n"\\':
                out += b"\\"
            out.append(ch)
        box = bytes(out + b'"')
    return box + rest


_NO_BREAKS = bytes.maketrans(b"\r\n", b"__")


def dtline(local: str, host: str) -> bytes:
    """``Delivered-To: LOCAL@HOST``. qmail turns ``\\n`` into ``_``; pyqmail turns ``\\r``
    too (an address from QMQP/QMTP/inject may hold one, and a lone CR becomes a line
    break on the next hop: a header injection)."""
    return b"Delivered-To: " + _b(f"{local}@{host}").translate(_NO_BREAKS) + b"\n"


def rpline(sender: str) -> bytes:
    """``Return-Path: <SENDER>`` with qmail's quoting; CR and LF become ``_``."""
    return b"Return-Path: <" + quote_address(_b(sender)).translate(_NO_BREAKS) + b">\n"


def ufline(sender: str, when: float | None = None) -> bytes:
    raw = _b(sender)
    who = raw.translate(bytes.maketrans(b" \t\n", b"---")) if raw else b"MAILER-DAEMON"
    return b"From " + who + b" " + mbox_date(when).encode() + b"\n"


def _host_prefix(host: str, dots: int) -> str:
    """HOST2..4: HOST without its last ``dots`` dot-separated parts (whole if too few)."""
    end = len(host)
    for _ in range(dots):
        cut = host.rfind(".", 0, end)
        if cut < 0:
            break
        end = cut
    return host[:end]


def _ext_from(ext: str, n: int) -> str:
    x = ext
    for _ in range(n):
        i = x.find("-")
        x = "" if i < 0 else x[i + 1 :]
    return x


def _loops(msg_fd: int, line: bytes) -> bool:
    """bouncexf: is ``line`` one of the header lines (before the first empty line)?"""
    offset = 0
    pending = b""
    while True:
        chunk = os.pread(msg_fd, 65536, offset)
        offset += len(chunk)
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        for ln in lines:
            if not ln:
                return False
            if ln + b"\n" == line:
                return True
        if not chunk:
            return False
        if len(pending) > len(line) + 65536:
            pending = pending[-1:]  # a header line this long cannot equal ours


# --- the algorithm ----------------------------------------------------------------------


class _Report:
    """Where the report goes: qmail-local's own lines to ``out``/``err`` (or appended to
    ``sink``), programs' output to ``prog_out``/``prog_err``."""

    def __init__(self, out: int, err: int, sink: bytearray | None, program_out: int | None) -> None:
        self.out = out
        self.err = err
        self.sink = sink
        self.prog_out = out if program_out is None else program_out
        self.prog_err = err if program_out is None else program_out

    def say(self, text: bytes) -> None:
        if self.sink is not None:
            self.sink += text
        else:
            _write(self.out, text)

    def error(self, text: str) -> None:
        if not text:
            return
        if self.sink is not None:
            self.sink += _b(text) + b"\n"
        else:
            _write(self.err, _b(text) + b"\n")


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return  # the report pipe is gone; the exit code still tells the story
        view = view[n:]


def run(
    req: Request,
    msg_fd: int,
    qhome: Home,
    *,
    out: int = 1,
    err: int = 2,
    now: float | None = None,
    sink: bytearray | None = None,
    program_out: int | None = None,
    environ: Mapping[bytes, bytes] | None = None,
    srs: SrsSource | None = None,
) -> int:
    """Deliver the message on ``msg_fd`` (seekable) as qmail-local would; the exit code.

    ``srs``: control/srs's bytes (:data:`SrsSource`); None reads the file when needed.

    Programs get ``environ`` plus qmail-local's variables; None means the daemon's
    minimal environment (:func:`program.daemon_environment`), not this process's.

    The report goes to ``out`` and ``err``. A caller that collects it may instead pass
    ``sink`` (qmail-local's own lines are appended there) and ``program_out`` (programs'
    stdout and stderr): the own lines always come after every program's output (they are
    the final ``did``/``qp`` lines or the one error that stopped the delivery), so
    program output + sink is the report in order.
    """
    rep = _Report(out, err, sink, program_out)
    if environ is None:
        environ = program.daemon_environment(str(qhome.root), qhome.single_user)
    srs_cfg = _SrsConfig(srs if srs is not None else lambda: srs_scheme.read(qhome.control))
    try:
        return _run(req, msg_fd, qhome, rep, time.time() if now is None else now, environ, srs_cfg)
    except DeliveryFailure as f:
        rep.error(f.text)
        return f.code
    except DotQmailError as e:
        rep.error(str(e))
        return TEMP
    except Exception:  # a bug or an input nobody foresaw: defer, never a traceback
        rep.error("Unexpected error in local delivery. (#4.3.0)")
        return TEMP


def _run(
    req: Request,
    msg_fd: int,
    qhome: Home,
    rep: _Report,
    now: float,
    environ: Mapping[bytes, bytes],
    srs_cfg: _SrsConfig,
) -> int:
    try:
        hfd = os.open(_b(req.home), os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise DeliveryFailure(
            TEMP, f"Unable to switch to {req.home}: {strerror(e)}. (#4.3.0)"
        ) from e
    try:
        return _run_in(req, msg_fd, qhome, rep, now, hfd, environ, srs_cfg)
    finally:
        os.close(hfd)


def home_refusal(mode: int) -> str | None:
    """qmail-local's checks of the home (local.md 3.1): the temporary failure for a
    writable or sticky home directory, None when it may be delivered into. Shared with
    the RCPT check (local/verdict.py)."""
    if mode & 0o002:
        return "Uh-oh: home directory is writable. (#4.7.0)"
    if mode & 0o1000:
        return "Home directory is sticky: user is editing his .qmail file. (#4.2.1)"
    return None


def _run_in(
    req: Request,
    msg_fd: int,
    qhome: Home,
    rep: _Report,
    now: float,
    hfd: int,
    environ: Mapping[bytes, bytes],
    srs_cfg: _SrsConfig,
) -> int:
    st = os.fstat(hfd)
    refusal = home_refusal(st.st_mode)
    if refusal is not None:
        if not req.dry_run or not st.st_mode & 0o1000 or st.st_mode & 0o002:
            raise DeliveryFailure(TEMP, refusal)
        rep.error("Warning: home directory is sticky.")

    dt = dtline(req.local, req.host)
    if not req.dry_run:
        try:
            if _loops(msg_fd, dt):
                raise DeliveryFailure(
                    PERM, "This message is looping: it already has my Delivered-To line. (#5.4.6)"
                )
        except OSError as e:
            raise DeliveryFailure(TEMP, f"Unable to read message: {strerror(e)}. (#4.3.0)") from e
    rp = rpline(req.sender)
    uf = ufline(req.sender, now)

    if srs_scheme.is_srs(req.local):
        config = srs_cfg.get()
        if config is not None:  # a bounce to an address we wrote: before any .qmail
            return _srs_reverse(req, msg_fd, qhome, rep, now, dt, config, srs_cfg)

    chosen = dotqmail.choose(req.dash, req.ext, hfd)
    if dotqmail.no_mailbox(chosen, req.dash):
        raise DeliveryFailure(PERM, "Sorry, no mailbox here by that name. (#5.1.1)")

    newsender = req.sender
    if req.sender and req.sender != "#@[]":
        base = ".qmail" + req.dash + dotqmail.safe_ext(req.ext)
        if dotqmail.exists(base + "-owner", hfd):
            if dotqmail.exists(base + "-owner-default", hfd):
                newsender = f"{req.local}-owner-@{req.host}-@[]"
            else:
                newsender = f"{req.local}-owner@{req.host}"

    content = chosen.content
    forward_only = chosen.forward_only
    if not content:
        content = _b(req.defaultdelivery)
        forward_only = False
    instructions = dotqmail.parse(content)
    env: dict[bytes, bytes] = {}
    if not req.dry_run and any(ins.kind is Kind.PROGRAM for ins in instructions):
        # before anything is delivered: a refusal must not follow a partial delivery
        env = _environment(req, dt, rp, uf, newsender, chosen.default, environ)
        srs_sender = srs_cfg.program_sender(qhome, req.sender, now)
        if srs_sender is not None:  # for our forward and condredirect (docs/srs.md)
            env[b"SRSSENDER"] = _b(srs_sender)

    forward_sender = newsender
    if not req.dry_run:
        targets = [ins.arg for ins in instructions if ins.kind is Kind.FORWARD]
        if targets:  # before anything is delivered, as the environment above
            forward_sender = srs_cfg.rewrite(qhome, newsender, targets, now)

    files = forwards = programs = 0
    recipients: list[str] = []
    for ins in instructions:
        if ins.kind is Kind.LIST:
            forward_only = True
            continue
        if ins.kind in (Kind.MBOX, Kind.MAILDIR):
            files += 1
            if forward_only:
                raise DeliveryFailure(
                    TEMP, "Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)"
                )
            if req.dry_run:
                rep.say(_b(f"{ins.kind.value} {ins.arg}\n"))
            elif ins.kind is Kind.MAILDIR:
                maildir.deliver(ins.arg, msg_fd, rp + dt, dir_fd=hfd, timeout=req.maildir_timeout)
            else:
                mbox.deliver(
                    ins.arg, msg_fd, uf, rp + dt, dir_fd=hfd, lock_timeout=req.lock_timeout
                )
        elif ins.kind is Kind.PROGRAM:
            programs += 1
            if forward_only:
                raise DeliveryFailure(
                    TEMP, "Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)"
                )
            if req.dry_run:
                rep.say(_b(f"program {ins.arg}\n"))
                continue
            if program.run(
                ins.arg,
                msg_fd,
                env,
                cwd=req.home,
                timeout=req.program_timeout,
                stdout=rep.prog_out,
                stderr=rep.prog_err,
            ):
                break
        else:
            forwards += 1
            if req.dry_run:
                rep.say(_b(f"forward {ins.arg}\n"))
            else:
                recipients.append(ins.arg)

    qp = 0
    if recipients:
        qp = forward(qhome, msg_fd, dt, forward_sender, recipients)
    rep.say(_b(f"did {files}+{forwards}+{programs}\n"))
    if qp:
        rep.say(_b(f"qp {qp}\n"))
    return 0


# --- SRS (docs/srs.md) --------------------------------------------------------------------


class _SrsConfig:
    """control/srs for one delivery, read at most once and only when needed (a forward
    with a sender, or an SRS local part). Trouble reading it is temporary, as with every
    control file."""

    def __init__(self, source: SrsSource) -> None:
        self.source = source
        self._done = False
        self._value: srs_scheme.Srs | None = None

    def get(self) -> srs_scheme.Srs | None:
        if not self._done:
            try:
                raw = self.source()
            except OSError as e:
                raise DeliveryFailure(
                    TEMP, f"Unable to read control/srs: {strerror(e)}. (#4.3.0)"
                ) from e
            try:
                self._value = None if raw is None else srs_scheme.parse(raw)
            except srs_scheme.ConfigError as e:
                raise DeliveryFailure(TEMP, f"{e}. (#4.3.0)") from e
            self._done = True
        return self._value

    def rewrite(self, qhome: Home, sender: str, recipients: Sequence[str], now: float) -> str:
        """The envelope sender a forward to ``recipients`` gets: SRS0/SRS1 at the SRS
        domain when SRS is on, the sender is foreign and a recipient is foreign
        (:func:`pyqmail.srs.needs_rewrite`); else ``sender`` itself."""
        if not sender or sender == "#@[]":
            return sender
        config = self.get()
        if config is None:
            return sender
        try:
            ctl = load_control(qhome)
        except ControlError as e:
            raise DeliveryFailure(TEMP, f"{e}. (#4.3.0)") from e
        if not srs_scheme.needs_rewrite(sender, recipients, ctl.locals, ctl.virtualdomains):
            return sender
        return config.forward(sender, now)

    def program_sender(self, qhome: Home, sender: str, now: float) -> str | None:
        """``$SRSSENDER`` for programs: the SRS form of SENDER when SRS is on and SENDER
        is foreign; our ``forward`` and ``condredirect`` use it for a foreign recipient.
        None otherwise, and when control/srs or the control files cannot be read: a
        program's delivery does not depend on them (its forwards keep the sender)."""
        if not sender or sender == "#@[]":
            return None
        try:
            config = self.get()
            if config is None:
                return None
            ctl = load_control(qhome)
        except (DeliveryFailure, ControlError):
            return None
        host = sender[sender.rfind("@") + 1 :] if "@" in sender else ""
        if not host or srs_scheme.ours(host, ctl.locals, ctl.virtualdomains):
            return None
        return config.forward(sender, now)


_SRS_REFUSED = {
    srs_scheme.Failure.FORGED: "Sorry, this SRS address is forged. (#5.7.1)",
    srs_scheme.Failure.EXPIRED: "Sorry, this SRS address has expired. (#5.7.1)",
    srs_scheme.Failure.MALFORMED: "Sorry, this SRS address is malformed. (#5.7.1)",
}


def srs_refusal(config: srs_scheme.Srs, local: str, now: float) -> str | None:
    """qmail-local's permanent failure text for the SRS local part ``local``, None when it
    reverses (its hash and age are good). Shared with the RCPT check (local/verdict.py)."""
    try:
        config.reverse(local, now)
    except srs_scheme.SrsError as e:
        return _SRS_REFUSED[e.failure]
    return None


def _srs_reverse(
    req: Request,
    msg_fd: int,
    qhome: Home,
    rep: _Report,
    now: float,
    dt: bytes,
    config: srs_scheme.Srs,
    srs_cfg: _SrsConfig,
) -> int:
    """Mail for an SRS address of ours: forward it to the address it stands for, as a
    ``&address`` line would (Delivered-To, one queue submission, ``did 0+1+0``); a forged,
    expired or malformed one fails permanently."""
    try:
        target = config.reverse(req.local, now)
    except srs_scheme.SrsError as e:
        raise DeliveryFailure(PERM, _SRS_REFUSED[e.failure]) from e
    if req.dry_run:
        rep.say(_b(f"forward {target}\n"))
        rep.say(b"did 0+1+0\n")
        return 0
    sender = srs_cfg.rewrite(qhome, req.sender, [target], now)
    qp = forward(qhome, msg_fd, dt, sender, [target])
    rep.say(b"did 0+1+0\n")
    rep.say(_b(f"qp {qp}\n"))
    return 0


def _environment(
    req: Request,
    dt: bytes,
    rp: bytes,
    uf: bytes,
    newsender: str,
    default: str | None,
    base: Mapping[bytes, bytes],
) -> dict[bytes, bytes]:
    """``base`` plus qmail-local's variables (local.md 3.9). As in qmail, DEFAULT is set
    only when a ``default`` file matched; otherwise one in ``base`` is passed on.

    Refuses (permanently) a value that bash would read as a function definition: an
    address from a queue that no door of ours checked (real qmail's, a local injection)
    must not define a function in a program's shell (Shellshock, CVE-2014-6271)."""
    env = dict(base)
    env.pop(b"SRSSENDER", None)  # only qmail-local sets it (docs/srs.md)
    values = {
        "HOST": req.host,
        "HOME": req.home,
        "USER": req.user,
        "LOCAL": req.local,
        "RECIPIENT": f"{req.local}@{req.host}",
        "SENDER": req.sender,
        "NEWSENDER": newsender,
        "EXT": req.ext,
        "EXT2": _ext_from(req.ext, 1),
        "EXT3": _ext_from(req.ext, 2),
        "EXT4": _ext_from(req.ext, 3),
        "HOST2": _host_prefix(req.host, 1),
        "HOST3": _host_prefix(req.host, 2),
        "HOST4": _host_prefix(req.host, 3),
    }
    if default is not None:
        values["DEFAULT"] = default
    for key, value in values.items():
        env[key.encode()] = _b(value).split(b"\0")[0]
    env[b"DTLINE"] = dt
    env[b"RPLINE"] = rp
    env[b"UFLINE"] = uf
    for key in (*values, "DEFAULT"):
        if _function_like(env.get(key.encode(), b"")):
            raise DeliveryFailure(
                PERM,
                f"Sorry, ${key} would look like a shell function definition to a program;"
                " I won't run one with it. (#5.7.1)",
            )
    return env


def _function_like(value: bytes) -> bool:
    """bash imports a variable whose value starts with ``() {`` as a function; refuse a
    wider net (any leading blanks, any ``()``) since a value has no business looking so."""
    return value.lstrip(b" \t\n").startswith(b"()")


# --- qmail-lspawn's view of the result ----------------------------------------------------

_FIXED: dict[int, Outcome] = {
    112: Outcome.temp("Internal qmail-lspawn bug.\n"),
    113: Outcome.temp("Not allowed to perform deliveries as root.\n"),
    115: Outcome.temp("NFS failure in qmail-local.\n"),
    116: Outcome.temp("Unable to find alias user!\n"),
    117: Outcome.temp("Trouble reading users/cdb in qmail-lspawn.\n"),
    118: Outcome.temp("Temporary failure in qmail-lspawn.\n"),
    119: Outcome.temp("Out of memory in qmail-lspawn.\n"),
    120: Outcome.temp("Unable to run qmail-local.\n"),
    121: Outcome.temp("Unable to run qmail-getpw.\n"),
    126: Outcome.perm("Unable to run qmail-local.\n"),
}


def truncate_report(report: bytes) -> bytes:
    """qmail-lspawn's cut: more than 3000 bytes keep the first 2966 and a note."""
    if len(report) > TRUNCREPORT:
        return report[: TRUNCREPORT - len(TRUNCMESS) - 3] + TRUNCMESS
    return report


def outcome_of(code: int | None, report: bytes) -> Outcome:
    """qmail-lspawn's mapping; ``code`` None means qmail-local was killed by a signal."""
    if code is None:
        return Outcome.temp("qmail-local crashed.\n")
    if code in _FIXED:
        return _FIXED[code]
    text = truncate_report(report).split(b"\0")[0].decode("utf-8", "replace")
    if code == 0:
        return Outcome.ok(text)
    if code in (111, 71, 74, 75):
        return Outcome.temp(text)
    return Outcome.perm(text)


def deliver(req: Request, msg_fd: int, qhome: Home) -> Outcome:
    """Run qmail-local in this process and map its result as qmail-lspawn would.

    The report (including programs' output) goes to a memfd (swappable kernel memory,
    not the interpreter's; no file created and removed per delivery); only its first
    3000 bytes are read back.
    """
    fd = os.memfd_create("qmail-local-report", os.MFD_CLOEXEC)
    try:
        code = run(req, msg_fd, qhome, out=fd, err=fd)
        text = os.pread(fd, TRUNCREPORT + 1, 0)
    finally:
        os.close(fd)
    return outcome_of(code, text)


class UsageError(Exception):
    """qmail-local's usage error; ``str()`` is getopt's complaint first, if any
    (``illegal option -- x``), which qmail-local prints before its usage line."""


def parse_args(argv: Sequence[str]) -> Request:
    """``[-nN] user home local dash ext domain sender defaultdelivery``; raises UsageError."""
    opts = Getopt(argv, "nN", "")
    dry = False
    try:
        for letter, _arg in opts:
            dry = letter == "n"
    except GetoptError as e:
        raise UsageError(str(e)) from None
    args = opts.rest
    if len(args) != 8 or not args[1].startswith("/"):
        raise UsageError("")
    user, home, local, dash, ext, host, sender, dd = args
    return Request(user, home, local, dash, ext, host, sender, dd, dry_run=dry)
