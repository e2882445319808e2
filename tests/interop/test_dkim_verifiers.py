"""Our DKIM signatures checked by verifiers no one here wrote, against the keygen records
served by a real DNS server: OpenDKIM's opendkim-testmsg and Perl's Mail::DKIM (Debian
opendkim-tools, libmail-dkim-perl; Debian 12's Mail::DKIM has no Ed25519, so OpenDKIM 2.11
and dkimpy check those), with dnsmasq on a fresh
127.x.y.z port 53 (opendkim knows only /etc/resolv.conf: it runs in a private mount
namespace where that file names our server). Also ``pyqmail check`` against those records."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import pytest

from pyqmail import dkim
from pyqmail.check import Severity, check
from pyqmail.home import Home
from pyqmail.layout import create_home
from tests.conftest import require, require_tools

pytestmark = pytest.mark.interop

MSG = (
    b"From: Someone <someone@example.test>\nTo: dest@remote.example\nSubject: interop\n"
    b"Date: Mon, 7 Dec 2026 11:00:00 +0000\nMessage-ID: <i1@example.test>\n"
    b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n"
    b"body marker-abc\n\n\ntrailing blank lines and  double  spaces \t\n"
)

PERL = r"""
use strict; use warnings;
use Net::DNS::Resolver; use Mail::DKIM::DNS; use Mail::DKIM::Verifier;
my $res = Net::DNS::Resolver->new(nameservers => [$ARGV[0]], port => 53, recurse => 1,
    retry => 2, retrans => 1, udp_timeout => 4, tcp_timeout => 4);
Mail::DKIM::DNS::resolver($res);
my $v = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\r\n/; $v->PRINT($line); }
$v->CLOSE;
printf "%s %s\n", $_->algorithm, $_->result for $v->signatures;
"""


class Dns:
    def __init__(self, home: Home, workdir: Path) -> None:
        self.ip = ""
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.home = home

    def start(self, records: dict[str, str]) -> None:
        lines = [f'txt-record={n},"{v}"' for n, v in records.items()]
        lines.append("txt-record=mismatch.example.test,x")
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join(lines) + "\n")
        for _ in range(5):
            ip = f"127.{random.randint(20, 219)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
            proc = subprocess.Popen(
                ["dnsmasq", "-k", f"--conf-file={conf}", "--no-resolv", "--no-hosts",
                 "--bind-interfaces", f"--listen-address={ip}", "--port=53", "--user=root",
                 "--pid-file=", "--local=/test/"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            res = dkim.resolver(ip, lifetime=0.3)
            deadline = time.monotonic() + 5
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    res.resolve(next(iter(records)), "TXT")
                    self.ip, self.proc = ip, proc
                    (self.workdir / "resolv.conf").write_text(f"nameserver {ip}\n")
                    return
                except dns.exception.DNSException:
                    time.sleep(0.05)
            proc.kill()
            proc.wait()
        raise RuntimeError("dnsmasq did not answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)

    def opendkim(self, message: bytes) -> subprocess.CompletedProcess[bytes]:
        """opendkim-testmsg (verify mode) with /etc/resolv.conf naming our server."""
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
             str(self.workdir / "resolv.conf"), "opendkim-testmsg"],
            input=message, capture_output=True, timeout=60,
        )  # fmt: skip

    def mail_dkim(self, message: bytes) -> list[str]:
        r = subprocess.run(["perl", "-e", PERL, self.ip], input=message, capture_output=True,
                           timeout=60, check=True)  # fmt: skip
        return r.stdout.decode().splitlines()


@pytest.fixture
def keyed(home: Home, tmp_path: Path) -> Iterator[tuple[Home, Dns]]:
    require(os.geteuid() == 0, "dnsmasq on port 53 and unshare -m need root", "run as root")
    require_tools("dnsmasq", "opendkim-testmsg", "unshare", "perl")
    ok = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-e1"],
                        capture_output=True).returncode == 0  # fmt: skip
    require(ok, "Mail::DKIM", "apt-get install libmail-dkim-perl")
    rsa, _ = dkim.keygen(home, "example.test", "s1")
    ed, _ = dkim.keygen(home, "example.test", "e1", ed=True)
    (home.control / "dkim/example.test/selector").write_text("s1\ne1\n")
    d = Dns(home, tmp_path)
    d.start({rsa.name: rsa.value, ed.name: ed.value})
    yield home, d
    d.stop()


def _only(home: Home, selector: str) -> None:
    (home.control / "dkim/example.test/selector").write_text(f"{selector}\n")


def test_rsa_passes_opendkim_and_mail_dkim_and_a_changed_byte_fails_both(
    keyed: tuple[Home, Dns],
) -> None:
    home, d = keyed
    _only(home, "s1")
    signed = dkim.Signer(home).signature(MSG) + MSG
    assert d.mail_dkim(signed) == ["rsa-sha256 pass"]
    r = d.opendkim(signed)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    for bad in (signed.replace(b"marker-abc", b"marker-abd"),
                signed.replace(b"Subject: interop", b"Subject: intero")):  # fmt: skip
        assert d.mail_dkim(bad) == ["rsa-sha256 fail"]
        assert d.opendkim(bad).returncode != 0


def test_ed25519_passes_opendkim_and_a_changed_byte_fails(keyed: tuple[Home, Dns]) -> None:
    home, d = keyed
    _only(home, "e1")
    signed = dkim.Signer(home).signature(MSG) + MSG
    assert b"a=ed25519-sha256" in signed
    r = d.opendkim(signed)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert d.opendkim(signed.replace(b"marker-abc", b"marker-abd")).returncode != 0
    # both signatures at once: OpenDKIM passes only if every one verifies
    _only(home, "s1\ne1")
    both = dkim.Signer(home).signature(MSG) + MSG
    assert both.count(b"DKIM-Signature:") == 2
    assert d.opendkim(both).returncode == 0
    assert d.opendkim(both + b"x\n").returncode != 0


def test_hostile_headers_signed_mail_passes(keyed: tuple[Home, Dns]) -> None:
    home, d = keyed
    _only(home, "s1")
    eight = b"Subject: caf\xe9 \xff\n" + MSG
    signed = dkim.Signer(home).signature(eight) + eight
    assert d.mail_dkim(signed) == ["rsa-sha256 pass"]
    # and a 100 KB header field. OpenDKIM refuses to parse either message at all
    # ("dkim_chunk(): Syntax error", exit 70), whatever signed it: Mail::DKIM is the judge
    big = b"X-Big: " + b"a" * 100_000 + b"\n" + MSG
    assert d.mail_dkim(dkim.Signer(home).signature(big) + big) == ["rsa-sha256 pass"]


def test_pyqmail_check_compares_the_records(
    keyed: tuple[Home, Dns], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, d = keyed
    monkeypatch.setenv("PYQMAIL_RESOLVER", d.ip)
    notes: list[str] = []
    assert [p for p in check(home, dns_notes=notes) if "dkim" in p.file] == []
    assert notes == []
    # a key whose record is missing, and one whose record is another key's
    dkim.keygen(home, "other.test", "s1")
    dkim.keygen(home, "example.test", "s2")
    (home.control / "dkim/example.test/selector").write_text("s1\ns2\n")
    d.stop()
    rsa = dkim.record_for(dkim.load_keys(home, "example.test")[0])
    other = dkim.record_for(dkim.load_keys(home, "other.test")[0])
    d.start({rsa.name: rsa.value, "s2._domainkey.example.test": other.value})
    monkeypatch.setenv("PYQMAIL_RESOLVER", d.ip)
    found = {p.file: p for p in check(home, dns_notes=notes) if "dkim" in p.file}
    assert set(found) == {"control/dkim/example.test/s2.key", "control/dkim/other.test/s1.key"}
    assert all(p.severity is Severity.WARNING for p in found.values())
    assert "publishes another key" in found["control/dkim/example.test/s2.key"].message
    assert "no DKIM record" in found["control/dkim/other.test/s1.key"].message
    # DNS that does not answer: a note, no problem
    monkeypatch.setenv("PYQMAIL_RESOLVER", "127.0.0.1:9")
    assert [p for p in check(home, dns_notes=notes) if "dkim" in p.file] == []
    assert len(notes) == 3 and all("DNS did not answer" in n for n in notes)
    # the command prints the note
    r = subprocess.run([str(Path(sys.executable).parent / "pyqmail"), "check", "--home",
                        str(home.root), "--single-user"], capture_output=True, text=True,
                       env={**os.environ, "PYQMAIL_RESOLVER": "127.0.0.1:9"})  # fmt: skip
    assert "note: DKIM record s1._domainkey.example.test not checked" in r.stdout, r.stdout


def test_a_fresh_home_has_no_dkim_findings(tmp_path: Path) -> None:
    h = Home(tmp_path / "q", single_user=True)
    create_home(h, "mx.test.example", None)
    notes: list[str] = []
    assert [p for p in check(h, dns_notes=notes) if "dkim" in p.file] == [] and notes == []
    assert not dkim.has_keys(h)
