"""``pyqmail smtpd --listen``: the SMTP listener alone, in one process or several.

The asyncio listener (smtp/server.py) as ``pyqmail run`` embeds it, but on its own, with
its messages queued by ``queue.submit.submitter`` (the in-process writer, or the queue
service for an ordinary user). With ``workers`` above 1, that many acceptor processes
share each port by SO_REUSEPORT, each with its share of the connection limit, and the
parent only relays TERM/INT to them and waits; its exit code is the worst of theirs.

TERM/INT drains as ``pyqmail run`` does (SmtpServer.drain): the listening sockets close,
a session receiving or committing a message gets its reply and then ``421``, the others
``421`` at once, and whatever is still open after control/timeoutdrain seconds is cut off
(its unacknowledged message aborted); then the exit is 0.

Each process raises its descriptor limit to the hard one (thousands of connections need
thousands of descriptors) and prints ``pyqmail smtpd: listening on ADDR:PORT`` on stderr
once bound, one write per line, as the acceptors share the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from pyqmail.control import ControlCache
from pyqmail.home import Home
from pyqmail.queue.submit import submitter
from pyqmail.smtp.authcheck import AuthChecker
from pyqmail.smtp.passwords import PasswordCheck
from pyqmail.smtp.rcptcheck import RcptChecks
from pyqmail.smtp.server import SmtpServer, install_uvloop

PROG = "pyqmail smtpd"


@dataclass(frozen=True)
class ListenOptions:
    """The listener's limits and timings (``pyqmail smtpd``'s options)."""

    rules: Path | None = None  # None: HOME/control/tcp.smtp.cdb
    max_conns: int = 100
    max_per_ip: int = 20
    limit_loopback: bool = False  # loopback clients are exempt from max_per_ip unless set
    greet_delay: float = 0.0
    workers: int = 1
    control_ttl: float = 1.0
    rcpt_checks: RcptChecks | None = None  # recipient checks at RCPT (cli/smtpd.py makes them)


def serve(home: Home, addrs: list[tuple[str, int]], opts: ListenOptions) -> int:
    """Listen on ``addrs`` until TERM/INT; 0 after a clean stop, 111 if it cannot start."""
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    if opts.workers == 1:
        return _serve(home, addrs, opts, opts.max_conns, reuse=False)
    children: list[int] = []
    share = max(1, opts.max_conns // opts.workers)
    for _ in range(opts.workers):
        pid = os.fork()
        if pid == 0:
            code = 111
            try:
                code = _serve(home, addrs, opts, share, reuse=True)
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


def _fatal(message: str) -> int:
    print(f"{PROG}: fatal: {message}", file=sys.stderr)
    return 111


def _serve(
    home: Home, addrs: list[tuple[str, int]], opts: ListenOptions, max_conns: int, *, reuse: bool
) -> int:
    install_uvloop()
    ctl = ControlCache(home)
    try:
        ctl.get()
    except Exception as e:
        return _fatal(f"unable to read controls: {e}")
    raise_nofile()
    server = SmtpServer(
        home,
        ctl,
        submitter(home),
        rules=opts.rules,
        max_conns=max_conns,
        max_per_ip=opts.max_per_ip,
        greet_delay=opts.greet_delay,
        reuse_port=reuse,
        control_ttl=opts.control_ttl,
        limit_loopback=opts.limit_loopback,
        rcpt_checks=opts.rcpt_checks,
        auth=AuthChecker(home.control),  # SPF, DKIM, DMARC of mail from the network
        passwords=PasswordCheck(home),  # SMTP AUTH (each worker counts failures alone)
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
            return _fatal(f"unable to bind: {e}")
        for s in servers:
            for sock in getattr(s, "sockets", ()):
                name = sock.getsockname()
                # one write(2) per line: acceptor processes share the stream (workers)
                sys.stderr.flush()
                os.write(2, f"{PROG}: listening on {name[0]}:{name[1]}\n".encode())
        await stop
        # stop accepting; sessions in DATA get their reply, then 421 (control/timeoutdrain)
        await server.drain()
        for s in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 5)
        await server.aclose()  # the messages being committed get their replies
        return 0

    return asyncio.run(run())


def raise_nofile() -> None:
    """Thousands of connections need thousands of descriptors: raise the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
