"""Small scripted SMTP servers on loopback for the remote-delivery tests (no tests here;
named test_remote_* to stay within the remote test files)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Script:
    """How the peer answers. A reply of None means: close the connection right there."""

    greeting: bytes | None = b"220 peer.test ESMTP\r\n"
    ehlo: bytes = b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    mail: bytes | None = b"250 ok\r\n"
    rcpt: Callable[[bytes], bytes] = lambda addr: b"250 ok\r\n"
    data: bytes | None = b"354 go ahead\r\n"
    after: bytes | None = b"250 ok: queued\r\n"
    silent: bool = False  # accept, then say nothing
    drop_mid_data: bool = False  # close after the first body bytes
    starttls: ssl.SSLContext | None = None  # offer STARTTLS with this server context
    broken_tls: bool = False  # offer STARTTLS, then answer the handshake with garbage
    tls_first_only: bool = True  # offer STARTTLS only on the first connection


@dataclass
class Peer:
    script: Script
    connections: int = 0
    messages: list[tuple[bytes, list[bytes], bytes]] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    tls_used: list[bool] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)  # the client address of each connection
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, host: str = "127.0.0.1") -> Peer:
        self._server = await asyncio.start_server(self._handle, host, 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Let the sessions finish (the client has closed its side), then stop."""
        assert self._server is not None
        self._server.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for w in list(self._writers):
            w.transport.abort()
        await self._server.wait_closed()

    async def __aenter__(self) -> Peer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        self.clients.append(w.get_extra_info("peername")[0])
        first = self.connections == 1
        try:
            await self._talk(r, w, first)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except asyncio.CancelledError:
            return
        finally:
            self._writers.discard(w)
            w.transport.abort()

    async def _talk(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, first: bool) -> None:
        s = self.script
        if s.silent:
            await r.read()
            return
        if s.greeting is None:
            return
        w.write(s.greeting)
        sender, rcpts = b"", []
        tls = False
        offer_tls = (s.starttls is not None or s.broken_tls) and (first or not s.tls_first_only)
        while True:
            line = await r.readline()
            if not line:
                return
            self.commands.append(line)
            u = line.strip().upper()
            if u.startswith(b"HELO"):
                w.write(b"250 peer.test\r\n")
            elif u.startswith(b"EHLO"):
                caps = s.ehlo
                if offer_tls and not tls:
                    caps = caps.replace(b"250 ", b"250-", 1) if caps.count(b"\n") == 1 else caps
                    caps = b"250-peer.test\r\n250-STARTTLS\r\n" + caps.split(b"\r\n", 1)[1]
                w.write(caps)
            elif u == b"STARTTLS":
                w.write(b"220 ready\r\n")
                await w.drain()
                if s.broken_tls:
                    await r.read(10)
                    w.write(b"this is not a TLS server hello\r\n" * 10)
                    await w.drain()
                    return
                assert s.starttls is not None
                await w.start_tls(s.starttls)
                tls = True
            elif u.startswith(b"MAIL FROM:"):
                if s.mail is None:
                    return
                sender, rcpts = line.strip()[10:], []
                w.write(s.mail)
            elif u.startswith(b"RCPT TO:"):
                addr = line.strip()[8:].strip(b"<>")
                reply = s.rcpt(addr)
                if reply.startswith(b"2"):
                    rcpts.append(addr)
                w.write(reply)
            elif u == b"DATA":
                if s.data is None:
                    return
                w.write(s.data)
                if not s.data.startswith(b"354"):
                    continue
                await w.drain()
                if s.drop_mid_data:
                    await r.read(1000)
                    return
                body = bytearray()
                while True:
                    chunk = await r.readline()
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    body += chunk
                if s.after is None:
                    return
                self.messages.append((sender, rcpts, bytes(body)))
                self.tls_used.append(tls)
                w.write(s.after)
            elif u == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                return
            elif u == b"RSET":
                w.write(b"250 ok\r\n")
            else:
                w.write(b"502 unimplemented\r\n")
            await w.drain()
