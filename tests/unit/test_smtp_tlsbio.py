"""The MemoryBIO TLS layer of the stdin/stdout door: in memory, and over a socket pair."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
import trustme

from pyqmail.smtp import tls, tlsbio


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    pem = tmp_path_factory.mktemp("tls") / "servercert.pem"
    ca.issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(pem))
    return tls.server_context(pem)


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class MemoryClient:
    def __init__(self, ca: trustme.CA) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = client_ctx(ca).wrap_bio(self.inc, self.out, server_hostname="mx.test.example")


def pump(client: MemoryClient, server: tlsbio.BioTls) -> None:
    for _ in range(10):
        try:
            client.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        done = server.step(client.out.read())
        client.inc.write(server.outgoing())
        if done:
            break
    client.obj.do_handshake()
    assert server.established


def test_handshake_and_data_both_ways_in_memory(server_ctx: ssl.SSLContext, ca: trustme.CA) -> None:
    client = MemoryClient(ca)
    server = tlsbio.BioTls(server_ctx)
    pump(client, server)
    info = server.info()
    assert info.version in ("TLSv1.2", "TLSv1.3") and info.cipher
    client.obj.write(b"EHLO c.example\r\n")
    record = client.out.read()
    assert server.decrypt(record[:3]) is None  # not a whole record yet
    assert server.decrypt(record[3:]) == b"EHLO c.example\r\n"
    client.inc.write(server.encrypt(b"250 ok\r\n"))
    assert client.obj.read(100) == b"250 ok\r\n"


def test_a_command_sent_with_the_clients_finished_is_not_lost(
    server_ctx: ssl.SSLContext, ca: trustme.CA
) -> None:
    client = MemoryClient(ca)
    server = tlsbio.BioTls(server_ctx)
    with pytest.raises(ssl.SSLWantReadError):
        client.obj.do_handshake()
    assert not server.step(client.out.read())  # ClientHello
    client.inc.write(server.outgoing())
    client.obj.do_handshake()  # TLS 1.3: the client is done and sends its Finished
    client.obj.write(b"EHLO c.example\r\n")
    assert server.step(client.out.read())  # Finished and the EHLO record in one read
    assert server.buffered() == b"EHLO c.example\r\n"
    assert server.buffered() == b""


def test_close_notify_and_eof_end_the_stream(server_ctx: ssl.SSLContext, ca: trustme.CA) -> None:
    client = MemoryClient(ca)
    server = tlsbio.BioTls(server_ctx)
    pump(client, server)
    try:
        client.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    assert server.decrypt(client.out.read()) == b"" and server.closed
    other = tlsbio.BioTls(server_ctx)
    client2 = MemoryClient(ca)
    pump(client2, other)
    assert other.decrypt(b"") == b""  # a plain end of file (truncation) ends it too


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"RSET\r\nMAIL FROM:<evil@x.example>\r\n",
        b"\x16\x03\x01\x00\x01\x00",
    ],
)
def test_a_handshake_that_is_not_tls_fails(server_ctx: ssl.SSLContext, garbage: bytes) -> None:
    server = tlsbio.BioTls(server_ctx)
    with pytest.raises(tlsbio.TlsFailure):
        server.step(garbage)
        server.step(b"")  # and then the client is gone


def test_decrypting_garbage_after_the_handshake_ends_the_stream(
    server_ctx: ssl.SSLContext, ca: trustme.CA
) -> None:
    client = MemoryClient(ca)
    server = tlsbio.BioTls(server_ctx)
    pump(client, server)
    assert server.decrypt(b"\x17\x03\x03\x00\x05hello") == b""
    assert server.closed


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def run_client(sock: socket.socket, ctx: ssl.SSLContext, result: list[object]) -> None:
    try:
        with ctx.wrap_socket(sock, server_hostname="mx.test.example") as s:
            s.sendall(b"NOOP\r\n")
            result.append(s.recv(100))
            result.append(s.version())
    except (ssl.SSLError, OSError) as e:
        result.append(e)


def test_handshake_over_descriptors(
    server_ctx: ssl.SSLContext, ca: trustme.CA, pair: tuple[socket.socket, socket.socket]
) -> None:
    srv, cli = pair
    result: list[object] = []
    t = threading.Thread(target=run_client, args=(cli, client_ctx(ca), result))
    t.start()
    fd = srv.fileno()
    conn = tlsbio.handshake(server_ctx, fd, fd, 10)
    data = conn.buffered()  # the NOOP may have come with the client's Finished
    while not data:
        data = conn.decrypt(os.read(fd, 65536))
    assert data == b"NOOP\r\n"
    tlsbio.write_all(fd, conn.encrypt(b"250 ok\r\n"), 10)
    t.join(10)
    assert result[0] == b"250 ok\r\n"
    assert result[1] == conn.info().version


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(
    server_ctx: ssl.SSLContext,
    ca: trustme.CA,
    pair: tuple[socket.socket, socket.socket],
    version: ssl.TLSVersion,
) -> None:
    srv, cli = pair
    old = client_ctx(ca)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = version
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    result: list[object] = []
    t = threading.Thread(target=run_client, args=(cli, old, result))
    t.start()
    with pytest.raises(tlsbio.TlsFailure):
        tlsbio.handshake(server_ctx, srv.fileno(), srv.fileno(), 10)
    srv.shutdown(socket.SHUT_RDWR)
    t.join(10)
    assert isinstance(result[0], ssl.SSLError | OSError)


def test_a_silent_client_times_out(
    server_ctx: ssl.SSLContext, pair: tuple[socket.socket, socket.socket]
) -> None:
    srv, _cli = pair
    with pytest.raises(tlsbio.TlsFailure, match="timeout"):
        tlsbio.handshake(server_ctx, srv.fileno(), srv.fileno(), 0.2)


def test_a_client_that_leaves_fails_the_handshake(
    server_ctx: ssl.SSLContext, pair: tuple[socket.socket, socket.socket]
) -> None:
    srv, cli = pair
    cli.close()
    with pytest.raises(tlsbio.TlsFailure, match=r"(?i)eof|end of file"):
        tlsbio.handshake(server_ctx, srv.fileno(), srv.fileno(), 5)
