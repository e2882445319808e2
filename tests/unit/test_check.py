"""pyqmail check: each finding names the file, the line and a fix; errors fail the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyqmail import tcprules
from pyqmail.check import Problem, Severity, check, errors, notes
from pyqmail.home import Home
from pyqmail.smtp import tls
from tests.conftest import write_control


def only_errors(home: Home) -> list[Problem]:
    return errors(check(home))


def one_error(home: Home, file: str) -> Problem:
    found = [p for p in only_errors(home) if p.file == file]
    assert len(found) == 1, found
    assert found[0].fix
    return found[0]


def compile_rules_file(home: Home, name: str) -> None:
    src = home.control / name
    with src.open("rb") as f:
        tcprules.compile_cdb(f, home.control / f"{name}.cdb", src.with_suffix(".t"))


def test_fresh_home_passes(home: Home) -> None:
    assert check(home) == []


def test_missing_rcpthosts_is_an_open_relay(home: Home) -> None:
    (home.control / "rcpthosts").unlink()
    p = one_error(home, "control/rcpthosts")
    assert "relay" in p.message
    assert "control/rcpthosts" in str(p)


def test_empty_rcpthosts_is_a_warning(home: Home) -> None:
    write_control(home, "rcpthosts", "")
    write_control(home, "locals", "")
    problems = check(home)
    assert [(p.severity, p.file) for p in problems] == [(Severity.WARNING, "control/rcpthosts")]


def test_local_and_virtual_domains_missing_from_rcpthosts(home: Home) -> None:
    write_control(home, "locals", "mx.test.example\nOther.Example\n")
    write_control(home, "virtualdomains", "v.example:joe\nu@w.example:bob\n.sub.example:s\n"
                  ":catchall\nexcept.example:\nlisted.example:x\n")  # fmt: skip
    write_control(home, "rcpthosts", "mx.test.example\n.sub.example\nlisted.example\n")
    found = {(p.file, p.line, p.fix) for p in only_errors(home)}
    assert found == {
        ("control/locals", 2, "add other.example to control/rcpthosts"),
        ("control/virtualdomains", 1, "add v.example to control/rcpthosts"),
        ("control/virtualdomains", 2, "add w.example to control/rcpthosts"),
    }


def test_morercpthosts_cdb_counts_and_must_be_fresh(home: Home) -> None:
    write_control(home, "locals", "mx.test.example\nmore.example\n")
    write_control(home, "morercpthosts", "more.example\n")
    p = one_error(home, "control/locals")
    assert "more.example" in p.message
    code = "import sys; from pyqmail.cli.newmrh import main; sys.exit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, "--home", str(home.root)])
    assert r.returncode == 0
    assert only_errors(home) == []
    os.utime(home.control / "morercpthosts.cdb", (1_500_000_000, 1_500_000_000))
    p = one_error(home, "control/morercpthosts")
    assert "newer than morercpthosts.cdb" in p.message and p.fix == "run qmail-newmrh"


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [("concurrencyremote", "abc\n", 1), ("databytes", "10k\n", 1),
     ("rcpthosts", "mx.test.example\r\n", 1), ("smtproutes", "ok:relay\nnocolon\n", 2),
     ("smtproutes", "x.example:relay:port\n", 1), ("qmqpservers", "1.2.3.4\nmx.example\n", 2),
     ("destinationlimits", "ok.example:2:30\nbad.example:two:\n", 2),
     ("destinationlimits", "# x\nnocolon\n", 2), ("destinationlimits", "a:1:2:3\n", 1)],
)  # fmt: skip
def test_malformed_files_name_file_and_line(home: Home, name: str, text: str, line: int) -> None:
    write_control(home, name, text)
    p = one_error(home, f"control/{name}")
    assert p.line == line
    assert str(p).startswith(f"error: control/{name}:{line}: ")


def test_unreadable_file(home: Home) -> None:
    (home.control / "badmailfrom").mkdir()
    p = one_error(home, "control/badmailfrom")
    assert "cannot be read" in p.message


def test_missing_me(home: Home) -> None:
    (home.control / "me").unlink()
    assert "missing" in one_error(home, "control/me").message


@pytest.mark.parametrize(
    ("rules", "line"),
    [(':allow,RELAYCLIENT=""\n', 1),
     ('127.0.0.1:allow,RELAYCLIENT=""\n=:allow,RELAYCLIENT=""\n', 2),
     ('# ok\n:allow,A="1",RELAYCLIENT="@x"\n', 2)],
)  # fmt: skip
def test_relayclient_for_everyone(home: Home, rules: str, line: int) -> None:
    write_control(home, "tcp.smtp", rules)
    compile_rules_file(home, "tcp.smtp")
    p = one_error(home, "control/tcp.smtp")
    assert p.line == line and "relay" in p.message


@pytest.mark.parametrize(
    "rules",
    ['127.0.0.1:allow,RELAYCLIENT=""\n:allow\n', ':deny,RELAYCLIENT=""\n',
     ':allow\n:allow,RELAYCLIENT=""\n'],  # tcpserver uses the first rule for a key
)  # fmt: skip
def test_safe_rules_pass(home: Home, rules: str) -> None:
    write_control(home, "tcp.smtp", rules)
    compile_rules_file(home, "tcp.smtp")
    assert check(home) == []


def test_compiled_relay_rule_without_source(home: Home) -> None:
    write_control(home, "tcp.smtp", ':allow,RELAYCLIENT=""\n')
    compile_rules_file(home, "tcp.smtp")
    (home.control / "tcp.smtp").unlink()
    p = one_error(home, "control/tcp.smtp.cdb")
    assert "relay" in p.message


def test_rules_syntax_error_and_freshness(home: Home) -> None:
    write_control(home, "tcp.smtp", ":allow\n1.2.3.4:allo\n")
    found = {(p.file, p.line) for p in only_errors(home)}
    assert found == {("control/tcp.smtp", 2), ("control/tcp.smtp", 0)}  # bad line; no cdb
    write_control(home, "tcp.smtp", ":allow\n")
    compile_rules_file(home, "tcp.smtp")
    assert only_errors(home) == []
    os.utime(home.control / "tcp.smtp.cdb", (1_500_000_000, 1_500_000_000))
    p = one_error(home, "control/tcp.smtp")
    assert "newer than tcp.smtp.cdb" in p.message and "tcprules" in p.fix


def test_users_assign_newer_than_cdb(home: Home) -> None:
    (home.users / "assign").write_text("=joe:joe:1000:1000:/home/joe:::\n.\n")
    assert "users/cdb does not exist" in one_error(home, "users/assign").message
    (home.users / "cdb").write_bytes(b"\0" * 2048)
    os.utime(home.users / "cdb", (1_500_000_000, 1_500_000_000))
    p = one_error(home, "users/assign")
    assert "newer" in p.message and p.fix == "run qmail-newu"


def test_unknown_file_is_a_warning_with_suggestion(home: Home) -> None:
    write_control(home, "rcpthost", "x\n")
    (p,) = check(home)
    assert p.severity is Severity.WARNING and "control/rcpthosts" in p.fix


def test_not_a_home(tmp_path: Path) -> None:
    (p,) = check(Home(tmp_path / "nothing"))
    assert p.severity is Severity.ERROR and "pyqmail init" in p.fix


def run_check(home: Home, *extra: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from pyqmail.cli.check import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "--home", str(home.root), *extra],
        capture_output=True,
        text=True,
    )


def test_command_exit_codes(home: Home) -> None:
    p = run_check(home)
    assert p.returncode == 0 and "0 error(s), 0 warning(s)" in p.stdout
    write_control(home, "concurrencyremote", "abc\n")
    p = run_check(home)
    assert p.returncode == 1 and "control/concurrencyremote:1" in p.stdout
    write_control(home, "concurrencyremote", "30\n")
    write_control(home, "rcpthost", "x\n")
    p = run_check(home, "-q")
    assert (p.returncode, p.stdout) == (0, "")


def test_unreadable_rules_file_reported_once(home: Home) -> None:
    (home.control / "tcp.smtp").mkdir()
    p = one_error(home, "control/tcp.smtp")
    assert "cannot be read" in p.message


@pytest.mark.parametrize(
    ("name", "text", "line", "word"),
    [("concurrencyremote", "0\n", 1, "hold"), ("defaultdelivery", "# x\n./Maildir\n", 2, "mbox"),
     ("virtualdomains", "other.example:joe\nmx.test.example:bob\n", 2, "never used"),
     ("destinationlimits", "ok.example:2:\nslow.example:0:\n", 2, "on hold")],
)  # fmt: skip
def test_probably_unintended_settings_warn(
    home: Home, name: str, text: str, line: int, word: str
) -> None:
    write_control(home, name, text)
    write_control(home, "rcpthosts", "mx.test.example\nother.example\n")
    (p,) = check(home)
    assert (p.severity, p.file, p.line) == (Severity.WARNING, f"control/{name}", line)
    assert word in p.message


def test_missing_queue_warns(home: Home) -> None:
    import shutil

    shutil.rmtree(home.queue)
    (p,) = check(home)
    assert (p.severity, p.file) == (Severity.WARNING, "queue")


def test_qmqp_open_to_everyone_is_a_relay(home: Home) -> None:
    write_control(home, "tcp.qmqp", "10.0.0.:allow\n:allow\n")
    compile_rules_file(home, "tcp.qmqp")
    p = one_error(home, "control/tcp.qmqp")
    assert p.line == 2 and "QMQP" in p.message and "relay" in p.message
    write_control(home, "tcp.qmqp", "10.0.0.:allow\n:deny\n")
    compile_rules_file(home, "tcp.qmqp")
    assert check(home) == []


@pytest.mark.parametrize(
    ("assign", "line", "word"),
    [("=joe:joe:1:1:/h:::\n=bad line\n=x:x:2:2:/x:::\n.\n", 2, "parse"),
     ("=joe:joe:1:1:/h:::\n", 0, "final line"),
     ("=joe:joe:one:1:/h:::\n.\n", 1, "uid"),
     ("=joe:joe:1:1:home:::\n.\n", 1, "absolute")],
)  # fmt: skip
def test_users_assign_format(home: Home, assign: str, line: int, word: str) -> None:
    (home.users / "assign").write_text(assign)
    (home.users / "cdb").write_bytes(b"\0" * 2048)  # fresher than assign: only the format
    os.utime(home.users / "assign", (1_500_000_000, 1_500_000_000))
    (p,) = only_errors(home)
    assert (p.file, p.line) == ("users/assign", line)
    assert word in p.message


def test_says_qmqp_serves_loopback_only_without_its_cdb(home: Home) -> None:
    (note,) = notes(home)
    assert "QMQP" in note and "loopback" in note and "tcp.qmqp.cdb" in note
    p = run_check(home)
    assert p.returncode == 0 and f"note: {note}" in p.stdout  # a note, not a problem
    assert "note:" not in run_check(home, "-q").stdout
    write_control(home, "tcp.qmqp", "10.1.2.3:allow\n:deny\n")
    compile_rules_file(home, "tcp.qmqp")
    assert notes(home) == [] and "QMQP" not in run_check(home).stdout


def test_servercert_is_known_and_checked(home: Home) -> None:
    pem = home.control / "servercert.pem"
    pem.write_bytes(tls.self_signed("mx.test.example"))
    pem.chmod(0o600)
    found = check(home)
    assert [(p.severity, p.file) for p in found] == [
        (Severity.WARNING, "control/servercert.pem")
    ]  # self-signed: a warning, and not "no part of qmail reads this file"
    assert "self-signed" in found[0].message
    pem.write_text("not a certificate\n")
    assert "cannot be used" in one_error(home, "control/servercert.pem").message


def test_smtproutesauth_must_be_private_and_parse(home: Home) -> None:
    path = home.control / "smtproutesauth"
    path.write_text("relay.example:u:secret\n")
    os.chmod(path, 0o640)
    p = one_error(home, "control/smtproutesauth")
    assert "readable by group or other (mode 640)" in p.message and p.fix == f"chmod 600 {path}"
    os.chmod(path, 0o600)
    assert check(home) == []  # a known file: no "nobody reads this" warning either
    path.write_text("relay.example:no-password-field\n")
    write_control(home, "smtproutestls", "relay.example:sha256:0123\n")
    got = {(p.file, p.line) for p in only_errors(home)}
    assert got == {("control/smtproutesauth", 1), ("control/smtproutestls", 1)}
    assert all("no-password-field" not in str(p) for p in check(home))


# --- control/srs (docs/srs.md) ------------------------------------------------------------


def srs_problems(home: Home) -> list[Problem]:
    return [p for p in check(home) if p.file == "control/srs"]


def test_srs_good_file_passes(home: Home) -> None:
    write_control(home, "locals", "mx.test.example\nsrs.test.example\n")
    write_control(home, "rcpthosts", "mx.test.example\nsrs.test.example\n")
    write_control(home, "srs", "0123456789abcdefghij\nsrs.test.example\n")
    assert check(home) == []


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("short\nmx.test.example\n", [1]),
        ("\nmx.test.example\n", [1]),
        ("0123456789abcdefghij\n", [2]),
        ("0123456789abcdefghij\nnot a domain\n", [2, 2]),  # and not in locals
        ("0123456789abcdefghij\nsrs.elsewhere.example\n", [2]),  # not in locals
    ],
)
def test_srs_errors(home: Home, text: str, lines: list[int]) -> None:
    write_control(home, "srs", text)
    found = srs_problems(home)
    assert [p.line for p in found] == lines, found
    assert all(p.severity is Severity.ERROR and p.fix for p in found)


def test_srs_world_readable_in_a_multi_user_home_warns(home: Home) -> None:
    write_control(home, "srs", "0123456789abcdefghij\nmx.test.example\n")
    (home.control / "srs").chmod(0o644)
    assert srs_problems(home) == []  # single-user: the user owns everything anyway
    multi = Home(home.root, single_user=False)
    (found,) = srs_problems(multi)
    assert found.severity is Severity.WARNING and "chmod 640" in found.fix
    (home.control / "srs").chmod(0o640)
    assert srs_problems(multi) == []


def test_srs_is_a_known_file(home: Home) -> None:
    write_control(home, "srs", "0123456789abcdefghij\nmx.test.example\n")
    assert not [p for p in check(home) if "no part of qmail" in p.message]


def test_smtp_auth_files_are_known_and_checked(home: Home) -> None:
    from pyqmail.smtp.passwords import set_password

    set_password(home, b"alice", b"pw")
    write_control(home, "authsenders", "alice: *\n")
    assert not [p for p in check(home) if p.file.startswith("control/auth")]
    path = home.control / "authusers"
    path.chmod(0o644)
    with path.open("ab") as f:
        f.write(b"bob:plaintext\n")
    found = [p for p in check(home) if p.file == "control/authusers"]
    assert [(p.severity, p.line) for p in found] == [
        (Severity.WARNING, 0),
        (Severity.WARNING, 2),
    ]
    write_control(home, "checkpassword", "/nonexistent/checkpassword /bin/true\n")
    assert one_error(home, "control/checkpassword").line == 1
    write_control(home, "checkpassword", "/bin/true\n")
    assert not [
        p for p in check(home) if p.file in ("control/checkpassword", "control/authsenders")
    ]
