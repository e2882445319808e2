"""What pyqmail makes of a live qmail home: control files, users, .qmail files and the queue.

Everything here only reads. Each finding is a :class:`Note`: ``same`` (pyqmail reads it as
qmail does), ``differs`` (read, with a difference the operator should know),
``unsupported`` (not carried over: why, and what to do instead), ``blocker`` (adopting now
would go wrong; adopt stops) or ``info``.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyqmail.home import SPLIT

_SAME = frozenset(
    {
        "me",
        "locals",
        "rcpthosts",
        "morercpthosts",
        "morercpthosts.cdb",
        "badmailfrom",
        "bouncefrom",
        "bouncehost",
        "defaultdomain",
        "defaulthost",
        "doublebouncehost",
        "doublebounceto",
        "envnoathost",
        "helohost",
        "idhost",
        "localiphost",
        "percenthack",
        "plusdomain",
        "queuelifetime",
        "smtpgreeting",
        "timeoutconnect",
        "timeoutremote",
        "timeoutsmtpd",
        "virtualdomains",
        "databytes",
        "qmqpservers",
        "defaultdelivery",
        "tcp.smtp",
        "tcp.smtp.cdb",
        "tcp.qmqp",
        "tcp.qmqp.cdb",
        "tcp.qmtp",
        "tcp.qmtp.cdb",
        "tlsdestinations",
        "destinationlimits",
        "qmtproutes",
        "spawnlimit",
    }
)

# name -> (what differs)
_DIFFERS = {
    "concurrencyincoming": "the LWQ run script's tcpserver -c, read by pyqmail run's SMTP "
    "listener itself (over it: 421, where tcpserver holds the client back)",
    "rbllist": "pyqmail run's block lists (zone, or zone:text, a line: rblsmtpd's -r); "
    "an RBL patch's other formats are not read",
    "concurrencylocal": "no compile-time cap of 120 (conf-spawn): the value is used as "
    "written, up to control/spawnlimit (default 1000)",
    "concurrencyremote": "no compile-time cap of 120 (conf-spawn): the value is used as "
    "written, up to control/spawnlimit (default 1000)",
    "smtproutes": "read as qmail does, with `relay:port`; the qmail-remote-auth patch's "
    "`domain:relay:port user pass` credentials are not used: write them as "
    "`relay:user:pass` in control/smtproutesauth (qmailr's, mode 0600)",
    "morercpthosts.tmp": "qmail-newmrh's temporary file; ignored",
}

# name (or prefix ending in "/") -> (the patch that reads it, what to do instead)
_UNSUPPORTED = {
    "servercert.pem": (
        "the qmail-tls patch (STARTTLS in qmail-smtpd)",
        "keep the certificate; configure pyqmail's TLS listener with it, or "
        "keep STARTTLS in front with a TLS proxy",
    ),
    "clientcert.pem": (
        "the qmail-tls patch (client certificate for qmail-remote)",
        "pyqmail's remote delivery uses opportunistic STARTTLS without one",
    ),
    "clientca.pem": ("the qmail-tls patch (client certificate checks)", "no equivalent yet"),
    "clientcrl.pem": ("the qmail-tls patch (client certificate checks)", "no equivalent yet"),
    "tlsserverciphers": ("the qmail-tls patch", "pyqmail uses the ssl module's defaults"),
    "tlsclientciphers": ("the qmail-tls patch", "pyqmail uses the ssl module's defaults"),
    "tlsclients": ("the qmail-tls patch", "no equivalent yet"),
    "tlshosts/": (
        "the qmail-tls patch (verified TLS per host)",
        "list the domains in control/tlsdestinations (TLS required)",
    ),
    "notlshosts/": ("the qmail-tls patch", "no equivalent: TLS is tried and falls back"),
    "dh2048.pem": ("the qmail-tls patch", "not needed: the ssl module's defaults"),
    "dh1024.pem": ("the qmail-tls patch", "not needed: the ssl module's defaults"),
    "dh512.pem": ("the qmail-tls patch", "not needed: the ssl module's defaults"),
    "rsa2048.pem": ("the qmail-tls patch", "not needed: the ssl module's defaults"),
    "rsa512.pem": ("the qmail-tls patch", "not needed: the ssl module's defaults"),
    "validrcptto.cdb": (
        "the validrcptto patch (recipient checks at RCPT)",
        "pyqmail run accepts every rcpthosts recipient, as qmail does; "
        "unknown users bounce after the fact",
    ),
    "validrcptto": ("the validrcptto patch", "as validrcptto.cdb"),
    "badrcptto": ("the badrcptto patch", "use a .qmail-default with bouncesaying"),
    "morebadrcptto": ("the badrcptto patch", "use a .qmail-default with bouncesaying"),
    "authsenders": (
        "the qmail-remote-auth patch (SMTP AUTH to a smarthost)",
        "relay through a local smarthost that authenticates, via smtproutes",
    ),
    "domainkeys/": (
        "the qmail-dkim/domainkeys patch (signing keys)",
        "sign with a QMAILREMOTE wrapper, or pyqmail's DKIM when it is enabled",
    ),
    "dkimkeys": ("the qmail-dkim patch", "as domainkeys/"),
    "signaturedomains": ("the qmail-dkim patch", "as domainkeys/"),
    "nosignaturedomains": ("the qmail-dkim patch", "as domainkeys/"),
    "dnsbl": ("an RBL patch", "keep rblsmtpd in front of the SMTP service"),
    "spfbehavior": ("the qmail-spf patch", "no SPF checks in pyqmail run"),
    "spfrules": ("the qmail-spf patch", "no SPF checks in pyqmail run"),
    "spfexp": ("the qmail-spf patch", "no SPF checks in pyqmail run"),
    "spfguess": ("the qmail-spf patch", "no SPF checks in pyqmail run"),
    "maxrcpt": ("the maxrcpt patch", "pyqmail's SMTP server has its own recipient limit"),
    "tarpitcount": ("the tarpit patch", "no tarpit in pyqmail run"),
    "tarpitdelay": ("the tarpit patch", "no tarpit in pyqmail run"),
    "greetdelay": ("the greetdelay patch", "`pyqmail smtpd --listen A:P --greet-delay N`"),
    "mfcheck": ("the mfcheck patch", "no sender-domain DNS check in pyqmail run"),
    "badhelo": ("the qregex patch", "no HELO checks in pyqmail run"),
    "badmailto": ("the qregex patch", "use a .qmail-default with bouncesaying"),
    "badmailfromre": ("the qregex patch", "list exact senders in badmailfrom"),
    "outgoingip": ("the outgoingip patch", "bind the host's primary address to it"),
    "bindroutes": ("the bindroutes patch", "no per-route source address in pyqmail run"),
    "smtpplugins": ("qmail-spp", "wrap the queue with a QMAILQUEUE filter instead"),
}


@dataclass(frozen=True, slots=True)
class Note:
    """One line of adopt's report."""

    kind: str  # same | differs | unsupported | blocker | info
    subject: str
    text: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.text}"


def control_notes(control: Path) -> list[Note]:
    """Every file (and directory) in control/, sorted, with what pyqmail does with it."""
    notes: list[Note] = []
    try:
        names = sorted(os.listdir(control))
    except OSError as e:
        return [Note("blocker", "control/", f"unreadable: {e.strerror}")]
    for name in names:
        key = name + "/" if (control / name).is_dir() else name
        subject = f"control/{key}"
        if key in _SAME:
            notes.append(Note("same", subject, "read as qmail reads it"))
        elif key in _DIFFERS:
            notes.append(Note("differs", subject, _DIFFERS[key]))
        elif key in _UNSUPPORTED:
            patch, instead = _UNSUPPORTED[key]
            notes.append(
                Note("unsupported", subject, f"read by {patch}, not by pyqmail; instead: {instead}")
            )
        elif key.endswith((".tmp", "~", ".bak", ".orig")):
            notes.append(Note("info", subject, "a leftover or backup file; nothing reads it"))
        else:
            notes.append(
                Note(
                    "unsupported",
                    subject,
                    "no qmail program or known patch reads "
                    'this name; pyqmail ignores it (qmail-showctl: "I have no idea '
                    'what this file does")',
                )
            )
    return notes


def users_notes(users: Path) -> list[Note]:
    """users/assign and users/cdb: qmail-newu's format is pyqmail's."""
    assign, cdb = users / "assign", users / "cdb"
    notes: list[Note] = []
    if not assign.exists():
        notes.append(
            Note(
                "info",
                "users/assign",
                "absent: every user comes from the password file (qmail-getpw's rules)",
            )
        )
        return notes
    notes.append(Note("same", "users/assign", "read as qmail reads it (through users/cdb)"))
    if not cdb.exists():
        notes.append(
            Note(
                "differs",
                "users/cdb",
                "absent: qmail then ignores users/assign; "
                "run `pyqmail newu --home HOME` (qmail-newu) to use it",
            )
        )
    elif cdb.stat().st_mtime < assign.stat().st_mtime:
        notes.append(
            Note(
                "differs",
                "users/cdb",
                "older than users/assign: qmail and pyqmail "
                "both use the old cdb until qmail-newu runs",
            )
        )
    else:
        notes.append(Note("same", "users/cdb", "qmail-newu's cdb, read as it is"))
    return notes


def assign_homes(users: Path) -> list[Path]:
    """The home directories users/assign names (``=`` and ``+`` lines)."""
    homes: list[Path] = []
    try:
        text = (users / "assign").read_text(errors="replace")
    except OSError:
        return homes
    for line in text.splitlines():
        if line[:1] in ("=", "+"):
            fields = line[1:].split(":")
            if len(fields) >= 5 and fields[4].startswith("/"):
                homes.append(Path(fields[4]))
    return list(dict.fromkeys(homes))


def dotqmail_notes(dirs: list[Path], qmail_bin: Path) -> list[Note]:
    """The .qmail files in ``dirs``: pyqmail reads them as qmail-local does; what to know."""
    counts = {"files": 0, "program": 0, "forward": 0, "maildir": 0, "mbox": 0}
    notes: list[Note] = []
    for d in dirs:
        try:
            names = sorted(n for n in os.listdir(d) if n == ".qmail" or n.startswith(".qmail-"))
        except OSError:
            continue
        for name in names:
            path = d / name
            try:
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            counts["files"] += 1
            if st.st_mode & 0o002:
                notes.append(
                    Note(
                        "differs",
                        str(path),
                        "world-writable: qmail-local and "
                        "pyqmail both defer its deliveries; chmod o-w",
                    )
                )
            for line in lines:
                if not line or line.startswith("#"):
                    continue
                if line.startswith("|"):
                    counts["program"] += 1
                    if str(qmail_bin) in line:
                        notes.append(
                            Note(
                                "info",
                                str(path),
                                f"`{line}` runs qmail's own program, which adopt keeps in place",
                            )
                        )
                elif line.startswith(("/", ".")):
                    counts["maildir" if line.endswith("/") else "mbox"] += 1
                else:
                    counts["forward"] += 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    notes.insert(0, Note("same", ".qmail files", f"read as qmail-local reads them ({summary})"))
    return notes


def _held(path: Path) -> bool | None:
    """Whether a process holds a lock on ``path`` (qmail-send's lock/sendmutex); None: absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def queue_notes(queue: Path, queue_uid: int | None) -> list[Note]:
    """Whether pyqmail (or qmail, for the way back) can take over ``queue`` as it is."""
    notes: list[Note] = []
    if not queue.is_dir():
        return [Note("blocker", "queue/", "absent")]
    held = _held(queue / "lock" / "sendmutex")
    if held:
        notes.append(
            Note(
                "blocker",
                "queue/lock/sendmutex",
                "held: qmail-send (or pyqmail "
                "run) is running on this queue; stop it first (svc -d)",
            )
        )
    entries: dict[str, set[str]] = {}
    for sub in ("todo", "intd", "bounce", "pid"):
        try:
            entries[sub] = set(os.listdir(queue / sub))
        except OSError:
            entries[sub] = set()
    counts = {sub: len(names) for sub, names in entries.items()}
    counts["intd"] = len(entries["intd"] - entries["todo"])  # intd/N with todo/N is complete
    mess = 0
    wrong_owner: list[str] = []
    odd: list[str] = []
    for s in range(SPLIT):
        try:
            names = os.listdir(queue / "mess" / str(s))
        except OSError:
            continue
        for n in names:
            mess += 1
            path = queue / "mess" / str(s) / n
            try:
                st = path.lstat()
            except OSError:
                continue
            if not n.isdigit() or int(n) % SPLIT != s:
                odd.append(f"mess/{s}/{n}")
            elif st.st_ino != int(n):
                odd.append(f"mess/{s}/{n} (inode {st.st_ino})")
            if queue_uid is not None and st.st_uid != queue_uid:
                wrong_owner.append(f"mess/{s}/{n}")
    notes.append(
        Note(
            "same",
            "queue/",
            f"qmail's layout, delivered as it is: {mess} "
            f"message(s), {counts['todo']} todo entr(ies) not yet preprocessed, "
            f"{counts['bounce']} bounce file(s)",
        )
    )
    if counts["pid"] or counts["intd"]:
        notes.append(
            Note(
                "info",
                "queue/pid, queue/intd",
                f"{counts['pid']} pid and "
                f"{counts['intd']} intd file(s) from writers that stopped: removed "
                "at start when no writer holds them, as qmail-clean does",
            )
        )
    if wrong_owner:
        notes.append(
            Note(
                "blocker",
                "queue/mess",
                f"{len(wrong_owner)} message file(s) not "
                f"owned by the queue user (e.g. {wrong_owner[0]}): qmail-lspawn "
                "and pyqmail refuse them; chown them to qmailq",
            )
        )
    if odd:
        notes.append(
            Note(
                "differs",
                "queue/mess",
                f"{len(odd)} file(s) whose name is not "
                f"their inode number (e.g. {odd[0]}): a queue copied file by file; "
                "both MTAs deliver them, but new messages may collide with these "
                "numbers: let the queue drain before copying it",
            )
        )
    extra = sorted(
        n
        for n in os.listdir(queue)
        if n not in {"pid", "intd", "todo", "bounce", "mess", "info", "local", "remote", "lock"}
    )
    if extra:
        notes.append(Note("info", "queue/", f"other entries qmail ignores: {', '.join(extra)}"))
    return notes


def sendmutex_held(queue: Path) -> bool:
    """True while a qmail-send or pyqmail run holds the queue."""
    return bool(_held(queue / "lock" / "sendmutex"))
