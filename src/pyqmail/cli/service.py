"""``pyqmail service install --systemd|--daemontools [--dest DIR] [--home DIR] [--user NAME]
[--force] [pyqmail run's listener and log options]``.

Writes what runs ``pyqmail run`` as a service (daemon/units.py): ``pyqmail.service`` for
systemd (default destination /etc/systemd/system), or a daemontools/runit service
directory with ``run`` and ``log/run`` (default HOME/supervise/pyqmail; link it into the
scan directory, /etc/service on Debian). Without a listener option the service listens
for SMTP on 0.0.0.0:25. A file that exists with other contents is refused unless
``--force``; every file written is printed.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.cli.common import fatal
from pyqmail.cli.run import add_run_options, run_argv
from pyqmail.daemon import units
from pyqmail.home import Home, resolve_home

PROG = "pyqmail service"
SYSTEMD_DIR = Path("/etc/systemd/system")
LOG_USER = "qmaill"


def _pyqmail() -> str:
    """The pyqmail command the service runs: this installation's."""
    beside = Path(sys.executable).parent / "pyqmail"
    if beside.exists():
        return str(beside)
    return shutil.which("pyqmail") or os.path.abspath(sys.argv[0])


def _account(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _log_dir(dest: Path, owner: pwd.struct_passwd | None) -> Path:
    """log/main, where multilog writes: owned by the account multilog runs as."""
    main = dest / "log" / "main"
    main.mkdir(parents=True, exist_ok=True)
    if owner is not None and os.geteuid() == 0:
        os.chown(main, owner.pw_uid, owner.pw_gid)
    main.chmod(0o755)
    return main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="write the files that run pyqmail "
                                "as a service (systemd, or daemontools/runit)")  # fmt: skip
    p.add_argument("action", choices=("install",), help="install: write the files")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--systemd", action="store_true",
                      help="a systemd unit, pyqmail.service (Type=notify, watchdog)")  # fmt: skip
    kind.add_argument("--daemontools", action="store_true",
                      help="a service directory with run and log/run (multilog)")  # fmt: skip
    p.add_argument("--dest", metavar="DIR",
                   help="where to write (default /etc/systemd/system, or "
                        "HOME/supervise/pyqmail for daemontools)")  # fmt: skip
    p.add_argument("--home", help="the qmail home (else PYQMAIL_HOME, else /var/qmail)")
    p.add_argument("--user", metavar="NAME",
                   help="run in single-user mode as this account (default: root mode)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace files that differ")
    add_run_options(p)
    a = p.parse_args(argv)
    if a.user is not None:
        if _account(a.user) is None:
            return fatal(PROG, f"no such account: {a.user}", 100)
        a.single_user = True
    home: Home = resolve_home(a.home, a.single_user)
    a.single_user = home.single_user  # PYQMAIL_SINGLE_USER=1 counts, as for pyqmail run
    if not (a.smtp or a.smtps or a.submission or a.qmqp or a.qmtp):
        a.smtp = ["0.0.0.0:25"]
    args = run_argv(a)
    if a.systemd:
        dest = Path(a.dest) if a.dest else SYSTEMD_DIR
        files = [units.systemd_unit(_pyqmail(), home, args, a.user)]
    else:
        dest = Path(a.dest) if a.dest else home.root / "supervise" / "pyqmail"
        log_owner = _account(a.user) if a.user else _account(LOG_USER)
        if os.geteuid() != 0 and a.user is None:
            log_owner = None  # multilog as the invoking user: no setuidgid
        files = units.daemontools_scripts(
            _pyqmail(), home, args, user=a.user,
            log_user=log_owner.pw_name if log_owner is not None else None,
            stamps=a.log_stamps == "tai64n",
        )  # fmt: skip
    dest = dest.absolute()
    try:
        done = units.install(dest, files, force=a.force)
    except OSError as e:
        return fatal(PROG, f"unable to write in {dest}: {e}", 111)
    for path in done.refused:
        print(f"{PROG}: {path} exists and differs; not replaced (--force replaces it)",
              file=sys.stderr)  # fmt: skip
    if done.refused:
        return 100
    for path in done.created:
        print(f"wrote {path}")
    for path in done.unchanged:
        print(f"unchanged {path}")
    if a.systemd:
        print(f"next: systemctl daemon-reload && systemctl enable --now {units.UNIT_NAME}")
    else:
        print(f"made {_log_dir(dest, log_owner)}")
        print(f"next: ln -s {dest} /etc/service/ (svscan starts it; runit: /etc/service too)")
    return 0
