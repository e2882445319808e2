"""daemon/http.py without a daemon: the page escapes what came from mail; --http rules."""

from __future__ import annotations

import pytest

from pyqmail.daemon.http import HttpError, StatusServer, check_http, parse_http
from pyqmail.home import Home
from pyqmail.send.stats import SendStats
from tests.conftest import write_control


def test_page_escapes_values_from_mail(home: Home) -> None:
    st = SendStats()
    evil = '"<script>alert(1)</script>"@x.example'
    st.delivery("remote", 1, evil, "Z", "<img src=x onerror=alert(2)>", 0.0)
    srv = StatusServer(home, smtp_snapshot=dict, send_stats=st)
    page = srv.page()
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x" in page


def test_loopback_by_default_and_non_loopback_needs_httpauth(home: Home) -> None:
    assert parse_http("9100") == ("127.0.0.1", 9100)
    assert check_http(home, "127.0.0.1") is None
    assert check_http(home, "::1") is None
    with pytest.raises(HttpError, match="httpauth"):
        check_http(home, "0.0.0.0")


def test_httpauth_must_hold_argon2_hashes(home: Home) -> None:
    write_control(home, "httpauth", "ops:plaintext\n")
    with pytest.raises(HttpError, match="argon2"):
        check_http(home, "0.0.0.0")
