"""queue/lock/tcpto: qmail's memory of IPv4 addresses whose SMTP connect timed out.

Byte format and rules exactly as qmail's tcpto.c (remote.md section 4), so qmail-tcpto,
qmail-tcpok and a real qmail-remote can share the file:

- 1024 bytes = 64 records of 16 bytes, an all-zero record is free. Record: bytes 0-3 the
  IPv4 address (network order), byte 4 the count of recent timeouts (0-10), bytes 8-11
  the time of the last timeout (little-endian seconds).
- Every access holds an exclusive ``flock`` on a write-open descriptor of the file.
- :meth:`Tcpto.is_down`: count >= 2 and the last timeout less than
  ``(60 + (pid & 31)) * 64`` seconds ago (3840-5824 s; the per-process spread is qmail's).
- :meth:`Tcpto.record`: after a connect. A success or a non-timeout error resets a record
  that was seen during the check; a timeout bumps the count (at most 10) unless the last
  timeout was under 120 s ago, or takes a free record, else evicts the record with the
  smallest ``when + count * 1024``.

The file is never opened through a symlink: qmail-tcpok and qmail-tcpto may run as root,
and lock/ belongs to the queue's owner.

IPv6 addresses are not recorded (qmail's format has room for IPv4 only); they are always
tried. An unreadable or missing file turns the table off, as in qmail.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SIZE = 1024
RECORD = 16
RECORDS = SIZE // RECORD


@dataclass(frozen=True, slots=True)
class Entry:
    ip: str
    count: int
    when: int


def parse(data: bytes) -> list[Entry]:
    """Every record with a count of at least 1 (what qmail-tcpto prints)."""
    out = []
    for i in range(0, min(len(data), SIZE) - RECORD + 1, RECORD):
        rec = data[i : i + RECORD]
        if rec[4] >= 1:
            ip = str(ipaddress.IPv4Address(rec[0:4]))
            out.append(Entry(ip, rec[4], struct.unpack("<I", rec[8:12])[0]))
    return out


def format_entries(data: bytes, now: int) -> str:
    """qmail-tcpto's output: ``1.2.3.4 timed out 123 seconds ago; # recent timeouts: 2``."""
    lines = []
    for e in parse(data):
        lines.append(f"{e.ip} timed out {now - e.when} seconds ago; # recent timeouts: {e.count}\n")
    return "".join(lines)


class Tcpto:
    """The table in ``path``; ``clock`` and ``pid`` are parameters for tests."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, pid: int | None = None
    ) -> None:
        self.path = path
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._seen: set[bytes] = set()  # addresses that had a record at the last check

    def _now(self) -> int:
        return int(self._clock()) & 0xFFFFFFFF

    def _locked(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NOCTTY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _read(fd: int) -> bytearray:
        buf = bytearray(os.pread(fd, SIZE, 0))
        buf += bytes(SIZE - len(buf))
        return buf

    def is_down(self, ip: str) -> bool:
        """True if ``ip`` should be skipped now. Also remembers that ``ip`` was seen."""
        key = _key(ip)
        if key is None:
            return False
        fd = self._locked()
        if fd is None:
            return False
        try:
            buf = self._read(fd)
        finally:
            os.close(fd)
        limit = (60 + (self._pid & 31)) << 6
        now = self._now()
        for i in range(0, SIZE, RECORD):
            if buf[i : i + 4] == key:
                self._seen.add(key)
                when = struct.unpack_from("<I", buf, i + 8)[0]
                return buf[i + 4] >= 2 and now - when < limit
        return False

    def record(self, ip: str, timed_out: bool) -> None:
        """Note the result of a connect attempt to ``ip`` (tcpto_err)."""
        key = _key(ip)
        if key is None:
            return
        if not timed_out:
            if key not in self._seen:
                return  # qmail: nothing to reset unless the check saw a record
            self._seen.discard(key)
        fd = self._locked()
        if fd is None:
            return
        try:
            buf = self._read(fd)
            now = self._now()
            hit = next((i for i in range(0, SIZE, RECORD) if buf[i : i + 4] == key), -1)
            if not timed_out:
                if hit >= 0 and buf[hit + 4]:
                    buf[hit + 4] = 0
                    os.pwrite(fd, bytes(buf[hit : hit + RECORD]), hit)
                return
            if hit >= 0:
                when = struct.unpack_from("<I", buf, hit + 8)[0]
                if buf[hit + 4] and now - when < 120:
                    return
                buf[hit + 4] = min(buf[hit + 4] + 1, 10)
                struct.pack_into("<I", buf, hit + 8, now)
                os.pwrite(fd, bytes(buf[hit : hit + RECORD]), hit)
                return
            slot = next((i for i in range(0, SIZE, RECORD) if not buf[i + 4]), -1)
            if slot < 0:

                def weight(i: int) -> int:
                    when: int = struct.unpack_from("<I", buf, i + 8)[0]
                    return when + (buf[i + 4] << 10)

                slot = min(range(0, SIZE, RECORD), key=weight)
            rec = bytearray(RECORD)
            rec[0:4] = key
            rec[4] = 1
            struct.pack_into("<I", rec, 8, now)
            os.pwrite(fd, bytes(rec), slot)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """Zero the whole table (qmail-tcpok; qmail-rspawn at start-up)."""
        fd = self._locked()
        if fd is None:
            raise OSError(f"unable to open {self.path} for writing")
        try:
            os.pwrite(fd, bytes(SIZE), 0)
            os.ftruncate(fd, SIZE)
        finally:
            os.close(fd)

    def entries(self) -> list[Entry]:
        return parse(read_table(self.path))


def read_table(path: Path) -> bytes:
    """The table's bytes; never through a symlink (qmail-tcpto may run as root, and
    lock/ is the queue owner's)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    try:
        return os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)


def _key(ip: str) -> bytes | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.version != 4:
        return None
    return addr.packed
