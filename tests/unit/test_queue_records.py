"""queue/records.py (info/local/remote), queue/clean.py (qmail-clean's job) and
queue/reader.py (qstat/qread formatting)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue import clean
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import (
    QueueCounts,
    QueuedMessage,
    format_message,
    qmail_strerror,
    qstat_text,
)
from pyqmail.queue.records import (
    Recipient,
    append_bounce,
    format_channel,
    iter_channel,
    mark_done,
    mark_done_fd,
    open_channel,
    parse_channel,
    parse_info,
    read_channel,
    read_info,
    read_info_birth,
    set_next_try,
    write_channel,
    write_info,
)


def test_info_roundtrip(tmp_path: Path) -> None:
    p = tmp_path / "info"
    write_info(p, b"joe@example.com")
    assert p.read_bytes() == b"Fjoe@example.com\0"
    assert read_info(p) == b"joe@example.com"
    assert os.stat(p).st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_info(p, b"x")
    write_info(tmp_path / "empty", b"")
    assert read_info(tmp_path / "empty") == b""


def test_channel_and_marking(tmp_path: Path) -> None:
    p = tmp_path / "local"
    write_channel(p, [b"a@x", b"bb@x", b"ccc@x"])
    assert p.read_bytes() == b"Ta@x\0Tbb@x\0Tccc@x\0"
    recs = read_channel(p)
    assert recs == [
        Recipient(0, False, b"a@x"),
        Recipient(5, False, b"bb@x"),
        Recipient(11, False, b"ccc@x"),
    ]
    mark_done(p, recs[1].offset)
    assert p.read_bytes() == b"Ta@x\0Dbb@x\0Tccc@x\0"
    assert [r.done for r in read_channel(p)] == [False, True, False]
    when = time.time() + 3600
    set_next_try(p, when)
    assert abs(os.stat(p).st_mtime - when) < 1


def test_parse_channel_torn_and_unknown() -> None:
    assert parse_channel(b"Ta\0Xjunk\0Db\0Tc") == [
        Recipient(0, False, b"a"),
        Recipient(9, True, b"b"),
    ]
    assert format_channel([b"a", b"b"]) == b"Ta\0Tb\0"


def test_write_failure_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_channel(tmp_path / "nodir" / "x", [b"a"])
    assert not (tmp_path / "nodir").exists()


def _msg(home: Home, n: int) -> QueuePaths:
    paths = QueuePaths(home.queue)
    paths.mess(n).write_bytes(b"m")
    paths.intd(n).write_bytes(b"e")
    os.link(paths.intd(n), paths.todo(n))
    return paths


def test_clean_todo_order(home: Home) -> None:
    paths = _msg(home, 100)
    clean.clean_todo(paths, 100)
    assert not paths.intd(100).exists() and not paths.todo(100).exists()
    assert paths.mess(100).exists()
    clean.clean_todo(paths, 100)  # missing files are not an error


def test_finish_message(home: Home) -> None:
    paths = _msg(home, 101)
    write_info(paths.info(101), b"s")
    clean.finish_message(paths, 101)
    assert not paths.info(101).exists() and not paths.mess(101).exists()
    assert not paths.intd(101).exists()


@pytest.mark.parametrize(
    ("req", "reply"),
    [
        (b"todo/102", b"+"),
        (b"foop/102", b"+"),
        (b"foop/999", b"+"),  # nothing to remove is fine
        (b"todo/", b"x"),
        (b"bar/102", b"x"),
        (b"todo/12a", b"x"),
        (b"foop/" + b"1" * 100, b"x"),
        (b"x", b"x"),
    ],
)
def test_clean_protocol(home: Home, req: bytes, reply: bytes) -> None:
    paths = _msg(home, 102)
    assert clean.handle_request(paths, req) == reply


def test_clean_protocol_failure(home: Home) -> None:
    paths = _msg(home, 103)
    os.unlink(paths.intd(103))
    os.mkdir(paths.intd(103))  # unlink of a directory fails: "!"
    assert clean.handle_request(paths, b"foop/103") == b"!"


def test_qstat_text() -> None:
    assert qstat_text(QueueCounts(12, 0)) == (
        "messages in queue: 12\nmessages in queue but not yet preprocessed: 0\n"
    )


def test_format_message() -> None:
    m = QueuedMessage(
        7,
        812090814.0,
        1234,
        b"a\tb\xff@x",
        False,
        (Recipient(0, True, b"l@x"),),
        (Recipient(0, False, b"r\n@y"),),
    )
    assert format_message(m) == (
        "26 Sep 1995 04:46:54 GMT  #7  1234  <a_b_@x> \n  done\tlocal\tl@x\n\tremote\tr_@y\n"
    )


def test_qmail_strerror() -> None:
    assert qmail_strerror(FileNotFoundError(errno.ENOENT, "x")) == "file does not exist"
    assert qmail_strerror(PermissionError(errno.EACCES, "x")) == "access denied"
    assert qmail_strerror(OSError(errno.ELOOP, "Too many levels")) == "too many levels"


# ---- the helpers the scheduler (send/manager.py) uses on its hot path


def test_channel_done_marks_and_str_paths(tmp_path: Path) -> None:
    p = str(tmp_path / "local")
    write_channel(p, [b"a@x", b"b@y"], done=[True, False], sync_dir=False)
    assert Path(p).read_bytes() == b"Da@x\0Tb@y\0"
    assert read_channel(p) == [Recipient(0, True, b"a@x"), Recipient(5, False, b"b@y")]


def test_iter_channel_reports_every_type_and_skips_a_torn_tail() -> None:
    data = b"Ta\0Xodd\0Db\0Ttorn"
    assert list(iter_channel(data)) == [(0, b"T", b"a"), (3, b"X", b"odd"), (8, b"D", b"b")]
    assert [r.address for r in parse_channel(data)] == [b"a", b"b"]


def test_parse_info_strict_and_lenient() -> None:
    assert parse_info(b"Fjoe@x\0") == b"joe@x"
    assert parse_info(b"Zjoe@x\0") == b"joe@x"  # qmail-qread shows it
    assert parse_info(b"Zjoe@x\0", strict=True) == b""  # qmail-send does not use it
    assert parse_info(b"Fjoe", strict=True) == b"joe"


def test_open_channel_marks_through_one_fd(tmp_path: Path) -> None:
    p = tmp_path / "remote"
    write_channel(p, [b"a@x", b"b@y"])
    fd, data = open_channel(p)
    try:
        recs = parse_channel(data)
        mark_done_fd(fd, recs[1].offset)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"Ta@x\0Db@y\0"
    with pytest.raises(FileNotFoundError):
        open_channel(tmp_path / "missing")


def test_finish_direct_removes_todo_first(home: Home) -> None:
    paths = _msg(home, 104)
    os.unlink(paths.intd(104))
    os.mkdir(paths.intd(104))  # intd cannot be unlinked: todo is gone, mess stays
    with pytest.raises(OSError) as ei:
        clean.finish_direct(paths, 104)
    assert ei.value.filename == str(paths.intd(104))
    assert not paths.todo(104).exists() and paths.mess(104).exists()
    os.rmdir(paths.intd(104))
    clean.finish_direct(paths, 104)
    assert not paths.mess(104).exists()


def test_finish_message_stops_when_info_stays(home: Home) -> None:
    paths = _msg(home, 105)
    os.mkdir(paths.info(105))  # info cannot be unlinked: mess must stay referenced
    with pytest.raises(OSError):
        clean.finish_message(paths, 105)
    assert paths.mess(105).exists() and paths.intd(105).exists()
    os.rmdir(paths.info(105))


def test_queue_paths_name_is_the_path_methods_as_str(tmp_path: Path) -> None:
    paths = QueuePaths(tmp_path / "queue")
    for kind in ("mess", "info", "local", "remote", "todo", "intd", "bounce"):
        assert paths.name(kind, 4711) == str(getattr(paths, kind)(4711))
    assert paths.name("mess", 4711) == f"{tmp_path}/queue/mess/{4711 % 23}/4711"
    assert paths.name("todo", 4711) == f"{tmp_path}/queue/todo/4711"


def test_bounce_file_appended_and_removed(home: Home) -> None:
    paths = QueuePaths(home.queue)
    append_bounce(paths.name("bounce", 300), b"<a@x>:\nno\n\n")
    append_bounce(paths.name("bounce", 300), b"<b@x>:\nno\n\n")
    assert paths.bounce(300).read_bytes() == b"<a@x>:\nno\n\n<b@x>:\nno\n\n"
    assert os.stat(paths.bounce(300)).st_mode & 0o777 == 0o600
    clean.remove_bounce(paths, 300)
    assert not paths.bounce(300).exists()
    clean.remove_bounce(paths, 300)  # missing is not an error


def test_read_info_birth_and_strict(tmp_path: Path) -> None:
    p = tmp_path / "info"
    p.write_bytes(b"Zx\0")
    assert read_info(p) == b"x" and read_info(p, strict=True) == b""
    write_info(tmp_path / "i2", b"joe@x")
    os.utime(tmp_path / "i2", (1000, 1234.5))
    assert read_info_birth(tmp_path / "i2") == (b"joe@x", 1234)


def test_remove_leftovers_and_channel(home: Home) -> None:
    paths = _msg(home, 301)
    for kind in ("info", "local", "remote"):
        Path(paths.name(kind, 301)).write_bytes(b"x")
    clean.remove_leftovers(paths, 301)
    assert not any(os.path.exists(paths.name(k, 301)) for k in ("info", "local", "remote"))
    assert paths.mess(301).exists() and paths.todo(301).exists()
    clean.remove_leftovers(paths, 301)  # nothing left: fine
    os.symlink("nowhere", paths.name("local", 301))  # a dangling link is a leftover too
    clean.remove_leftovers(paths, 301)
    assert not os.path.lexists(paths.name("local", 301))
    Path(paths.name("remote", 301)).write_bytes(b"Dx\0")
    clean.remove_channel(paths.name("remote", 301))
    assert not paths.remote(301).exists()


def test_read_path_reads_past_one_chunk_and_reports_a_missing_file(tmp_path: Path) -> None:
    from pyqmail.queue import records

    p = tmp_path / "todo"
    data = bytes(range(256)) * 700  # 179,200 bytes: three reads of 64 KiB and an end
    p.write_bytes(data)
    assert records.read_path(p) == data
    assert records.read_path(str(p)) == data
    with pytest.raises(FileNotFoundError):
        records.read_path(tmp_path / "gone")
