"""systemd's notification protocol (sd_notify(3)), written out: no dependency.

A service started with ``Type=notify`` finds ``NOTIFY_SOCKET`` in its environment: an
AF_UNIX datagram socket, a path or, when it starts with ``@``, a name in the abstract
namespace (the ``@`` stands for the leading NUL byte). Each datagram is newline-separated
``KEY=VALUE`` lines; pyqmail sends ``READY=1`` (listening, scheduler up), ``STATUS=...``
(one line for ``systemctl status``), ``WATCHDOG=1`` (the loop is alive: under
``WatchdogSec=`` systemd sets ``WATCHDOG_USEC`` and restarts a service that stays silent
that long) and ``STOPPING=1`` (SIGTERM is being handled).

Invariants: nothing here raises. Without ``NOTIFY_SOCKET`` every call does nothing; a send
that fails (systemd gone, socket full) is dropped, never an error of the daemon. The
variables are taken out of ``os.environ`` when read (sd_notify's ``unset_environment``), so
no delivery program inherits them: with ``NotifyAccess=main`` only the process that read
them speaks to systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import MutableMapping

__all__ = ["Notifier"]

_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """The notifications of one service process (see the module docstring).

    ``address``: the socket as ``NOTIFY_SOCKET`` names it (None: notifications off);
    ``watchdog_usec``: ``WATCHDOG_USEC`` (0: no watchdog).
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if self.address else 0
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """The notifier ``environ`` (default ``os.environ``) describes; with ``unset`` the
        three variables are removed from it. A watchdog meant for another pid
        (``WATCHDOG_PID``) is not ours."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        if unset:
            for name in _VARS:
                env.pop(name, None)
        usec = int(usec_text) if usec_text.isdigit() else 0
        if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
            usec = 0
        if address and address[0] not in "/@":
            address = ""  # sd_notify accepts only these two forms (vsock is not for us)
        return cls(address or None, usec)

    @property
    def enabled(self) -> bool:
        """Whether systemd listens (NOTIFY_SOCKET was set)."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
        recommends; None without a watchdog."""
        if not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=VALUE`` each) as one datagram; False if not sent."""
        if self.address is None or not lines:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        data = "\n".join(_one_line(x) for x in lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never wait on systemd from the event loop
            self._sock.sendto(data, target)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (with a STATUS line when given)."""
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """STATUS=text: the line ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")

    def watchdog(self, status: str | None = None) -> bool:
        """WATCHDOG=1 (with a STATUS line when given); nothing without a watchdog."""
        if not self.watchdog_usec:
            return self.status(status) if status else False
        return self.notify("WATCHDOG=1", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: the shutdown has begun."""
        return self.notify("STOPPING=1", *_status(status))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    return () if text is None else (f"STATUS={text}",)


def _one_line(text: str) -> str:
    """A value may not span lines: a newline would start a new KEY=VALUE."""
    return text.replace("\r", " ").replace("\n", " ")
