#!/usr/bin/env python3
"""End to end: smtp-source -> MTA -> local Maildir, pyqmail beside Postfix in one run.

For each MTA, every run: empty the Maildir, start smtp-source (N messages of SIZE bytes,
S sessions, a new connection per message) and time from its start until the N-th file is
in Maildir/new. Also: the CPU of the whole machine during that time minus smtp-source's own
(CPU-ms per message), as the acceptance driver measures it.

* pyqmail: ``pyqmail run --single-user`` on a fresh home, the recipient's Maildir under it;
  with ``--root``, ``pyqmail run`` as root on a multi-user home (listener, committer,
  scheduler and spawner under qmail's users, the recipient ``nobody``), as sites run it.
* postfix: a private Debian Postfix instance (``postfix -c DIR``, its own queue and port,
  the system one untouched) delivering x@vbench.local through its virtual agent into a
  Maildir (fsynced), as the acceptance check's Postfix does.

Usage: bench/e2e.py [--dir DIR] [--n 2000] [--sessions 10] [--size 1024] [--runs 3]
[--no-postfix] [--root]. DIR holds both MTAs' homes and queues (run on a journalled file system:
bench/journalled.sh); the file system is printed first.
Prints one line per MTA (median [min-max]) and the ratio pyqmail/postfix. Needs root for
Postfix. Both MTAs guarantee a message acknowledged with 250 is on disk (fsync).
"""

from __future__ import annotations

import argparse
import os
import pwd
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/peers.py
from bench.fsinfo import add_dir_arg, block_dev, block_stat, describe, jbd2_commits, make_dir
from tests.peers import PrivatePostfix

HZ = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]


def count(d: Path) -> int:
    try:
        return len(os.listdir(d))
    except FileNotFoundError:
        return 0


def clean(maildir: Path) -> None:
    for sub in ("new", "cur", "tmp"):
        for e in os.scandir(maildir / sub):
            os.unlink(e.path)


def one_run(port: int, maildir: Path, a: argparse.Namespace) -> dict[str, float]:
    clean(maildir)
    os.sync()
    new = maildir / "new"
    cmd = ["smtp-source", "-m", str(a.n), "-s", str(a.sessions), "-l", str(a.size),
           "-f", "sender@bench.local", "-t", "x@vbench.local", "-M", "client.bench.local",
           f"127.0.0.1:{port}"]  # fmt: skip
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    dev = block_dev(str(maildir))
    io0, j0 = block_stat(dev), jbd2_commits(dev)[0]
    b0 = busy_jiffies()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    t_acc = time.perf_counter() - t0
    if p.returncode != 0 or p.stderr.strip():
        print("smtp-source:", p.returncode, p.stderr[-300:], file=sys.stderr)
    deadline = t0 + a.timeout
    t_del = None
    while time.perf_counter() < deadline:
        if count(new) >= a.n:
            t_del = time.perf_counter() - t0
            break
        time.sleep(0.01)
    b1 = busy_jiffies()
    io1, j1 = block_stat(dev), jbd2_commits(dev)[0]
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    cli = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    me = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    busy = (b1 - b0) / HZ - cli - me
    return {
        "accept": a.n / t_acc,
        "e2e": a.n / t_del if t_del else 0.0,
        "delivered": count(new),
        "cpu_ms": 1000 * busy / a.n,
        "flushes": (io1[1] - io0[1]) / a.n,  # the device's cache flushes per message
        "commits": (j1 - j0) / a.n,  # journal transactions per message (jbd2)
    }


def runs(port: int, maildir: Path, a: argparse.Namespace) -> list[dict[str, float]]:
    out = []
    for _ in range(a.runs):
        out.append(one_run(port, maildir, a))
        time.sleep(a.settle)
    return out


# -- pyqmail ------------------------------------------------------------------------------
def make_home(d: Path, root: bool) -> tuple[Path, Path, dict[str, str]]:
    """A fresh pyqmail home under ``d`` with x@vbench.local delivered to a Maildir:
    single-user (the invoking user), or with ``root`` a multi-user home whose user x is
    ``nobody`` (its Maildir and .qmail owned by it). (home, Maildir, environment)."""
    env = dict(os.environ)
    if not root:
        env["PYQMAIL_SINGLE_USER"] = "1"
    else:
        env.pop("PYQMAIL_SINGLE_USER", None)
    home = d / "q"
    subprocess.run([str(VENV_BIN / "pyqmail"), "init", str(home), "--me", "mx.test.example"],
                   check=True, capture_output=True, env=env)  # fmt: skip
    for name in ("locals", "rcpthosts"):
        with open(home / "control" / name, "a") as f:
            f.write("vbench.local\n")
    user = d / "x"
    for sub in ("cur", "new", "tmp"):
        (user / "Maildir" / sub).mkdir(parents=True)
    uid, gid = os.getuid(), os.getgid()
    if root:
        nb = pwd.getpwnam("nobody")
        uid, gid = nb.pw_uid, nb.pw_gid
        for dirpath, _, _ in os.walk(user):
            os.chown(dirpath, uid, gid)
        os.chown(user, uid, gid)
        (user / ".qmail").write_text("./Maildir/\n")
        os.chown(user / ".qmail", uid, gid)
    (home / "users" / "assign").write_text(f"=x:x:{uid}:{gid}:{user}:::\n.\n")
    subprocess.run(
        [str(VENV_BIN / "qmail-newu")], check=True, env=dict(env, PYQMAIL_HOME=str(home))
    )
    return home, user / "Maildir", env


def run_pyqmail(a: argparse.Namespace) -> list[dict[str, float]]:
    d = make_dir(a.dir, "pyqmail-bench-e2e-")
    d.chmod(0o755)
    proc: subprocess.Popen[bytes] | None = None
    try:
        home, maildir, env = make_home(d, a.root)
        port = free_port()
        log = open(d / "log", "wb")  # noqa: SIM115 - closed with the process
        argv = [str(VENV_BIN / "pyqmail"), "run", "--home", str(home),
                "--smtp", f"127.0.0.1:{port}"]  # fmt: skip
        if not a.root:
            argv.append("--single-user")
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        wait_port(port)
        rs = runs(port, maildir, a)
        if min(r["delivered"] for r in rs) < a.n:
            tail = (d / "log").read_bytes().decode(errors="replace").splitlines()
            usual = ("status:", "starting", "delivery", "new msg", "info msg", "end msg")
            odd = [x for x in tail if not x.startswith(usual)]
            print("pyqmail log (unusual lines):", *odd[-20:], sep="\n  ", file=sys.stderr)
        return rs
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(d, ignore_errors=True)


# -- Postfix ------------------------------------------------------------------------------
def postfix_config(d: Path, port: int) -> PrivatePostfix:
    """Postfix delivering vbench.local to a virtual Maildir owned by nobody."""
    for sub in ("mail/vbench/Maildir/new", "mail/vbench/Maildir/cur", "mail/vbench/Maildir/tmp"):
        (d / sub).mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    for root, dirs, _ in os.walk(d / "mail"):
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        for x in dirs:
            os.chown(os.path.join(root, x), nobody.pw_uid, nobody.pw_gid)
    (d / "vmailbox.re").write_text("/@vbench\\.local$/ vbench/Maildir/\n")
    return PrivatePostfix(
        d,
        port,
        hostname="mx.bench.local",
        settings=f"""mydestination = bench.local, localhost
virtual_mailbox_domains = vbench.local
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = regexp:{d}/vmailbox.re
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
default_transport = error
relay_transport = error
smtpd_client_connection_count_limit = 1000
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
""",
    )


def run_postfix(a: argparse.Namespace) -> list[dict[str, float]]:
    d = make_dir(a.dir, "pyqmail-bench-e2e-postfix-")
    d.chmod(0o755)
    port = free_port()
    pfx = postfix_config(d, port)
    try:
        pfx.start()
        wait_port(port)
        return runs(port, d / "mail" / "vbench" / "Maildir", a)
    finally:
        pfx.stop()
        shutil.rmtree(d, ignore_errors=True)


def summary(label: str, rs: list[dict[str, float]], a: argparse.Namespace) -> float:
    def st(k: str, fmt: str) -> str:
        v = [r[k] for r in rs]
        return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]"

    print(f"{label:9s} n={a.n} s={a.sessions} size={a.size} | e2e {st('e2e', '.1f')} msg/s | "
          f"accept {st('accept', '.1f')} msg/s | CPU {st('cpu_ms', '.2f')} ms/msg | "
          f"journal commits {st('commits', '.2f')}, flushes {st('flushes', '.2f')} /msg | "
          f"delivered {min(int(r['delivered']) for r in rs)}", flush=True)  # fmt: skip
    return statistics.median(r["e2e"] for r in rs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--no-postfix", action="store_true")
    ap.add_argument("--root", action="store_true",
                    help="pyqmail run as root, multi-user home (user nobody)")  # fmt: skip
    add_dir_arg(ap)
    a = ap.parse_args()
    print(describe(a.dir or tempfile.gettempdir()))
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    if not shutil.which("smtp-source"):
        raise SystemExit("smtp-source (Debian package postfix) is needed")
    mtas: list[tuple[str, Callable[[argparse.Namespace], list[dict[str, float]]]]] = []
    if not a.no_postfix and shutil.which("postfix") and os.geteuid() == 0:
        mtas.append(("postfix", run_postfix))
    mtas.append(("pyqmail", run_pyqmail))
    rates = {label: summary(label, fn(a), a) for label, fn in mtas}
    if rates.get("postfix"):
        print(f"ratio pyqmail/postfix (e2e) = {rates['pyqmail'] / rates['postfix']:.2f}")


if __name__ == "__main__":
    main()
