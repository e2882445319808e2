"""Hostile local parts and senders at local delivery, through the real ``qmail-local``
command (local.md 3; gaps.md 3.1: addresses never through a shell, ``\\n`` -> ``_`` in
Delivered-To and Return-Path, no path outside the home).

The .qmail lines are ours; only the address parts come from "the network". A program
line gets them only as environment values (we dump its environment with ``env -0``), and
marker files prove that nothing in them was ever run by a shell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail.home import Home
from pyqmail.queue.envelope import parse_todo

HOSTILE = [
    "a;touch PWNED1;b",
    "$(touch PWNED2)",
    "`touch PWNED3`",
    "x${IFS}|${IFS}touch${IFS}PWNED4",
    "|touch PWNED5",
    "x&&touch PWNED6",
    "'\"; touch PWNED7; echo \"'",
    "x\ntouch PWNED8\nX-Evil: injected",
    "../../../../tmp/PWNED9",
    ".hidden/../../PWNED10",
    "-x- ; touch PWNED11",
    "x>PWNED12",
    "x<PWNED13",
    "\\$HOME*?[a-z]~",
    "a" * 300,  # longer than a file name may be
    "a-" * 150,  # 150 levels of -default files to try
]


def _qmail_local(
    home: Home, user_home: Path, local: str, ext: str, sender: str, msg: bytes, dash: str = "-"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pyqmail.cli.main", "local", "--home", str(home.root), "--",
         "u", str(user_home), local, dash, ext, "test.example", sender, "./Maildir/"],
        input=msg,
        capture_output=True,
        cwd=user_home.parent,
        timeout=60,
    )  # fmt: skip


@pytest.fixture
def user_home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o755)
    for sub in ("tmp", "new", "cur"):
        (h / "Maildir" / sub).mkdir(parents=True, mode=0o700)
    q = h / ".qmail-default"
    q.write_text("|env -0 > envdump\n./Maildir/\n")
    q.chmod(0o644)
    return h


def _env(path: Path) -> dict[bytes, bytes]:
    out = {}
    for item in path.read_bytes().split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            out[k] = v
    return out


def _no_markers(*roots: Path) -> None:
    for root in (*roots, Path("/tmp")):
        found = (
            [p for p in root.rglob("PWNED*")]
            if root != Path("/tmp")
            else list(Path("/tmp").glob("PWNED*"))
        )
        assert found == [], found


@pytest.mark.parametrize("local", HOSTILE)
def test_hostile_local_part_reaches_program_only_as_env(
    home: Home, user_home: Path, local: str
) -> None:
    sender = "s;touch PWNEDS`touch PWNEDT`\nX-Sender-Evil: 1@client.example"
    r = _qmail_local(home, user_home, local, local, sender, b"Subject: s\n\nbody\n")
    assert r.returncode == 0, r
    assert b"Traceback" not in r.stdout + r.stderr
    env = _env(user_home / "envdump")
    b = lambda s: s.encode()  # noqa: E731
    assert env[b"LOCAL"] == b(local)
    assert env[b"EXT"] == b(local)
    assert env[b"DEFAULT"] == b(local)
    assert env[b"SENDER"] == b(sender)
    assert env[b"RECIPIENT"] == b(local + "@test.example")
    assert env[b"DTLINE"] == b("Delivered-To: " + local.replace("\n", "_") + "@test.example\n")
    assert env[b"RPLINE"].count(b"\n") == 1 and env[b"RPLINE"].endswith(b">\n")
    _no_markers(user_home.parent)
    # the Maildir copy: exactly two added header lines, no injected one
    [msg] = list((user_home / "Maildir" / "new").iterdir())
    lines = msg.read_bytes().split(b"\n")
    assert lines[0].startswith(b"Return-Path: <") and lines[0].endswith(b">")
    assert lines[1] == b("Delivered-To: " + local.replace("\n", "_") + "@test.example")
    assert lines[2] == b"Subject: s"
    assert not any(line.startswith(b"X-") for line in lines)


@pytest.mark.parametrize(
    "ext",
    ["../outside", "../../outside", "/outside", "x/../../outside", ".qmail-outside",
     "..", "..-default", "outside/", "./../outside"],
)  # fmt: skip
def test_dot_qmail_name_never_walks_out_of_home(home: Home, user_home: Path, ext: str) -> None:
    """A .qmail-like file outside the home (and in a sub directory) is never used."""
    root = user_home.parent
    for place in (root, root / "sub"):
        place.mkdir(exist_ok=True)
        for name in (".qmail-outside", "outside", ".qmail-..-outside", ".qmail-::-outside"):
            p = place / name
            p.write_text("|touch PWNED_OUTSIDE\n")
            p.chmod(0o644)
    r = _qmail_local(home, user_home, "u-" + ext, ext, "s@client.example", b"\n")
    assert r.returncode == 0, r
    assert (user_home / "envdump").exists()  # .qmail-default, inside the home, was used
    assert list(root.rglob("PWNED_OUTSIDE")) == []
    assert list(Path("/tmp").glob("PWNED_OUTSIDE")) == []


def test_no_mailbox_for_hostile_ext_without_default(home: Home, user_home: Path) -> None:
    (user_home / ".qmail-default").unlink()
    (user_home.parent / ".qmail-x").write_text("|touch PWNED_X\n")
    r = _qmail_local(home, user_home, "u-../.qmail-x", "../.qmail-x", "s@c.example", b"\n")
    assert r.returncode == 100
    assert b"Sorry, no mailbox here by that name." in r.stdout + r.stderr
    _no_markers(user_home.parent)


def test_message_with_our_delivered_to_is_a_loop(home: Home, user_home: Path) -> None:
    msg = b"Delivered-To: u-x@test.example\nSubject: loop\n\nbody\n"
    r = _qmail_local(home, user_home, "u-x", "x", "s@client.example", msg)
    assert r.returncode == 100
    assert b"This message is looping: it already has my Delivered-To line." in r.stdout + r.stderr
    assert not (user_home / "envdump").exists()
    assert list((user_home / "Maildir" / "new").iterdir()) == []


def test_forwarding_loop_ends_in_a_bounce(home: Home, user_home: Path) -> None:
    """.qmail-default forwards to itself: the first pass queues one copy with our
    Delivered-To line; delivering that copy is refused as a loop (never a storm)."""
    q = user_home / ".qmail-default"
    q.write_text("&u-x@test.example\n")
    r = _qmail_local(home, user_home, "u-x", "x", "s@client.example", b"Subject: f\n\nbody\n")
    assert r.returncode == 0, r
    todo = [f for f in (home.queue / "todo").rglob("*") if f.is_file()]
    assert len(todo) == 1
    assert parse_todo(todo[0].read_bytes()).recipients == (b"u-x@test.example",)
    [mess] = [f for f in (home.queue / "mess").rglob("*") if f.is_file()]
    copy = mess.read_bytes()
    body = copy[copy.index(b"Delivered-To:") :]
    r2 = _qmail_local(home, user_home, "u-x", "x", "s@client.example", body)
    assert r2.returncode == 100
    assert b"looping" in r2.stdout + r2.stderr
    assert len([f for f in (home.queue / "todo").rglob("*") if f.is_file()]) == 1


def test_forward_line_with_newline_in_sender_keeps_the_envelope_whole(
    home: Home, user_home: Path
) -> None:
    """The forwarded copy's envelope has exactly one sender and the listed recipients,
    whatever bytes the sender holds (no NUL can come in; a newline stays a byte)."""
    (user_home / ".qmail-default").write_text("&fwd@elsewhere.example\n")
    sender = "evil\nTvictim@elsewhere.example@client.example"
    r = _qmail_local(home, user_home, "u-y", "y", sender, b"Subject: f\n\nbody\n")
    assert r.returncode == 0, r
    [todo] = [f for f in (home.queue / "todo").rglob("*") if f.is_file()]
    t = parse_todo(todo.read_bytes())
    assert t.recipients == (b"fwd@elsewhere.example",)
    assert t.sender == sender.encode()


def test_getpw_never_hands_out_root_or_a_path(home: Home) -> None:
    """qmail-getpw with root's name or a path as the local part: the alias user."""
    for local in ("root", "ROOT", "../../root", "root-x", "/root", "..", "."):
        r = subprocess.run(
            [str(Path(sys.executable).parent / "qmail-getpw"), local],
            capture_output=True,
            timeout=30,
            env=dict(os.environ),
        )
        assert r.returncode in (0, 111), r  # 111: no alias user on this machine
        if r.returncode != 0:
            continue
        fields = r.stdout.split(b"\0")
        # root's account is never the recipient (in single-user mode the alias user has
        # the caller's ids, which may be 0: that is the documented single-user rule)
        assert fields[0] == b"alias", (local, fields)
        assert fields[3] != b"/root" and fields[3].endswith(b"alias"), fields


@pytest.mark.parametrize(
    "line",
    [
        b"|echo hi\0; touch PWNED_NUL\n",
        b"./Mail\0box\n",
        b"./Maildir\0/\n",
        b"&a@test.example\0Tvictim@elsewhere.example\n",
    ],
    ids=["program", "mbox", "maildir", "forward"],
)
def test_nul_in_a_dot_qmail_line(home: Home, user_home: Path, line: bytes) -> None:
    """A NUL inside a .qmail line (qmail reads lines as C strings: the NUL ends them) must
    give a clean qmail-local result, never a traceback in the delivery report (which
    becomes a bounce), never a command after the NUL, never an extra recipient."""
    q = user_home / ".qmail-nul"
    q.write_bytes(line)
    q.chmod(0o644)
    r = _qmail_local(home, user_home, "u-nul", "nul", "s@client.example", b"Subject: n\n\nb\n")
    assert b"Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode in (0, 100, 111), r
    _no_markers(user_home.parent)
    for f in (home.queue / "todo").rglob("*"):
        if f.is_file():
            assert b"victim" not in f.read_bytes()


@pytest.mark.parametrize(
    ("local", "sender"),
    [
        ("u-x\rX-Evil: injected", "s@client.example"),
        ("u-x", "s\rX-Evil: injected@client.example"),
        ("u-x\r\nX-Evil: injected", "s\r\nX-Evil: injected@client.example"),
    ],
    ids=["cr-local", "cr-sender", "crlf-both"],
)
def test_cr_in_address_never_splits_a_header_line(
    home: Home, user_home: Path, local: str, sender: str
) -> None:
    """An address holding CR (QMTP, QMQP and inject accept it) ends up in Delivered-To and
    Return-Path. Stored as a bare CR it becomes a line break on the next hop (the remote
    encoder sends a lone CR as CRLF), so in the stored copies it must be harmless too."""
    from pyqmail.remote.transmit import encode as wire_encode

    (user_home / ".qmail-default").write_text("./Maildir/\n&fwd@elsewhere.example\n")
    r = _qmail_local(home, user_home, local, local[2:], sender, b"Subject: s\n\nbody\n")
    assert r.returncode == 0, r
    [stored] = list((user_home / "Maildir" / "new").iterdir())
    [mess] = [f for f in (home.queue / "mess").rglob("*") if f.is_file()]
    for copy in (stored.read_bytes(), mess.read_bytes()):
        header = wire_encode(copy).split(b"\r\n\r\n", 1)[0]
        fields = [ln for ln in header.split(b"\r\n") if ln[:1] not in (b" ", b"\t")]
        assert not any(f.startswith(b"X-Evil") for f in fields), header


def test_forwarding_loop_through_the_forward_program(home: Home, user_home: Path) -> None:
    """The same loop made with ``|forward`` (qmail's tool) instead of ``&``: its copy
    carries $DTLINE, so the second pass is refused as a loop too."""
    forward = Path(sys.executable).parent / "forward"
    (user_home / ".qmail-default").write_text(f"|{forward} u-x@test.example\n")
    r = _qmail_local(home, user_home, "u-x", "x", "s@client.example", b"Subject: f\n\nbody\n")
    assert r.returncode == 0, r
    [mess] = [f for f in (home.queue / "mess").rglob("*") if f.is_file()]
    copy = mess.read_bytes()
    body = copy[copy.index(b"Delivered-To:") :]
    r2 = _qmail_local(home, user_home, "u-x", "x", "s@client.example", body)
    assert r2.returncode == 100
    assert b"looping" in r2.stdout + r2.stderr


@pytest.mark.parametrize(
    ("what", "text"),
    [
        ("home-writable", b"home directory is writable"),
        ("qmail-writable", b".qmail file is writable"),
        ("home-sticky", b"Home directory is sticky"),
    ],
)
def test_writable_or_sticky_home_defers(
    home: Home, user_home: Path, what: str, text: bytes
) -> None:
    """Another user could have planted or edited the .qmail: defer, deliver nothing."""
    if what == "home-writable":
        user_home.chmod(0o777)
    elif what == "qmail-writable":
        (user_home / ".qmail-default").chmod(0o666)
    else:
        user_home.chmod(0o1755)
    r = _qmail_local(home, user_home, "u-x", "x", "s@client.example", b"Subject: w\n\nb\n")
    assert r.returncode == 111, r
    assert text in r.stdout + r.stderr
    assert not (user_home / "envdump").exists()
    assert list((user_home / "Maildir" / "new").iterdir()) == []
