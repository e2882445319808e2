"""cdb reader and writer: round trips, duplicates, large files, atomic replacement."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail import cdb


def build(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    with cdb.Writer(path) as w:
        for k, v in items:
            w.add(k, v)


def test_hash_matches_djb() -> None:
    # h = 5381, then ((h << 5) + h) ^ c
    assert cdb.cdb_hash(b"") == 5381
    assert cdb.cdb_hash(b"a") == ((5381 * 33) & 0xFFFFFFFF) ^ ord("a")


def test_empty_database_is_2048_byte_header(tmp_path: Path) -> None:
    build(tmp_path / "e.cdb", [])
    data = (tmp_path / "e.cdb").read_bytes()
    assert len(data) == 2048
    with cdb.Reader.open(tmp_path / "e.cdb") as r:
        assert r.get(b"x") is None


def test_duplicates_first_wins_and_all_listed(tmp_path: Path) -> None:
    build(tmp_path / "d.cdb", [(b"k", b"1"), (b"other", b"x"), (b"k", b"2")])
    with cdb.Reader.open(tmp_path / "d.cdb") as r:
        assert r.get(b"k") == b"1"
        assert list(r.find_all(b"k")) == [b"1", b"2"]
        assert list(r.items()) == [(b"k", b"1"), (b"other", b"x"), (b"k", b"2")]


def test_large_file_over_64k(tmp_path: Path) -> None:
    items = [(f"key{i}".encode(), b"v" * 50 + str(i).encode()) for i in range(3000)]
    build(tmp_path / "big.cdb", items)
    assert (tmp_path / "big.cdb").stat().st_size > 65536
    with cdb.Reader.open(tmp_path / "big.cdb") as r:
        for k, v in items[::97]:
            assert r.get(k) == v
        assert r.get(b"missing") is None


def test_failed_build_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.cdb"
    build(path, [(b"a", b"old")])
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with cdb.Writer(path) as w:
            w.add(b"a", b"new")
            raise RuntimeError("boom")
    assert path.read_bytes() == before
    assert not (tmp_path / "x.cdb.tmp").exists()


def test_truncated_file_raises(tmp_path: Path) -> None:
    (tmp_path / "t.cdb").write_bytes(b"\0" * 100)
    with pytest.raises(cdb.CdbError):
        cdb.Reader.open(tmp_path / "t.cdb")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=60))
def test_round_trip(
    tmp_path_factory: pytest.TempPathFactory, items: list[tuple[bytes, bytes]]
) -> None:
    path = tmp_path_factory.mktemp("rt") / "r.cdb"
    build(path, items)
    with cdb.Reader.open(path) as r:
        for k, _ in items:
            assert r.get(k) == next(v for kk, v in items if kk == k)
        assert list(r.items()) == items


def test_failed_commit_removes_tmp_and_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "dir.cdb"
    target.mkdir()  # renaming a file over a directory fails
    w = cdb.Writer(target, tmp_path / "t.tmp")
    w.add(b"k", b"v")
    with pytest.raises(OSError) as e:
        w.commit()
    assert e.value.filename2 is not None  # the rename failed, not the write
    assert target.is_dir()
    assert not (tmp_path / "t.tmp").exists()
    with pytest.raises(cdb.CdbError):
        w.commit()  # a writer is used once


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=2048, max_size=2300),
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 40)),
             max_size=8),
    st.lists(st.binary(max_size=4), max_size=4),
)  # fmt: skip
def test_corrupt_files_raise_cdb_error_only(
    data: bytes, entries: list[tuple[int, int, int]], keys: list[bytes]
) -> None:
    buf = bytearray(data)
    for slot, pos, slots in entries:
        struct.pack_into("<II", buf, 8 * slot, pos % (len(buf) + 64), slots)
    r = cdb.Reader(bytes(buf))
    try:
        list(r.items())
    except cdb.CdbError:
        pass
    for key in keys:
        try:
            list(r.find_all(key))
        except cdb.CdbError:
            pass
