#!/usr/bin/env python3
"""SMTP accept rate with the checks of incoming mail on and off, same run (issue 13).

    .venv/bin/python bench/authcheck.py [--runs 3] [--messages 1000] [--sessions 10]

Starts ``pyqmail smtpd --listen`` (bench/smtp.py's ``Pyqmail``) on a fresh home whose
clients are not relay clients, with ``PYQMAIL_RESOLVER`` pointed at a private Debian
dnsmasq on loopback that publishes SPF (``ip4:127.0.0.1 -all``), DMARC (``p=reject``) and
a DKIM key for ``pass.test``; Postfix's ``smtp-source`` sends 1 KiB messages from
``bob@pass.test`` (HELO ``pass.test``), a new connection per message. Modes, one
listener each, alternating run by run so each sees the same noise:

* ``off``: control/authchecks turns every check off (the listener's own path);
* ``spf``: SPF only (MAIL FROM and HELO at MAIL; the message streams, header known);
* ``all``: SPF, DKIM, DMARC on an unsigned message (spooled, verdict, then queued);
* ``all+dkim``: the same with a DKIM-signed message (RSA 1024, one signature verified).

dnsmasq answers from memory, so DNS costs a loopback round trip, not a resolver's wait:
these are the checks' CPU and latency costs, a floor for a real site. Medians of
``--runs``; rate = messages durably accepted per second; ratio against ``off``.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dkim  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smtp import Pyqmail, free_port, tree_cpu  # type: ignore[import-not-found]

MODES = {
    "off": "spf=off\ndkim=off\ndmarc=off\n",
    "spf": "spf=tag\ndkim=off\ndmarc=off\n",
    "all": "",
    "all+dkim": "",
}


def dnsmasq(tmp: Path, pubkey: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    records = [
        "--txt-record=pass.test,v=spf1 ip4:127.0.0.1 -all",
        "--txt-record=_dmarc.pass.test,v=DMARC1; p=reject",
        f"--txt-record=sel._domainkey.pass.test,v=DKIM1; k=rsa; p={pubkey}",
    ]
    proc = subprocess.Popen(
        ["dnsmasq", "-k", "--no-resolv", "--no-hosts", f"--port={port}",
         "--listen-address=127.0.0.1", "--bind-interfaces", f"--pid-file={tmp / 'dns.pid'}",
         *(["--user=root"] if os.geteuid() == 0 else []), "--local=/test/", *records],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.5)
    return proc, f"127.0.0.1:{port}"


def key(tmp: Path) -> tuple[bytes, str]:
    subprocess.run(["openssl", "genrsa", "-out", str(tmp / "k.pem"), "1024"],
                   check=True, capture_output=True)  # fmt: skip
    pub = ["openssl", "rsa", "-in", str(tmp / "k.pem"), "-pubout", "-outform", "DER"]
    der = subprocess.run(pub, check=True, capture_output=True).stdout
    return (tmp / "k.pem").read_bytes(), base64.b64encode(der).decode()


def message(tmp: Path, priv: bytes | None) -> Path:
    body = b"".join(
        b"line %04d of the bench message, to make about one KiB\n" % i for i in range(18)
    )
    msg = b"From: bob@pass.test\nTo: rcpt@bench.local\nSubject: bench\n\n" + body
    if priv is not None:
        msg = (
            dkim.sign(
                msg,
                b"sel",
                b"pass.test",
                priv,
                include_headers=[b"from", b"subject"],
                linesep=b"\n",
            )
            + msg
        )
    path = tmp / ("signed.eml" if priv is not None else "plain.eml")
    path.write_bytes(msg)  # LF only: smtp-source sends each line with CRLF
    return path


def drive(server: Pyqmail, n: int, sessions: int, msg: Path) -> tuple[float, float]:
    before = server.queued()
    cpu0 = tree_cpu(server.pid)
    t0 = time.perf_counter()
    p = subprocess.run(
        ["smtp-source", "-m", str(n), "-s", str(sessions), "-F", str(msg), "-f", "bob@pass.test",
         "-t", "rcpt@bench.local", "-M", "pass.test", f"127.0.0.1:{server.port}"],
        capture_output=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    cpu = tree_cpu(server.pid) - cpu0
    got = server.queued() - before
    if got != n:
        print(f"  {got} of {n} queued: {p.stderr[-300:]!r}", file=sys.stderr)
    return got / wall, 1000 * cpu / max(n, 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", type=int, default=10)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyqmail-authbench-") as t:
        tmp = Path(t)
        priv, pub = key(tmp)
        dns, spec = dnsmasq(tmp, pub)
        os.environ["PYQMAIL_RESOLVER"] = spec
        plain, signed = message(tmp, None), message(tmp, priv)
        servers: dict[str, Pyqmail] = {}
        try:
            for mode, text in MODES.items():
                (tmp / mode).mkdir()
                servers[mode] = s = Pyqmail(tmp / mode, 1, 200)
                (s.home / "control" / "authchecks").write_text(text)
            time.sleep(1.5)  # the listeners look at control/authchecks once a second
            rates: dict[str, list[float]] = {m: [] for m in MODES}
            cpus: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(a.runs):
                for mode, s in servers.items():
                    msg = signed if mode == "all+dkim" else plain
                    r, c = drive(s, a.messages, a.sessions, msg)
                    rates[mode].append(r)
                    cpus[mode].append(c)
            print(f"{a.messages} messages of 1 KiB, {a.sessions} sessions, median of {a.runs}\n")
            print("| checks | msg/s | server CPU ms/msg | rate vs off |")
            print("|---|---:|---:|---:|")
            base = statistics.median(rates["off"])
            for mode in MODES:
                r = statistics.median(rates[mode])
                c = statistics.median(cpus[mode])
                print(f"| {mode} | {r:.0f} | {c:.2f} | {r / base:.2f} |")
            for mode in ("all", "all+dkim"):
                for f in (servers[mode].home / "queue" / "mess").rglob("*"):
                    if f.is_file():
                        head = f.read_bytes().split(b"\n\n")[0].decode()
                        ar = head[head.find("Authentication-Results") :].split("\n")
                        n = 1 + next(i for i, x in enumerate([*ar[1:], ""]) if x[:1] != "\t")
                        print(f"\n{mode}: " + " ".join(" ".join(ar[:n]).split()))
                        break
        finally:
            for s in servers.values():
                s.stop()
            dns.terminate()
            dns.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
