"""Post-processing rules: repetition, scope, line limit, overlap, streaming, reuse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma_lsp.context import CompletionContext, build_context
from gemma_lsp.documents import Document
from gemma_lsp.postprocess import (
    complete_unit,
    dedupe,
    finalize,
    is_useful,
    should_stop_early,
    trim_completion,
    typed_ahead,
)


def ctx_at(text: str, language: str = "python") -> CompletionContext:
    """Context for ``text`` with the cursor at ``|``."""
    offset = text.index("|")
    doc = Document("file:///t", text.replace("|", "", 1), 1, language)
    return build_context(doc, offset)


# --- repetition of the suffix ------------------------------------------------------------------


def test_cut_before_repeating_the_next_line() -> None:
    ctx = ctx_at("def f(x):\n    y = x + 1\n    |\n    return y\n")
    out = trim_completion("z = y * 2\n    return y\n", ctx, 8)
    assert out == "z = y * 2"


def test_whole_completion_repeating_next_line_is_empty() -> None:
    ctx = ctx_at("def f(x):\n|\n    return x\n")
    assert trim_completion("    return x\n", ctx, 8) == ""


def test_short_suffix_line_needs_confirmation() -> None:
    ctx = ctx_at("if (a) {\n  |\n}\nfoo();\n", "javascript")
    # an inner "}" at another indentation is not the suffix's "}"
    assert trim_completion("if (b) {\n    x();\n  }", ctx, 8) == "if (b) {\n    x();\n  }"
    # "}" then "foo();" is the suffix repeated
    assert trim_completion("bar();\n}\nfoo();\n", ctx, 8) == "bar();"
    # "}" followed by something else is not a repetition (but closes the block: kept and cut)
    assert trim_completion("bar();\n}\nbaz();", ctx, 8) == "bar();\n}"


def test_rest_of_line_overlap_is_dropped() -> None:
    ctx = ctx_at("print(|)\n")
    assert trim_completion("x)", ctx, 8) == "x"
    assert trim_completion("foo(x)", ctx, 8) == "foo(x)"  # its own bracket: kept
    assert trim_completion("foo(x))", ctx, 8) == "foo(x)"
    ctx = ctx_at("items = [a, |]\n")
    assert trim_completion("b, c]", ctx, 8) == "b, c"


def test_rest_of_line_repeated_then_more_lines() -> None:
    ctx = ctx_at("total = compute(|)\nnext_line()\n")
    assert trim_completion("a, b)\nextra = 1\n", ctx, 8) == "a, b"


def test_in_the_middle_of_a_line_a_completion_must_run_into_the_rest() -> None:
    ctx = ctx_at("def area(width|, h):\n    return w * h\n")
    # it stops short of ", h):": inserting it would leave ", h):" behind (seen in VS Code)
    assert trim_completion(', height):\n    """Area."""', ctx, 8) == ""
    assert trim_completion("_px", ctx, 8) == ""
    # it runs into the rest: an insertion, the rest kept after it
    assert trim_completion("_px, h):", ctx, 8) == "_px"
    # only closers after the cursor: anything goes
    assert trim_completion("x, y", ctx_at("f(|)\n"), 8) == "x, y"
    assert trim_completion("a)\n    b = 2", ctx_at("if f(|):\n"), 8) == "a)\n    b = 2"


# --- scope --------------------------------------------------------------------------------------


def test_python_dedent_leaves_the_block() -> None:
    ctx = ctx_at("def f(x):\n    if x:\n        |\n")
    out = trim_completion("return 1\n    else:\n        return 2\n", ctx, 8)
    assert out == "return 1"


def test_python_block_opener_on_cursor_line() -> None:
    ctx = ctx_at("|\n")
    out = trim_completion("def f():\n    return 1\n\ndef g():\n    pass\n", ctx, 8)
    assert out == "def f():\n    return 1"
    ctx = ctx_at("def f():|\n")
    assert trim_completion("\n    return 1\n\nprint(f())", ctx, 8) == "\n    return 1"


def test_blank_lines_do_not_end_the_block() -> None:
    ctx = ctx_at("class A:\n    |\n")
    out = trim_completion("x = 1\n\n    y = 2\nz = 3", ctx, 8)
    assert out == "x = 1\n\n    y = 2"


def test_brace_language_stops_after_closing_the_block() -> None:
    ctx = ctx_at("function f() {|", "javascript")
    out = trim_completion("\n  return 1;\n}\n\nfunction g() {\n}", ctx, 8)
    assert out == "\n  return 1;\n}"


def test_braces_in_strings_and_comments_are_ignored() -> None:
    ctx = ctx_at("function f() {\n  |", "typescript")
    out = trim_completion("const s = '}}}';  // }\n  return s;", ctx, 8)
    assert out == "const s = '}}}';  // }\n  return s;"


def test_else_on_the_closing_line_continues() -> None:
    ctx = ctx_at("if (a) {\n  |", "c")
    out = trim_completion("x();\n} else {\n  y();\n}\nz();", ctx, 8)
    assert out == "x();\n} else {\n  y();\n}"


def test_no_scope_rules_for_plain_text() -> None:
    ctx = ctx_at("  |", "plaintext")
    assert trim_completion("a }\nb\n}", ctx, 8) == "a }\nb\n}"


# --- limits and whitespace ----------------------------------------------------------------------


def test_line_limit_and_trailing_whitespace() -> None:
    ctx = ctx_at("|", "plaintext")
    assert trim_completion("1\n2\n3\n4\n", ctx, 2) == "1\n2"
    assert trim_completion("a  \n\n", ctx, 8) == "a"
    assert trim_completion("  \n \t\n", ctx, 8) == ""
    assert trim_completion("", ctx, 8) == ""
    assert trim_completion("a\r\nb", ctx, 8) == "a\nb"


@given(st.text(alphabet="ab (){}:\n\t ", max_size=60), st.integers(1, 6))
def test_trim_output_is_a_prefix_within_limits(text: str, max_lines: int) -> None:
    for lang in ("python", "c", "plaintext"):
        ctx = ctx_at("x = (|)\n  y\n", lang)
        out = trim_completion(text, ctx, max_lines)
        assert text.startswith(out)
        assert out.count("\n") < max_lines
        assert out == out.rstrip()
        assert out == "" or out.strip()


# --- streaming ----------------------------------------------------------------------------------


def stream_until_stop(text: str, ctx: CompletionContext, max_lines: int) -> str:
    for i in range(1, len(text) + 1):
        if should_stop_early(text[:i], ctx, max_lines):
            return text[:i]
    return text


def test_should_stop_early_on_repetition() -> None:
    ctx = ctx_at("def f(x):\n    |\n    return y\n")
    full = "y = x\n    return y\n    print('never')\n"
    seen = stream_until_stop(full, ctx, 8)
    assert seen == "y = x\n    return y\n"  # stops once the repeated line is complete
    assert trim_completion(seen, ctx, 8) == "y = x"


def test_should_stop_early_on_dedent_as_soon_as_it_shows() -> None:
    ctx = ctx_at("def f(x):\n    |\n")
    seen = stream_until_stop("a = 1\n    b = 2\nprint(f(1))\n", ctx, 8)
    assert seen == "a = 1\n    b = 2\np"


def test_should_stop_early_on_line_limit_and_braces() -> None:
    ctx = ctx_at("|", "plaintext")
    assert stream_until_stop("1\n2\n3\n4", ctx, 2) == "1\n2\n"
    ctx = ctx_at("int f() {\n  |", "c")
    assert stream_until_stop("return 1;\n}\nint g() {}", ctx, 8) == "return 1;\n}\n"
    assert not should_stop_early("return 1;\n", ctx, 8)
    assert not should_stop_early("", ctx, 8)


# --- dedupe / usefulness / typed ahead ----------------------------------------------------------


def test_dedupe_and_is_useful() -> None:
    assert dedupe(["a", "a  ", "", "  ", "b", "a"]) == ["a", "b"]
    assert is_useful("x = 1")
    assert not is_useful("  \n")
    assert not is_useful(")")
    assert not is_useful("});")
    assert is_useful("pass")


def test_finalize() -> None:
    ctx = ctx_at("def f():\n    |\n    return 0\n")
    out = finalize(["x = 1\n    return 0", "x = 1", ")", "y = 2\n"], ctx, 8)
    assert out == ["x = 1", "y = 2"]


@pytest.mark.parametrize(
    "suggestion, prev, new, expected",
    [
        ("oo(bar)", "f", "fo", "o(bar)"),
        ("oo(bar)", "f", "foo(", "bar)"),
        ("oo(bar)", "f", "f", "oo(bar)"),
        ("oo(bar)", "f", "fx", None),
        ("oo(bar)", "f", "foo(bar)", None),  # nothing remains
        ("oo(bar)", "f", "fo(bar)x", None),
        ("oo", "abc", "ab", None),  # deleted a character
        ("\n    return x", "def f(x):", "def f(x):\n    ", "return x"),
    ],
)
def test_typed_ahead(suggestion: str, prev: str, new: str, expected: str | None) -> None:
    assert typed_ahead(suggestion, prev, new) == expected


# --- complete units (completion-menu items) ------------------------------------------------------


@pytest.mark.parametrize("text, final, unit", [
    ("x) for x in xs)\n    ", True, "x) for x in xs)"),  # closes what the line opened
    ("x", True, None),  # `return sum(len(x` : still open
    ("x) for x in", True, None),  # ends on a keyword that needs more
    ("x) for x in xs) +", True, None),  # ends on an operator
    ("x) for x in xs)", False, None),  # the line may go on: not known to be complete
    ("x) for x in xs)\n    return", False, "x) for x in xs)"),  # the last line is undecided
])
def test_complete_unit(text: str, final: bool, unit: str | None) -> None:
    ctx = ctx_at("def f(xs):\n    return sum(len(|")
    assert complete_unit(text, ctx, final=final) == unit


def test_complete_unit_counts_the_rest_of_the_line_and_strings() -> None:
    assert complete_unit("a, b", ctx_at("x = foo(|)")) == "a, b"  # `)` stays after the item
    assert complete_unit("abc", ctx_at("s = '|")) is None  # an open string
    assert complete_unit("abc'", ctx_at("s = '|")) == "abc'"
    assert complete_unit("a)  # (not closed", ctx_at("f(|")) == "a)  # (not closed"  # comment
    doc = 'def f(x):\n    """Doc.\n    more"""\n    return x\n'
    assert complete_unit(doc, ctx_at("|")) == doc.rstrip()  # a triple-quoted string closes
