"""The files qmail-send keeps per message: info/S/N, local/S/N, remote/S/N (queue.md 1, 4, 6).

- ``info/S/N``: ``F<sender>\\0``; its mtime is the message's birth time.
- ``local/S/N`` and ``remote/S/N``: ``T<addr>\\0`` records; a finished recipient has its
  ``T`` overwritten in place by ``D`` (no fsync, as qmail: a crash before the mark
  means a second delivery, never a lost one). mtime = next retry time at shutdown.

Shared by send/ (which writes them), qmail-qread and the cleaners. Writers create the
file with O_EXCL and fsync it; ``create`` also fsyncs the split directory (pyqmail's
improvement over qmail, which relied on BSD directory semantics).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyqmail.durable import fsync_dir, write_all


@dataclass(frozen=True)
class Recipient:
    """One record of a channel file: its byte offset (of the T/D byte), state, address."""

    offset: int
    done: bool
    address: bytes


def _create(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)
    if sync_dir:
        fsync_dir(path.parent)


def write_info(path: Path, sender: bytes, *, sync_dir: bool = True) -> None:
    """Create info/S/N (O_EXCL) with ``F<sender>\\0``, fsynced."""
    _create(path, b"F" + sender + b"\0", sync_dir=sync_dir)


def read_info(path: Path) -> bytes:
    """The sender recorded in info/S/N: the bytes after the first, up to a NUL.

    Lenient as qmail-qread is (it shows ``Fx`` and even ``Zx\\0`` as sender ``x``).
    """
    data = path.read_bytes()
    end = data.find(b"\0")
    return data[1:] if end < 0 else data[1:end]


def format_channel(recipients: Sequence[bytes]) -> bytes:
    return b"".join(b"T" + r + b"\0" for r in recipients)


def write_channel(path: Path, recipients: Sequence[bytes], *, sync_dir: bool = True) -> None:
    """Create local/S/N or remote/S/N (O_EXCL) with ``T<addr>\\0`` records, fsynced."""
    _create(path, format_channel(recipients), sync_dir=sync_dir)


def parse_channel(data: bytes) -> list[Recipient]:
    """Records of a channel file; other record types are skipped (as qmail-send does)."""
    out: list[Recipient] = []
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\0", pos)
        if end < 0:
            break  # a torn last record is not a recipient
        kind = data[pos : pos + 1]
        if kind in (b"T", b"D"):
            out.append(Recipient(pos, kind == b"D", data[pos + 1 : end]))
        pos = end + 1
    return out


def read_channel(path: Path) -> list[Recipient]:
    return parse_channel(path.read_bytes())


def mark_done(path: Path, offset: int) -> None:
    """Overwrite the ``T`` at ``offset`` with ``D`` (qmail-send's markdone). OSError on
    failure: the caller logs qmail's "message will be delivered twice!" warning."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, b"D", offset) != 1:
            raise OSError("short write marking a recipient done")
    finally:
        os.close(fd)


def set_next_try(path: Path, when: float) -> None:
    """Set atime and mtime of a channel file to its next retry time (qmail-send at exit)."""
    os.utime(path, (when, when))
