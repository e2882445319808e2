"""queue/service.py: framing, the reply, and the origin wording from the caller's uid."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqmail.home import Home, Ids
from pyqmail.queue.envelope import MAX_ENVELOPE, MAX_RECIPIENTS, format_input, parse_todo
from pyqmail.queue.layout import QueuePaths
from pyqmail.queue.recover import CrashState
from pyqmail.queue.service import (
    FrameError,
    QueueService,
    ServiceClient,
    netstring,
    origin_of,
    peer_credentials,
    read_netstring,
)
from pyqmail.queue.submit import ServiceSubmitter
from pyqmail.queue.writer import QueueWriter


def test_netstrings() -> None:
    f = io.BytesIO(netstring(b"hello") + netstring(b"") + b"3:abc,")
    assert read_netstring(f, 10) == b"hello"
    assert read_netstring(f, 10) == b""
    assert read_netstring(f, 10) == b"abc"
    with pytest.raises(FrameError):
        read_netstring(f, 10)


@pytest.mark.parametrize(
    "raw", [b"5:abc", b"3:abc;", b"x:", b":", b"99999999999:", b"20:" + b"a" * 20 + b","]
)
def test_bad_netstrings(raw: bytes) -> None:
    with pytest.raises(FrameError):
        read_netstring(io.BytesIO(raw), 10)


def test_origin_of() -> None:
    ids = Ids(
        {
            "alias": 1,
            "daemon": 2,
            "log": 3,
            "owner": 0,
            "passwd": 4,
            "queue": 5,
            "remote": 6,
            "send": 7,
        },
        {"nofiles": 10, "qmail": 11},
        False,
    )
    assert [origin_of(u, ids) for u in (1, 2, 7, 5, 1000)] == [
        "alias",
        "network",
        "bounce",
        "uid",
        "uid",
    ]
    assert origin_of(2, None) == "uid"


def test_peer_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_raw_protocol(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s")
    svc.bind()
    svc.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"6:hello\n,0:," + netstring(b"Fa\0Tb\0\0"))
            with s.makefile("rb") as f:
                code, qp, n = read_netstring(f, 100).split()
        assert (code, int(qp)) == (b"0", os.getpid())
        data = QueuePaths(home.queue).mess(int(n)).read_bytes()
        assert data.endswith(b"\nhello\n")
        # broken framing: nothing queued, 54
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"6:hello\n;")
            s.shutdown(socket.SHUT_WR)
            with s.makefile("rb") as f:
                assert read_netstring(f, 100).split()[0] == b"54"
        assert os.listdir(home.queue / "todo") == [n.decode()]
    finally:
        svc.close()
    assert not svc.path.exists()


def test_unexpected_error_is_81_and_leaves_nothing(home: Home, tmp_path: Path) -> None:
    def hook(state: CrashState) -> None:
        if state is CrashState.INTD_CREATED:
            raise RuntimeError("bug")

    svc = QueueService(home, path=tmp_path / "s", writer=QueueWriter(home, hook=hook))
    svc.bind()
    svc.start()
    try:
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 81 and "RuntimeError" in r.text
    finally:
        svc.close()
    paths = QueuePaths(home.queue)
    assert os.listdir(paths.dir("todo")) == [] and os.listdir(paths.dir("intd")) == []
    assert all(os.listdir(d) == [] for d in paths.split_dirs("mess"))


def test_limits_refuse_at_once_instead_of_waiting(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s", max_clients=2)
    svc.bind()
    svc.start()
    held = []
    try:
        for _ in range(2):  # two silent clients hold both slots (and make no files)
            c = socket.socket(socket.AF_UNIX)
            c.connect(str(svc.path))
            held.append(c)
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 71 and "too many connections" in r.text
        assert os.listdir(home.queue / "pid") == []
        held.pop().close()  # the service answers the closed one (54) and frees its slot
        # the slot is freed when the service thread sees the close: retry until then
        deadline = time.monotonic() + 10
        while (r := ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")).code == 71:
            assert time.monotonic() < deadline
        assert r.code == 0
    finally:
        for c in held:
            c.close()
        svc.close()


def test_per_uid_limit(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s", per_uid=1)
    svc._trusted.clear()  # treat the test's own uid as an ordinary user
    svc.bind()
    svc.start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(svc.path))
        r = ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0")
        assert r.code == 71 and f"uid {os.getuid()}" in r.text
        c.close()
    finally:
        svc.close()


SHELLSHOCK = b"() { :; }; /bin/touch /tmp/x"  # the published exploit's sender


@pytest.mark.parametrize(
    ("sender", "rcpts"),
    [
        (SHELLSHOCK, [b"x@e.test"]),
        (b"a;b@e.test", [b"x@e.test"]),
        (b"john doe@e.test", [b"x@e.test"]),
        (b'"' + SHELLSHOCK + b'"@e.test', [b"x@e.test"]),
        (b"ok@e.test", [b"x(y@e.test"]),
        (b"ok@e.test", [b"x@e.test", b""]),
        (b"ok@e.test", [b"x@e.test."]),
    ],
)
def test_raw_envelopes_that_are_not_mailboxes_get_11(
    home: Home, tmp_path: Path, sender: bytes, rcpts: list[bytes]
) -> None:
    svc = QueueService(home, path=tmp_path / "s")
    svc.bind()
    svc.start()
    try:
        r = ServiceClient(svc.path).submit([b"x\n"], format_input(sender, rcpts))
    finally:
        svc.close()
    assert r.code == 11 and "envelope" in r.text
    paths = QueuePaths(home.queue)
    assert os.listdir(paths.dir("todo")) == [] and os.listdir(paths.dir("intd")) == []
    assert all(os.listdir(d) == [] for d in paths.split_dirs("mess"))


@pytest.mark.parametrize(
    ("sender", "rcpts"),
    [
        (b"john doe@e.test", [b"a;b@e.test", b'a"b\\c@e.test', b"postmaster"]),  # queue form
        (b"", [b"joe"]),
        (b"#@[]", [b"u@[192.0.2.1]"]),  # a double bounce
    ],
)
def test_our_client_quotes_queue_forms_and_the_service_unquotes_them(
    home: Home, tmp_path: Path, sender: bytes, rcpts: list[bytes]
) -> None:
    svc = QueueService(home, path=tmp_path / "s")
    svc.bind()
    svc.start()
    try:
        p = ServiceSubmitter(home, path=svc.path).begin()
        p.write(b"x\n")
        n = p.commit_blocking(sender, rcpts).msgnum
    finally:
        svc.close()
    todo = parse_todo((home.queue / "todo" / str(n)).read_bytes())
    assert (todo.sender, list(todo.recipients)) == (sender, rcpts)


def test_the_service_refuses_a_function_definition_even_from_our_client(
    home: Home, tmp_path: Path
) -> None:
    svc = QueueService(home, path=tmp_path / "s")
    svc.bind()
    svc.start()
    try:
        p = ServiceSubmitter(home, path=svc.path).begin()
        p.write(b"x\n")
        r = p.commit_blocking(b"me-" + SHELLSHOCK + b"@e.test", [b"x@e.test"])
    finally:
        svc.close()
    assert r.code == 11


def _leftovers(home: Home) -> list[str]:
    paths = QueuePaths(home.queue)
    out = os.listdir(paths.dir("todo")) + os.listdir(paths.dir("intd"))
    return out + [f for d in paths.split_dirs("mess") for f in os.listdir(d)]


@pytest.fixture
def svc(home: Home, tmp_path: Path) -> Iterator[QueueService]:
    service = QueueService(home, path=tmp_path / "s")
    service.bind()
    service.start()
    yield service
    service.close()


def test_recipients_up_to_the_bound_and_not_one_more(home: Home, svc: QueueService) -> None:
    rcpts = [b"r%d@x.example" % i for i in range(MAX_RECIPIENTS + 1)]
    client = ServiceClient(svc.path)
    r = client.submit([b"x\n"], format_input(b"a@b", rcpts[:-1]))
    assert r.code == 0
    (todo,) = os.listdir(home.queue / "todo")
    assert parse_todo((home.queue / "todo" / todo).read_bytes()).recipients == tuple(rcpts[:-1])
    r = client.submit([b"x\n"], format_input(b"a@b", rcpts))
    assert r.code == 31 and "too many recipients" in r.text
    assert _leftovers(home) == [todo] * 3  # todo, intd and mess of the first only


def test_envelope_declared_too_long_is_refused_before_it_is_read(
    home: Home, svc: QueueService
) -> None:
    """The answer comes with only the length sent: nothing of the envelope was held."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(svc.path))
        s.sendall(b"2:x\n,0:," + b"%d:F\0" % (MAX_ENVELOPE + 1))
        with s.makefile("rb") as f:
            code, _, n, *why = read_netstring(f, 200).split(b" ")
    assert (code, n) == (b"31", b"0") and b"envelope over" in b" ".join(why)
    assert _leftovers(home) == []
    assert ServiceClient(svc.path).submit([b"x\n"], b"Fa\0Tb\0\0").code == 0


def test_a_10mb_envelope_streams_into_intd(home: Home, svc: QueueService) -> None:
    """MAX_RECIPIENTS addresses of 990 bytes: the service holds one piece at a time
    (traced allocations of this process, the service's thread included, stay small)."""
    addr = [b"r%05d" % i + b"y" * 974 + b"@x.example" for i in range(MAX_RECIPIENTS)]
    size = len(format_input(b"a@b", addr))
    assert 9_900_000 < size <= MAX_ENVELOPE
    tracemalloc.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"2:x\n,0:," + b"%d:Fa@b\0" % size)
            for k in range(0, MAX_RECIPIENTS, 50):
                s.sendall(b"".join(b"T" + a + b"\0" for a in addr[k : k + 50]))
            s.sendall(b"\0,")
            with s.makefile("rb") as f:
                code, _, n = read_netstring(f, 200).split(b" ")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == b"0"
    assert peak < 2 << 20, f"{peak} bytes traced at the peak"
    todo = parse_todo((home.queue / "todo" / n.decode()).read_bytes())
    assert todo.recipients == tuple(addr)


@pytest.mark.root
@pytest.mark.parametrize("plant", ["writable parent", "symlink"])
def test_root_makes_the_socket_directory_only_where_no_one_else_can_act(
    home: Home, tmp_path: Path, plant: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    parent = tmp_path / "p"
    parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if plant == "writable parent":
        parent.chmod(0o777)  # anyone could swap run/ for a symlink between two calls
    else:
        parent.chmod(0o755)
        (parent / "run").symlink_to(elsewhere)
    svc = QueueService(home, path=parent / "run" / "qmail-queue.sock")
    with pytest.raises(OSError):
        svc.prepare_dir((12345, 12345))
    st = elsewhere.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o700)
    assert plant == "symlink" or not (parent / "run").exists()


@pytest.mark.root
def test_root_made_socket_directory_belongs_to_the_queue_user(home: Home, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp_path.chmod(0o755)
    svc = QueueService(home, path=tmp_path / "run" / "qmail-queue.sock")
    svc.prepare_dir((12345, 23456))
    st = os.lstat(tmp_path / "run")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12345, 23456, 0o755)


# -- the ``sign`` option: honoured from qmaild alone (the caller's uid, SO_PEERCRED)

SIGNED_MSG = (
    b"From: Someone <someone@example.test>\nTo: dest@remote.example\nSubject: hi\n"
    b"Date: 7 Dec 2026 11:00:00 -0000\nMessage-ID: <1@example.test>\n\nbody\n"
)


def _ids_as(role: str | None) -> Ids:
    """Multi-user Ids in which this process's uid plays ``role`` (None: a local user)."""
    roles = ("alias", "daemon", "log", "owner", "passwd", "queue", "remote", "send")
    me = os.geteuid()
    uids = {r: 60000 + i for i, r in enumerate(roles)}
    if role is not None:
        uids[role] = me
    return Ids(uids, {"nofiles": 60100, "qmail": 60101}, False)


def _signed(home: Home, n: int) -> bool:
    return b"DKIM-Signature:" in QueuePaths(home.queue).mess(n).read_bytes()


@pytest.mark.parametrize(
    ("role", "asked", "signed"),
    [
        ("daemon", True, True),  # qmaild asking: an authenticated session's message
        ("daemon", False, False),  # qmaild's network mail: never signed unasked
        (None, False, True),  # a local user: signed as ever, asked or not
        (None, True, True),
        ("send", True, False),  # bounces and alias: the option is ignored
        ("alias", True, False),
    ],
)
def test_the_sign_option_counts_from_qmaild_alone(
    home: Home, tmp_path: Path, role: str | None, asked: bool, signed: bool
) -> None:
    from pyqmail import dkim

    dkim.keygen(home, "example.test", "s1")
    svc = QueueService(home, path=tmp_path / "s", ids=_ids_as(role))
    svc.bind()
    svc.start()
    try:
        r = ServiceClient(svc.path).submit(
            [SIGNED_MSG], b"Fa@example.test\0Tb@x.test\0\0", sign=asked
        )
    finally:
        svc.close()
    assert r.code == 0
    assert _signed(home, r.msgnum) is signed


def test_options_on_the_wire_and_an_unknown_one_is_refused(home: Home, tmp_path: Path) -> None:
    svc = QueueService(home, path=tmp_path / "s", ids=_ids_as("daemon"))
    svc.bind()
    svc.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(svc.path))
            s.sendall(b"+9:sign sign," + netstring(SIGNED_MSG) + b"0:," + netstring(b"Fa\0Tb\0\0"))
            with s.makefile("rb") as f:
                code, _, n = read_netstring(f, 100).split()
        assert code == b"0"
        assert not _signed(home, int(n))  # no key yet: unsigned, no error
        # unknown option: 91 (temporary); broken or over-long options frame: 54
        for raw, want in ((b"+4:fast,", b"91"), (b"+9:sign fast,", b"91"),
                          (b"+300:", b"54"), (b"+x,", b"54")):  # fmt: skip
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(svc.path))
                s.sendall(raw + b"2:x\n,0:," + netstring(b"Fa\0Tb\0\0"))
                s.shutdown(socket.SHUT_WR)
                with s.makefile("rb") as f:
                    assert read_netstring(f, 100).split()[0] == want
        assert os.listdir(home.queue / "todo") == [n.decode()]  # nothing else queued
    finally:
        svc.close()


def _capture(path: Path, got: list[bytes]) -> socket.socket:
    """A fake service on ``path`` that records one request's bytes and answers 0."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\0\0,"):
                data += conn.recv(65536)
            got.append(data)
            conn.sendall(netstring(b"0 1 2"))

    threading.Thread(target=run, daemon=True).start()
    return srv


@pytest.mark.parametrize("sign", [False, True])
def test_service_submitter_sends_the_option_only_when_asked(
    home: Home, tmp_path: Path, sign: bool
) -> None:
    """Unsigned requests are the old protocol byte for byte (older services take them)."""
    got: list[bytes] = []
    with _capture(tmp_path / "fake", got):
        p = ServiceSubmitter(home, path=tmp_path / "fake").begin(sign=sign)
        p.write(b"x\n")
        assert p.commit_blocking(b"a@e.test", [b"b@e.test"]).code == 0
    body = b"2:x\n,0:," + netstring(b"Fa@e.test\0Tb@e.test\0\0")
    assert got == [(b"+4:sign," if sign else b"") + body]


@pytest.mark.parametrize(("role", "asks"), [("daemon", True), (None, False), ("send", True)])
def test_queue_submitter_asks_the_service_only_for_an_account_it_would_not_sign(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str | None, asks: bool
) -> None:
    """A local user's qmail-inject sends no option: it keeps working with a service older
    than the option, which signs local users' mail by their uid anyway."""
    from pyqmail.queue import submit

    multi = Home(home.root, single_user=False)
    monkeypatch.setattr(Home, "ids", lambda self: _ids_as(role))
    monkeypatch.setattr(submit, "can_write_queue", lambda h: False)
    monkeypatch.setenv("PYQMAIL_QUEUE_SOCKET", str(tmp_path / "fake"))
    if os.geteuid() == 0:
        monkeypatch.setattr(submit.QueueSubmitter, "_as_root", lambda self: False)
    got: list[bytes] = []
    with _capture(tmp_path / "fake", got):
        p = submit.QueueSubmitter(multi).begin(sign=True)
        p.write(b"x\n")
        assert p.commit_blocking(b"a@e.test", [b"b@e.test"]).code == 0
    assert got[0].startswith(b"+4:sign,") is asks
