"""Container health check: the SMTP listener answers with a 220 greeting (exit 0), else 1.

The address is PYQMAIL_SMTP's port on loopback (a wildcard listen address), as the
entrypoint starts it.
"""

import os
import socket
import sys

listen = os.environ.get("PYQMAIL_SMTP", "0.0.0.0:25")
host, _, port = listen.rpartition(":")
host = host.strip("[]")
host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "0": "127.0.0.1", "::": "::1"}.get(host, host)
try:
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(5)
        ok = s.recv(512).startswith(b"220")
        s.sendall(b"QUIT\r\n")
except OSError as e:
    print(f"pyqmail-healthcheck: {host}:{port}: {e}", file=sys.stderr)
    ok = False
sys.exit(0 if ok else 1)
