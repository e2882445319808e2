"""HOME/bin: qmail's command names, each a wrapper bound to its home, and the sendmail link.

A qmail home has its programs in ``HOME/bin`` and the world calls them there:
``/usr/sbin/sendmail`` links to ``/var/qmail/bin/sendmail``, PHP and cron run
``bin/sendmail`` or ``bin/qmail-inject``, filters exec ``bin/qmail-queue``. Each name
here is a small ``#!/bin/sh`` script that sets PYQMAIL_HOME to its home (and
PYQMAIL_SINGLE_USER for a single-user home), then execs the interpreter that ran
``pyqmail init`` by absolute path in isolated mode (``-I``: no current directory,
PYTHONPATH or user site on the import path, so root running it from /tmp imports
nothing planted there).

Invariants: a wrapper is written atomically (a temporary name, then rename), mode 0755,
owned by root:qmail in root mode (by the caller in single-user mode), so no lesser
account can change what a caller of HOME/bin runs. A file in HOME/bin that is not a
pyqmail wrapper (a real qmail program, mixed in on purpose) is never replaced. In root
mode nothing is written into a bin directory that is not root's alone.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.home import Home, Ids

# qmail's command names and their modules: every console script of pyproject.toml but
# pyqmail itself (the administrative command, which takes --home) and ucspi-tcp's
# tcprules/tcprulescheck (not qmail programs; they take their files as arguments).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("qmail-showctl", "showctl"),
    ("qmail-newmrh", "newmrh"),
    ("qmail-queue", "queue"),
    ("qmail-qread", "qread"),
    ("qmail-qstat", "qstat"),
    ("qmail-smtpd", "smtpd"),
    ("qmail-newu", "newu"),
    ("qmail-pw2u", "pw2u"),
    ("qmail-getpw", "getpw"),
    ("qmail-local", "local"),
    ("qmail-remote", "remote"),
    ("qmail-tcpto", "tcpto"),
    ("qmail-tcpok", "tcpok"),
    ("qmail-inject", "inject"),
    ("sendmail", "sendmail"),
    ("qmail-qmqpc", "qmqpc"),
    ("qmail-qmqpd", "qmqpd"),
    ("qmail-qmtpd", "qmtpd"),
    ("maildirmake", "maildirmake"),
    ("maildir2mbox", "maildir2mbox"),
    ("forward", "forward"),
    ("condredirect", "condredirect"),
    ("bouncesaying", "bouncesaying"),
    ("except", "except_"),
    ("preline", "preline"),
)

SENDMAIL_LINK = Path("/usr/sbin/sendmail")
_MARK = b"#!/bin/sh\n# pyqmail wrapper: "


@dataclass
class BinReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files that are not ours, left alone


class BinError(Exception):
    """HOME/bin cannot be written safely; the message says why."""


def wrapper(home: Home, name: str, module: str, python: str = sys.executable) -> bytes:
    """The script for ``name``: bound to ``home``, running ``pyqmail.cli.<module>``."""
    code = (
        f'import sys; sys.argv[0] = "{name}"; '
        f"from pyqmail.cli.{module} import main; sys.exit(main())"
    )
    lines = [
        f"{_MARK.decode()}{name} for the qmail home {str(home.root)!a}"
        " (made by pyqmail init, which rewrites this file)",
        f"PYQMAIL_HOME={shlex.quote(str(home.root))}",
        "export PYQMAIL_HOME",
    ]
    if home.single_user:
        lines += ["PYQMAIL_SINGLE_USER=1", "export PYQMAIL_SINGLE_USER"]
    lines.append(f'exec {shlex.quote(python)} -I -c {shlex.quote(code)} "$@"')
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def _check_dir(bindir: Path, root_mode: bool) -> None:
    st = os.lstat(bindir)
    if not stat.S_ISDIR(st.st_mode):
        raise BinError(f"{bindir} is not a directory")
    if root_mode and (st.st_uid != 0 or st.st_mode & 0o022):
        mode = stat.S_IMODE(st.st_mode)
        raise BinError(
            f"{bindir} is not root's alone (owner uid {st.st_uid}, mode {mode:o}); "
            "not writing programs there"
        )


def _write(path: Path, content: bytes, owner: tuple[int, int] | None) -> None:
    tmp = path.with_name(f".{path.name}.init-tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
    try:
        os.write(fd, content)
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, 0o755)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def install_wrappers(home: Home, ids: Ids | None, python: str = sys.executable) -> BinReport:
    """Write every missing or outdated wrapper into HOME/bin (the directory must exist)."""
    report = BinReport()
    root_mode = ids is not None and not ids.single_user and os.geteuid() == 0
    bindir = home.root / "bin"
    _check_dir(bindir, root_mode)
    owner = (0, ids.gid("qmail")) if root_mode and ids is not None else None
    for name, module in COMMANDS:
        path = bindir / name
        want = wrapper(home, name, module, python)
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                report.kept.append(str(path))
                continue
            with open(path, "rb") as f:
                have = f.read(len(want) + 1)
            if not have.startswith(_MARK):
                report.kept.append(str(path))
                continue
            mode_ok = stat.S_IMODE(st.st_mode) == 0o755
            owner_ok = owner is None or (st.st_uid, st.st_gid) == owner
            if have == want and mode_ok and owner_ok:
                continue
        _write(path, want, owner)
        report.created.append(str(path))
    return report


QUEUE_UNIT = "pyqmail-queue.service"


def queue_unit(home: Home) -> bytes:
    """A systemd unit running the queue service for ``home`` on its own, so that local
    users' qmail-inject, sendmail and qmail-queue can queue while pyqmail run is stopped
    (root's write the queue themselves). pyqmail run leaves a live service's socket alone."""
    bindir = str(home.root / "bin")
    exe = f'"{bindir}/qmail-queue"' if any(c.isspace() for c in bindir) else f"{bindir}/qmail-queue"
    return f"""\
# pyqmail's queue service for the home {home.root}: local users' mail is queued through
# it (Python programs cannot be setuid). It drops to qmailq itself.
#   systemd:     cp {home.root}/doc/{QUEUE_UNIT} /etc/systemd/system/
#                systemctl enable --now {QUEUE_UNIT}
#   daemontools: a service directory whose run script is
#                exec {bindir}/qmail-queue --serve 2>&1
[Unit]
Description=pyqmail queue service (qmail-queue for local users) for {home.root}
After=local-fs.target

[Service]
ExecStart={exe} --serve
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
""".encode()


def _qmail_like(target: str, link: Path) -> bool:
    """A link to some qmail home's bin/sendmail: qmail-inject sits beside it."""
    full = Path(target) if os.path.isabs(target) else link.parent / target
    return (
        full.name == "sendmail"
        and full.parent.name == "bin"
        and (full.parent / "qmail-inject").exists()
    )


def sendmail_link(home: Home, link: Path = SENDMAIL_LINK) -> tuple[bool, str]:
    """Make ``link`` a symlink to HOME/bin/sendmail; (done, what happened).

    Replaces only a missing name or a link to another qmail-like sendmail (and says
    so); a program of another MTA, or any other file, is left alone.
    """
    ours = str(home.root / "bin" / "sendmail")
    try:
        old: str | None = os.readlink(link)
    except FileNotFoundError:
        old = None
    except OSError:
        return False, (f"not replacing {link}: it is not a link (another MTA's sendmail?); "
                       f"to use pyqmail's: ln -sf {ours} {link}")  # fmt: skip
    if old == ours:
        return True, f"{link} already links to {ours}"
    if old is not None and not _qmail_like(old, link):
        return False, (f"not replacing {link}: it links to {old}, not a qmail sendmail; "
                       f"to use pyqmail's: ln -sf {ours} {link}")  # fmt: skip
    tmp = link.with_name(f".{link.name}.pyqmail-tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(ours, tmp)
    os.rename(tmp, link)
    if old is None:
        return True, f"created {link} -> {ours}"
    return True, f"replaced {link} -> {ours} (it linked to {old})"


def sendmail_hint(home: Home, link: Path = SENDMAIL_LINK) -> str | None:
    """What to run to make ``link`` pyqmail's, or None if it already is."""
    ours = str(home.root / "bin" / "sendmail")
    try:
        if os.readlink(link) == ours:
            return None
    except OSError:
        pass
    return (f"{link} is not {ours}: `pyqmail init {home.root} --sendmail-link` makes it "
            f"(it replaces only a link to a qmail sendmail)")  # fmt: skip
