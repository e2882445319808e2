#!/usr/bin/env python3
"""STARTTLS accept rate: pyqmail's listener against Postfix with TLS on, same run.

    .venv/bin/python bench/tls.py [--runs 3] [--sessions 200] [--concurrency 1,10]

Each server gets the same self-signed RSA 2048 certificate (the one ``pyqmail init``
made for pyqmail's home, given to Postfix as ``smtpd_tls_chain_files``, security level
``may``). A client session is: connect, read the greeting, EHLO, STARTTLS, a TLS 1.3
handshake (no session resumption), EHLO inside TLS, QUIT. The client is Python threads
(ssl releases the GIL in the handshake), the same for both servers; the figures are
sessions per second and server CPU per session (the server's process tree, from /proc),
the median of ``--runs`` runs, pyqmail and Postfix alternating. The machine is shared
and has 2 cores: compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import itertools
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# plain threads: concurrent.futures imports the queue module, which bench/queue.py shadows
from bench.smtp import Postfix, Pyqmail, tree_cpu


def _reply(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n") or buf.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def session(port: int, ctx: ssl.SSLContext) -> str:
    """One STARTTLS session; the TLS version it got (an exception if anything failed)."""
    s = socket.create_connection(("127.0.0.1", port), 30)
    try:
        _reply(s)
        s.sendall(b"EHLO client.bench.local\r\n")
        if b"STARTTLS" not in _reply(s):
            raise RuntimeError("STARTTLS not offered")
        s.sendall(b"STARTTLS\r\n")
        if not _reply(s).startswith(b"220"):
            raise RuntimeError("STARTTLS refused")
        t = ctx.wrap_socket(s, server_hostname="mx.bench.local")
        version = t.version() or "none"
        t.sendall(b"EHLO client.bench.local\r\nQUIT\r\n")
        got = b""
        while b"\r\n221" not in got and not got.startswith(b"221"):
            chunk = t.recv(4096)
            if not chunk:
                break
            got += chunk
        t.close()
        if b"221" not in got:
            raise RuntimeError(f"no 221 inside TLS: {got!r}")
        return version
    finally:
        s.close()


def drive(port: int, pid: int, n: int, conc: int) -> tuple[float, float]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cpu0 = tree_cpu(pid)
    t0 = time.perf_counter()
    todo = itertools.count()
    versions: list[str] = []  # list.append is atomic under the GIL

    def worker() -> None:
        while next(todo) < n:
            versions.append(session(port, ctx))

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if versions != ["TLSv1.3"] * n:  # a failed session would flatter the rate
        raise SystemExit(f"only {versions.count('TLSv1.3')} of {n} sessions got TLS 1.3")
    return n / wall, 1000 * (tree_cpu(pid) - cpu0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--concurrency", default="1,10")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyqmail-tls-bench-") as d:
        tmp = Path(d)
        Path(d).chmod(0o755)
        pq = Pyqmail(tmp, 1, 1000)
        pem = pq.home / "control" / "servercert.pem"
        pf_pem = tmp / "postfix-cert.pem"
        pf_pem.write_bytes(pem.read_bytes())
        pf_pem.chmod(0o600)
        pf = Postfix(
            tmp,
            extra=f"smtpd_tls_security_level = may\nsmtpd_tls_chain_files = {pf_pem}\n"
            "smtpd_tls_session_cache_database =\nsmtpd_tls_loglevel = 0\n",
        )
        try:
            print("| concurrency | pyqmail sessions/s | Postfix sessions/s | ratio "
                  "| pyqmail CPU ms/session | Postfix CPU ms/session |")  # fmt: skip
            print("|---|---|---|---|---|---|")
            for conc in (int(c) for c in a.concurrency.split(",")):
                res: dict[str, list[tuple[float, float]]] = {"p": [], "f": []}
                session(pq.port, ssl._create_unverified_context())  # warm up
                for _ in range(a.runs):
                    res["p"].append(drive(pq.port, pq.pid, a.sessions, conc))
                    res["f"].append(drive(pf.port, pf.pid, a.sessions, conc))
                pr = statistics.median(r for r, _ in res["p"])
                fr = statistics.median(r for r, _ in res["f"])
                pc = statistics.median(c for _, c in res["p"])
                fc = statistics.median(c for _, c in res["f"])
                print(f"| {conc} | {pr:.0f} | {fr:.0f} | {pr / fr:.2f} | {pc:.1f} | {fc:.1f} |")
        finally:
            pq.stop()
            pf.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
