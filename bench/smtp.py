#!/usr/bin/env python3
"""SMTP accept rate: pyqmail's listener against Postfix, with Postfix's smtp-source, same run.

    .venv/bin/python bench/smtp.py [--runs 3] [--workers 1] [--quick] [--idle 10000]
    .venv/bin/python bench/smtp.py --root [--runs 3]   # pyqmail run as root, as deployed
    .venv/bin/python bench/smtp.py --session-log [--root]  # pyqmail run, session log on/off
    add --dir /mnt/pyqmail-bench (sh bench/journalled.sh) to run on a journalled ext4

What it does (issue 4):

* starts ``pyqmail smtpd --listen`` on a fresh single-user home in a temporary directory,
  and a private Debian Postfix instance (its own config and queue directories, another
  loopback port, ``smtpd_client_restrictions = static:HOLD`` so every message is accepted,
  fsynced into its queue and put on hold, never delivered; no DNS, no peer-name lookup,
  as pyqmail does none either). The system Postfix is not touched. With ``--root``,
  pyqmail is the whole ``pyqmail run`` started as root on a multi-user home instead:
  the listener as qmaild, its committer as qmailq, the scheduler turning each new
  message into info/local files (control/concurrencylocal 0 keeps them queued).
* drives each with ``smtp-source`` (a new connection per message): 3,000 messages of
  1 KiB and 1,000 of 100 KiB over 1, 10 and 50 sessions, and reports messages durably
  accepted per second (each counted in the queue afterwards), server CPU per message
  (user+system of the server's process tree, from /proc), and the ratio pyqmail/Postfix;
* with ``--session-log``, two ``pyqmail run`` daemons side by side (single-user, or as
  root with ``--root``), one writing SMTP session logs (the default) and one started with
  ``--no-session-log``, each logging to a file in the bench's directory as it would to
  multilog; they are driven alternately, run by run, and the ratio on/off is printed;
* holds ``--idle`` connections open to pyqmail's listener and reports its resident
  memory, then checks that a real client is still served while they are open.

The queues are never emptied between runs (each run counts what it added). On a
journal-less ext4 such as this machine's root filesystem, the inode allocator skips every
inode freed in the last 60-300 seconds, one by one: right after a queue of thousands of
messages is deleted, creating a file costs 0.4-0.7 ms of kernel CPU instead of 20-50 us,
for a minute or more. Emptying the queues before each run measured that scan, not the
servers (pyqmail makes two files per message, Postfix one). The header reports the cost
of creating a file in the bench's directory at the start, so a slow filesystem shows.

The machine is shared and has 2 cores: every figure is the median of ``--runs`` runs, and
pyqmail and Postfix alternate run by run so both see the same noise. The table is printed
in Markdown for docs/benchmarks/smtp.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

HZ = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/peers.py

from bench.fsinfo import add_dir_arg, describe, make_dir  # noqa: E402
from tests.peers import PrivatePostfix  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as s:
                if s.recv(100).startswith(b"220"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on 127.0.0.1:{port}")


# ----------------------------------------------------------------- /proc accounting


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of the tree: each process's own and its reaped children's."""
    total = 0
    for pid in tree(root):
        st = _stat(pid)
        if st is not None:
            total += sum(int(x) for x in st[11:15])  # utime stime cutime cstime
    return total / HZ


def tree_rss(root: int) -> int:
    """Resident memory of the tree in bytes."""
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


# ----------------------------------------------------------------- the two servers


class Pyqmail:
    """``pyqmail smtpd --listen`` on a single-user home; with ``root``, the whole
    ``pyqmail run`` as root on a multi-user home (listener as qmaild, its committer as
    qmailq, the scheduler preprocessing each message; control/concurrencylocal 0 keeps
    the messages queued, as Postfix's hold does)."""

    name = "pyqmail"

    def __init__(
        self,
        tmp: Path,
        workers: int,
        max_conns: int,
        *,
        root: bool = False,
        run: bool = False,
        session_log: bool = True,
        name: str = "qmail",
    ) -> None:
        """``run``: ``pyqmail run --single-user`` (root: as root); ``session_log`` False
        adds ``--no-session-log``; the daemon's log goes to ``tmp/NAME.log``."""
        self.home = tmp / name
        self.root = root
        self.run = run or root
        env = dict(os.environ, PYQMAIL_SINGLE_USER="1")
        if root:
            del env["PYQMAIL_SINGLE_USER"]
        subprocess.run(
            [str(VENV_BIN / "pyqmail"), "init", str(self.home), "--me", "mx.bench.local"],
            check=True,
            env=env,
            capture_output=True,
        )
        (self.home / "control" / "rcpthosts").write_text("bench.local\n")
        # rcpt@bench.local is local and exists (alias/.qmail-rcpt), so the RCPT check
        # (on by default, docs/rcptcheck.md) does its whole lookup and accepts it
        (self.home / "control" / "locals").write_text("bench.local\n")
        (self.home / "alias" / ".qmail-rcpt").write_text("./Maildir/\n")
        if root:  # the alias account's home is not this home's alias/: assign it
            import pwd

            pw = pwd.getpwnam("alias")
            (self.home / "users" / "assign").write_text(
                f"=rcpt:alias:{pw.pw_uid}:{pw.pw_gid}:{self.home}/alias:-:rcpt:\n.\n"
            )
            subprocess.run(
                [str(VENV_BIN / "pyqmail"), "newu", "--home", str(self.home)], check=True, env=env
            )
        self.port = free_port()
        log: int | BinaryIO = subprocess.DEVNULL
        if self.run:
            (self.home / "control" / "concurrencylocal").write_text("0\n")
            argv = ["run", "--home", str(self.home), "--smtp", f"127.0.0.1:{self.port}"]
            if not root:
                argv.append("--single-user")
            if not session_log:
                argv.append("--no-session-log")
            log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115 - the daemon holds it
        else:
            argv = ["smtpd", "--home", str(self.home), "--listen", f"127.0.0.1:{self.port}"]
            argv += ["--max-conns", str(max_conns), "--max-per-ip", str(max_conns)]
            argv += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "pyqmail"), *argv], env=env, stdout=log, stderr=log
        )
        if not isinstance(log, int):
            log.close()
        wait_port(self.port)
        self.pid = self.proc.pid

    def rcptchecks(self, on: bool) -> None:
        """control/rcptchecks 1 or 0, and wait until the listener has seen it (it looks at
        control/ once a second)."""
        (self.home / "control" / "rcptchecks").write_text("1\n" if on else "0\n")
        time.sleep(2.5)

    def queued(self) -> int:
        if self.run:  # the scheduler turns todo/N into info and local files at once
            return sum(len(files) for _, _, files in os.walk(self.home / "queue" / "mess"))
        return sum(1 for e in os.scandir(self.home / "queue" / "todo") if e.is_file())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Postfix:
    """A private Postfix instance (tests/peers.py) that holds every message it accepts."""

    name = "postfix"

    def __init__(self, tmp: Path, extra: str = "") -> None:
        """``extra``: more main.cf lines (bench/tls.py turns STARTTLS on with them)."""
        self.dir = tmp / "postfix"
        self.port = free_port()
        self.instance = PrivatePostfix(
            self.dir,
            self.port,
            hostname="mx.bench.local",
            settings="""syslog_name = postfix-pyqmail-bench
smtpd_client_restrictions = static:HOLD
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 200
message_size_limit = 0
"""
            + extra,
        )
        self.instance.start()
        wait_port(self.port)
        self.pid = self.instance.pid

    def rcptchecks(self, on: bool) -> None:
        """control/rcptchecks 1 or 0, and wait until the listener has seen it (it looks at
        control/ once a second)."""
        (self.home / "control" / "rcptchecks").write_text("1\n" if on else "0\n")
        time.sleep(2.5)

    def queued(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.instance.queue / "hold"))

    def stop(self) -> None:
        self.instance.stop()


# ----------------------------------------------------------------- one measurement


@dataclass
class Result:
    rate: float  # messages durably accepted per second
    cpu_ms: float  # server CPU per message
    accepted: int


def drive(server: Pyqmail | Postfix, n: int, sessions: int, size: int) -> Result:
    before = server.queued()  # the queues are never emptied during a bench: see the docstring
    os.sync()
    cpu0 = tree_cpu(server.pid)
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            "smtp-source",
            "-m",
            str(n),
            "-s",
            str(sessions),
            "-l",
            str(size),
            "-f",
            "sender@client.bench.local",
            "-t",
            "rcpt@bench.local",
            "-M",
            "client.bench.local",
            f"127.0.0.1:{server.port}",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    cpu = tree_cpu(server.pid) - cpu0
    if p.returncode != 0:
        print(
            f"  smtp-source against {server.name}: rc {p.returncode} {p.stderr[-300:]}",
            file=sys.stderr,
        )
    deadline = time.monotonic() + 30
    got = server.queued() - before
    while got < n and time.monotonic() < deadline:  # Postfix's cleanup may lag a moment
        time.sleep(0.1)
        got = server.queued() - before
    return Result(got / wall, 1000 * cpu / max(n, 1), got)


def create_cost(where: Path, count: int = 300) -> float:
    """Median microseconds to create an empty file in a new directory under ``where``.

    The files stay (they go with the bench's directory at the end): deleting them here
    would slow the next creations on a journal-less filesystem."""
    d = where / "create-probe"
    d.mkdir()
    times = []
    for i in range(count):
        t = time.perf_counter()
        fd = os.open(d / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        times.append(time.perf_counter() - t)
        os.close(fd)
    return statistics.median(times) * 1e6


# ----------------------------------------------------------------- idle connections


def idle(server: Pyqmail, count: int) -> tuple[float, float, float, bool]:
    """(RSS MB before, RSS MB with ``count`` idle connections, KB each, still serving)."""
    before = tree_rss(server.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", server.port))
            socks.append(s)
        greeted = 0
        for s in socks:
            s.settimeout(30)
            if s.recv(100).startswith(b"220"):
                greeted += 1
        time.sleep(1)
        during = tree_rss(server.pid)
        queued = server.queued()
        p = subprocess.run(
            [
                "smtp-source",
                "-m",
                "50",
                "-s",
                "5",
                "-l",
                "1024",
                "-f",
                "a@client.bench.local",
                "-t",
                "rcpt@bench.local",
                f"127.0.0.1:{server.port}",
            ],
            capture_output=True,
            timeout=120,
        )
        serving = p.returncode == 0 and server.queued() - queued == 50 and greeted == count
    finally:
        for s in socks:
            s.close()
    mb = 1024 * 1024
    return before / mb, during / mb, (during - before) / 1024 / max(count, 1), serving


# ----------------------------------------------------------------- main


def compare_rcptchecks(
    ours: Pyqmail, loads: list[tuple[int, int, str]], sessions: list[int], runs: int
) -> None:
    """The accept rate with control/rcptchecks 1 and 0, alternating run by run."""
    print(
        "| messages | sessions | checks on msg/s | on CPU ms/msg | checks off msg/s "
        "| off CPU ms/msg | on/off msg/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, size, label in loads:
        for s in sessions:
            on: list[Result] = []
            off: list[Result] = []
            for _ in range(runs):
                ours.rcptchecks(True)
                on.append(drive(ours, n, s, size))
                ours.rcptchecks(False)
                off.append(drive(ours, n, s, size))
            lost = [r.accepted for r in on + off if r.accepted != n]
            r_on = statistics.median(r.rate for r in on)
            r_off = statistics.median(r.rate for r in off)
            c_on = statistics.median(r.cpu_ms for r in on)
            c_off = statistics.median(r.cpu_ms for r in off)
            ratios = statistics.median(a.rate / b.rate for a, b in zip(on, off, strict=True))
            note = f" (only {lost} queued!)" if lost else ""
            print(
                f"| {n} x {label} | {s} | {r_on:.0f}{note} | {c_on:.2f} | {r_off:.0f} "
                f"| {c_off:.2f} | **{ratios:.2f}** |",
                flush=True,
            )


def session_log_cost(where: Path, sessions: int = 20000) -> tuple[float, float, int]:
    """In-process: (microseconds of CPU per session with session logs written to a file,
    without (the counters only), lines per session), for the calls the listener makes in
    one session that queues one message (smtp/sessionlog.py; qmail format, no loop, so
    each line is written at once)."""
    from pyqmail.logsink import LogSink
    from pyqmail.smtp.sessionlog import SessionLog, SmtpStats

    def once(sink: LogSink | None) -> float:
        stats = SmtpStats()
        t = time.process_time()
        for i in range(sessions):
            s = SessionLog(sink, stats, "192.0.2.7")
            s.connect(True, {})
            s.note(b"ehlo", b"client.bench.local", b"250-mx.bench.local\r\n")
            s.note(b"mail", b"FROM:<sender@client.bench.local>", b"250 ok\r\n")
            s.note(b"rcpt", b"TO:<rcpt@bench.local>", b"250 ok\r\n")
            s.data(1024)
            s.queued(True, 131147 + i, 4242, 1024, "")
            s.disconnect()
        return (time.process_time() - t) / sessions * 1e6

    with open(where / "sessionlog-cost.log", "wb") as f:
        sink = LogSink(f)
        on = statistics.median(once(sink) for _ in range(5))
        f.flush()
        lines = (where / "sessionlog-cost.log").read_bytes().count(b"\n") // (5 * sessions)
    off = statistics.median(once(None) for _ in range(5))
    return on, off, lines


def compare_session_log(
    on: Pyqmail, off: Pyqmail, loads: list[tuple[int, int, str]], sessions: list[int], runs: int
) -> None:
    """The accept rate of pyqmail run with session logs and with --no-session-log,
    alternating run by run."""
    print(
        "| messages | sessions | log on msg/s | on CPU ms/msg | log off msg/s "
        "| off CPU ms/msg | on/off msg/s | on/off CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, size, label in loads:
        for s in sessions:
            r_on: list[Result] = []
            r_off: list[Result] = []
            for _ in range(runs):
                r_on.append(drive(on, n, s, size))
                r_off.append(drive(off, n, s, size))
            lost = [r.accepted for r in r_on + r_off if r.accepted != n]
            rate_on = statistics.median(r.rate for r in r_on)
            rate_off = statistics.median(r.rate for r in r_off)
            cpu_on = statistics.median(r.cpu_ms for r in r_on)
            cpu_off = statistics.median(r.cpu_ms for r in r_off)
            ratio = statistics.median(a.rate / b.rate for a, b in zip(r_on, r_off, strict=True))
            note = f" (only {lost} queued!)" if lost else ""
            print(
                f"| {n} x {label} | {s} | {rate_on:.0f}{note} | {cpu_on:.2f} | {rate_off:.0f} "
                f"| {cpu_off:.2f} | **{ratio:.2f}** | {cpu_on / cpu_off:.2f} |",
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; the median is shown")
    ap.add_argument("--workers", type=int, default=1, help="pyqmail listener processes")
    ap.add_argument("--quick", action="store_true", help="a tenth of the messages")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections (0: skip)")
    ap.add_argument("--sessions", default="1,10,50")
    ap.add_argument("--sizes", default="1024,102400", help="message sizes to run")
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument(
        "--root",
        action="store_true",
        help="pyqmail run as root (multi-user home) instead of pyqmail smtpd; no idle test",
    )
    ap.add_argument(
        "--rcptchecks",
        action="store_true",
        help="compare pyqmail with the RCPT check on and off, run by run (no Postfix)",
    )
    ap.add_argument(
        "--session-log",
        action="store_true",
        help="compare pyqmail run with SMTP session logs and with --no-session-log (no Postfix)",
    )
    add_dir_arg(ap)
    a = ap.parse_args()
    if a.session_log:
        a.no_postfix = True
        a.idle = 0
    if a.rcptchecks:
        a.no_postfix = True
        a.idle = 0
    if a.root:
        if os.geteuid() != 0:
            print("bench/smtp.py: --root needs root", file=sys.stderr)
            return 1
        a.idle = 0
    for tool in ("smtp-source",) + (() if a.no_postfix else ("postfix",)):
        if shutil.which(tool) is None:
            print(f"bench/smtp.py: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * a.idle + 1000))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    sessions = [int(x) for x in a.sessions.split(",")]
    sizes = {int(x) for x in a.sizes.split(",")}
    loads = [(3000, 1024, "1 KiB"), (1000, 102400, "100 KiB")]
    loads = [load for load in loads if load[1] in sizes]
    if a.quick:
        loads = [(n // 10, size, label) for n, size, label in loads]
    tmp = make_dir(a.dir, "pyqmail-bench-smtp-")
    tmp.chmod(0o755)  # Postfix (user postfix) must reach its data directory
    ours: Pyqmail | None = None
    theirs: Postfix | None = None
    quiet: Pyqmail | None = None
    try:
        if a.session_log:
            ours = Pyqmail(tmp, 1, 1000, root=a.root, run=True, name="log-on")
            quiet = Pyqmail(tmp, 1, 1000, root=a.root, run=True, session_log=False,
                            name="log-off")  # fmt: skip
            mode = "as root" if a.root else "--single-user"
            print(f"pyqmail run {mode}: session log on :{ours.port}, "
                  f"--no-session-log on :{quiet.port}")  # fmt: skip
            print(describe(tmp))
            print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
                  f"median of {a.runs} run(s)\n")  # fmt: skip
            compare_session_log(ours, quiet, loads, sessions, a.runs)
            lines = (tmp / "log-on.log").read_bytes().count(b"\n")
            quiet_lines = (tmp / "log-off.log").read_bytes().count(b"\n")
            print(f"\nlog lines written: {lines} with session logs, {quiet_lines} without")
            on_us, off_us, per = session_log_cost(tmp)
            print(f"in-process: {on_us:.1f} us of CPU per session with its {per} log lines "
                  f"written to a file, {off_us:.1f} us counting only")  # fmt: skip
            return 0
        ours = Pyqmail(tmp, a.workers, max(1000, a.idle + 200), root=a.root)
        theirs = None if a.no_postfix else Postfix(tmp)
        print(
            ("pyqmail run as root" if a.root else f"pyqmail smtpd --workers {a.workers}")
            + f" on :{ours.port}"
            + ("" if theirs is None else f", Postfix (hold) on :{theirs.port}")
        )
        print(describe(tmp))
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start, "
            f"creating a file costs {create_cost(tmp):.0f} us, median of {a.runs} run(s)\n"
        )
        if a.rcptchecks:
            compare_rcptchecks(ours, loads, sessions, a.runs)
            return 0
        print(
            "| messages | sessions | pyqmail msg/s | pyqmail CPU ms/msg | Postfix msg/s "
            "| Postfix CPU ms/msg | ratio msg/s | ratio CPU |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for n, size, label in loads:
            for s in sessions:
                mine: list[Result] = []
                peer: list[Result] = []
                for _ in range(a.runs):
                    mine.append(drive(ours, n, s, size))
                    if theirs is not None:
                        peer.append(drive(theirs, n, s, size))
                m_rate = statistics.median(r.rate for r in mine)
                m_cpu = statistics.median(r.cpu_ms for r in mine)
                lost = [r.accepted for r in mine if r.accepted != n]
                if peer:
                    p_rate = statistics.median(r.rate for r in peer)
                    p_cpu = statistics.median(r.cpu_ms for r in peer)
                    cells = (
                        f"{p_rate:.0f} | {p_cpu:.2f} | **{m_rate / p_rate:.2f}** | "
                        f"{p_cpu / m_cpu:.2f}"
                    )
                else:
                    cells = "- | - | - | -"
                note = f" (only {lost} queued!)" if lost else ""
                print(
                    f"| {n} x {label} | {s} | {m_rate:.0f}{note} | {m_cpu:.2f} | {cells} |",
                    flush=True,
                )
        if theirs is not None:
            theirs.stop()
            theirs = None
        if a.idle:
            before, during, per, serving = idle(ours, a.idle)
            print(
                f"\nidle connections: {a.idle}; pyqmail RSS {before:.1f} MB before, "
                f"{during:.1f} MB with them open ({per:.1f} KB each); "
                f"a client was {'still' if serving else 'NOT'} served meanwhile"
            )
    finally:
        if theirs is not None:
            theirs.stop()
        if ours is not None:
            ours.stop()
        if quiet is not None:
            quiet.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
