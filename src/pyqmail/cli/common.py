"""What every command shares: finding the home, and qmail-style fatal messages."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from pyqmail.home import Home, resolve_home
from pyqmail.listener import parse_listen

ListenerStart = Callable[[str, int], Awaitable[asyncio.AbstractServer]]


def split_home_args(argv: Sequence[str]) -> tuple[Home, list[str]]:
    """Strip leading ``--home DIR`` / ``--home=DIR`` / ``--single-user`` from ``argv``.

    qmail's programs have fixed argument lists; pyqmail lets each take these two options
    first, before its own arguments, and otherwise reads PYQMAIL_HOME and
    PYQMAIL_SINGLE_USER.
    """
    args = list(argv)
    home_arg: str | None = None
    single = False
    while args:
        a = args[0]
        if a == "--home" and len(args) > 1:
            home_arg = args[1]
            del args[:2]
        elif a.startswith("--home="):
            home_arg = a[len("--home=") :]
            del args[0]
        elif a == "--single-user":
            single = True
            del args[0]
        else:
            break
    return resolve_home(home_arg, single), args


def fatal(prog: str, message: str, code: int = 111) -> int:
    """Print ``prog: fatal: message`` on stderr and return ``code`` (qmail's style)."""
    print(f"{prog}: fatal: {message}", file=sys.stderr)
    return code


def serve_listener(prog: str, listen: str, start: ListenerStart) -> int:
    """Run one asyncio listener until Ctrl-C or TERM: the ``--listen`` mode of the QMQP and
    QMTP servers. ``start(host, port)`` binds it and returns the server."""
    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        return fatal(prog, str(e), 100)

    async def run() -> None:
        server = await start(host, port)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        return fatal(prog, f"unable to listen on {listen}: {e.strerror}", 111)
    return 0


_CONTROL = {c: "?" for c in [*range(0, 9), *range(11, 32), 127]}  # keeps \t and \n


def printable(text: str) -> str:
    """Text that came from a message, a user's file or a remote server, made safe for a
    terminal: every control character but tab and newline becomes ``?``."""
    return text.translate(_CONTROL)
