"""``pyqmail adopt``'s plan: what it found, what it will change, and the way back.

:func:`make_plan` only reads: the control files, users, .qmail files and the queue
(:mod:`pyqmail.adopt.site`), qmail's ``rc`` and the run scripts of daemontools or runit
(:mod:`pyqmail.adopt.services`). It returns the report, line by line, the equivalent
``pyqmail run`` command line, and the files it would write:

- ``control/defaultdelivery`` from the rc's ``qmail-start`` argument, when absent;
- the qmail-send service's ``run`` script swapped for one that runs ``pyqmail run`` with the
  SMTP (and QMQP/QMTP) services' listeners and rules folded in; those services' ``run``
  scripts become placeholders, with a ``down`` file.

:func:`apply` writes them, after copying every file it replaces to
``HOME/pyqmail-adopt/backup/<absolute path>`` and recording each in
``HOME/pyqmail-adopt/manifest.json``. Nothing of qmail's is deleted. :func:`rollback`
copies the backups back, moves the files adopt created to ``HOME/pyqmail-adopt/after/``,
and checks that qmail can take the queue (pyqmail writes qmail's format).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyqmail.adopt.services import Service, read_service
from pyqmail.adopt.site import (
    Note,
    assign_homes,
    control_notes,
    dotqmail_notes,
    queue_notes,
    sendmutex_held,
    users_notes,
)
from pyqmail.durable import replace_file
from pyqmail.home import Home, HomeError

SERVICE_DIRS = (Path("/service"), Path("/etc/service"), Path("/var/service"))
STATE = "pyqmail-adopt"


@dataclass(frozen=True, slots=True)
class Change:
    """A file adopt writes (replacing or creating it)."""

    path: Path
    content: bytes
    mode: int
    why: str


@dataclass
class Plan:
    home: Path
    notes: list[Note] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    run_argv: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)  # what the operator does next

    @property
    def blocked(self) -> bool:
        return any(n.kind == "blocker" for n in self.notes)

    def lines(self) -> list[str]:
        out = [str(n) for n in self.notes]
        out.append("pyqmail run command: " + " ".join(_quote(a) for a in self.run_argv))
        for c in self.changes:
            out.append(f"will write {c.path}: {c.why}")
        out += [f"then: {a}" for a in self.after]
        return out


def _quote(word: str) -> str:
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./_-[]")
    return word if word and set(word) <= safe else "'" + word.replace("'", "'\\''") + "'"


def find_services(home: Path, dirs: list[Path] | None) -> list[Path]:
    """Service directories (with a ``run`` file) that start this home's qmail.

    ``dirs`` (from ``--service``) may name service directories or directories of them; by
    default /service, /etc/service, /var/service and HOME/supervise are looked in, and a
    service there counts only if it lives under HOME or its run script names HOME.
    """
    explicit = dirs is not None
    bases = dirs if dirs is not None else [*SERVICE_DIRS, home / "supervise"]
    found: dict[str, Path] = {}
    for base in bases:
        candidates = [base] if (base / "run").is_file() else []
        if not candidates:
            try:
                candidates = sorted(p for p in base.iterdir() if (p / "run").is_file())
            except OSError:
                continue
        for d in candidates:
            real = Path(os.path.realpath(d))
            if not explicit and not real.is_relative_to(Path(os.path.realpath(home))):
                try:
                    if str(home) not in (d / "run").read_text(errors="replace"):
                        continue
                except OSError:
                    continue
            found.setdefault(str(real), real)
    return list(found.values())


def _port(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def _listen(svc: Service, notes: list[Note]) -> str | None:
    assert svc.tcp is not None
    host = "0.0.0.0" if svc.tcp.host in ("0", "0.0.0.0", "") else svc.tcp.host
    port = _port(svc.tcp.port)
    if port is None:
        notes.append(
            Note(
                "unsupported",
                str(svc.path),
                f"tcpserver port {svc.tcp.port!r} is "
                "not a number or a known service name; give --smtp yourself",
            )
        )
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tcpserver_notes(svc: Service, home: Path, notes: list[Note]) -> None:
    tcp = svc.tcp
    assert tcp is not None
    where = f"{svc.path} tcpserver"
    if "c" in tcp.options:
        notes.append(
            Note(
                "differs",
                where,
                f"-c {tcp.options['c']}: pyqmail run's SMTP "
                "listener takes control/concurrencyincoming connections (default 100; "
                f"control/concurrencyperip, default 20, per client): write {tcp.options['c']} "
                "there to keep the limit",
            )
        )
    if "u" in tcp.options or "g" in tcp.options:
        try:
            qmaild = pwd.getpwnam("qmaild").pw_uid
        except KeyError:
            qmaild = -1
        u = tcp.options.get("u", "")
        same = u == str(qmaild) or u == "qmaild"
        notes.append(
            Note(
                "same" if same else "differs",
                where,
                f"-u {u} -g "
                f"{tcp.options.get('g', '')}: pyqmail's SMTP part runs as qmaild"
                + ("" if same else f" (uid {qmaild}), not as {u}"),
            )
        )
    if "l" in tcp.options or tcp.flags & {"R", "H"}:
        notes.append(
            Note("same", where, "-l/-R/-H (no DNS or ident lookups): pyqmail's listener makes none")
        )
    if tcp.flags & {"h", "p"}:
        notes.append(
            Note(
                "unsupported",
                where,
                "-h/-p (remote host names): pyqmail makes no "
                "reverse lookups, so rules keyed on =host names do not match; key "
                "them on addresses",
            )
        )
    for opt in sorted(set(tcp.options) & set("tbBiI")):
        notes.append(
            Note(
                "info",
                where,
                f"-{opt} {tcp.options[opt]}: not carried over (no effect on the mail taken)",
            )
        )
    if tcp.rules is None:
        notes.append(
            Note(
                "differs",
                where,
                "no -x: every client allowed by tcpserver; pyqmail "
                "reads control/tcp.smtp.cdb when it exists",
            )
        )
    else:
        rules = Path(tcp.rules)
        if not rules.is_absolute():
            rules = svc.path.parent / rules
        exists = "" if rules.exists() else " (it does not exist now: every client allowed)"
        notes.append(Note("same", where, f"-x {rules}: pyqmail run --rules {rules}{exists}"))


def _server_notes(svc: Service, notes: list[Note]) -> None:
    if svc.rbl:
        zones = [svc.rbl[i + 1] for i, a in enumerate(svc.rbl[:-1]) if a == "-r"]
        lost = sorted({a for a in svc.rbl if a in ("-a", "-b", "-c", "-t")})
        notes.append(
            Note(
                "differs",
                f"{svc.path} rblsmtpd",
                f"rblsmtpd {' '.join(svc.rbl)}: pyqmail run checks the lists in "
                "control/rbllist before the greeting and honours RBLSMTPD from the rules"
                + (f"; write there: {', '.join(zones)}" if zones else "")
                + (f"; not carried over: {' '.join(lost)}" if lost else ""),
            )
        )
    if svc.checkpassword:
        notes.append(
            Note(
                "unsupported",
                f"{svc.path} qmail-smtpd",
                f"checkpassword program "
                f"{svc.checkpassword} (SMTP AUTH patch): pyqmail run offers no AUTH; "
                "clients that must authenticate keep a qmail-smtpd with the patch on "
                "their port (587), or relay by address in the rules",
            )
        )
    if "QMAILQUEUE" in svc.env:
        notes.append(
            Note(
                "differs",
                f"{svc.path} QMAILQUEUE",
                f"{svc.env['QMAILQUEUE']}: kept "
                "in pyqmail run's environment, where it filters every message its "
                "listeners take; for SMTP only, set it in the rules instead "
                '(:allow,QMAILQUEUE="...")',
            )
        )
    if svc.softlimit:
        limits = " ".join(f"-{k} {v}" for k, v in sorted(svc.softlimit.items()))
        notes.append(
            Note(
                "unsupported",
                f"{svc.path} softlimit",
                f"{limits}: not carried over: "
                "a limit sized for qmail-smtpd is too small for a Python daemon; "
                "pyqmail bounds each connection's memory itself (add softlimit -m "
                "1000000000 to its run script for a cap)",
            )
        )
    for prog in ("recordio", "fixcrio"):
        if prog in svc.chain:
            notes.append(
                Note(
                    "unsupported",
                    str(svc.path),
                    f"{prog}: not carried over; pyqmail logs each message, not the session bytes",
                )
            )


def _queue_uid(home: Path, single_user: bool) -> int | None:
    """The queue's owner: qmailq, or the caller for a single-user home; None if unknown."""
    try:
        return Home(home, single_user).ids().uid("queue")
    except HomeError:
        return None


def make_plan(
    home: Path, service_dirs: list[Path] | None = None, *, single_user: bool = False
) -> Plan:
    """Inspect ``home`` and its services; nothing is changed (see the module docstring)."""
    plan = Plan(home)
    notes = plan.notes
    qmailq = _queue_uid(home, single_user)
    notes += control_notes(home / "control")
    notes += users_notes(home / "users")
    notes += dotqmail_notes([home / "alias", *assign_homes(home / "users")], home / "bin")
    notes += queue_notes(home / "queue", qmailq)
    if (home / STATE / "manifest.json").exists():
        notes.append(
            Note(
                "blocker",
                str(home / STATE),
                f"adopt already ran here; `pyqmail adopt --rollback {home}` first",
            )
        )

    exe = Path(sys.argv[0]).resolve() if sys.argv[0].endswith("pyqmail") else None
    argv = [str(exe) if exe and exe.exists() else "pyqmail", "run", "--home", str(home)]
    if single_user:
        argv.append("--single-user")
    send_dir: Path | None = None
    merged: list[Service] = []
    rules: str | None = None
    dirs = find_services(home, service_dirs)
    if not dirs:
        notes.append(
            Note(
                "info",
                "services",
                "no daemontools/runit service for this home in "
                "/service, /etc/service, /var/service or HOME/supervise "
                "(--service DIR names one)",
            )
        )
    for d in dirs:
        svc = read_service(d / "run")
        plan.services.append(svc)
        if svc.error:
            notes.append(
                Note("unsupported", str(svc.path), f"not understood ({svc.error}); left as it is")
            )
            continue
        for u in svc.unresolved:
            notes.append(Note("info", str(svc.path), f"{u} not resolved (never run)"))
        if svc.kind == "send":
            send_dir = d
            notes.append(
                Note(
                    "same",
                    str(svc.path),
                    "qmail-send service: becomes `pyqmail "
                    "run` (queue, scheduler, deliveries and the listeners below)",
                )
            )
        elif svc.kind in ("smtpd", "qmqpd", "qmtpd") and svc.tcp is not None:
            listen = _listen(svc, notes)
            if listen is None:
                continue
            notes.append(
                Note(
                    "same",
                    str(svc.path),
                    f"{svc.program} under tcpserver on "
                    f"{listen}: becomes pyqmail run --{svc.kind[:-1]} {listen}",
                )
            )
            _tcpserver_notes(svc, home, notes)
            if svc.kind == "smtpd":
                _server_notes(svc, notes)
                if svc.tcp.rules is not None:
                    path = Path(svc.tcp.rules)
                    path = path if path.is_absolute() else svc.path.parent / path
                    if path != home / "control" / "tcp.smtp.cdb":
                        if rules is not None and rules != str(path):
                            notes.append(
                                Note(
                                    "unsupported",
                                    str(svc.path),
                                    "a second SMTP "
                                    "service with other rules: serve it with `pyqmail "
                                    f"smtpd --listen {listen} --rules {path}`",
                                )
                            )
                            continue
                        rules = str(path)
            elif (
                svc.tcp.rules
                and Path(svc.tcp.rules) != home / "control" / f"tcp.{svc.kind[:-1]}.cdb"
            ):
                notes.append(
                    Note(
                        "differs",
                        str(svc.path),
                        f"-x {svc.tcp.rules}: pyqmail reads "
                        f"control/tcp.{svc.kind[:-1]}.cdb; link it there",
                    )
                )
            argv += [f"--{svc.kind[:-1]}", listen]
            merged.append(svc)
        elif svc.kind == "log":
            notes.append(
                Note(
                    "same",
                    str(svc.path),
                    f"logger ({svc.program}): unchanged; "
                    "pyqmail run writes qmail-send's log lines to it",
                )
            )
        else:
            notes.append(
                Note("info", str(svc.path), f"runs {svc.program}: not qmail's, left as it is")
            )
    if rules is not None:
        argv += ["--rules", rules]
    plan.run_argv = argv
    _rc(home, plan)
    env = {k: v for s in merged for k, v in s.env.items() if k == "QMAILQUEUE"}
    if send_dir is not None:
        _swap(plan, send_dir, merged, env)
    else:
        notes.append(
            Note(
                "info",
                "qmail-send",
                "no qmail-send service found: start `pyqmail "
                "run` (the command above) where qmail's rc was started",
            )
        )
    return plan


def _rc(home: Path, plan: Plan) -> None:
    """qmail's rc: its qmail-start argument becomes control/defaultdelivery if that is absent."""
    rc = home / "rc"
    svc = next((s for s in plan.services if s.kind == "send" and s.defaultdelivery), None)
    if svc is None and rc.is_file():
        svc = read_service(rc)
    if svc is None or svc.kind != "send" or svc.program is None:
        plan.notes.append(
            Note(
                "info",
                str(rc),
                "no qmail-start line found: pyqmail delivers to "
                "control/defaultdelivery, else ./Mailbox",
            )
        )
        return
    dd_file = home / "control" / "defaultdelivery"
    if svc.defaultdelivery is None:
        if svc.defaultdelivery_text:
            plan.notes.append(
                Note(
                    "same",
                    str(svc.path),
                    f"qmail-start "
                    f"{svc.defaultdelivery_text}: pyqmail reads "
                    "control/defaultdelivery itself",
                )
            )
        return
    if dd_file.exists():
        plan.notes.append(
            Note(
                "same",
                str(svc.path),
                f"qmail-start {svc.defaultdelivery}: "
                "control/defaultdelivery exists and is what pyqmail uses",
            )
        )
    else:
        plan.changes.append(
            Change(
                dd_file,
                svc.defaultdelivery.encode() + b"\n",
                0o644,
                f"{svc.defaultdelivery!r}, qmail-start's argument in {svc.path}",
            )
        )
    if svc.logger:
        plan.notes.append(
            Note(
                "same",
                str(svc.path),
                f"logger {' '.join(svc.logger)}: pyqmail "
                "run writes the same log lines on stderr; its run script sends "
                "them to the service's log (or pipe them to the logger)",
            )
        )


def _swap(plan: Plan, send_dir: Path, merged: list[Service], env: dict[str, str]) -> None:
    home = plan.home
    backup = home / STATE / "backup"
    cmd = " ".join(_quote(a) for a in plan.run_argv)
    env_words = " ".join(f"{k}={_quote(v)}" for k, v in sorted(env.items()))
    run = (
        "#!/bin/sh\n"
        f"# written by pyqmail adopt; qmail's script is kept at {backup}{send_dir}/run\n"
        f"# and `pyqmail adopt --rollback {home}` puts it back.\n"
        "exec 2>&1\n"
        f'exec env - PATH="/usr/local/bin:/usr/bin:/bin" {env_words + " " if env_words else ""}'
        f"{cmd}\n"
    )
    plan.changes.append(
        Change(
            send_dir / "run",
            run.encode(),
            0o755,
            f"runs `pyqmail run` (qmail's run kept at {backup}{send_dir}/run)",
        )
    )
    plan.after.append(f"svc -t {send_dir} (or sv restart): pyqmail run takes the queue")
    for svc in merged:
        d = svc.path.parent
        placeholder = (
            "#!/bin/sh\n"
            f"# pyqmail adopt: this service is served by `pyqmail run` ({send_dir}/run);\n"
            f"# qmail's script is kept at {backup}{d}/run; `pyqmail adopt --rollback {home}`.\n"
            "exec sleep 2147483647\n"
        )
        plan.changes.append(
            Change(
                d / "run",
                placeholder.encode(),
                0o755,
                f"a placeholder: {svc.program} is folded into pyqmail run "
                f"(qmail's run kept at {backup}{d}/run)",
            )
        )
        if not (d / "down").exists():
            plan.changes.append(Change(d / "down", b"", 0o644, "svscan leaves it down"))
        plan.after.insert(0, f"svc -d {d} (or sv down): its port is pyqmail run's now")


# -- apply and roll back ---------------------------------------------------------------------


def _backup_path(home: Path, path: Path) -> Path:
    return home / STATE / "backup" / str(path.resolve()).lstrip("/")


def apply(plan: Plan) -> list[str]:
    """Make the plan's changes, keeping a copy of every file replaced. Returns the report."""
    home = plan.home
    state = home / STATE
    state.mkdir(mode=0o700, exist_ok=True)
    manifest: list[dict[str, object]] = []
    out: list[str] = []
    for c in plan.changes:
        entry: dict[str, object] = {"path": str(c.path), "backup": None}
        if c.path.exists():
            b = _backup_path(home, c.path)
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(c.path, b)
            entry["backup"] = str(b)
            out.append(f"kept {c.path} as {b}")
        manifest.append(entry)
        # recorded before the change, so a crash between the two still rolls back
        replace_file(state / "manifest.json", [json.dumps(manifest, indent=1).encode()])
        st = c.path.stat() if c.path.exists() else None
        replace_file(c.path, [c.content], mode=c.mode)
        if st is not None:
            os.chown(c.path, st.st_uid, st.st_gid)
        os.chmod(c.path, c.mode)
        out.append(f"wrote {c.path}: {c.why}")
    out += [f"then: {a}" for a in plan.after]
    return out


def rollback(home: Path, *, single_user: bool = False) -> tuple[list[str], bool]:
    """Undo :func:`apply` from its manifest; (report, ok)."""
    state = home / STATE
    manifest_path = state / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return [f"blocker: {manifest_path}: {e}: nothing to roll back"], False
    if sendmutex_held(home / "queue"):
        return ["blocker: queue/lock/sendmutex: held: stop pyqmail run first (svc -d)"], False
    out: list[str] = []
    stamp = time.strftime("%Y%m%d%H%M%S")
    for entry in reversed(manifest):
        path = Path(str(entry["path"]))
        backup = entry.get("backup")
        if backup:
            shutil.copy2(str(backup), path)
            out.append(f"restored {path} from {backup}")
        elif path.exists():
            kept = state / "after" / stamp / str(path.resolve()).lstrip("/")
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, kept)
            out.append(f"moved {path}, which adopt created, to {kept}")
    os.replace(manifest_path, state / f"manifest.rolled-back.{stamp}.json")
    notes = queue_notes(home / "queue", _queue_uid(home, single_user))
    out += [str(n) for n in notes]
    out.append(
        "then: start qmail again (svc -u on its services, or its rc): qmail-send takes "
        "the queue, written in qmail's format"
    )
    return out, not any(n.kind == "blocker" for n in notes)
