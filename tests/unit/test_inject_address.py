"""RFC 822 tokens, address completion and folding (inject.md 1.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyqmail.inject.address import Kind, ParseError, Rewriter, fold, rewrite_list, tokenize

RW = Rewriter("dh", "dd.example", "pd.example")


def test_tokenize_kinds() -> None:
    toks = tokenize('Joe (a (nested) c) "q \\" s" <u@[1.2.3.4]>, x;')
    kinds = [t.kind for t in toks]
    assert kinds == [Kind.ATOM, Kind.COMMENT, Kind.QUOTED, Kind.SPECIAL, Kind.ATOM,
                     Kind.SPECIAL, Kind.LITERAL, Kind.SPECIAL, Kind.SPECIAL, Kind.ATOM,
                     Kind.SPECIAL]  # fmt: skip
    assert toks[1].text == "(a (nested) c)"


@pytest.mark.parametrize("text", ['"open', "(open", "[open", "a)b", "a]"])
def test_tokenize_errors(text: str) -> None:
    with pytest.raises(ParseError):
        tokenize(text)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("joe", "joe@dh.dd.example"),
        ("djb@silverton", "djb@silverton.dd.example"),
        ("eric@mammoth.cs+", "eric@mammoth.cs.pd.example"),
        ("u@h.x.", "u@h.x"),
        ("u@", "u@dh.dd.example"),
        ("u@[]", "u@[]"),
        ("u@[1.2.3.4]", "u@[1.2.3.4]"),
        ("", ""),
        ("a@b@c", "a@b@c.dd.example"),
    ],
)
def test_raw_completion(raw: str, want: str) -> None:
    assert RW.raw(raw) == want


def test_defaulthost_itself_is_completed() -> None:
    assert Rewriter("box+", "d.example", "p.example").raw("u") == "u@box.p.example"
    assert Rewriter("a.b", "d.example", "p.example").raw("u") == "u@a.b"


@pytest.mark.parametrize(
    ("field", "items", "addrs"),
    [
        ("a, b", ["a@dh.dd.example", "b@dh.dd.example"], ["a@dh.dd.example", "b@dh.dd.example"]),
        ("fred barney", ["fred@dh.dd.example", "barney@dh.dd.example"],
         ["fred@dh.dd.example", "barney@dh.dd.example"]),
        ("Joe <@r1,@r2:u@h>", ["Joe <u@h.dd.example>"], ["u@h.dd.example"]),
        ('"a b"@c (x)', ['"a b"@c.dd.example (x)'], ["a b@c.dd.example"]),
        ("g: a, b;", ["g: a@dh.dd.example", "b@dh.dd.example;"],
         ["a@dh.dd.example", "b@dh.dd.example"]),
        ("<>", ["<>"], [""]),
        ("jö", ['"jö"@dh.dd.example'], ["jö@dh.dd.example"]),
    ],
)  # fmt: skip
def test_rewrite_list(field: str, items: list[str], addrs: list[str]) -> None:
    res = rewrite_list(field, RW)
    assert res.items == items
    assert res.addresses == addrs


@pytest.mark.parametrize("field", ["@r1:u@h", "a: b: c;", "a;;", "a > b", "<a<b>>"])
def test_rewrite_list_errors(field: str) -> None:
    with pytest.raises(ParseError):
        rewrite_list(field, RW)


def test_fold_breaks_before_column_79() -> None:
    items = ["a" * 20 + "@x.example", "b" * 20 + "@x.example", "c" * 20 + "@x.example"]
    text = fold("To", items)
    lines = text.split("\n")
    assert len(lines) == 2
    assert all(len(line) <= 78 for line in lines)
    assert lines[1].startswith("  ")
    assert text.replace("\n  ", " ") == "To: " + ", ".join(items)


def test_fold_never_splits_one_long_address() -> None:
    long = "x" * 200 + "@y.example"
    assert fold("To", [long]) == "To: " + long


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_+", min_size=1, max_size=12)


@given(st.lists(st.tuples(_atom, _atom), min_size=1, max_size=30))
def test_rewrite_then_fold_keeps_every_address(pairs: list[tuple[str, str]]) -> None:
    field = ", ".join(f"{u}@{h}.example" for u, h in pairs)
    res = rewrite_list(field, RW)
    assert res.addresses == [f"{u}@{h}.example" for u, h in pairs]
    folded = fold("Cc", res.items)
    assert all(len(line) <= 78 or "," not in line[:-1] for line in folded.split("\n"))
    assert rewrite_list(folded[len("Cc:") :], RW).addresses == res.addresses


@given(st.text(max_size=200))
def test_never_crashes(text: str) -> None:
    try:
        res = rewrite_list(text, RW)
    except ParseError:
        return
    assert isinstance(fold("To", res.items), str)
