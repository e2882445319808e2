"""Interop with Debian's ucspi-tcp (tcprules, tcprulescheck) and tinycdb (cdb).

Our tcprules must write the same bytes as ucspi-tcp's for every rules file it accepts,
refuse the same files with the same message and exit code, and our tcprulescheck must
answer like theirs. Our cdb module must read what tinycdb writes and write what tinycdb
reads, byte for byte, duplicates and files over 64 KiB included.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail import cdb, tcprules
from tests.conftest import require, require_tools

pytestmark = pytest.mark.interop

REF_TCPRULES = "/usr/bin/tcprules"
REF_CHECK = "/usr/bin/tcprulescheck"
TINYCDB = shutil.which("cdb")


@pytest.fixture
def _ucspi() -> None:
    ok = os.access(REF_TCPRULES, os.X_OK) and os.access(REF_CHECK, os.X_OK)
    require(ok, "Debian ucspi-tcp is not installed", "run `make deps` as root (`make test` does)")


@pytest.fixture
def _tinycdb() -> None:
    require_tools("cdb")


needs_ucspi = pytest.mark.usefixtures("_ucspi")
needs_tinycdb = pytest.mark.usefixtures("_tinycdb")

OURS = [
    sys.executable,
    "-c",
    "import sys; from pyqmail.cli.{} import main; sys.exit(main(sys.argv[1:]))",
]


def ours(module: str) -> list[str]:
    return [OURS[0], OURS[1], OURS[2].format(module)]


def run(
    cmd: list[str], stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env)


def both_tcprules(
    tmp: Path, rules: bytes
) -> tuple[
    subprocess.CompletedProcess[bytes],
    bytes | None,
    subprocess.CompletedProcess[bytes],
    bytes | None,
]:
    for p in tmp.glob("*"):
        p.unlink()
    ref = run([REF_TCPRULES, str(tmp / "ref.cdb"), str(tmp / "ref.tmp")], rules)
    our = run([*ours("tcprules"), str(tmp / "our.cdb"), str(tmp / "our.tmp")], rules)
    ref_bytes = (tmp / "ref.cdb").read_bytes() if (tmp / "ref.cdb").exists() else None
    our_bytes = (tmp / "our.cdb").read_bytes() if (tmp / "our.cdb").exists() else None
    return ref, ref_bytes, our, our_bytes


CORPUS: list[str] = [
    "",
    "\n\n\n",
    "# only comments\n#:allow\n",
    ":allow\n",
    ":deny\n",
    '127.0.0.1:allow,RELAYCLIENT=""\n:allow\n',
    '127.:allow,RELAYCLIENT=""\n10.0.0.:allow,RELAYCLIENT="",RBLSMTPD=""\n'
    ':allow,RBLSMTPD="-go away"\n',
    "1.2.3.37-53:deny\n10.2-3.:allow\n1.2.3.-2:deny\n1.2.3.5-:deny\n1.2.3.250-999:allow\n",
    "1.2.3.0010-0012:deny\n1-2.3-4:allow\n-:deny\n 1.2-3:allow\n",
    '=host.example:allow,H="1"\n=.example:deny\n=:allow\njoe@1.2.3.4:allow\njoe@=h.example:deny\n',
    "x:allow,X='1',B=/y,z/,C=|a\"b|\n",
    'x:allow,="v",A=""\n',
    "no colon at all\n   \n\t\n1.2.3.4 :allow\n  :allow  \t\n",
    "a:allow\nb:deny\na:deny\n:allow\n:deny\n",
    'last:allow,A="no newline"',
    "1.2.3.0/24:deny\n",
    ":allow\n" + "".join(f'10.{i}.:allow,N="{i}"\n' for i in range(256)),
    "".join(f"192.168.{i}.0-255:deny\n" for i in range(0, 256, 8)),  # > 64 KiB of cdb
    '\xe9t\xe9:allow,V="\xfc"\n',
]

BAD: list[str] = [
    ":allo\n",
    ':allow,RELAYCLIENT="\n',
    "a:allow\nb:Allow\n",
    ":allowx\n",
    ": allow\n",
    ":allow,\n",
    ":allow,A\n",
    ":allow,A=\n",
    "1.2.3.a-5:allow\n",
    "1.2.3.4-5-6:allow\n",
    ":allow\r\n",
    '127.0.0.1:allow,RELAYCLIENT="\n:allo\n',
]


@needs_ucspi
@pytest.mark.parametrize("rules", CORPUS, ids=range(len(CORPUS)))
def test_tcprules_same_bytes(tmp_path: Path, rules: str) -> None:
    ref, ref_bytes, our, our_bytes = both_tcprules(tmp_path, rules.encode("latin-1"))
    assert ref.returncode == 0, ref.stderr
    assert our.returncode == 0, our.stderr
    assert our_bytes == ref_bytes


@needs_ucspi
@pytest.mark.parametrize("rules", BAD, ids=range(len(BAD)))
def test_tcprules_same_refusal(tmp_path: Path, rules: str) -> None:
    (tmp_path / "keep").mkdir()
    ref, _, our, our_bytes = both_tcprules(tmp_path / "keep", rules.encode())
    assert ref.returncode == 100
    assert (our.returncode, our.stderr) == (ref.returncode, ref.stderr)
    assert our_bytes is None
    assert not (tmp_path / "keep" / "our.tmp").exists()  # we also clean up the tmp


@needs_ucspi
def test_tcprules_refusal_keeps_old_cdb(tmp_path: Path) -> None:
    good = b'127.0.0.1:allow,RELAYCLIENT=""\n'
    for cmd in ([REF_TCPRULES], ours("tcprules")):
        cdbp, tmpp = tmp_path / "r.cdb", tmp_path / "r.tmp"
        assert run([*cmd, str(cdbp), str(tmpp)], good).returncode == 0
        before = cdbp.read_bytes()
        assert run([*cmd, str(cdbp), str(tmpp)], b":allow\n:bad\n").returncode == 100
        assert cdbp.read_bytes() == before
        cdbp.unlink()


@needs_ucspi
def test_tcprules_usage_and_io_errors_match(tmp_path: Path) -> None:
    cases = [
        ([], b""),
        ([str(tmp_path / "only.cdb")], b""),
        ([str(tmp_path / "no/r.cdb"), str(tmp_path / "no/r.tmp")], b":allow\n"),
    ]
    (tmp_path / "adir").mkdir()
    cases.append(([str(tmp_path / "adir"), str(tmp_path / "x.tmp")], b":allow\n"))
    for args, stdin in cases:
        ref = run([REF_TCPRULES, *args], stdin)
        our = run([*ours("tcprules"), *args], stdin)
        assert (our.returncode, our.stderr) == (ref.returncode, ref.stderr), args


# Lines mixing the pieces of the syntax; many are invalid on purpose.
_PIECE = st.sampled_from(
    ["", "1", "2", ".", "-", "=", "@", ":", ",", "allow", "deny", "A", "=", '"', "'", "x",
     " ", "\t", "#", "10.", "255", "1.2.3.4", "RELAYCLIENT", '""', "\r"]
)  # fmt: skip
_LINE = st.lists(_PIECE, max_size=10).map("".join)


@needs_ucspi
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_LINE, max_size=6), st.booleans())
def test_tcprules_differential(tmp_path: Path, lines: list[str], newline: bool) -> None:
    """Random rules files: the library (as the command uses it) against ucspi-tcp's binary."""
    text = ("\n".join(lines) + ("\n" if newline else "")).encode()
    for p in tmp_path.glob("*"):
        p.unlink()
    ref = run([REF_TCPRULES, str(tmp_path / "ref.cdb"), str(tmp_path / "ref.tmp")], text)
    try:
        strict = list(tcprules.records(io.BytesIO(text), ipv6=False))
    except tcprules.RulesError as e:
        assert ref.returncode == 100
        assert ref.stderr == b"tcprules: fatal: unable to parse this line: " + e.line + b"\n"
        return
    assert ref.returncode == 0, ref.stderr
    # the IPv6 extension changes no valid file
    assert list(tcprules.records(io.BytesIO(text))) == strict
    tcprules.compile_cdb(io.BytesIO(text), tmp_path / "our.cdb", tmp_path / "our.tmp")
    assert (tmp_path / "our.cdb").read_bytes() == (tmp_path / "ref.cdb").read_bytes()


# -- tcprulescheck ----------------------------------------------------------------------

CHECK_RULES = b"""\
# relay for ourselves
127.0.0.1:allow,RELAYCLIENT=""
10.1.:allow,RELAYCLIENT="",DATABYTES="200000"
192.168.7.10-20:allow,RELAYCLIENT="@relay.example"
=mx.example.net:allow,TAG="mx"
=.bad.example:deny,WHY="bad"
joe@203.0.113.5:allow,RELAYCLIENT=""
joe@=mx.example.net:allow,JOE="host"
@1.2.3.4:allow,EMPTYINFO="1"
203.0.113.5:deny
=:allow,NAMED="yes"
:allow,RBLSMTPD="",X="a,b:c"
"""

IPS = ["127.0.0.1", "10.1.2.3", "192.168.7.15", "192.168.7.21", "203.0.113.5", "1.2.3.4",
       "8.8.8.8", "0.0.0.0"]  # fmt: skip
HOSTS = [None, "", "mx.example.net", "a.bad.example", "MX.example.net", "x.y.bad.example."]
INFOS = [None, "", "joe", "Joe"]


def client_env(ip: str | None, host: str | None, info: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for name, value in (("TCPREMOTEIP", ip), ("TCPREMOTEHOST", host), ("TCPREMOTEINFO", info)):
        if value is not None:
            env[name] = value
    return env


@pytest.fixture(scope="module")
def check_cdb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "r.cdb"
    p = run([REF_TCPRULES, str(path), str(path.with_suffix(".tmp"))], CHECK_RULES)
    assert p.returncode == 0
    return path


@needs_ucspi
@pytest.mark.parametrize("ip", [*IPS, None])
def test_tcprulescheck_report_every_combination(check_cdb: Path, ip: str | None) -> None:
    """The library's report and decision for every (ip, host, info) vs ucspi-tcp's output."""
    with cdb.Reader.open(check_cdb) as r:
        for host in HOSTS:
            for info in INFOS:
                ref = run([REF_CHECK, str(check_cdb)], env=client_env(ip, host, info))
                hit = tcprules.find(r, ip or "0.0.0.0", host, info)
                assert tcprules.explain(hit) == ref.stdout, (ip, host, info)
                d = tcprules.lookup(r, ip or "0.0.0.0", host, info)
                assert d.allow == (b"deny connection" not in ref.stdout)


@needs_ucspi
@pytest.mark.parametrize("ip", [*IPS, None])
def test_tcprulescheck_command_same_output(check_cdb: Path, ip: str | None) -> None:
    for host, info in ((None, None), ("", ""), ("mx.example.net", "joe")):
        env = client_env(ip, host, info)
        ref = run([REF_CHECK, str(check_cdb)], env=env)
        our = run([*ours("tcprulescheck"), str(check_cdb)], env=env)
        assert (our.returncode, our.stdout, our.stderr) == (ref.returncode, ref.stdout, ref.stderr)


@needs_ucspi
def test_tcprulescheck_errors_match(tmp_path: Path) -> None:
    (tmp_path / "empty.cdb").write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "1.2.3.4"}
    for args in ([], [str(tmp_path / "missing.cdb")], [str(tmp_path / "empty.cdb")]):
        ref = run([REF_CHECK, *args], env=env)
        our = run([*ours("tcprulescheck"), *args], env=env)
        assert (our.returncode, our.stdout, our.stderr) == (ref.returncode, ref.stdout, ref.stderr)


# -- cdb vs tinycdb ---------------------------------------------------------------------


def cdbmake_input(items: list[tuple[bytes, bytes]]) -> bytes:
    out = [b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v) for k, v in items]
    return b"".join(out) + b"\n"


def write_ours(path: Path, items: list[tuple[bytes, bytes]]) -> None:
    with cdb.Writer(path) as w:
        for k, v in items:
            w.add(k, v)


BIG = [(f"key-{i}".encode(), os.urandom(i % 97)) for i in range(4000)]
DUPS = [(b"k", b"1"), (b"other", b"x"), (b"k", b"2"), (b"", b"empty key"), (b"k", b""),
        (b"\0\xff", b"\n\0binary")]  # fmt: skip


@needs_tinycdb
@pytest.mark.parametrize("items", [[], DUPS, BIG], ids=["empty", "duplicates", "big"])
def test_cdb_same_bytes_as_tinycdb(tmp_path: Path, items: list[tuple[bytes, bytes]]) -> None:
    assert TINYCDB is not None
    theirs = tmp_path / "theirs.cdb"
    p = run([TINYCDB, "-c", str(theirs)], cdbmake_input(items))
    assert p.returncode == 0, p.stderr
    write_ours(tmp_path / "ours.cdb", items)
    assert (tmp_path / "ours.cdb").read_bytes() == theirs.read_bytes()
    if items is BIG:
        assert theirs.stat().st_size > 65536


@needs_tinycdb
def test_tinycdb_reads_ours(tmp_path: Path) -> None:
    assert TINYCDB is not None
    path = tmp_path / "ours.cdb"
    items = DUPS + BIG[:2000]
    write_ours(path, items)
    assert path.stat().st_size > 65536
    dump = run([TINYCDB, "-d", str(path)])
    assert dump.returncode == 0 and dump.stdout == cdbmake_input(items)
    for key in (b"k", b"key-1999", b"key-7"):
        values = [v for k, v in items if k == key]
        for n, value in enumerate(values, 1):
            q = run([TINYCDB, "-q", "-n", str(n), str(path), key.decode()])
            assert (q.returncode, q.stdout) == (0, value)
    assert run([TINYCDB, "-q", str(path), "nokey"]).returncode == 100


@needs_tinycdb
def test_we_read_tinycdb(tmp_path: Path) -> None:
    assert TINYCDB is not None
    path = tmp_path / "theirs.cdb"
    items = DUPS + BIG
    assert run([TINYCDB, "-c", str(path)], cdbmake_input(items)).returncode == 0
    with cdb.Reader.open(path) as r:
        assert list(r.items()) == items
        assert list(r.find_all(b"k")) == [b"1", b"2", b""]
        assert r.get(b"k") == b"1"
        for k, v in BIG[::131]:
            assert r.get(k) == v
        assert r.get(b"nokey") is None


@needs_tinycdb
@needs_ucspi
def test_tcprules_cdb_reads_in_tinycdb(tmp_path: Path) -> None:
    assert TINYCDB is not None
    path = tmp_path / "r.cdb"
    p = run([*ours("tcprules"), str(path), str(tmp_path / "r.tmp")], CHECK_RULES)
    assert p.returncode == 0
    dump = run([TINYCDB, "-d", str(path)])
    assert dump.stdout == cdbmake_input(list(tcprules.records(io.BytesIO(CHECK_RULES))))


_KEYS = ["", "=", "1.2.3.4", "1.2.3.", "1.2.", "1.", "=a.b.example", "=.b.example", "=.example",
         "joe@1.2.3.4", "joe@=a.b.example", "@1.2.3.4", "@=a.b.example", "1.2.3.1-9",
         "=A.b.example"]  # fmt: skip
_CLIENT_IPS = st.sampled_from(["1.2.3.4", "1.2.3.5", "1.2.9.9", "1.9.9.9", "9.9.9.9", "1.2.3.40"])
_CLIENT_HOSTS = st.sampled_from([None, "", "a.b.example", "x.b.example", "example", "A.b.example"])
_CLIENT_INFOS = st.sampled_from([None, "", "joe", "bob"])


@needs_ucspi
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.sampled_from(_KEYS), st.booleans(), st.integers(0, 99)), max_size=8),
    st.lists(st.tuples(_CLIENT_IPS, _CLIENT_HOSTS, _CLIENT_INFOS), min_size=1, max_size=4),
)
def test_lookup_differential(
    tmp_path: Path,
    rules: list[tuple[str, bool, int]],
    clients: list[tuple[str, str | None, str | None]],
) -> None:
    """Random rules and clients: our lookup's report vs ucspi-tcp's tcprulescheck."""
    text = "".join(
        f'{key}:{"deny" if deny else "allow"},N="{n}"\n' for key, deny, n in rules
    ).encode()
    path = tmp_path / "r.cdb"
    assert run([REF_TCPRULES, str(path), str(tmp_path / "r.tmp")], text).returncode == 0
    with cdb.Reader.open(path) as r:
        for ip, host, info in clients:
            ref = run([REF_CHECK, str(path)], env=client_env(ip, host, info))
            assert tcprules.explain(tcprules.find(r, ip, host, info)) == ref.stdout
