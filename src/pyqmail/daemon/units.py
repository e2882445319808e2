"""The files that run ``pyqmail run`` as a service: a systemd unit, daemontools run scripts.

``pyqmail service install`` (cli/service.py) writes them. This module owns their text and
how they are written:

* :func:`systemd_unit` — ``pyqmail.service``: ``Type=notify`` (daemon/notify.py), the
  watchdog, reload by HUP, a stop timeout longer than the SIGTERM drain, and hardening that
  leaves root-mode delivery into users' homes working; every choice explained in a comment;
* :func:`daemontools_scripts` — ``run`` and ``log/run`` for daemontools' supervise (and
  runit's runsv, which runs the same two scripts), logging through ``multilog``;
* :func:`install` — write them: a file that exists with other contents is refused unless
  ``force`` (nothing is half-written: each file goes through a temporary name and rename).

Root mode needs no ``setuidgid`` (nor ``User=``): ``pyqmail run`` binds its ports as root and
drops each part to its qmail user itself, and the local spawner must stay root to become
each recipient. With ``user`` (single-user mode under an ordinary account) the service
starts as that account instead.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyqmail.control import ControlError, load
from pyqmail.daemon.notify import STATUS_INTERVAL
from pyqmail.daemon.parts import STOP_TIMEOUT
from pyqmail.home import Home

UNIT_NAME = "pyqmail.service"
DRAIN_DEFAULT = 30
WATCHDOG_SEC = 60
STOP_MARGIN = 60  # seconds beyond the drain and the deliveries in flight (the committer's
# and the agents' own bounded waits)


@dataclass(frozen=True)
class ServiceFile:
    """One file to write: where (relative to the destination), what, its mode."""

    path: str
    text: str
    mode: int = 0o644


def _drain(home: Home) -> int:
    """control/timeoutdrain of ``home`` (the default when it cannot be read)."""
    try:
        return max(0, load(home).timeoutdrain)
    except (ControlError, OSError):
        return DRAIN_DEFAULT


def stop_timeout(home: Home) -> int:
    """TimeoutStopSec: the SMTP drain, then the deliveries in flight, then a margin."""
    return _drain(home) + int(STOP_TIMEOUT) + STOP_MARGIN


def _cmdline(args: Sequence[str]) -> str:
    """A command line for sh (the run scripts)."""
    return " ".join(shlex.quote(a) for a in args)


def _systemd_word(arg: str) -> str:
    """One word of ExecStart= (systemd.service(5) "Command lines"): % and $ doubled, and
    double quotes (with \\ and \" escaped) around a word with a space, quote or ;."""
    word = arg.replace("%", "%%").replace("$", "$$")
    if word and not any(c.isspace() or c in "\"'\\;" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(
    pyqmail: str, home: Home, run_args: Sequence[str], user: str | None = None
) -> ServiceFile:
    """pyqmail.service for ``pyqmail run --home HOME RUN_ARGS`` (see the module docstring)."""
    drain = _drain(home)
    exec_start = " ".join(
        _systemd_word(a) for a in [pyqmail, "run", "--home", str(home.root), *run_args]
    )
    as_user = ""
    if user is not None:
        as_user = f"""\
# Single-user mode: everything runs as {user}, who must own the home.
User={user}
"""
    text = f"""\
# pyqmail: the whole MTA (`pyqmail run`) for the home {home.root}.
# Written by `pyqmail service install --systemd`. Install and start:
#   cp {UNIT_NAME} /etc/systemd/system/ && systemctl daemon-reload
#   systemctl enable --now {UNIT_NAME}
# `systemctl reload` re-reads the control files; qmail-send's ALRM (retry every queued
# message now) goes to the main process only, which relays it:
#   systemctl kill --kill-who=main -s ALRM pyqmail
[Unit]
Description=pyqmail mail transfer agent for {home.root}
Documentation=man:pyqmail-run(1)
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
# pyqmail run says READY=1 once every listener accepts and the scheduler has rebuilt its
# schedule from the queue, so units ordered after this one find mail working.
Type=notify
# Only the main process may speak to systemd: delivery programs (.qmail |programs) run
# in this service's cgroup and must not be able to report for it.
NotifyAccess=main
{as_user}ExecStart={exec_start}
# HUP re-reads the control files (qmail-send's HUP).
ExecReload=/bin/kill -HUP $MAINPID
# TERM: the listeners close at once, SMTP sessions in DATA get control/timeoutdrain
# ({drain} s) to finish, the others get 421; then deliveries in flight get {int(STOP_TIMEOUT)} s.
KillSignal=SIGTERM
# TERM goes to the main process alone, which stops its parts in that order; at the end
# of the timeout everything left in the cgroup is killed.
KillMode=mixed
# Longer than the drain plus the deliveries in flight plus {STOP_MARGIN} s for the
# committer and the agents (it follows control/timeoutdrain when the files are rewritten).
TimeoutStopSec={stop_timeout(home)}
# The event loops ping every {int(STATUS_INTERVAL)} s; one stuck for {WATCHDOG_SEC} s gets the
# service killed (SIGABRT) and, by Restart=, started again.
WatchdogSec={WATCHDOG_SEC}
# Exit 111 (cannot start, or a part was lost) and a watchdog kill restart the service;
# a clean exit 0 after TERM does not.
Restart=on-failure
RestartSec=5
# One descriptor per SMTP session and per delivery in flight.
LimitNOFILE=65536

# Hardening that keeps root-mode delivery working. Root is needed: binding port 25,
# switching to qmail's users, and becoming each recipient to deliver into their home.
# Not set, and why:
#   ProtectHome=  deliveries write ~/Maildir and ~/Mailbox under /home (and elsewhere);
#   NoNewPrivileges=  a .qmail program may be setgid (procmail locks /var/mail as mail);
#   PrivateTmp=  a .qmail program may leave files in /tmp for other programs;
#   MemoryDenyWriteExecute=  .qmail programs may need a JIT (Perl, Java filters);
#   User=  (root mode) pyqmail run drops privileges itself, part by part.
# /usr, /boot and /etc read-only; /var (the queue, /var/mail) and homes stay writable,
# and so does the qmail home wherever it is (some sites keep it under /usr/local).
ProtectSystem=full
ReadWritePaths=-{_systemd_word(str(home.root))}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Sockets: TCP/IP for SMTP, Unix for the queue service and journald, netlink for the
# interface list (localiphost).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
    return ServiceFile(UNIT_NAME, text)


def daemontools_scripts(
    pyqmail: str,
    home: Home,
    run_args: Sequence[str],
    *,
    user: str | None = None,
    log_user: str | None = "qmaill",
    stamps: bool = False,
) -> list[ServiceFile]:
    """``run``, ``log/run`` (and the log directory's place, ``log/main``) for supervise.

    ``log_user``: multilog runs as it (qmail's qmaill), when given; ``stamps``: pyqmail
    already stamps its lines (``--log-stamps tai64n``), so multilog adds none."""
    cmd = _cmdline([pyqmail, "run", "--home", str(home.root), *run_args])
    if user is not None:
        who = (f"# Single-user mode as {user} (setuidgid: that account's uid, gid and groups).\n"
               f"exec setuidgid {shlex.quote(user)} {cmd}")  # fmt: skip
    else:
        who = ("# As root: pyqmail run binds its ports, then drops each part to qmail's users\n"
               "# itself (no setuidgid: the local spawner must become each recipient).\n"
               f"exec {cmd}")  # fmt: skip
    run = f"""\
#!/bin/sh
# pyqmail run for the home {home.root}, under daemontools' supervise or runit's runsv.
# Written by `pyqmail service install --daemontools`.
#   svc -t DIR: TERM (SMTP sessions in DATA finish, then it exits 0; supervise restarts it)
#   svc -h DIR: HUP, re-read the control files;  svc -a DIR: ALRM, retry the queue now
#   svc -d DIR: stop and leave it down;  svc -u DIR: up again
# Every log line goes to stdout, for log/run.
exec 2>&1
{who}
"""
    stamp = "" if stamps else "t "
    as_log = f"setuidgid {shlex.quote(log_user)} " if log_user else ""
    why = (
        "pyqmail stamps its own lines (--log-stamps tai64n): no 't'"
        if stamps
        else "'t': a tai64n stamp on each line (tai64nlocal makes it readable)"
    )
    log_run = f"""\
#!/bin/sh
# pyqmail's log: multilog keeps ./main/current and rotates it (10 files of 1 MB).
# {why}.
exec {as_log}multilog {stamp}./main
"""
    return [ServiceFile("run", run, 0o755), ServiceFile("log/run", log_run, 0o755)]


@dataclass
class Written:
    """What install did with each file."""

    created: list[Path]
    unchanged: list[Path]
    refused: list[Path]


def install(dest: Path, files: Sequence[ServiceFile], *, force: bool = False) -> Written:
    """Write ``files`` under ``dest`` (made if missing). A file that exists with other
    contents is refused (nothing written at all) unless ``force``; the same file is left."""
    out = Written([], [], [])
    plan: list[tuple[Path, ServiceFile]] = []
    for f in files:
        path = dest / f.path
        try:
            have = path.read_bytes()
        except FileNotFoundError:
            plan.append((path, f))
            continue
        if have == f.text.encode() and stat.S_IMODE(path.stat().st_mode) == f.mode:
            out.unchanged.append(path)
        elif force:
            plan.append((path, f))
        else:
            out.refused.append(path)
    if out.refused:
        return out
    for path, f in plan:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as fh:
            fh.write(f.text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, f.mode)
        os.rename(tmp, path)
        out.created.append(path)
    return out
