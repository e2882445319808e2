"""tests/conftest.py's preconditions: under root (what ``make test`` runs as on CI) a missing
qmail account or Debian peer is a test error naming the make target; otherwise a skip."""

from __future__ import annotations

import pwd

import pytest

from tests import conftest


def _without_qmaild(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pwd.getpwnam

    def getpwnam(name: str) -> pwd.struct_passwd:
        if name == "qmaild":
            raise KeyError(name)
        return real(name)

    monkeypatch.setattr(pwd, "getpwnam", getpwnam)


def test_missing_account_under_root_is_an_error_saying_make_accounts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_qmaild(monkeypatch)
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception, match=r"user qmaild.*`make accounts`"):
        conftest.qmail_ids()


def test_missing_account_for_an_ordinary_user_is_a_skip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_qmaild(monkeypatch)
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="user qmaild"):
        conftest.qmail_ids()


def test_missing_tool_under_root_is_an_error_saying_make_deps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conftest.os, "geteuid", lambda: 0)
    with pytest.raises(pytest.fail.Exception, match=r"no-such-tool-x.*`make deps`"):
        conftest.require_tools("sh", "no-such-tool-x")
    conftest.require_tools("sh")  # present: nothing happens
