"""Creating a home the way qmail's install plus ``config-fast FQDN`` do (layout.md).

Idempotent: a second run creates what is missing and changes nothing that exists (but
the HOME/bin wrappers of homebin.py, which it brings up to date). As
root in multi-user mode the owners and modes are qmail's; in single-user mode everything
belongs to the invoking user with the same modes.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.home import GROUP_ROLES, SPLIT, USER_ROLES, Home, Ids
from pyqmail.homebin import QUEUE_UNIT, install_wrappers, queue_unit

# (path relative to queue/, owner role, mode, split into SPLIT subdirectories)
QUEUE_DIRS: tuple[tuple[str, str, int, bool], ...] = (
    ("", "queue", 0o750, False),
    ("pid", "queue", 0o700, False),
    ("intd", "queue", 0o700, False),
    ("todo", "queue", 0o750, False),
    ("bounce", "send", 0o700, False),
    ("mess", "queue", 0o750, True),
    ("info", "send", 0o700, True),
    ("local", "send", 0o700, True),
    ("remote", "send", 0o700, True),
    ("lock", "queue", 0o750, False),
)

ALIASES = ("postmaster", "mailer-daemon", "root")


@dataclass
class Report:
    """What init did, one line per thing created."""

    created: list[str]
    kept: list[str] = field(default_factory=list)  # HOME/bin files that are not pyqmail's


def default_fqdn() -> str:
    name = socket.getfqdn()
    if "." not in name:
        try:
            name = (
                subprocess.run(
                    ["hostname", "-f"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or name
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return name


def defaultdomain_of(fqdn: str) -> str:
    """config-fast's defaultdomain: the name without its first label (if it has 3+)."""
    parts = fqdn.split(".")
    return ".".join(parts[1:]) if len(parts) >= 3 else fqdn


def plusdomain_of(fqdn: str) -> str:
    """config-fast's plusdomain: the last two labels."""
    parts = fqdn.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else fqdn


def create_users() -> list[str]:
    """Create qmail's groups and users that are missing (Debian's groupadd/useradd)."""
    import grp
    import pwd

    made = []
    for _, name in GROUP_ROLES:
        try:
            grp.getgrnam(name)
        except KeyError:
            subprocess.run(["groupadd", "--system", name], check=True)
            made.append(f"group {name}")
    for role, name in USER_ROLES:
        if role == "owner":
            continue
        try:
            pwd.getpwnam(name)
        except KeyError:
            group = "qmail" if role in ("queue", "remote", "send") else "nofiles"
            homedir = "/var/qmail/alias" if role == "alias" else "/var/qmail"
            subprocess.run(
                ["useradd", "--system", "-g", group, "-d", homedir, "-s", "/usr/sbin/nologin",
                 "-M", name],
                check=True,
            )  # fmt: skip
            made.append(f"user {name}")
    return made


class _Maker:
    def __init__(self, ids: Ids | None, report: Report) -> None:
        self.ids = ids
        self.report = report

    def _own(self, path: Path, user: str, group: str) -> None:
        if self.ids is not None and not self.ids.single_user and os.geteuid() == 0:
            os.lchown(path, self.ids.uid(user), self.ids.gid(group))

    def dir(self, path: Path, mode: int, user: str = "owner", group: str = "qmail") -> None:
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)
            self._own(path, user, group)
            self.report.created.append(str(path) + "/")

    def file(self, path: Path, content: bytes, mode: int = 0o644, user: str = "owner",
             group: str = "qmail") -> None:  # fmt: skip
        if not path.exists():
            tmp = path.with_name(path.name + ".init-tmp")
            tmp.write_bytes(content)
            os.chmod(tmp, mode)
            self._own(tmp, user, group)
            os.rename(tmp, path)
            self.report.created.append(str(path))

    def fifo(self, path: Path, mode: int, user: str, group: str = "qmail") -> None:
        if not path.exists():
            os.mkfifo(path)
            os.chmod(path, mode)
            self._own(path, user, group)
            self.report.created.append(str(path))


def create_queue(home: Home, ids: Ids | None) -> Report:
    """Create queue/ with its split subdirectories and lock files (missing parts only)."""
    report = Report([])
    mk = _Maker(ids, report)
    q = home.queue
    for name, role, mode, split in QUEUE_DIRS:
        d = q / name if name else q
        mk.dir(d, mode, role)
        if split:
            for i in range(SPLIT):
                mk.dir(d / str(i), mode, role)
    mk.file(q / "lock" / "tcpto", b"\0" * 1024, 0o644, "remote")
    mk.file(q / "lock" / "sendmutex", b"", 0o600, "send")
    mk.fifo(q / "lock" / "trigger", 0o622, "send")
    return report


def create_home(home: Home, me: str, ids: Ids | None) -> Report:
    """Make every missing part of a home; ``me`` fills the config-fast files."""
    report = Report([])
    mk = _Maker(ids, report)
    root = home.root
    mk.dir(root, 0o755)
    for sub in ("control", "users", "bin", "doc"):
        mk.dir(root / sub, 0o755)
    mk.file(root / "doc" / QUEUE_UNIT, queue_unit(home))
    c = root / "control"
    mk.file(c / "me", f"{me}\n".encode())
    mk.file(c / "defaultdomain", f"{defaultdomain_of(me)}\n".encode())
    mk.file(c / "plusdomain", f"{plusdomain_of(me)}\n".encode())
    mk.file(c / "locals", f"{me}\n".encode())
    mk.file(c / "rcpthosts", f"{me}\n".encode())
    mk.file(c / "defaultdelivery", b"./Maildir/\n")
    mk.dir(root / "alias", 0o2755, "alias")
    for sub in ("", "cur", "new", "tmp"):
        mk.dir(root / "alias" / "Maildir" / sub if sub else root / "alias" / "Maildir", 0o700,
               "alias")  # fmt: skip
    for name in ALIASES:
        mk.file(root / "alias" / f".qmail-{name}", b"./Maildir/\n", 0o644, "alias")
    report.created += create_queue(home, ids).created
    bins = install_wrappers(home, ids)
    report.created += bins.created
    report.kept += bins.kept
    return report
