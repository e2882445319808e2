"""inject/getopt.py: the one getopt qmail-inject and sendmail share."""

from __future__ import annotations

import pytest

from pyqmail.inject.getopt import Getopt, GetoptError


def _all(
    argv: list[str], flags: str = "ab", with_arg: str = "f"
) -> tuple[list[tuple[str, str]], list[str]]:
    g = Getopt(argv, flags, with_arg)
    got = list(g)
    return got, g.rest


def test_clusters_attached_and_separate_arguments() -> None:
    assert _all(["-ab", "-fjoe", "-a", "-f", "x y", "r1", "-b"]) == (
        [("a", ""), ("b", ""), ("f", "joe"), ("a", ""), ("f", "x y")],
        ["r1", "-b"],
    )
    assert _all(["-afjoe", "r"]) == ([("a", ""), ("f", "joe")], ["r"])


def test_end_of_options() -> None:
    assert _all(["-a", "--", "-b"]) == ([("a", "")], ["-b"])
    assert _all(["-", "-a"]) == ([], ["-", "-a"])
    assert _all([]) == ([], [])


def test_errors_come_when_reached() -> None:
    g = Getopt(["-a", "-x"], "ab", "f")
    it = iter(g)
    assert next(it) == ("a", "")
    with pytest.raises(GetoptError, match=r"^illegal option -- x$"):
        next(it)
    with pytest.raises(GetoptError, match=r"^option requires an argument -- f$"):
        _all(["-af"])
