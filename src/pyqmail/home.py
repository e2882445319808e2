"""Where a pyqmail installation lives and whose identities it runs under.

A *home* is qmail's /var/qmail tree: control/, users/, alias/, queue/. Every command
finds it from ``--home``, else ``PYQMAIL_HOME``, else ``/var/qmail``. The *users* are
qmail's eight accounts and two groups (layout.md section 3); in single-user mode
(``--single-user`` or ``PYQMAIL_SINGLE_USER=1``) every role is the invoking user.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "/var/qmail"
SPLIT = 23  # conf-split: queue subdirectories per split directory
BREAK = "-"  # conf-break: the user/extension delimiter

# qmail's role -> default account name (conf-users order: alias qmaild qmaill root
# qmailp qmailq qmailr qmails), then the two groups (nofiles, qmail).
USER_ROLES: tuple[tuple[str, str], ...] = (
    ("alias", "alias"),
    ("daemon", "qmaild"),
    ("log", "qmaill"),
    ("owner", "root"),
    ("passwd", "qmailp"),
    ("queue", "qmailq"),
    ("remote", "qmailr"),
    ("send", "qmails"),
)
GROUP_ROLES: tuple[tuple[str, str], ...] = (("nofiles", "nofiles"), ("qmail", "qmail"))


class HomeError(Exception):
    """The home or an account it needs is missing; the message says which."""


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "no", "false")


def single_user_requested(flag: bool = False) -> bool:
    """True if ``--single-user`` was given or PYQMAIL_SINGLE_USER is set to a true value."""
    return flag or _truthy(os.environ.get("PYQMAIL_SINGLE_USER"))


@dataclass(frozen=True)
class Ids:
    """Numeric ids for qmail's roles. In single-user mode every role is the caller."""

    uids: dict[str, int]
    gids: dict[str, int]
    single_user: bool

    def uid(self, role: str) -> int:
        return self.uids[role]

    def gid(self, role: str) -> int:
        return self.gids[role]


@dataclass(frozen=True)
class Home:
    """A qmail home directory and the mode pyqmail runs it in."""

    root: Path
    single_user: bool = False

    @functools.cached_property
    def control(self) -> Path:
        return self.root / "control"

    @functools.cached_property
    def queue(self) -> Path:
        return self.root / "queue"

    @functools.cached_property
    def users(self) -> Path:
        return self.root / "users"

    @functools.cached_property
    def alias(self) -> Path:
        return self.root / "alias"

    def control_file(self, name: str) -> Path:
        return self.control / name

    def ids(self) -> Ids:
        """Resolve qmail's accounts (run time, as notqmail does). Raises HomeError."""
        if self.single_user:
            uid, gid = os.getuid(), os.getgid()
            return Ids(
                {role: uid for role, _ in USER_ROLES} | {"owner": uid},
                {role: gid for role, _ in GROUP_ROLES},
                True,
            )
        uids: dict[str, int] = {}
        gids: dict[str, int] = {}
        missing: list[str] = []
        for role, name in USER_ROLES:
            try:
                uids[role] = pwd.getpwnam(name).pw_uid
            except KeyError:
                missing.append(f"user {name}")
        for role, name in GROUP_ROLES:
            try:
                gids[role] = grp.getgrnam(name).gr_gid
            except KeyError:
                missing.append(f"group {name}")
        if missing:
            raise HomeError(
                "missing qmail account(s): "
                + ", ".join(missing)
                + " (create them with 'pyqmail init --create-users', or run with --single-user)"
            )
        return Ids(uids, gids, False)


def resolve_home(arg: str | os.PathLike[str] | None = None, single_user: bool = False) -> Home:
    """The home named by ``--home``, else PYQMAIL_HOME, else /var/qmail."""
    path = os.fspath(arg) if arg else os.environ.get("PYQMAIL_HOME") or DEFAULT_HOME
    return Home(Path(os.path.abspath(path)), single_user_requested(single_user))


_warned_root = False


def warn_if_root_single_user(home: Home, prog: str) -> None:
    """Single-user mode as root delivers as root: say so once (design.md)."""
    global _warned_root
    if home.single_user and os.getuid() == 0 and not _warned_root:
        _warned_root = True
        print(
            f"{prog}: warning: single-user mode as root: deliveries run as root",
            file=sys.stderr,
        )


def make_account_dir(home: Home, name: str, uid: int, gid: int) -> None:
    """As root: make ``HOME/name`` (mode 0700, ``uid:gid``) for one account's private state
    (greylist/ for qmaild, mtasts/ for qmailr) if it is missing. The home must be root's
    and writable by nobody else; the directory is made and changed through descriptors, so
    no symlink planted by anyone is followed. An existing one is left as it is."""
    parent = os.open(home.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        st = os.fstat(parent)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise OSError(f"{home.root} is not root's alone: not making {name}/ in it")
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            return
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    finally:
        os.close(parent)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
