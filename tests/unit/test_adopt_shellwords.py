"""The run-script shell reader: words, quotes, expansions, redirections; never runs anything."""

from __future__ import annotations

import pytest

from pyqmail.adopt.shellwords import ShellError, Sub, Var, literal, show, split_script


def _texts(script: str) -> list[list[str]]:
    return [[show(w) for w in c.words] for c in split_script(script)]


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("exec a b\n", [["exec", "a", "b"]]),
        ("a \\\n  b\\\n c\n", [["a", "b", "c"]]),
        ("a 'x y' \"p q\"\n", [["a", "x y", "p q"]]),
        ("a 'it''s'\n", [["a", "its"]]),
        ('a "x\\"y" x\\ y\n', [["a", 'x"y', "x y"]]),
        ("# comment\na # trailing\n#!/bin/sh\n", [["a"]]),
        ("a; b && c || d | e & f\n", [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]),
        ("a x#y\n", [["a", "x#y"]]),
        ('a "" b\n', [["a", "", "b"]]),
        ("a $ b\n", [["a", "$", "b"]]),
    ],
)
def test_words(script: str, expect: list[list[str]]) -> None:
    assert _texts(script) == expect


def test_redirections_are_set_aside() -> None:
    (cmd,) = split_script("exec prog -v 2>&1 >/dev/null <in 3> out\n")
    assert [show(w) for w in cmd.words] == ["exec", "prog", "-v"]
    assert cmd.redirects == ("2>&1", ">/dev/null", "<in", "3>out")


def test_digits_that_are_not_a_redirection_stay_words() -> None:
    (cmd,) = split_script("tcpserver 0 25 prog\n")
    assert [show(w) for w in cmd.words] == ["tcpserver", "0", "25", "prog"]
    assert cmd.redirects == ()


def test_expansions_keep_their_structure() -> None:
    (cmd,) = split_script('a -l "$LOCAL" -c ${MAX}x `id -u qmaild` "$(cat f)" \'$NOT\'\n')
    w = cmd.words
    assert w[2] == (Var("LOCAL"),)
    assert w[4] == (Var("MAX"), "x")
    assert w[5] == (Sub("id -u qmaild"),)
    assert w[6] == (Sub("cat f"),)
    assert w[7] == ("$NOT",) and literal(w[7]) == "$NOT"
    assert literal(w[2]) is None


def test_nested_command_substitution() -> None:
    (cmd,) = split_script("a $(echo $(b))\n")
    assert cmd.words[1] == (Sub("echo $(b)"),)


def test_line_numbers() -> None:
    cmds = split_script("#!/bin/sh\n\nA=1\nexec x \\\n y\n")
    assert [c.line for c in cmds] == [3, 4]


@pytest.mark.parametrize("bad", ["a 'open\n", 'a "open\n', "a `open\n", "a $(open\n", "a >\n"])
def test_unterminated_is_an_error(bad: str) -> None:
    with pytest.raises(ShellError):
        split_script(bad)
