"""send/todo.py: envelope parsing and qmail-send's recipient rewriting (send.md 1, 2)."""

from __future__ import annotations

import pytest

from pyqmail.control import load
from pyqmail.home import Home
from pyqmail.send.schedule import LOCAL, REMOTE
from pyqmail.send.todo import (
    Routing,
    TodoError,
    bounce_address,
    parse_todo,
    verp_sender,
)
from tests.conftest import write_control


def routing(**kw: object) -> Routing:
    base: dict[str, object] = {
        "envnoathost": "envhost.example",
        "locals": frozenset({"mx.test.example", "test.example"}),
        "percenthack": frozenset(),
        "virtualdomains": {},
    }
    base.update(kw)
    return Routing(**base)  # type: ignore[arg-type]


def test_parse_todo_records() -> None:
    env = parse_todo(b"u1000\0p4242\0Fjoe@a.example\0Tx@b\0Ty@c\0")
    assert (env.uid, env.qp, env.sender, env.recipients) == (
        1000,
        4242,
        "joe@a.example",
        ("x@b", "y@c"),
    )
    assert parse_todo(b"u0\0p1\0F\0").recipients == ()
    assert parse_todo(b"u0\0p1\0F\0").sender == ""


def test_parse_todo_unknown_record() -> None:
    with pytest.raises(TodoError):
        parse_todo(b"u0\0p1\0Fa@b\0Xbad\0")


def test_bytes_survive_round_trip() -> None:
    env = parse_todo(b"u0\0p1\0F\xff@x\0T\xe9t\xe9@y\0")
    assert env.sender.encode("utf-8", "surrogateescape") == b"\xff@x"


@pytest.mark.parametrize(
    ("addr", "expect"),
    [
        ("joe@test.example", (LOCAL, "joe@test.example")),
        ("joe@TEST.Example", (LOCAL, "joe@TEST.Example")),
        ("joe", (REMOTE, "joe@envhost.example")),
        ("joe@remote.example", (REMOTE, "joe@remote.example")),
    ],
)
def test_locals_and_envnoathost(addr: str, expect: tuple[int, str]) -> None:
    assert routing().route(addr) == expect


def test_envnoathost_local() -> None:
    assert routing(envnoathost="test.example").route("joe") == (LOCAL, "joe@test.example")


def test_percenthack_repeats_while_domain_listed() -> None:
    r = routing(percenthack=frozenset({"gw.example", "c.example"}))
    assert r.route("a%b%c.example@gw.example") == (REMOTE, "a@b")
    assert r.route("a%b%x.example@gw.example") == (REMOTE, "a%b@x.example")
    assert r.route("plain@gw.example") == (REMOTE, "plain@gw.example")
    r2 = routing(percenthack=frozenset({"gw.example"}))
    assert r2.route("u%test.example@gw.example") == (LOCAL, "u@test.example")


def test_virtualdomains_all_forms() -> None:
    vd = {
        "virt.example": "alice",
        ".sub.example": "subs",
        "bob@other.example": "bobby",
        "except.sub.example": "",
        "": "catchall",
    }
    r = routing(virtualdomains=vd)
    assert r.route("x@virt.example") == (LOCAL, "alice-x@virt.example")
    assert r.route("x@a.b.sub.example") == (LOCAL, "subs-x@a.b.sub.example")
    assert r.route("bob@other.example") == (LOCAL, "bobby-bob@other.example")
    assert r.route("x@except.sub.example") == (REMOTE, "x@except.sub.example")
    assert r.route("x@anywhere.example") == (LOCAL, "catchall-x@anywhere.example")
    # locals win over virtualdomains
    assert r.route("x@test.example") == (LOCAL, "x@test.example")


def test_virtualdomains_from_control_file(home: Home) -> None:
    write_control(home, "virtualdomains", "Virt.Example:alice\n")
    r = Routing.from_control(load(home))
    assert r.route("Bob@virt.EXAMPLE") == (LOCAL, "alice-Bob@virt.EXAMPLE")


def test_strip_virtual_for_bounce_text() -> None:
    r = routing(virtualdomains={"virt.example": "alice", "exc.example": ""})
    assert r.strip_virtual("alice-bob@virt.example") == "bob@virt.example"
    assert r.strip_virtual("other-bob@virt.example") == "other-bob@virt.example"
    assert r.strip_virtual("x@exc.example") == "x@exc.example"
    assert r.strip_virtual("joe@test.example") == "joe@test.example"


def test_verp() -> None:
    assert (
        verp_sender("owner-@list.example-@[]", "box@dom.example")
        == "owner-box=dom.example@list.example"
    )
    assert verp_sender("joe@x.example", "box@dom") == "joe@x.example"
    assert verp_sender("nohost-@[]", "box@dom") == "nohost-@[]"
    assert verp_sender("owner-@list-@[]", "noat") == "owner-@list-@[]"
    assert bounce_address("owner-@list.example-@[]") == "owner-@list.example"
    assert bounce_address("joe@x") == "joe@x"
    assert bounce_address("") == ""
