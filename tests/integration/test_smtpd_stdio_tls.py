"""run_stdio's STARTTLS in process, over a socket pair, with a client whose TLS bytes the
test writes itself: the cases timing cannot be trusted to produce (a command in the same
segment as the client's Finished; STARTTLS with the handshake pipelined behind it)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pyqmail.home import Home
from pyqmail.smtp import replies
from pyqmail.smtp.stdio import run_stdio


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


class Client:
    def __init__(self, sock: socket.socket, ca: trustme.CA) -> None:
        self.sock = sock
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname="mx.test.example")
        self.buf = b""

    def line_reply(self) -> bytes:
        while b"\r\n" not in self.buf or self.buf.split(b"\r\n")[-2][3:4] == b"-":
            self.buf += self.sock.recv(4096)
        out, self.buf = self.buf, b""
        return out

    def handshake_without_finished(self) -> None:
        """Run the handshake up to the client's Finished, which stays unsent."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                if data := self.out.read():
                    self.sock.sendall(data)
                self.inc.write(self.sock.recv(65536))

    def tls_reply(self) -> bytes:
        got = b""
        while not got.endswith(b"\r\n") or got.split(b"\r\n")[-2][3:4] == b"-":
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self.inc.write(self.sock.recv(65536))
        return got


@pytest.fixture
def session(home: Home, ca: trustme.CA) -> Iterator[tuple[Client, list[int]]]:
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(
        str(Path(home.control / "servercert.pem"))
    )
    srv, cli = socket.socketpair()
    rc: list[int] = []
    t = threading.Thread(
        target=lambda: rc.append(
            run_stdio(home, {"TCPREMOTEIP": "127.0.0.1"}, infd=srv.fileno(), outfd=srv.fileno())
        )
    )
    t.start()
    cli.settimeout(20)
    c = Client(cli, ca)
    assert c.line_reply().startswith(b"220 ")
    yield c, rc
    cli.close()
    t.join(30)
    srv.close()


def test_a_command_in_the_segment_of_the_clients_finished_is_answered(
    session: tuple[Client, list[int]],
) -> None:
    c, _rc = session
    c.sock.sendall(b"EHLO c.example\r\n")
    assert b"250-STARTTLS" in c.line_reply()
    c.sock.sendall(b"STARTTLS\r\n")
    assert c.line_reply() == replies.TLS_GO
    c.handshake_without_finished()
    c.tls.write(b"EHLO c.example\r\n")
    c.sock.sendall(c.out.read())  # Finished (+ ticket ack) and the EHLO record, one write
    reply = c.tls_reply()
    assert reply.startswith(b"250-mx.test.example\r\n") and b"STARTTLS" not in reply
    c.tls.write(b"QUIT\r\n")
    c.sock.sendall(c.out.read())
    assert c.tls_reply().startswith(b"221 ")


def test_a_client_hello_pipelined_behind_starttls_is_discarded(
    session: tuple[Client, list[int]],
) -> None:
    # The ClientHello sent before the 220 arrives with the STARTTLS line: like any
    # pipelined byte it is thrown away, so this handshake cannot complete.
    c, rc = session
    with pytest.raises(ssl.SSLWantReadError):
        c.tls.do_handshake()
    c.sock.sendall(b"STARTTLS\r\n" + c.out.read())
    assert c.line_reply() == replies.TLS_GO
    c.sock.shutdown(socket.SHUT_WR)  # the server waits for a ClientHello that never comes
    deadline = time.monotonic() + 20
    while not rc and time.monotonic() < deadline:
        time.sleep(0.01)  # run_stdio returns when its handshake fails
    assert rc == [1]
    c.sock.settimeout(0.1)
    try:
        rest = c.sock.recv(100)
    except TimeoutError:
        rest = b""
    assert rest == b"" or rest.startswith(b"\x15\x03")  # at most a TLS alert
