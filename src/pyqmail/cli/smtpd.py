"""``qmail-smtpd`` (stdin/stdout, under tcpserver) and ``pyqmail smtpd --listen ADDR:PORT``.

Without ``--listen`` this is qmail-smtpd: the socket is fd 0/1 and the environment is
what tcpserver set (TCPREMOTEIP, TCPREMOTEHOST, TCPREMOTEINFO, TCPLOCALIP, TCPLOCALHOST,
RELAYCLIENT, DATABYTES, QMAILQUEUE). Extra arguments (a checkpassword program, as AUTH
patches take) are ignored, as qmail-smtpd ignores them.

With ``--listen`` it is the asyncio listener alone (what ``pyqmail run`` embeds), with
``--rules CDB`` (default HOME/control/tcp.smtp.cdb), ``--max-conns``, ``--max-per-ip``
(loopback clients exempt unless ``--limit-loopback``), ``--greet-delay`` (talking before
the greeting gets 554), ``--control-ttl`` (how often control/ and the cdbs are re-checked)
and ``--workers N`` (N processes sharing the port by SO_REUSEPORT, each with its share of
the connection limit). It prints ``pyqmail smtpd: listening on ADDR:PORT`` on stderr once
bound (per worker).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pyqmail.cli.common import fatal, split_home_args
from pyqmail.home import Home, resolve_home

PROG = "pyqmail smtpd"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--listen" or a.startswith("--listen=") for a in args):
        home, _rest = split_home_args(args)
        from pyqmail.smtp.stdio import run_stdio

        return run_stdio(home)
    p = argparse.ArgumentParser(prog=PROG, description="the SMTP listener")
    p.add_argument("--listen", action="append", required=True, metavar="ADDR:PORT")
    p.add_argument("--rules", type=Path, default=None, metavar="CDB")
    p.add_argument("--home", default=None)
    p.add_argument("--single-user", action="store_true")
    p.add_argument("--max-conns", type=int, default=100)
    p.add_argument("--max-per-ip", type=int, default=20)
    p.add_argument(
        "--limit-loopback",
        action="store_true",
        help="apply --max-per-ip to loopback clients too (exempt by default)",
    )
    p.add_argument("--greet-delay", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--control-ttl",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="re-check control/ and the rules cdb at most this often (0: every connection)",
    )
    ns = p.parse_args(args)
    home = resolve_home(ns.home, ns.single_user)
    from pyqmail.cli.common import parse_listen

    try:
        addrs = [parse_listen(a) for a in ns.listen]
    except ValueError as e:
        return fatal(PROG, str(e), 100)
    if ns.workers < 1 or ns.max_conns < 1 or ns.max_per_ip < 1:
        return fatal(PROG, "--workers, --max-conns and --max-per-ip must be positive", 100)
    logging.basicConfig(level=logging.WARNING, format="pyqmail smtpd: %(message)s")
    if ns.workers == 1:
        return _serve(home, ns, addrs, ns.max_conns, reuse=False)
    children: list[int] = []
    share = max(1, ns.max_conns // ns.workers)
    for _ in range(ns.workers):
        pid = os.fork()
        if pid == 0:
            code = 111
            try:
                code = _serve(home, ns, addrs, share, reuse=True)
            finally:
                os._exit(code)
        children.append(pid)

    def _stop(signum: int, _frame: object) -> None:
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worst = 0
    for c in children:
        _, status = os.waitpid(c, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst


def _serve(
    home: Home, ns: argparse.Namespace, addrs: list[tuple[str, int]], max_conns: int, *, reuse: bool
) -> int:
    from pyqmail.control import ControlCache
    from pyqmail.queue.submit import submitter
    from pyqmail.smtp.server import SmtpServer, install_uvloop

    install_uvloop()
    ctl = ControlCache(home)
    try:
        ctl.get()
    except Exception as e:
        return fatal(PROG, f"unable to read controls: {e}")
    _raise_nofile()
    server = SmtpServer(
        home,
        ctl,
        submitter(home),
        rules=ns.rules,
        max_conns=max_conns,
        max_per_ip=ns.max_per_ip,
        greet_delay=ns.greet_delay,
        reuse_port=reuse,
        control_ttl=ns.control_ttl,
        limit_loopback=ns.limit_loopback,
    )

    async def run() -> int:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def _stop() -> None:
            if not stop.done():
                stop.set_result(None)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop)
        try:
            servers = [await server.start(h, port) for h, port in addrs]
        except OSError as e:
            return fatal(PROG, f"unable to bind: {e}")
        for s in servers:
            for sock in getattr(s, "sockets", ()):
                name = sock.getsockname()
                # one write(2) per line: acceptor processes share the stream (--workers)
                sys.stderr.flush()
                os.write(2, f"{PROG}: listening on {name[0]}:{name[1]}\n".encode())
        await stop
        for s in servers:
            s.close()
        await server.aclose()  # the messages being committed get their replies
        return 0

    return asyncio.run(run())


def _raise_nofile() -> None:
    """Thousands of connections need thousands of descriptors: raise the soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
