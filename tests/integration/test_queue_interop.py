"""Interop: pyqmail reads a queue laid down by hand from queue.md (not by our writer), and
extends it. (The comparisons with the real notqmail are tests/compat/test_queue_compat.py.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pyqmail.home import Home
from pyqmail.queue import clean
from pyqmail.queue.envelope import parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.reader import count, format_message, messages
from pyqmail.queue.records import read_channel
from pyqmail.queue.recover import clean_stale
from pyqmail.queue.writer import QueueWriter

REF = Path("/var/qmail-ref")
BIN = Path(sys.executable).parent


def lay_down(root: Path) -> dict[str, int]:
    """Write a qmail queue with plain file operations, following queue.md section 1.

    Two messages: ``new`` only queued (intd + todo), ``old`` preprocessed by qmail-send
    (info + local + remote with one recipient done, and a bounce in progress).
    """
    for d in ("pid", "intd", "todo", "bounce", "lock"):
        os.makedirs(root / d)
    for d in ("mess", "info", "local", "remote"):
        for i in range(23):
            os.makedirs(root / d / str(i))

    def new_mess(body: bytes) -> int:
        tmp = root / "pid" / "4242.812090814.1"
        tmp.write_bytes(body)
        n = os.stat(tmp).st_ino
        os.link(tmp, root / "mess" / str(n % 23) / str(n))
        os.unlink(tmp)
        return n

    a = new_mess(
        b"Received: (qmail 4242 invoked by uid 1000); 26 Sep 1995 04:46:54 -0000\nSubject: a\n\nA\n"
    )
    (root / "intd" / str(a)).write_bytes(b"u1000\x00p4242\x00Fjoe@example.com\x00Tx@y.example\x00")
    os.link(root / "intd" / str(a), root / "todo" / str(a))
    b = new_mess(b"Received: (qmail 4243 invoked from network); 26 Sep 1995 04:46:54 -0000\n\nB\n")
    s = str(b % 23)
    (root / "info" / s / str(b)).write_bytes(b"F\x00")
    os.utime(root / "info" / s / str(b), (812090814, 812090814))
    (root / "local" / s / str(b)).write_bytes(b"Dpostmaster@mx.example\x00Tjoe@mx.example\x00")
    (root / "remote" / s / str(b)).write_bytes(b"Tfriend@far.example\x00")
    (root / "bounce" / str(b)).write_bytes(
        b"<nobody@mx.example>:\nSorry, no mailbox here by that name.\n\n"
    )
    return {"new": a, "old": b}


def test_read_hand_written_queue(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    ns = lay_down(root)
    paths = QueuePaths(root)
    c = count(paths)
    assert (c.messages, c.unprocessed) == (2, 1)
    t = parse_todo(paths.todo(ns["new"]).read_bytes())
    assert (t.uid, t.pid, t.sender, t.recipients) == (
        1000,
        4242,
        b"joe@example.com",
        (b"x@y.example",),
    )
    (m,) = [m for m in messages(paths) if not isinstance(m, tuple)]
    b = ns["old"]
    size = paths.mess(b).stat().st_size
    assert format_message(m) == (
        f"26 Sep 1995 04:46:54 GMT  #{b}  {size}  <>  bouncing\n"
        "  done\tlocal\tpostmaster@mx.example\n\tlocal\tjoe@mx.example\n"
        "\tremote\tfriend@far.example\n"
    )
    assert [r.offset for r in read_channel(paths.local(b))] == [0, 23]
    # the start-up clean leaves a consistent foreign queue alone
    before = sorted(p for p in root.rglob("*") if p.is_file())
    assert clean_stale(paths).removed == []
    assert sorted(p for p in root.rglob("*") if p.is_file()) == before
    # qmail-clean's jobs on it
    clean.clean_todo(paths, ns["new"])
    assert not paths.todo(ns["new"]).exists() and not paths.intd(ns["new"]).exists()
    os.unlink(paths.local(b))
    os.unlink(paths.remote(b))
    os.unlink(paths.bounce(b))
    clean.finish_message(paths, b)
    assert not paths.info(b).exists() and not paths.mess(b).exists()


def test_our_writer_extends_hand_written_queue(tmp_path: Path) -> None:
    root = tmp_path / "qmail" / "queue"
    lay_down(root)
    home = Home(tmp_path / "qmail", True)
    n = QueueWriter(home, notify=lambda n: None).begin().commit(b"a", [b"b"])
    assert count(QueuePaths(root)).messages == 3
    assert parse_todo(QueuePaths(root).todo(n).read_bytes()).sender == b"a"
