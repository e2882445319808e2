"""tcprules: the rules parser, the value encoding, range expansion and tcpserver's lookup order.

The byte-for-byte comparison with ucspi-tcp's own tcprules is in tests/interop.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyqmail import cdb, tcprules
from pyqmail.tcprules import Decision, RulesError, lookup


def compile_rules(text: str | bytes, *, ipv6: bool = True) -> list[tuple[bytes, bytes]]:
    """The records the tcprules command writes for the rules file ``text``."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    return list(tcprules.records(io.BytesIO(data), ipv6=ipv6))


def reader_for(tmp_path: Path, rules: str | bytes) -> cdb.Reader:
    path = tmp_path / "rules.cdb"
    data = rules.encode("utf-8", "surrogateescape") if isinstance(rules, str) else rules
    tcprules.compile_cdb(io.BytesIO(data), path, tmp_path / "rules.tmp")
    return cdb.Reader.open(path)


# -- value encoding -------------------------------------------------------------------

ENCODING = [
    ('127.0.0.1:allow,RELAYCLIENT=""', [(b"127.0.0.1", b"+RELAYCLIENT=\0")]),
    (":allow", [(b"", b"")]),
    ("10.2.:deny", [(b"10.2.", b"D\0")]),
    ('x:deny,A="b"', [(b"x", b"D\0+A=b\0")]),
    ("x:allow,X='1',B=/y,z/", [(b"x", b"+X=1\0+B=y,z\0")]),
    ('x:allow,="v"', [(b"x", b"+=v\0")]),  # an empty name is not checked
    ("x:allow,A=zqz", [(b"x", b"+A=q\0")]),  # any character is a quote
    ('x:allow,A="a:b",B="=c"', [(b"x", b"+A=a:b\0+B==c\0")]),
    ("1.2.3.4 :allow", [(b"1.2.3.4 ", b"")]),  # the address is literal, spaces included
    ("  :allow  \t", [(b"  ", b"")]),  # trailing white space goes, leading stays
    ("=host.example:allow", [(b"=host.example", b"")]),
    ("joe@1.2.3.4:allow", [(b"joe@1.2.3.4", b"")]),
    ("1.2.3.0/24:deny", [(b"1.2.3.0/24", b"D\0")]),  # no CIDR: a literal key
    ("a:allow\nb:deny\na:deny", [(b"a", b""), (b"b", b"D\0"), (b"a", b"D\0")]),
]


@pytest.mark.parametrize(("text", "records"), ENCODING)
def test_value_encoding(text: str, records: list[tuple[bytes, bytes]]) -> None:
    assert compile_rules(text) == records


SKIPPED = [
    "# a comment:allow",
    "",
    "no colon here",
    "   ",
    "\t",
    "#:deny",
]


@pytest.mark.parametrize("text", SKIPPED)
def test_skipped_lines(text: str) -> None:
    assert compile_rules(text + "\n") == []


BAD = [
    ":allo",
    ":Allow",
    ":allowx",
    ":allow ",  # stripped, so this one is fine: checked below
    ":allow,",
    ":allow,A",
    ":allow,A=",
    ':allow,A="x',
    ":deny,A='x\"",
    ": allow",
    ':allow;A="x"',
    ':allow,A=""""',  # after A="" comes '"', not ','
    "1.2.3.a-5:allow",
    "1.2.3.4-5-6:allow",
    "1.2.3.4-x:allow",
]


@pytest.mark.parametrize("text", [b for b in BAD if b != ":allow "])
def test_bad_lines_name_the_line(text: str) -> None:
    with pytest.raises(RulesError) as e:
        compile_rules(f"1.2.3.4:allow\n# fine\n{text}\n:deny\n")
    assert e.value.lineno == 3
    assert e.value.line == text.rstrip(" \t").encode()
    assert "line 3" in str(e.value)


def test_trailing_space_after_allow_is_stripped() -> None:
    assert compile_rules(":allow \t\n") == [(b"", b"")]


def test_final_line_without_newline_counts() -> None:
    assert compile_rules("a:allow\nb:deny") == [(b"a", b""), (b"b", b"D\0")]


def test_crlf_line_is_an_error_like_tcprules() -> None:
    # the CR stays at the end of the instructions, which tcprules refuses
    with pytest.raises(RulesError):
        compile_rules(":allow\r\n")


# -- ranges ---------------------------------------------------------------------------

RANGES = [
    ("1.2.3.37-53", [f"1.2.3.{n}" for n in range(37, 54)]),
    ("10.2-3.", ["10.2.", "10.3."]),
    ("1.2.3.-2", ["1.2.3.0", "1.2.3.1", "1.2.3.2"]),  # an empty bottom is 0
    ("1.2.3.5-", []),  # an empty top is 0: bottom > top gives nothing
    ("1.2.3.7-5", []),
    ("1.2.3.250-999", [f"1.2.3.{n}" for n in range(250, 256)]),  # top clamped at 255
    ("1.2.3.0010-0012", ["1.2.3.10", "1.2.3.11", "1.2.3.12"]),  # leading zeros drop
    ("1-2.3-4", ["1.3-4", "2.3-4"]),  # only the first dash is a range
    ("-", ["0"]),
    (" 1.2-3", [" 1.2", " 1.3"]),
    ("1.2.3.18446744073709551617-3", ["1.2.3.1", "1.2.3.2", "1.2.3.3"]),  # 64-bit wrap
    ("x@1.2-3", ["x@1.2-3"]),  # '@' or '=' turn range expansion off
    ("=a-b", ["=a-b"]),
]


@pytest.mark.parametrize(("address", "keys"), RANGES)
def test_range_expansion(address: str, keys: list[str]) -> None:
    assert compile_rules(f"{address}:deny\n") == [(k.encode(), b"D\0") for k in keys]


# -- IPv6 extension ---------------------------------------------------------------------


def test_ipv6_rules_extension() -> None:
    assert compile_rules('::1:allow,RELAYCLIENT=""\n2001:db8::deny\n') == [
        (b"::1", b"+RELAYCLIENT=\0"),
        (b"2001:db8:", b"D\0"),
    ]
    with pytest.raises(RulesError):
        compile_rules("::1:allow\n", ipv6=False)
    with pytest.raises(RulesError):
        compile_rules("2001:db8::1:allowed\n")


# -- hypothesis: the parser never crashes, and what it writes reads back ----------------

_VAR = st.text(alphabet="ABCXYZ_019", min_size=0, max_size=8)
_VALUE = st.text(alphabet="abc ,:=@.-'\"/019", max_size=10)


@st.composite
def rule_line(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid rule line and the value it must encode to."""
    address = draw(st.sampled_from(["", "1.2.3.4", "1.2.", "=", "=a.example", "joe@1.2.3.4"]))
    deny = draw(st.booleans())
    parts = ["deny" if deny else "allow"]
    value = b"D\0" if deny else b""
    for name, val in draw(st.lists(st.tuples(_VAR, _VALUE), max_size=4)):
        quote = next(q for q in "\"'/|#%" if q not in val)
        parts.append(f",{name}={quote}{val}{quote}")
        value += f"+{name}={val}\0".encode()
    return address + ":" + "".join(parts), value


@settings(max_examples=200, deadline=None)
@given(st.lists(rule_line(), max_size=8))
def test_generated_rules_encode_exactly(lines: list[tuple[str, bytes]]) -> None:
    text = "\n".join(line for line, _ in lines)
    records = compile_rules(text)
    assert [v for _, v in records] == [v for _, v in lines]
    assert [k.decode() for k, _ in records] == [line.split(":", 1)[0] for line, _ in lines]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_parse_or_raise_rules_error(data: bytes) -> None:
    try:
        records = compile_rules(data)
    except RulesError as e:
        assert e.lineno >= 1
        return
    for _, value in records:
        assert value == b"" or value.endswith(b"\0")


@settings(max_examples=60, deadline=None)
@given(st.lists(rule_line(), min_size=1, max_size=6))
def test_lookup_uses_best_key_and_its_first_rule(
    tmp_path_factory: pytest.TempPathFactory, lines: list[tuple[str, bytes]]
) -> None:
    tmp = tmp_path_factory.mktemp("lk")
    with reader_for(tmp, "\n".join(line for line, _ in lines)) as r:
        hit = tcprules.find(r, "1.2.3.4", "a.example", "joe")
    assert hit is not None
    key, value = hit
    present = {line.split(":", 1)[0].encode() for line, _ in lines}
    order = list(tcprules.candidate_keys("1.2.3.4", "a.example", "joe"))
    assert key == min(present, key=order.index)
    assert value == next(v for line, v in lines if line.split(":", 1)[0].encode() == key)


# -- lookup order ---------------------------------------------------------------------

ORDER_RULES = """\
joe@1.2.3.4:allow,R="info@ip"
joe@=a.b.example:allow,R="info@=host"
1.2.3.4:allow,R="ip"
=a.b.example:allow,R="=host"
1.2.3.:allow,R="1.2.3."
1.2.:allow,R="1.2."
1.:allow,R="1."
=.b.example:allow,R="=.b.example"
=.example:allow,R="=.example"
=:allow,R="="
:allow,R="default"
"""

# (rules removed so far) -> the rule that must answer next, for ip 1.2.3.4,
# host a.b.example, info joe: tcpserver's order, one step at a time.
ORDER = [
    "info@ip",
    "info@=host",
    "ip",
    "=host",
    "1.2.3.",
    "1.2.",
    "1.",
    "=.b.example",
    "=.example",
    "=",
    "default",
]


def test_lookup_order_table(tmp_path: Path) -> None:
    lines = ORDER_RULES.splitlines()
    for i, expected in enumerate(ORDER):
        with reader_for(tmp_path, "\n".join(lines[i:])) as r:
            d = lookup(r, "1.2.3.4", "a.b.example", "joe")
        assert d.env == {"R": expected}, f"after removing {i} rules"
        assert d.allow
    with reader_for(tmp_path, "") as r:
        assert lookup(r, "1.2.3.4", "a.b.example", "joe") == Decision(True, {}, None)


def test_candidate_keys_exact_order() -> None:
    keys = list(tcprules.candidate_keys("1.2.3.4", "a.b.c", "joe"))
    assert keys == [
        b"joe@1.2.3.4", b"joe@=a.b.c", b"1.2.3.4", b"=a.b.c", b"1.2.3.", b"1.2.", b"1.",
        b"=.b.c", b"=.c", b"=", b"",
    ]  # fmt: skip
    assert list(tcprules.candidate_keys("1.2.3.4")) == [b"1.2.3.4", b"1.2.3.", b"1.2.", b"1.", b""]


def test_empty_host_and_info_count_as_set() -> None:
    keys = list(tcprules.candidate_keys("9.9.9.9", "", ""))
    assert keys[:4] == [b"@9.9.9.9", b"@=", b"9.9.9.9", b"="]
    assert b"=" in keys


def test_host_is_not_lowercased() -> None:
    assert b"=A.example" in list(tcprules.candidate_keys("1.1.1.1", "A.example"))


def test_ipv6_lookup_keys_and_mapped_addresses(tmp_path: Path) -> None:
    keys = list(tcprules.candidate_keys("2001:db8::1"))
    assert keys == [b"2001:db8::1", b"2001:db8::", b"2001:db8:", b"2001:", b""]
    with reader_for(tmp_path, '2001:db8::allow,V6="1"\n1.2.3.:deny\n') as r:
        assert lookup(r, "2001:db8::7").env == {"V6": "1"}
        assert not lookup(r, "::ffff:1.2.3.9").allow


def test_deny_and_env(tmp_path: Path) -> None:
    with reader_for(
        tmp_path, '10.:deny,A="x"\n127.0.0.1:allow,RELAYCLIENT="",DATABYTES="9"\n'
    ) as r:
        assert lookup(r, "10.0.0.1") == Decision(False, {"A": "x"}, b"10.")
        d = lookup(r, "127.0.0.1")
        assert d == Decision(True, {"RELAYCLIENT": "", "DATABYTES": "9"}, b"127.0.0.1")


def test_later_variable_overrides_earlier() -> None:
    assert tcprules.decide(b"k", b"+A=1\0+A=2\0+NOEQ\0tail").env == {"A": "2"}


def test_explain_like_tcprulescheck() -> None:
    assert tcprules.explain(None) == b"default:\nallow connection\n"
    assert tcprules.explain((b"", b"+X=q\0+Y=\0")) == (
        b"rule :\nset environment variable X=q\nset environment variable Y=\nallow connection\n"
    )
    assert tcprules.explain((b"=", b"D\0+B=2\0")) == b"rule =:\ndeny connection\n"


def test_lookup_file_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tcprules.lookup_file(tmp_path / "none.cdb", "1.2.3.4")


# -- the commands -----------------------------------------------------------------------


def run(
    args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    code = "import sys; from pyqmail.cli.{0} import main; sys.exit(main(sys.argv[1:]))"
    mod = args[0]
    return subprocess.run(
        [sys.executable, "-c", code.format(mod), *args[1:]],
        input=stdin,
        capture_output=True,
        env=env if env is not None else dict(os.environ),
    )


def test_tcprules_command_bad_line_keeps_old_cdb(tmp_path: Path) -> None:
    cdbp, tmpp = tmp_path / "r.cdb", tmp_path / "r.tmp"
    assert run(["tcprules", str(cdbp), str(tmpp)], b":allow\n").returncode == 0
    before = cdbp.read_bytes()
    p = run(["tcprules", str(cdbp), str(tmpp)], b'1.2.3.4:deny\n127.0.0.1:allow,A="\n')
    assert p.returncode == 100
    assert p.stderr == b'tcprules: fatal: unable to parse this line: 127.0.0.1:allow,A="\n'
    assert cdbp.read_bytes() == before
    assert not tmpp.exists()


def test_tcprules_command_usage_and_io_errors(tmp_path: Path) -> None:
    p = run(["tcprules", str(tmp_path / "only")])
    assert p.returncode == 100 and b"usage" in p.stderr
    p = run(["tcprules", str(tmp_path / "no/r.cdb"), str(tmp_path / "no/r.tmp")], b":allow\n")
    assert p.returncode == 111
    assert p.stderr.startswith(b"tcprules: fatal: unable to create ")
    assert p.stderr.endswith(b": file does not exist\n")
    (tmp_path / "isdir").mkdir()
    p = run(["tcprules", str(tmp_path / "isdir"), str(tmp_path / "x.tmp")], b":allow\n")
    assert p.returncode == 111 and b"unable to move" in p.stderr
    assert not (tmp_path / "x.tmp").exists()


def test_tcprulescheck_command(tmp_path: Path) -> None:
    cdbp = tmp_path / "r.cdb"
    tcprules.compile_cdb(io.BytesIO(b'1.2.3.4:deny\n=:allow,H="y"\n'), cdbp, tmp_path / "t")
    env = {"PATH": os.environ["PATH"], "TCPREMOTEIP": "1.2.3.4"}
    p = run(["tcprulescheck", str(cdbp)], env=env)
    assert (p.returncode, p.stdout) == (0, b"rule 1.2.3.4:\ndeny connection\n")
    p = run(
        ["tcprulescheck", str(cdbp)], env={**env, "TCPREMOTEIP": "5.5.5.5", "TCPREMOTEHOST": ""}
    )
    assert p.stdout == b"rule =:\nset environment variable H=y\nallow connection\n"
    p = run(["tcprulescheck", str(cdbp)], env={"PATH": os.environ["PATH"]})
    assert p.stdout == b"default:\nallow connection\n"  # no TCPREMOTEIP: 0.0.0.0
    p = run(["tcprulescheck", str(tmp_path / "missing.cdb")], env=env)
    assert p.returncode == 111
    assert p.stderr.endswith(b"missing.cdb: file does not exist\n")
    (tmp_path / "empty.cdb").write_bytes(b"")
    p = run(["tcprulescheck", str(tmp_path / "empty.cdb")], env=env)
    assert (p.returncode, p.stderr.endswith(b": invalid argument\n")) == (111, True)
    (tmp_path / "short.cdb").write_bytes(b"x" * 100)
    p = run(["tcprulescheck", str(tmp_path / "short.cdb")], env=env)
    assert (p.returncode, p.stderr.endswith(b": protocol error\n")) == (111, True)
    assert run(["tcprulescheck"], env=env).returncode == 100
