"""users/assign -> users/cdb (qmail-newu), the users/cdb probe and qmail-getpw's rules."""

from __future__ import annotations

import base64
import os
import pwd
import zlib
from pathlib import Path

import pytest

from pyqmail import cdb
from pyqmail.home import Home
from pyqmail.local import users
from pyqmail.local.users import AssignError, UserError, UserInfo

# users/cdb written by notqmail 1.09's qmail-newu for REF_ASSIGN (observed, then stored).
REF_ASSIGN = (
    b"=joe:joe:507:100:/home/joe:::\n"
    b"+joe-:joe:507:100:/home/joe:-::\n"
    b"=Fred:fred:1:2:/h:-:x:extra\n"
    b"+:alias:7790:2108:/var/qmail/alias:-::\n"
    b".\n"
)
REF_CDB = zlib.decompress(
    base64.b64decode(
        "eNqbzcEABrOJoJmA9Goof5QepalNg9LXbih/lB48NAuQvg3lj9K4aVD6fQ3lj9Kj9FCgWYFYHIgVs/JTGUD"
        "Y1MCcwdDAgEE/Iz83VR8kAlYjAVWji12NLgMbUAE/SFFaUWoKA5gwZDACKgHKVTACJZRBkok5mYnFDObmlg"
        "YMRoYGFgz6ZYlF+oW5iZk5+hApXbCrQOohLJATRRkYJnEwwEFg56KDnkB+i80TVgYQvZWJIQ1JHgZWAuVVk"
        "MQB6er46Q=="
    )
)


def write_assign(home: Home, text: bytes) -> None:
    (home.users / "assign").write_bytes(text)


def test_newu_is_byte_identical_to_qmail_newu(home: Home) -> None:
    write_assign(home, REF_ASSIGN)
    users.newu(home)
    assert (home.users / "cdb").read_bytes() == REF_CDB


def test_compile_assign_records() -> None:
    recs = users.compile_assign(
        b"=Joe:joe:507:100:/home/joe:::\n"
        b"+Joe-:joe:507:100:/home/joe:-::\n"
        b"+ab.:x:1:2:/x:-:pre:\n"
        b"+xy-:x:1:2:/x:-::ignored:more\n"
        b".\nanything after\n"
    )
    assert recs == [
        (b"!joe\x00", b"joe\x00507\x00100\x00/home/joe\x00\x00"),
        (b"!joe-", b"joe\x00507\x00100\x00/home/joe\x00-\x00"),
        (b"!ab.", b"x\x001\x002\x00/x\x00-\x00pre"),
        (b"!xy-", b"x\x001\x002\x00/x\x00-\x00"),
        (b"", b"-."),  # wildchars: distinct last characters, in order of appearance
    ]


@pytest.mark.parametrize(
    "text",
    [
        b"=joe:joe:1:2:/h:::\n",  # no terminating "."
        b"",
        b"joe\n.\n",  # no colon
        b":joe:1:2:/h:::\n.\n",  # colon first
        b"=joe:joe:1:2:/h::\n.\n",  # only five colons after the first field
        b"=jo\x00e:joe:1:2:/h:::\n.\n",  # NUL
        b"=joe:joe:1:2:/h:::",  # last line without newline and no terminator
    ],
)
def test_bad_assign_keeps_old_cdb(home: Home, text: bytes) -> None:
    write_assign(home, REF_ASSIGN)
    users.newu(home)
    write_assign(home, text)
    with pytest.raises(AssignError, match="bad format in users/assign"):
        users.newu(home)
    assert (home.users / "cdb").read_bytes() == REF_CDB
    assert not (home.users / "cdb.tmp").exists()


def test_newu_missing_assign(home: Home) -> None:
    with pytest.raises(AssignError, match="unable to open users/assign"):
        users.newu(home)


def _cdb_home(home: Home, assign: bytes) -> Path:
    write_assign(home, assign)
    users.newu(home)
    return home.users / "cdb"


ASSIGN = (
    b"=joe:joe:507:100:/home/joe:::\n"
    b"+joe-:joe:507:100:/home/joe:-::\n"
    b"+joe-list-:list:600:100:/home/list:-:l-:\n"
    b"=joe:second:1:1:/dup:::\n"
    b"+sales:sales:700:100:/home/sales:-:s:\n"
    b".\n"
)


@pytest.mark.parametrize(
    ("local", "expect"),
    [
        ("joe", UserInfo("joe", 507, 100, "/home/joe", "", "")),  # first "=" line wins
        ("JOE", UserInfo("joe", 507, 100, "/home/joe", "", "")),
        ("joe-direct", UserInfo("joe", 507, 100, "/home/joe", "-", "direct")),
        ("Joe-Direct", UserInfo("joe", 507, 100, "/home/joe", "-", "Direct")),  # ext keeps case
        ("joe-list-x", UserInfo("list", 600, 100, "/home/list", "-", "l-x")),  # longer prefix
        ("joe-list-", UserInfo("list", 600, 100, "/home/list", "-", "l-")),
        ("joe-", UserInfo("joe", 507, 100, "/home/joe", "-", "")),
        # "sales" ends in 's', which is a wildchar: the prefix matches itself and longer ones
        ("sales", UserInfo("sales", 700, 100, "/home/sales", "-", "s")),
        ("joex", None),  # 'e' is no wildchar: "!joe" is never probed for joex
        ("nobody", None),
    ],
)
def test_lookup_cdb(home: Home, local: str, expect: UserInfo | None) -> None:
    path = _cdb_home(home, ASSIGN)
    assert users.lookup_cdb(path, local) == expect


def test_catch_all_plus_colon(home: Home) -> None:
    path = _cdb_home(home, b"+:alias:7790:2108:/var/qmail/alias:-::\n.\n")
    assert users.lookup_cdb(path, "Anyone-x") == UserInfo(
        "alias", 7790, 2108, "/var/qmail/alias", "-", "Anyone-x"
    )


def test_cdb_without_wildchars_key_is_temporary(home: Home) -> None:
    with cdb.Writer(home.users / "cdb") as w:
        w.add(b"!joe\x00", b"joe\x001\x001\x00/h\x00\x00")
    with pytest.raises(UserError) as e:
        users.lookup_cdb(home.users / "cdb", "joe")
    assert e.value.code == users.QLX_CDB
    assert e.value.text == "Trouble reading users/cdb in qmail-lspawn."


def test_missing_cdb_is_no_match(home: Home) -> None:
    assert users.lookup_cdb(home.users / "cdb", "joe") is None


def _owned_dir(path: Path) -> int:
    """A directory owned by a non-root uid (chowned to 4242 when we are root)."""
    path.mkdir(exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, 4242, 4242)
        return 4242
    return os.getuid()


def _pw(name: str, uid: int, home: str) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, 100, "", home, "/bin/sh"))


def test_getpw_longest_prefix_and_checks(tmp_path: Path, home: Home) -> None:
    good = tmp_path / "good"
    mine = _owned_dir(good)
    table = {
        "joe": _pw("joe", mine, str(good)),
        "joe-list": _pw("joe-list", mine, str(good)),
        "rooty": _pw("rooty", 0, str(good)),  # uid 0 never
        "gone": _pw("gone", mine, str(tmp_path / "missing")),  # home missing
        "other": _pw("other", mine + 1, str(good)),  # home owned by someone else
        "alias": _pw("alias", 9999, "/var/qmail/alias"),
    }
    look = table.get
    assert users.getpw("joe-list-x", Home(home.root), look) == UserInfo(
        "joe-list", mine, 100, str(good), "-", "x"
    )
    assert users.getpw("JOE", Home(home.root), look) == UserInfo(
        "joe", mine, 100, str(good), "", ""
    )
    assert users.getpw("joe-a-b", Home(home.root), look).ext == "a-b"
    for local in ("rooty", "gone", "other", "nobody-x", "joex"):
        info = users.getpw(local, Home(home.root), look)
        assert (info.user, info.uid, info.dash, info.ext) == ("alias", 9999, "-", local)


def test_getpw_skips_names_of_32_chars(tmp_path: Path, home: Home) -> None:
    name = "a" * 32
    uid = _owned_dir(tmp_path / "h")
    table = {name: _pw(name, uid, str(tmp_path / "h")), "alias": _pw("alias", 5, "/a")}
    assert users.getpw(name, Home(home.root), table.get).user == "alias"
    short = "b" * 31
    table[short] = _pw(short, uid, str(tmp_path / "h"))
    assert users.getpw(short + "-x", Home(home.root), table.get).user == short


def test_no_alias_user_is_temporary(home: Home) -> None:
    with pytest.raises(UserError) as e:
        users.getpw("nobody", Home(home.root), {}.get)
    assert e.value.code == users.QLX_NOALIAS


def test_single_user_alias_is_the_homes_alias_dir(home: Home) -> None:
    info = users.getpw("Postmaster", home, {}.get)
    assert info == UserInfo("alias", os.getuid(), os.getgid(), str(home.alias), "-", "Postmaster")


def test_resolve_prefers_cdb(home: Home, tmp_path: Path) -> None:
    _cdb_home(home, b"=joe:assigned:5:6:/x:::\n.\n")
    uid = _owned_dir(tmp_path / "h")
    table = {"joe": _pw("joe", uid, str(tmp_path / "h"))}
    multi = Home(home.root)
    assert users.resolve(multi, "joe", table.get).user == "assigned"
    assert users.resolve(multi, "joe-x", table.get).user == "joe"


def test_single_user_getpw_only_matches_the_callers_account(home: Home, tmp_path: Path) -> None:
    uid = _owned_dir(tmp_path / "bob")  # an account that is not the caller's (unless we are
    table = {"bob": _pw("bob", uid, str(tmp_path / "bob"))}  # an ordinary user: then it is)
    assert users.getpw("bob-x", Home(home.root), table.get).user == "bob"  # multi-user
    info = users.getpw("bob-x", home, table.get)  # single-user
    if os.getuid() == uid:
        assert info.user == "bob"
    else:
        assert (info.user, info.home, info.ext) == ("alias", str(home.alias), "bob-x")


def test_short_record_is_lspawn_bug(home: Home) -> None:
    with cdb.Writer(home.users / "cdb") as w:
        w.add(b"", b"")
        w.add(b"!joe\x00", b"joe\x001")
    with pytest.raises(UserError) as e:
        users.lookup_cdb(home.users / "cdb", "joe")
    assert e.value.code == users.QLX_USAGE


def test_cdb_cache_follows_qmail_newu(home: Home) -> None:
    cache = users.CdbCache(home.users / "cdb")
    assert cache.reader() is None  # no users/cdb yet
    _cdb_home(home, b"=joe:first:5:6:/x:::\n.\n")
    r1 = cache.reader()
    assert r1 is not None and users.lookup_reader(r1, "joe") == UserInfo(
        "first", 5, 6, "/x", "", ""
    )
    assert cache.reader() is r1  # unchanged file: the same open reader
    _cdb_home(home, b"=joe:second:7:8:/y:::\n.\n")
    r2 = cache.reader()
    assert r2 is not None and r2 is not r1
    assert users.resolve_with(home, "joe", r2).user == "second"
    (home.users / "cdb").unlink()
    assert cache.reader() is None


def test_cdb_cache_unreadable_is_temporary(home: Home) -> None:
    (home.users / "cdb").write_bytes(b"short")
    with pytest.raises(UserError) as e:
        users.CdbCache(home.users / "cdb").reader()
    assert e.value.code == users.QLX_CDB
