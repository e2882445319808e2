"""destlimits.py: control/destinationlimits parsed and looked up as smtproutes is."""

from __future__ import annotations

from pyqmail import destlimits
from pyqmail.control import parse_list
from pyqmail.destlimits import Limit


def parse(text: str) -> destlimits.DestinationLimits:
    return destlimits.parse(parse_list(text.encode()))


def test_lines_and_lookup_order() -> None:
    t = parse(
        "# comment\ngmail.com:5:100\n.example.net:2:\nyahoo.com::60\nMixed.Example:3\n*:10:\n"
    )
    assert t.lookup("gmail.com") == Limit("gmail.com", 5, 100, 2, "gmail.com")
    assert t.lookup("GMail.COM").concurrency == 5
    # .suffix: the subdomains, sharing one set of counters under the line's key
    assert t.lookup("a.example.net") == Limit(".example.net", 2, None, 3, ".example.net")
    assert t.lookup("b.c.example.net").key == ".example.net"
    # the default line: each domain its own counters
    assert t.lookup("example.net") == Limit("example.net", 10, None, 6, "*")
    assert t.lookup("other.org").key == "other.org"
    assert t.lookup("yahoo.com") == Limit("yahoo.com", None, 60, 4, "yahoo.com")
    assert t.lookup("mixed.example") == Limit("mixed.example", 3, None, 5, "mixed.example")
    assert not t.bad and bool(t)


def test_no_file_no_limits() -> None:
    t = parse("")
    assert not t
    lim = t.lookup("Any.Example")
    assert lim == Limit("any.example") and not lim.limited and not lim.held
    assert lim.describe() == "no limit"


def test_empty_key_is_the_default_and_last_line_wins() -> None:
    t = parse(":4:\nd.example:1:1\nd.example:2:2\n")
    assert t.lookup("x.example").concurrency == 4
    assert t.lookup("d.example") == Limit("d.example", 2, 2, 3, "d.example")


def test_exact_wins_over_suffix_and_longest_suffix_first() -> None:
    t = parse(".example.com:1:\n.b.example.com:2:\nb.example.com:3:\n")
    assert t.lookup("b.example.com").concurrency == 3
    assert t.lookup("a.b.example.com").concurrency == 2
    assert t.lookup("c.example.com").concurrency == 1
    assert t.lookup("example.com") == Limit("example.com")  # .suffix is subdomains only


def test_bad_lines_are_reported_and_ignored() -> None:
    t = parse("nocolon\nd.example:x:1\ne.example:1:2:3\nf.example:-1:\ng.example: 2 : 30 \n")
    assert [b.line for b in t.bad] == [1, 2, 3, 4]
    assert "not a number" in t.bad[1].reason
    assert t.lookup("d.example") == Limit("d.example")
    assert t.lookup("g.example").rate == 30  # spaces around a number are fine


def test_hold_and_describe() -> None:
    t = parse("h.example:0:\nr.example::0\nx.example:2:30\n")
    assert t.lookup("h.example").held and t.lookup("r.example").held
    assert "on hold" in t.lookup("h.example").describe()
    assert t.lookup("x.example").describe() == (
        "at most 2 deliveries at once, at most 30 started per minute"
    )
