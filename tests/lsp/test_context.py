"""Context building: budgets, prefix / suffix cuts, cursor line info, extras selection."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from lsprotocol import types as lsp

from gemma_lsp.context import (
    Budgets,
    CompletionContext,
    Snippet,
    build_context,
    comment_syntax,
    display_path,
    indent_width,
    render_extras_block,
    render_snippet,
)
from gemma_lsp.documents import Document, DocumentStore


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def numbered(n: int, width: int = 20) -> str:
    return "".join(f"line {i:05d}".ljust(width, ".") + "\n" for i in range(n))


def type_at(store: DocumentStore, uri: str, line: int, col: int, text: str) -> None:
    pos = lsp.Position(line=line, character=col)
    change = lsp.TextDocumentContentChangePartial(range=lsp.Range(start=pos, end=pos), text=text)
    store.change(uri, None, [change])


# --- budgets ----------------------------------------------------------------------------------


def test_budget_defaults_and_conversion() -> None:
    b = Budgets()
    assert (b.prefix_tokens, b.suffix_tokens, b.extras_tokens) == (1500, 400, 512)
    assert b.chars_per_token == 3.5
    assert b.prefix_chars == 5250 and b.suffix_chars == 1400 and b.extras_chars == 1792
    b = Budgets(prefix_tokens=10, suffix_tokens=4, extras_tokens=0, chars_per_token=2.0)
    assert (b.prefix_chars, b.suffix_chars, b.extras_chars) == (20, 8, 0)


# --- prefix / suffix --------------------------------------------------------------------------


def test_small_document_is_whole_prefix_and_suffix() -> None:
    doc = Document("file:///p/a.py", "def f(x):\n    return x\n", 1, "python")
    ctx = build_context(doc, 14, None)
    assert ctx.prefix == "def f(x):\n    "
    assert ctx.suffix == "return x\n"
    assert ctx.at_document_start
    assert ctx.indent == "    "
    assert ctx.line_prefix == "    "
    assert ctx.line_suffix == "return x"
    assert ctx.line == 1
    assert ctx.language_id == "python" and ctx.uri == "file:///p/a.py"
    assert ctx.path == "/p/a.py"
    assert ctx.extras == []


def test_long_prefix_is_cut_at_a_line_boundary_near_the_cursor() -> None:
    text = numbered(1000)
    doc = Document("u", text, 1, "python")
    b = Budgets(prefix_tokens=100, suffix_tokens=20, chars_per_token=2.0, anchor_lines=1)
    offset = doc.line_start(500) + 5
    ctx = build_context(doc, offset, None, b)
    assert len(ctx.prefix) <= 200
    assert text[:offset].endswith(ctx.prefix)
    assert ctx.prefix_start == doc.line_start(doc.line_of_offset(ctx.prefix_start))
    # the cut keeps as much as fits: one more line would not fit
    prev = doc.line_start(doc.line_of_offset(ctx.prefix_start) - 1)
    assert offset - prev > 200
    # suffix: whole lines within the budget
    assert len(ctx.suffix) <= 40
    assert ctx.suffix.endswith("\n") and text[offset:].startswith(ctx.suffix)


def test_prefix_start_is_on_an_anchor_line_and_stable_while_typing() -> None:
    store = DocumentStore()
    doc = store.open("u", numbered(1000), 1, "python")
    b = Budgets(prefix_tokens=500, chars_per_token=2.0, anchor_lines=16)
    line = 400
    offset = doc.line_start(line) + 4
    ctx = build_context(doc, offset, store, b)
    first_line = doc.line_of_offset(ctx.prefix_start)
    assert first_line % 16 == 0
    assert len(ctx.prefix) <= 1000
    starts = set()
    for k in range(10):  # typing on the cursor line keeps the prompt's start in place
        type_at(store, "u", line, 4 + k, "x")
        starts.add(build_context(doc, offset + k + 1, store, b).prefix_start)
    assert starts == {ctx.prefix_start}


def test_cursor_line_longer_than_budget_is_cut_inside_the_line() -> None:
    text = "short\n" + "x" * 500
    doc = Document("u", text)
    b = Budgets(prefix_tokens=50, suffix_tokens=10, chars_per_token=2.0)
    ctx = build_context(doc, 300, None, b)
    assert ctx.prefix == "x" * 100
    assert ctx.suffix == "x" * 20  # rest of the line is over budget: cut inside it


@given(st.integers(0, 60), st.integers(0, 40), st.integers(1, 20), st.integers(0, 5000))
def test_prefix_suffix_invariants(n_lines: int, prefix_t: int, anchor: int, raw: int) -> None:
    text = numbered(n_lines, 12)
    doc = Document("u", text)
    offset = raw % (len(text) + 1)
    b = Budgets(
        prefix_tokens=prefix_t,
        suffix_tokens=prefix_t // 2,
        chars_per_token=3.0,
        anchor_lines=anchor,
    )
    ctx = build_context(doc, offset, None, b)
    assert text[ctx.prefix_start : offset] == ctx.prefix
    assert text[offset : ctx.suffix_end] == ctx.suffix
    assert len(ctx.prefix) <= b.prefix_chars
    assert len(ctx.suffix) <= b.suffix_chars
    if ctx.prefix_start and len(ctx.prefix) > len(ctx.line_prefix):
        assert text[ctx.prefix_start - 1] == "\n"  # cut at a line boundary


def test_crlf_document_line_info() -> None:
    doc = Document("u", "a = 1\r\n\tb = 2\r\nc\r\n", 1, "go")
    ctx = build_context(doc, doc.offset_at(lsp.Position(line=1, character=2)))
    assert ctx.indent == "\t"
    assert ctx.line_prefix == "\tb"
    assert ctx.line_suffix == " = 2"
    assert ctx.eol == "\r\n"


def test_offset_is_clamped() -> None:
    doc = Document("u", "abc")
    assert build_context(doc, 99).prefix == "abc"
    assert build_context(doc, -5).prefix == ""


# --- extras -----------------------------------------------------------------------------------


def make_store() -> DocumentStore:
    store = DocumentStore(clock=Clock())
    store.open("file:///w/util.py", "def helper(x):\n    return x * 2\n", 1, "python")
    store.open("file:///w/main.py", numbered(400), 1, "python")
    store.open("file:///w/blob.bin", "abc\x00def", 1, "plaintext")
    return store


def test_extras_from_other_documents_with_path_header() -> None:
    store = make_store()
    doc = store.get("file:///w/main.py")
    assert doc is not None
    ctx = build_context(doc, doc.line_start(200), store, Budgets(), root_uri="file:///w")
    assert [s.uri for s in ctx.extras] == ["file:///w/util.py"]  # binary doc skipped
    snip = ctx.extras[0]
    assert snip.path == "util.py" and snip.kind == "open"
    assert render_snippet(snip, "python") == (
        "# Path: util.py\n# def helper(x):\n#     return x * 2\n"
    )


def test_recent_regions_first_and_current_region_skipped() -> None:
    store = make_store()
    doc = store.get("file:///w/main.py")
    assert doc is not None
    b = Budgets(prefix_tokens=200, suffix_tokens=50, extras_tokens=400)
    type_at(store, "file:///w/main.py", 20, 0, "# edited far above\n")
    type_at(store, "file:///w/util.py", 1, 0, "    # note\n")
    type_at(store, "file:///w/main.py", 300, 0, "cur")  # the current region
    ctx = build_context(doc, doc.line_start(300) + 3, store, b)
    kinds = [(s.uri, s.kind) for s in ctx.extras]
    assert kinds[0] == ("file:///w/util.py", "edit")  # most recent region not at the cursor
    assert kinds[1] == ("file:///w/main.py", "edit")
    assert "edited far above" in ctx.extras[1].text
    assert all(not (s.uri == doc.uri and s.start_line <= 300 <= s.end_line) for s in ctx.extras)
    # util.py is already shown through its region: no second snippet overlapping it
    assert len([s for s in ctx.extras if s.uri == "file:///w/util.py"]) == 1


def test_extras_respect_budget_and_are_stable_across_keystrokes() -> None:
    store = DocumentStore(clock=Clock())
    for i in range(6):
        store.open(f"file:///w/m{i}.py", numbered(100, 30), 1, "python")
    doc = store.open("file:///w/cur.py", numbered(50), 1, "python")
    b = Budgets(extras_tokens=300, chars_per_token=3.5)
    ctx = build_context(doc, doc.line_start(25), store, b)
    block = render_extras_block(ctx.extras, "python")
    assert 0 < len(block) <= b.extras_chars
    assert ctx.extras[0].uri == "file:///w/m5.py"  # most recently opened first
    for k in range(8):
        type_at(store, "file:///w/cur.py", 25, k, "y")
        again = build_context(doc, doc.line_start(25) + k + 1, store, b)
        assert again.extras == ctx.extras


def test_skipped_current_document_gets_no_extras() -> None:
    store = make_store()
    doc = store.get("file:///w/blob.bin")
    assert doc is not None
    assert build_context(doc, 2, store).extras == []


def test_region_in_current_document_inside_window_is_not_repeated() -> None:
    store = DocumentStore(clock=Clock())
    doc = store.open("u", numbered(30), 1, "python")
    type_at(store, "u", 5, 0, "old edit ")
    type_at(store, "u", 25, 0, "now ")
    ctx = build_context(doc, doc.line_start(25) + 4, store)  # whole file fits: nothing extra
    assert ctx.extras == []


# --- helpers ----------------------------------------------------------------------------------


def test_comment_syntax() -> None:
    assert comment_syntax("python") == ("#", "")
    assert comment_syntax("typescript") == ("//", "")
    assert comment_syntax("lua") == ("--", "")
    assert comment_syntax("html") == ("<!--", "-->")
    assert comment_syntax("something-new") == ("#", "")


def test_render_snippet_in_other_comment_styles() -> None:
    s = Snippet("file:///a.py", "a.py", "x = 1\n\ny = 2", 0, 2, "python")
    assert render_snippet(s, "rust") == "// Path: a.py\n// x = 1\n//\n// y = 2\n"
    html = render_snippet(Snippet("u", "b.html", "<p>--></p>"), "html")
    assert html.startswith("<!-- Path: b.html -->\n<!--\n")
    assert html.endswith("-->\n") and html.count("-->") == 2  # the inner "-->" is defused


def test_display_path() -> None:
    assert display_path("file:///home/me/proj/src/a%20b.py") == "/home/me/proj/src/a b.py"
    assert display_path("file:///home/me/proj/src/a.py", "file:///home/me/proj") == "src/a.py"
    assert display_path("file:///elsewhere/a.py", "file:///home/me/proj/") == "/elsewhere/a.py"
    assert display_path("untitled:Untitled-1") == "untitled:Untitled-1"


def test_indent_width() -> None:
    assert indent_width("    x") == 4
    assert indent_width("\tx") == 4
    assert indent_width("x") == 0
    assert indent_width("   ") == 3


def test_context_can_be_built_by_hand() -> None:
    ctx = CompletionContext(prefix="a", suffix="b")
    assert ctx.extras == [] and ctx.line_suffix == ""
