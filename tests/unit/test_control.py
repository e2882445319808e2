"""control: qmail's three readers, every file's default and ``me`` fall-back, findings,
unreadable files, matching helpers, and ControlCache's re-read on change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail import cdb, control
from pyqmail.control import ControlCache, ControlError, load, parse_int, parse_line, parse_list
from pyqmail.home import Home
from tests.conftest import write_control

# -- the readers, against a model of control.md section 1 -------------------------------

_LINES = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b""))


@settings(max_examples=300)
@given(_LINES)
def test_line_reader_model(raw: bytes) -> None:
    got = parse_line(raw).encode("utf-8", "surrogateescape")
    first = raw.split(b"\n", 1)[0]
    assert first.startswith(got)
    assert first[len(got) :].strip(b" \t") == b""
    assert not got.endswith((b" ", b"\t"))


@settings(max_examples=300)
@given(st.text(alphabet="0123456789 abx\t-+", max_size=12), st.binary(max_size=10))
def test_int_reader_model(first: str, rest: bytes) -> None:
    value, problem = parse_int(first.encode() + b"\n" + rest)
    stripped = first.rstrip(" \t")
    digits = ""
    for ch in stripped:
        if not ch.isdigit():
            break
        digits += ch
    if not digits:
        assert value is None and problem is not None
    else:
        wrapped = int(digits) % 2**64 % 2**32
        expected = wrapped if wrapped < 2**31 else 0
        assert value == expected
        assert (problem is None) == (digits == stripped and expected == int(digits))


@settings(max_examples=300)
@given(st.lists(st.text(alphabet="ab# \t.", max_size=6), max_size=10), st.booleans())
def test_list_reader_model(lines: list[str], final_newline: bool) -> None:
    raw = "\n".join(lines) + ("\n" if final_newline and lines else "")
    got = parse_list(raw.encode())
    expected = [
        (line.rstrip(" \t"), n)
        for n, line in enumerate(lines, 1)
        if line.rstrip(" \t") and not line.startswith("#")
    ]
    assert list(got) == expected


@pytest.mark.parametrize(
    ("raw", "value"),
    [(b"", ""), (b"x", "x"), (b"x \t\n", "x"), (b"  x\n", "  x"), (b"a\nb\n", "a"), (b"\nb", "")],
)
def test_line_reader_table(raw: bytes, value: str) -> None:
    assert parse_line(raw) == value


@pytest.mark.parametrize(
    ("raw", "value", "flagged"),
    [(b"60\n", 60, False), (b"60s\n", 60, True), (b" 60", None, True), (b"", None, True),
     (b"abc\n", None, True), (b"-5", None, True), (b"007", 7, False), (b"12 \n", 12, False),
     # qmail: unsigned long into int; notqmail's qmail-showctl shows these values
     (b"2147483647", 2147483647, False), (b"2147483648", 0, True), (b"4294967306", 10, True),
     (b"99999999999999999999", 1661992959, True)],
)  # fmt: skip
def test_int_reader_table(raw: bytes, value: int | None, flagged: bool) -> None:
    got, problem = parse_int(raw)
    assert got == value
    assert (problem is not None) == flagged


# -- every file's default, and me's fall-backs ------------------------------------------

ME_LINES = ["bouncehost", "defaultdomain", "defaulthost", "doublebouncehost", "envnoathost",
            "idhost", "plusdomain"]  # fmt: skip


def bare_home(home: Home, me: str | None) -> Home:
    for p in home.control.iterdir():
        p.unlink()
    if me is not None:
        write_control(home, "me", me + "\n")
    return home


def test_defaults_with_me(home: Home) -> None:
    c = load(bare_home(home, "mx.test.example"))
    for name in ME_LINES:
        assert getattr(c, name) == "mx.test.example", name
        assert c.sources[name] == "me"
    assert c.helohost == c.localiphost == c.smtpgreeting == "mx.test.example"
    assert c.locals == frozenset({"mx.test.example"})
    assert c.sources["locals"] == "me"
    assert c.bouncefrom == "MAILER-DAEMON"
    assert c.doublebounceto == "postmaster"
    assert (c.concurrencylocal, c.concurrencyremote, c.databytes) == (10, 20, 0)
    assert (c.queuelifetime, c.timeoutconnect, c.timeoutremote, c.timeoutsmtpd) == (
        604800, 60, 1200, 1200,
    )  # fmt: skip
    assert c.spawnlimit == control.DEFAULT_SPAWN_LIMIT
    assert c.rcpthosts is None
    assert c.badmailfrom == c.percenthack == frozenset()
    assert c.qmqpservers == c.morercpthosts == ()
    assert dict(c.smtproutes) == dict(c.virtualdomains) == dict(c.qmtproutes) == {}
    assert c.tlsdestinations == frozenset()
    assert c.defaultdelivery == "./Mailbox\n"
    assert c.findings == ()


def test_defaults_without_me(home: Home) -> None:
    c = load(bare_home(home, None))
    assert c.me is None
    for name in ME_LINES:
        assert getattr(c, name) == name
        assert c.sources[name] == "default"
    assert c.helohost is None and c.localiphost is None and c.smtpgreeting is None
    assert c.locals == frozenset()


def test_empty_files_are_empty_not_default(home: Home) -> None:
    bare_home(home, "mx.test.example")
    for name in ("bouncehost", "bouncefrom", "helohost"):
        write_control(home, name, "")
    c = load(home)
    assert (c.bouncehost, c.bouncefrom, c.helohost) == ("", "", "")
    assert c.sources["bouncehost"] == "file"


def test_empty_me_counts_as_present(home: Home) -> None:
    bare_home(home, None)
    write_control(home, "me", "")
    c = load(home)
    assert c.me == "" and c.bouncehost == "" and c.sources["bouncehost"] == "me"


def test_values_from_files(home: Home) -> None:
    write_control(home, "concurrencyremote", "500\n")
    write_control(home, "timeoutsmtpd", "0\n")
    write_control(home, "rcpthosts", "A.Example\n.sub.example\n# x\n\n")
    write_control(home, "smtproutes", ":smart.example\nA.example:one\na.example:two\n")
    write_control(home, "virtualdomains", "v.example:joe\nu@w.example:bob\n.v.example:sub\n")
    write_control(home, "defaultdelivery", "./Maildir/")
    c = load(home)
    assert c.concurrencyremote == 500
    assert c.timeoutsmtpd == 1  # qmail: values <= 0 become 1
    assert c.rcpthosts == frozenset({"a.example", ".sub.example"})
    assert c.smtproutes == {"": "smart.example", "a.example": "two"}  # last wins, lowercased
    assert c.defaultdelivery == "./Maildir/\n"
    assert control.host_listed("x.sub.example", c.rcpthosts) is True
    assert control.host_listed("sub.example", c.rcpthosts) is False
    assert control.host_listed("A.EXAMPLE", c.rcpthosts) is True
    assert control.virtual_lookup(c.virtualdomains, "u@w.example") == "bob"
    assert control.virtual_lookup(c.virtualdomains, "x@a.v.example") == "sub"
    assert control.virtual_lookup(c.virtualdomains, "x@v.example") == "joe"
    assert control.virtual_lookup(c.virtualdomains, "x@none.example") is None


# -- findings: what qmail ignores never passes silently ----------------------------------


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("concurrencyremote", "abc\n", 20),
        ("databytes", "10k\n", 10),
        ("queuelifetime", " 5", 604800),
    ],
)
def test_bad_numbers_keep_qmail_value_and_are_named(
    home: Home, name: str, text: str, value: int
) -> None:
    write_control(home, name, text)
    c = load(home)
    assert getattr(c, name) == value
    assert [f.file for f in c.findings] == [name]
    assert str(c.findings[0]).startswith(f"control/{name}:1: ")


def test_concurrency_over_spawnlimit_is_capped_with_finding(home: Home) -> None:
    write_control(home, "spawnlimit", "300\n")
    write_control(home, "concurrencyremote", "1000\n")
    c = load(home)
    assert c.concurrencyremote == 300
    assert c.findings[0].file == "concurrencyremote"
    write_control(home, "spawnlimit", "5000\n")
    assert load(home).concurrencyremote == 1000  # no compile-time cap


def test_crlf_and_colonless_lines_are_findings(home: Home) -> None:
    write_control(home, "rcpthosts", "a.example\r\nb.example\n")
    write_control(home, "smtproutes", "ok.example:relay\nnocolon\n")
    found = {(f.file, f.line) for f in load(home).findings}
    assert found == {("rcpthosts", 1), ("smtproutes", 2)}


# -- unreadable files are temporary failures, never empty values ------------------------


@pytest.mark.parametrize("name", ["me", "rcpthosts", "concurrencyremote", "badmailfrom"])
def test_unreadable_file_raises_control_error(home: Home, name: str) -> None:
    path = home.control / name
    if path.exists():
        path.unlink()
    path.mkdir()  # reading a directory fails with EISDIR, even as root
    with pytest.raises(ControlError) as e:
        load(home)
    assert e.value.name == name
    assert f"control/{name}" in str(e.value)


def test_permission_denied_raises_control_error(home: Home) -> None:
    """EACCES is a temporary failure, never an empty value. Root reads mode-000 files, so
    as root the load runs in a child that has dropped to nobody (65534)."""
    os.chmod(home.control / "rcpthosts", 0)
    if os.geteuid() != 0:
        with pytest.raises(ControlError) as e:
            load(home)
        assert e.value.name == "rcpthosts"
        return
    for d in [home.root, *home.root.parents]:  # let nobody reach control/
        os.chmod(d, os.stat(d).st_mode | 0o011)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        said = b"no ControlError"
        try:
            os.setgid(65534)
            os.setuid(65534)
            load(home)
        except ControlError as err:
            said = f"{err.name}: {err}".encode()
        except BaseException as err:
            said = repr(err).encode()
        finally:
            os.write(w, said)
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    assert said.startswith("rcpthosts: ") and "Permission denied" in said, said


def test_missing_control_dir_is_all_defaults(tmp_path: Path) -> None:
    c = load(Home(tmp_path / "nothing", single_user=True))
    assert c.me is None and c.rcpthosts is None


# -- helpers ------------------------------------------------------------------------------


def test_domain_keys_and_host_listed() -> None:
    assert control.domain_keys("A.B.Example") == ["a.b.example", ".b.example", ".example"]
    assert control.host_listed("x.b.example", frozenset({".b.example"}))
    assert not control.host_listed("b.example", frozenset({".b.example"}))


def test_colon_map_last_wins_and_needs_colon() -> None:
    lines = (("A:1", 1), ("nocolon", 2), ("a:2:3", 3))
    assert control.colon_map(lines) == {"a": "2:3"}


def test_morercpthosts_keys() -> None:
    raw = b"A.Example\n# c\n\n  sp.example \t\nb.example\nA.example\nlast"
    assert control.morercpthosts_keys(raw) == [
        b"a.example", b"  sp.example", b"b.example", b"a.example", b"last",
    ]  # fmt: skip


# -- ControlCache ------------------------------------------------------------------------


def test_cache_rereads_only_on_change(home: Home) -> None:
    calls: list[int] = []

    def loader(h: Home) -> control.Control:
        calls.append(1)
        return load(h)

    cache = ControlCache(home, loader)
    first = cache.get()
    assert cache.get() is first and len(calls) == 1
    write_control(home, "databytes", "1234\n")  # a new file
    assert cache.get().databytes == 1234
    write_control(home, "databytes", "99\n")  # rewritten in place: size changes
    assert cache.get().databytes == 99
    path = home.control / "databytes"
    st = path.stat()
    path.write_text("77\n")  # same size: the mtime must tell
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.get().databytes == 77
    (home.control / "databytes").unlink()
    assert cache.get().databytes == 0
    n = len(calls)
    cache.get()
    assert len(calls) == n


def test_cache_propagates_control_error(home: Home) -> None:
    cache = ControlCache(home)
    cache.get()
    (home.control / "rcpthosts").unlink()
    (home.control / "rcpthosts").mkdir()
    with pytest.raises(ControlError):
        cache.get()


def test_cache_reports_new_findings_once(home: Home) -> None:
    seen: list[tuple[control.Finding, ...]] = []
    cache = ControlCache(home, on_findings=seen.append)
    cache.get()
    assert seen == []
    write_control(home, "concurrencyremote", "abc\n")
    cache.get()
    cache.get()
    assert [[str(f) for f in fs] for fs in seen] == [
        ["control/concurrencyremote:1: 'abc' is not a number; qmail ignores it and uses the "
         "default (write a decimal number into concurrencyremote)"]
    ]  # fmt: skip
    write_control(home, "databytes", "5\n")  # a reload with the same findings: no repeat
    cache.get()
    assert len(seen) == 1


# -- qmail-newmrh ------------------------------------------------------------------------


def newmrh(home: Home) -> subprocess.CompletedProcess[str]:
    code = "import sys; from pyqmail.cli.newmrh import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "--home", str(home.root)],
                          capture_output=True, text=True)  # fmt: skip


def test_newmrh_compiles_lowercased_keys(home: Home) -> None:
    write_control(home, "morercpthosts", "A.Example\n# no\n\nb.example \n")
    p = newmrh(home)
    assert (p.returncode, p.stderr) == (0, "")
    with cdb.Reader.open(home.control / "morercpthosts.cdb") as r:
        assert list(r.items()) == [(b"a.example", b""), (b"b.example", b"")]
    assert not (home.control / "morercpthosts.tmp").exists()


def test_newmrh_failures_leave_old_cdb_and_no_tmp(home: Home) -> None:
    p = newmrh(home)
    assert p.returncode == 111
    assert p.stderr == (
        "qmail-newmrh: fatal: unable to read control/morercpthosts: file does not exist\n"
    )
    (home.control / "morercpthosts").mkdir()
    p = newmrh(home)
    assert p.returncode == 111 and "is a directory" in p.stderr
    (home.control / "morercpthosts").rmdir()
    write_control(home, "morercpthosts", "a.example\n")
    (home.control / "morercpthosts.cdb").mkdir()  # rename over a directory fails
    p = newmrh(home)
    assert p.returncode == 111
    assert p.stderr.startswith("qmail-newmrh: fatal: unable to move control/morercpthosts.tmp")
    assert (home.control / "morercpthosts.cdb").is_dir()
    assert not (home.control / "morercpthosts.tmp").exists()


def test_list_reader_nul_splits_like_qmail() -> None:
    # qmail keeps list lines NUL-separated: a NUL inside a line splits it (empty pieces
    # too), a line starting with NUL is empty (checked against notqmail's qmail-showctl)
    assert parse_list(b"a \0b\nc\n\0x\n#x\0y\nx\0\0y \n") == (
        ("a ", 1), ("b", 1), ("c", 2), ("x", 5), ("", 5), ("y", 5),
    )  # fmt: skip


def test_cache_max_age_limits_checks(home: Home) -> None:
    now = [100.0]
    cache = ControlCache(home, max_age=1.0, clock=lambda: now[0])
    assert cache.get().databytes == 0
    write_control(home, "databytes", "42\n")
    now[0] += 0.5
    assert cache.get().databytes == 0  # not looked at yet
    now[0] += 0.6
    assert cache.get().databytes == 42
