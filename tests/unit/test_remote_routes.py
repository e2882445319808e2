"""remote/routes.py: every smtproutes form and qmail's lookup order."""

from __future__ import annotations

import pytest

from pyqmail.control import colon_map, parse_list
from pyqmail.remote.routes import Route, RouteError, lookup, parse_relay


def table(text: str) -> dict[str, str]:
    return colon_map(parse_list(text.encode()))


@pytest.mark.parametrize(
    ("value", "route"),
    [
        ("", None),
        ("relay.example", Route("relay.example", 25, False)),
        ("relay.example:2525", Route("relay.example", 2525, False)),
        ("192.0.2.7", Route("192.0.2.7", 25, True)),
        ("192.0.2.7:26", Route("192.0.2.7", 26, True)),
        ("[192.0.2.7]", Route("192.0.2.7", 25, True)),
        ("[192.0.2.7]:2525", Route("192.0.2.7", 2525, True)),
        ("[::1]:2525", Route("::1", 2525, True)),
        ("relay.example:25x", Route("relay.example", 25, False)),
    ],
)
def test_parse_relay(value: str, route: Route | None) -> None:
    assert parse_relay(value) == route


@pytest.mark.parametrize("bad", ["relay:abc", "[1.2.3.4", "[1.2.3.4]x"])
def test_bad_relays(bad: str) -> None:
    with pytest.raises(RouteError):
        parse_relay(bad)


ROUTES = """\
example.com:hub.example:2525
.example.com:sub-hub.example
inside.example.com:
.af.mil:
x.af.mil:[10.0.0.5]:2525
Upper.Example:up.example
:smarthost.example
dup.example:first.example
dup.example:second.example
"""


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("example.com", Route("hub.example", 2525)),
        ("a.example.com", Route("sub-hub.example")),
        ("a.b.example.com", Route("sub-hub.example")),
        ("inside.example.com", None),  # empty relay: MX, and the search stops
        ("af.mil", Route("smarthost.example")),  # .af.mil does not match af.mil
        ("y.af.mil", None),
        ("x.af.mil", Route("10.0.0.5", 2525, True)),
        ("upper.example", Route("up.example")),
        ("UPPER.EXAMPLE", Route("up.example")),
        ("elsewhere.test", Route("smarthost.example")),
        ("dup.example", Route("second.example")),  # last line wins (constmap)
    ],
)
def test_lookup_order(host: str, route: Route | None) -> None:
    assert lookup(table(ROUTES), host) == route


def test_no_routes_means_mx() -> None:
    assert lookup({}, "example.com") is None
