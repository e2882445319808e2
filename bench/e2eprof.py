#!/usr/bin/env python3
"""Where pyqmail's end-to-end time goes: CPU per message per process, system calls and fsyncs.

Starts ``pyqmail run`` (``--single-user`` by default, or as root on a multi-user home with
``--root``) on a fresh home under DIR, sends N messages with smtp-source (a new connection
per message) to one local Maildir user, and waits until the N-th file is in Maildir/new.
Prints, for every process of the daemon's tree (grouped by user and role: daemon,
committer, worker, spawner, ...), the CPU it used per message (user + system, its reaped
children's included), the accept and end-to-end rates, and the median and 90th percentile
of the time from a message's 250 (smtp-source's end) to its file in Maildir/new,
estimated from the Maildir files' ctimes against the accept timeline.

With ``--strace`` the daemon's tree runs under ``strace -f -c`` for the measured part and
the system calls per message are printed (fsync, fdatasync, openat, link, unlink, rename,
the futex and the total): strace slows everything down, so its rates mean nothing.

Usage: bench/e2eprof.py [--dir DIR] [--n 2000] [--sessions 10] [--size 1024] [--root]
[--strace]. Root mode needs root.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.e2e import free_port, make_home, wait_port
from bench.fsinfo import add_dir_arg, block_dev, block_stat, describe, jbd2_commits, make_dir

HZ = os.sysconf("SC_CLK_TCK")
VENV_BIN = Path(sys.executable).parent


def children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2 :].split()[1])
        out.setdefault(ppid, []).append(int(e))
    return out


def tree(root: int) -> list[int]:
    kids = children()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def proc_cpu(pid: int) -> tuple[str, float] | None:
    """(role, CPU seconds incl. reaped children) of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    v = s[s.rfind(")") + 2 :].split()
    cpu = sum(int(x) for x in v[11:15]) / HZ
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if "committer" in cmd:
        role = "committer"
    elif "strace" in cmd:
        role = "strace"
    elif "pyqmail run" in cmd or "pyqmail/cli" in cmd or cmd.startswith(str(VENV_BIN)):
        role = "pyqmail"
    else:
        role = cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"
    return f"{user}:{role}", cpu


def snapshot(root: int) -> dict[int, tuple[str, float]]:
    """Every process of the tree: the top one is the daemon (or supervisor), the
    pyqmail processes below it are named after their parent's role."""
    out: dict[int, tuple[str, float]] = {}
    kids = children()
    todo = [(root, "")]
    while todo:
        pid, parent = todo.pop()
        got = proc_cpu(pid)
        if got is None:
            continue
        role, cpu = got
        if pid == root:
            role = role.replace(":pyqmail", ":daemon")
        elif role.endswith(":pyqmail"):
            role = role.replace(":pyqmail", ":child of " + parent.split(":", 1)[-1])
        out[pid] = (role, cpu)
        todo.extend((k, role) for k in kids.get(pid, []))
    return out


def jbd2_cpu(dev: str | None) -> float:
    """CPU seconds of the journal thread of ``dev`` (jbd2/DEV-8)."""
    if dev is None:
        return 0.0
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                s = f.read()
        except OSError:
            continue
        if f"(jbd2/{dev}" in s:
            v = s[s.rfind(")") + 2 :].split()
            return (int(v[11]) + int(v[12])) / HZ
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--root", action="store_true")
    ap.add_argument("--strace", action="store_true")
    ap.add_argument(
        "--strace-daemon",
        action="store_true",
        help="with --strace: only the daemon's process (its threads), every call",
    )
    ap.add_argument("--pyspy", metavar="FILE", help="py-spy record the tree (raw stacks) into FILE")
    ap.add_argument(
        "--pyspy-gil",
        action="store_true",
        help="with --pyspy: only samples holding the GIL (CPU in Python, not waits)",
    )
    ap.add_argument("--warm", type=int, default=200, help="messages sent before measuring")
    add_dir_arg(ap)
    a = ap.parse_args()
    if a.pyspy and not (VENV_BIN / "py-spy").exists():
        sys.exit(f"e2eprof: --pyspy needs {VENV_BIN / 'py-spy'} (make bench installs it)")
    print(describe(a.dir or tempfile.gettempdir()))
    mode = "root mode" if a.root else "single-user"
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"{mode}, n={a.n} s={a.sessions} size={a.size}")  # fmt: skip
    d = make_dir(a.dir, "pyqmail-bench-e2eprof-")
    d.chmod(0o755)
    home, maildir, env = make_home(d, a.root)
    port = free_port()
    log = open(d / "log", "wb")  # noqa: SIM115 - closed at exit
    argv = [str(VENV_BIN / "pyqmail"), "run", "--home", str(home), "--smtp", f"127.0.0.1:{port}"]
    if not a.root:
        argv.append("--single-user")
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    st: subprocess.Popen[bytes] | None = None
    try:
        wait_port(port)
        new = maildir / "new"

        def send(n: int) -> float:
            t0 = time.perf_counter()
            cmd = ["smtp-source", "-m", str(n), "-s", str(a.sessions), "-l", str(a.size),
                   "-f", "sender@bench.local", "-t", "x@vbench.local",
                   "-M", "client.bench.local", f"127.0.0.1:{port}"]  # fmt: skip
            subprocess.run(cmd, check=True)
            return time.perf_counter() - t0

        def wait_for(n: int) -> None:
            deadline = time.monotonic() + 600
            while len(os.listdir(new)) < n:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {len(os.listdir(new))} of {n} delivered")
                time.sleep(0.005)

        if a.warm:
            send(a.warm)
            wait_for(a.warm)
        for e in os.scandir(new):
            os.unlink(e.path)
        os.sync()
        time.sleep(1)
        if a.strace:
            out = d / "strace.txt"
            pids = [proc.pid] if a.strace_daemon else tree(proc.pid)
            st = subprocess.Popen(["strace", "-f", "-c", "-o", str(out),
                                   *[x for p in pids for x in ("-p", str(p))]],
                                  stderr=subprocess.DEVNULL)  # fmt: skip
            time.sleep(1.5)
        dev = block_dev(str(home))
        bs0, j0, c0 = block_stat(dev), jbd2_cpu(dev), jbd2_commits(dev)
        spy = None
        if a.pyspy:
            spy_cmd = [str(VENV_BIN / "py-spy"), "record", "--subprocesses",
                       "-r", "200", "-f", "raw", "-o", a.pyspy, "-p", str(proc.pid)]  # fmt: skip
            if a.pyspy_gil:
                spy_cmd.append("--gil")
            spy = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
        before = snapshot(proc.pid)
        t0 = time.time()
        t_acc = send(a.n)
        t1 = time.time()
        wait_for(a.n)
        t_del = time.time() - t0
        after = snapshot(proc.pid)
        bs1, j1, c1 = block_stat(dev), jbd2_cpu(dev), jbd2_commits(dev)
        if st is not None:
            st.send_signal(signal.SIGINT)
            st.wait(60)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        roles: dict[str, list[float]] = {}
        for pid, (role, cpu) in after.items():
            if role.endswith(":strace"):
                continue
            prev = before.get(pid, (role, 0.0))[1]
            roles.setdefault(role, []).append(cpu - prev)
        print(f"accept {a.n / t_acc:.1f} msg/s, end to end {a.n / t_del:.1f} msg/s "
              f"(last file {t_del - (t1 - t0):.2f} s after the last 250)")  # fmt: skip
        # 250 -> Maildir: each file's ctime against a uniform accept timeline
        lags = []
        names = sorted(os.scandir(new), key=lambda e: e.stat().st_ctime)
        for i, e in enumerate(names):
            acked = t0 + (i + 1) * t_acc / a.n
            lags.append(e.stat().st_ctime - acked)
        lags.sort()
        print(f"250 -> Maildir/new (estimated): median {1000 * statistics.median(lags):.1f} ms, "
              f"p90 {1000 * lags[int(0.9 * len(lags))]:.1f} ms")  # fmt: skip
        total = 0.0
        print("CPU ms per message by process (user:role, processes):")
        for role, cpus in sorted(roles.items(), key=lambda kv: -sum(kv[1])):
            ms = 1000 * sum(cpus) / a.n
            total += ms
            print(f"  {role:28s} {len(cpus):3d}  {ms:6.2f}")
        print(f"  {'total':28s}      {total:6.2f}")
        print(f"  {'kernel jbd2/' + str(dev):28s}      {1000 * (j1 - j0) / a.n:6.2f}")
        print(
            f"block device {dev}: {(bs1[0] - bs0[0]) / a.n:.2f} writes, "
            f"{(bs1[1] - bs0[1]) / a.n:.2f} flushes per message"
        )
        print(
            f"journal: {(c1[0] - c0[0]) / a.n:.2f} transactions per message, "
            f"{(c1[0] - c0[0]) / t_del:.0f} per second, average commit "
            f"{c1[1]:.1f} ms (the kernel's running average)"
        )
        if st is not None:
            which = "the daemon" if a.strace_daemon else "whole tree"
            print(f"system calls per message (strace -f -c, {which}):")
            wanted = ("fsync", "fdatasync", "openat", "link", "linkat", "unlink", "unlinkat",
                      "rename", "renameat2", "futex", "write", "read", "sendto", "recvfrom",
                      "epoll_wait", "close", "newfstatat", "statx", "mkdir")  # fmt: skip
            for line in (d / "strace.txt").read_text().splitlines():
                f = line.split()
                shown = a.strace_daemon or f[-1] in (*wanted, "total")
                if len(f) >= 5 and f[3].isdigit() and shown:
                    calls = int(f[3])
                    print(f"  {f[-1]:12s} {calls / a.n:7.2f}  ({f[1]} s)")
    finally:
        if st is not None and st.poll() is None:
            st.kill()
        proc.terminate()
        proc.wait(60)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
