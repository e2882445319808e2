"""D. J. Bernstein's constant database: reader and writer, byte-identical to cdbmake.

Format (tcprules.md section 6): a 2048-byte header of 256 (position, slots) pairs, the
records (klen, dlen, key, data) in insertion order, then 256 open-addressing hash tables
with twice as many slots as records. All integers are little-endian u32.

We keep our own ~150 lines rather than a package: cdbx is a C extension and pure-cdb has
been unmaintained since 2022; this module is checked byte for byte against Debian's
tcprules and tinycdb in tests/interop.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from array import array
from collections.abc import Iterator
from types import TracebackType

from pyqmail.durable import fsync_dir, write_all

_PAIR = struct.Struct("<II")
_HEADER_SIZE = 2048
_LIMIT = 0xFFFFFFFF


class CdbError(Exception):
    """A cdb file is malformed or too large."""


_U32 = "I" if array("I").itemsize == 4 else "L"  # an array typecode of 4 bytes


def _le(values: array[int]) -> bytes:
    """An array of u32 as little-endian bytes (cdb's byte order on any machine)."""
    if sys.byteorder != "little":
        values = array(_U32, values)
        values.byteswap()
    return values.tobytes()


def cdb_hash(key: bytes) -> int:
    """The cdb hash: h = 5381; h = ((h << 5) + h) ^ c, modulo 2**32."""
    h = 5381
    for c in key:
        h = (h * 33 ^ c) & 0xFFFFFFFF  # c < 256: masking after the xor is the same
    return h


class Reader:
    """A read-only view of a cdb file. Lookups return the first record inserted for a key."""

    def __init__(self, data: bytes | mmap.mmap) -> None:
        if len(data) < _HEADER_SIZE:
            raise CdbError("cdb file shorter than its header")
        self._data = data  # the header is read per lookup: most opens make one or two

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Reader:
        """Open and map ``path``. OSError propagates (ENOENT means: no such cdb)."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CdbError("empty cdb file")
            return cls(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def find_all(self, key: bytes) -> Iterator[bytes]:
        """Every value stored under ``key``, in insertion order."""
        h = cdb_hash(key)
        pos, slots = _PAIR.unpack_from(self._data, 8 * (h & 255))
        if slots == 0:
            return
        data = self._data
        start = (h >> 8) % slots
        for i in range(slots):
            slot_pos = pos + 8 * ((start + i) % slots)
            if slot_pos + 8 > len(data):
                raise CdbError("hash table runs past the end of the file")
            sh, rpos = _PAIR.unpack_from(data, slot_pos)
            if rpos == 0:
                return
            if sh != h:
                continue
            if rpos + 8 > len(data):
                raise CdbError("record runs past the end of the file")
            klen, dlen = _PAIR.unpack_from(data, rpos)
            if klen != len(key):
                continue
            kstart = rpos + 8
            if kstart + klen + dlen > len(data):
                raise CdbError("record runs past the end of the file")
            if data[kstart : kstart + klen] == key:
                yield bytes(data[kstart + klen : kstart + klen + dlen])

    def get(self, key: bytes) -> bytes | None:
        """The first value stored under ``key``, or None."""
        for value in self.find_all(key):
            return value
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record in file order, duplicates included. CdbError if malformed."""
        data = self._data
        end = min(_PAIR.unpack_from(data, 8 * i)[0] for i in range(256))
        if end > len(data):
            raise CdbError("hash tables start past the end of the file")
        pos = _HEADER_SIZE
        while pos < end:
            if pos + 8 > end:
                raise CdbError("record runs into the hash tables")
            klen, dlen = _PAIR.unpack_from(data, pos)
            if pos + 8 + klen + dlen > end:
                raise CdbError("record runs into the hash tables")
            k = bytes(data[pos + 8 : pos + 8 + klen])
            v = bytes(data[pos + 8 + klen : pos + 8 + klen + dlen])
            yield k, v
            pos += 8 + klen + dlen


def get(path: str | os.PathLike[str], key: bytes) -> bytes | None:
    """Look one key up in the cdb at ``path`` (opened and closed for this call)."""
    with Reader.open(path) as r:
        return r.get(key)


class Writer:
    """Builds a cdb file in a temporary file and renames it into place on ``commit``.

    Records are streamed to the temporary file as they are added; only the (hash,
    position) pairs are kept in memory. Until ``commit`` returns, readers of the final
    path see the old file.
    """

    def __init__(self, path: str | os.PathLike[str], tmp: str | os.PathLike[str] | None = None):
        self.path = os.fspath(path)
        self.tmp = os.fspath(tmp) if tmp is not None else self.path + ".tmp"
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = _HEADER_SIZE
        self._entries: list[tuple[int, int]] = []
        self._buf: list[bytes] = [b"\0" * _HEADER_SIZE]
        self._buffered = _HEADER_SIZE
        self._done = False

    def add(self, key: bytes, value: bytes) -> None:
        record = _PAIR.pack(len(key), len(value)) + key + value
        if self._pos + len(record) > _LIMIT:
            raise CdbError("cdb file would exceed 4 GiB")
        self._entries.append((cdb_hash(key), self._pos))
        self._pos += len(record)
        self._buf.append(record)
        self._buffered += len(record)
        if self._buffered >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        write_all(self._fd, b"".join(self._buf))
        self._buf = []
        self._buffered = 0

    def commit(self) -> None:
        """Write the hash tables and header, fsync, and rename over the final path.

        On any failure the temporary file is removed, the final path is untouched, and
        the error propagates (an OSError from the rename has ``filename2`` set).
        """
        if self._done:
            raise CdbError("cdb writer already committed or aborted")
        try:
            self._finish()
            os.rename(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def _finish(self) -> None:
        buckets: list[list[tuple[int, int]]] = [[] for _ in range(256)]
        for h, p in self._entries:
            buckets[h & 255].append((h, p))
        header = array(_U32)
        tables: list[bytes] = []
        pos = self._pos
        for bucket in buckets:
            slots = 2 * len(bucket)
            header.extend((pos, slots))
            hashes = [0] * slots
            positions = [0] * slots  # 0 = empty: no record sits at offset 0
            for h, p in bucket:
                i = (h >> 8) % slots
                while positions[i]:
                    i = (i + 1) % slots
                hashes[i] = h
                positions[i] = p
            table = array(_U32, bytes(8 * slots))
            table[0::2] = array(_U32, hashes)
            table[1::2] = array(_U32, positions)
            tables.append(_le(table))
            pos += 8 * slots
            if pos > _LIMIT:
                raise CdbError("cdb file would exceed 4 GiB")
        self._buf.append(b"".join(tables))
        self._flush()
        os.lseek(self._fd, 0, os.SEEK_SET)
        write_all(self._fd, _le(header))
        os.fsync(self._fd)
        fd, self._fd = self._fd, -1
        os.close(fd)

    def abort(self) -> None:
        """Give up: close and remove the temporary file; the final path is untouched."""
        if not self._done:
            self._done = True
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    os.close(fd)
                except OSError:
                    pass
            try:
                os.unlink(self.tmp)
            except OSError:
                pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if not self._done:
                self.commit()
        else:
            self.abort()
