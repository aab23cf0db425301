"""Documents: position encodings, incremental edits, skipping, recent edit regions."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types as lsp

from gemma_lsp.documents import Document, DocumentStore, apply_changes_to_string

U8, U16, U32 = (
    lsp.PositionEncodingKind.Utf8,
    lsp.PositionEncodingKind.Utf16,
    lsp.PositionEncodingKind.Utf32,
)
ENCODINGS = [U8, U16, U32]
CODEC = {U8: ("utf-8", 1), U16: ("utf-16-le", 2), U32: ("utf-32-le", 4)}


def P(line: int, character: int) -> lsp.Position:
    return lsp.Position(line=line, character=character)


def R(l1: int, c1: int, l2: int, c2: int) -> lsp.Range:
    return lsp.Range(start=P(l1, c1), end=P(l2, c2))


def partial(rng: lsp.Range, text: str) -> lsp.TextDocumentContentChangePartial:
    return lsp.TextDocumentContentChangePartial(range=rng, text=text)


# --- a slow, obviously right reference --------------------------------------------------------


def ref_lines(text: str) -> list[tuple[int, str]]:
    """(start offset, content without line break) for every line."""
    out, pos = [], 0
    for m in re.finditer(r"\r\n|\r|\n", text):
        out.append((pos, text[pos : m.start()]))
        pos = m.end()
    out.append((pos, text[pos:]))
    return out


def units(s: str, enc: lsp.PositionEncodingKind) -> int:
    codec, width = CODEC[enc]
    return len(s.encode(codec, "surrogatepass")) // width


def ref_position(text: str, offset: int, enc: lsp.PositionEncodingKind) -> lsp.Position:
    lines = ref_lines(text)
    for i in range(len(lines) - 1, -1, -1):
        start, content = lines[i]
        if start <= offset:
            idx = min(offset - start, len(content))
            return P(i, units(content[:idx], enc))
    raise AssertionError


def ref_offset(text: str, pos: lsp.Position, enc: lsp.PositionEncodingKind) -> int:
    lines = ref_lines(text)
    if pos.line >= len(lines):
        return len(text)
    start, content = lines[pos.line]
    for i in range(len(content) + 1):
        if units(content[: i + 1], enc) > pos.character or i == len(content):
            return start + i
    raise AssertionError


def char_offsets(text: str) -> list[int]:
    """Offsets that are real cursor places (not between \\r and \\n)."""
    return [
        i for i in range(len(text) + 1) if not (0 < i < len(text) and text[i - 1 : i + 1] == "\r\n")
    ]


# --- explicit examples --------------------------------------------------------------------------

SAMPLE = "a😀b\r\n中文x\n\r\nend"
#  line 0: "a😀b"   line 1: "中文x"   line 2: ""   line 3: "end"


@pytest.mark.parametrize(
    "enc, pos, offset",
    [
        (U16, P(0, 0), 0),
        (U16, P(0, 1), 1),
        (U16, P(0, 3), 2),  # after the emoji: 2 UTF-16 units
        (U16, P(0, 4), 3),
        (U16, P(1, 0), 5),
        (U16, P(1, 2), 7),
        (U16, P(2, 0), 9),
        (U16, P(3, 3), 14),
        (U8, P(0, 5), 2),  # emoji: 4 UTF-8 bytes
        (U8, P(0, 6), 3),
        (U8, P(1, 3), 6),  # 中: 3 bytes
        (U8, P(1, 7), 8),
        (U32, P(0, 2), 2),
        (U32, P(1, 3), 8),
    ],
)
def test_offset_at_examples(enc: lsp.PositionEncodingKind, pos: lsp.Position, offset: int) -> None:
    doc = Document("file:///a", SAMPLE)
    assert doc.offset_at(pos, enc) == offset
    assert doc.position_at(offset, enc) == pos


def test_line_structure_with_mixed_breaks() -> None:
    doc = Document("file:///a", SAMPLE)
    assert doc.line_count == 4
    assert [doc.line_text(i) for i in range(4)] == ["a😀b", "中文x", "", "end"]
    assert doc.line_text(0, include_eol=True) == "a😀b\r\n"
    assert doc.eol == "\r\n"
    assert Document("u", "x\ny").eol == "\n"
    assert Document("u", "xy").eol == "\n"
    lone_cr = Document("u", "a\rb\r")
    assert lone_cr.line_count == 3
    assert lone_cr.offset_at(P(1, 1)) == 3


def test_default_encoding_is_utf16_and_store_sets_it() -> None:
    store = DocumentStore()
    doc = store.open("u", "😀x")
    assert doc.offset_at(P(0, 2)) == 1
    store.encoding = "utf-8"
    assert doc.offset_at(P(0, 4)) == 1
    assert store.open("v", "😀x").encoding == U8
    with pytest.raises(ValueError):
        DocumentStore(encoding="utf-7")


def test_clamping_past_line_and_document_end() -> None:
    doc = Document("u", "ab\r\ncd\n")
    assert doc.offset_at(P(0, 99)) == 2  # line end, before \r\n
    assert doc.offset_at(P(1, 3)) == 6
    assert doc.offset_at(P(2, 0)) == 7  # the empty last line
    assert doc.offset_at(P(2, 5)) == 7
    assert doc.offset_at(P(9, 0)) == 7  # past the last line: document end
    assert doc.position_at(3) == P(0, 2)  # inside \r\n: end of the line
    assert doc.position_at(99) == P(2, 0)


def test_middle_of_surrogate_pair_maps_to_char_start() -> None:
    doc = Document("u", "x😀y")
    assert doc.offset_at(P(0, 2), U16) == 1
    assert doc.offset_at(P(0, 2), U8) == 1
    assert doc.offset_at(P(0, 4), U8) == 1
    assert doc.offset_at(P(0, 5), U8) == 2


def test_negative_positions_raise_naming_the_position() -> None:
    # lsprotocol's own Position refuses negative values; positions built any other way
    # (duck-typed, or with validation off) are checked here
    doc = Document("u", "abc")
    with pytest.raises(ValueError, match=r"line -1.*character 0"):
        doc.offset_at(SimpleNamespace(line=-1, character=0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="character -3"):
        doc.offset_at(SimpleNamespace(line=0, character=-3))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        doc.position_at(-1)


# --- properties ---------------------------------------------------------------------------------

ALPHABET = ["a", "b", " ", "\t", "\n", "\r", "\r\n", "é", "中", "😀", "𝄞", "\u200d"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join)


@given(texts, st.sampled_from(ENCODINGS), st.data())
def test_position_round_trip(text: str, enc: lsp.PositionEncodingKind, data: st.DataObject) -> None:
    doc = Document("u", text)
    offset = data.draw(st.sampled_from(char_offsets(text)))
    pos = doc.position_at(offset, enc)
    assert pos == ref_position(text, offset, enc)
    assert doc.offset_at(pos, enc) == offset


@given(texts, st.sampled_from(ENCODINGS), st.integers(0, 12), st.integers(0, 60))
def test_offset_at_matches_reference(
    text: str, enc: lsp.PositionEncodingKind, line: int, character: int
) -> None:
    doc = Document("u", text)
    assert doc.offset_at(P(line, character), enc) == ref_offset(text, P(line, character), enc)


@st.composite
def edit_scripts(draw: st.DrawFn) -> tuple[str, list[tuple[int, int, str]]]:
    text = draw(texts)
    edits = []
    for _ in range(draw(st.integers(1, 8))):
        edits.append(
            (draw(st.integers(0, 60)), draw(st.integers(0, 60)), draw(texts | st.just("x" * 70)))
        )
    return text, edits


@given(edit_scripts(), st.sampled_from(ENCODINGS))
@settings(max_examples=300)
def test_incremental_edits_equal_plain_string_edits(
    script: tuple[str, list[tuple[int, int, str]]], enc: lsp.PositionEncodingKind
) -> None:
    text, edits = script
    doc = Document("u", text, encoding=enc)
    assert doc.utf8_size == len(text.encode())
    plain = text
    for a, b, new in edits:
        cands = char_offsets(plain)
        a, b = sorted((cands[a % len(cands)], cands[b % len(cands)]))
        rng = lsp.Range(start=ref_position(plain, a, enc), end=ref_position(plain, b, enc))
        doc.apply_change(partial(rng, new))
        plain = plain[:a] + new + plain[b:]
        assert doc.text == plain
        assert doc.utf8_size == len(plain.encode())
        fresh = Document("u", plain)
        assert doc.line_count == fresh.line_count
        assert [doc.line_start(i) for i in range(doc.line_count)] == [
            s for s, _ in ref_lines(plain)
        ]
    for off in range(len(plain) + 1):
        assert doc.line_of_offset(off) == fresh.line_of_offset(off)


@given(texts, texts)
def test_whole_document_change(old: str, new: str) -> None:
    doc = Document("u", old)
    assert doc.line_count >= 1  # build the index so the change goes through the incremental path
    doc.apply_change(lsp.TextDocumentContentChangeWholeDocument(text=new))
    assert doc.text == new
    assert [doc.line_start(i) for i in range(doc.line_count)] == [s for s, _ in ref_lines(new)]


def test_range_with_reversed_ends_and_clamped_end() -> None:
    text = "hello\nworld"
    out = apply_changes_to_string(text, [partial(R(1, 99, 0, 2), "")])
    assert out == "he"
    out = apply_changes_to_string(text, [partial(R(0, 5, 7, 0), "!")])
    assert out == "hello!"


def test_changes_apply_in_order() -> None:
    store = DocumentStore()
    store.open("u", "abc\ndef\n", 1, "python")
    doc = store.change(
        "u",
        3,
        [
            partial(R(0, 3, 0, 3), "X\nY"),  # "abcX\nY\ndef\n"
            partial(R(1, 1, 1, 1), "Z"),  # "abcX\nYZ\ndef\n"
            lsp.TextDocumentContentChangeWholeDocument(text="new text"),
            partial(R(0, 0, 0, 3), "old"),
        ],
    )
    assert doc is not None
    assert doc.text == "old text"
    assert doc.version == 3
    assert store.change("missing", 1, []) is None


def test_crlf_pairs_formed_and_broken_by_edits() -> None:
    doc = Document("u", "a\rb")
    assert doc.line_count == 2
    doc.apply_change(partial(R(1, 0, 1, 0), "\n"))  # "a\r\nb": the \r and \n join
    assert doc.text == "a\r\nb"
    assert doc.line_count == 2
    assert [doc.line_start(i) for i in range(doc.line_count)] == [s for s, _ in ref_lines(doc.text)]
    doc = Document("u", "a\rX\nb")
    doc.apply_change(partial(R(1, 0, 1, 1), ""))  # "a\r\nb"
    assert doc.text == "a\r\nb"
    assert doc.line_count == 2
    assert doc.line_text(1) == "b"


# --- skipping ---------------------------------------------------------------------------------


def test_huge_and_binary_documents_are_skipped() -> None:
    store = DocumentStore(max_file_bytes=100)
    big = store.open("file:///big.txt", "x" * 101)
    assert big.skipped and big.skip_reason and "large" in big.skip_reason
    ok = store.open("file:///ok.txt", "é" * 50)  # 100 bytes
    assert not ok.skipped
    multibyte = store.open("file:///mb.txt", "é" * 51)  # 102 bytes in UTF-8
    assert multibyte.skipped
    binary = store.open("file:///bin", "abc\x00def")
    assert binary.skipped and binary.skip_reason and "NUL" in binary.skip_reason
    assert "file:///bin" in store  # tracked anyway


def test_skip_state_follows_changes() -> None:
    store = DocumentStore(max_file_bytes=100)
    doc = store.open("u", "text")
    store.change("u", 2, [partial(R(0, 0, 0, 0), "\x00")])
    assert doc.skipped
    store.change("u", 3, [lsp.TextDocumentContentChangeWholeDocument(text="clean")])
    assert not doc.skipped
    store.change("u", 4, [partial(R(0, 5, 0, 5), "y" * 200)])
    assert doc.skipped


def test_default_limit_is_20_mb() -> None:
    assert DocumentStore().max_file_bytes == 20 * 1024 * 1024


# --- recent edits -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def type_at(store: DocumentStore, uri: str, line: int, col: int, text: str) -> None:
    store.change(uri, None, [partial(R(line, col, line, col), text)])


def test_edits_on_nearby_lines_coalesce() -> None:
    store = DocumentStore(clock=Clock())
    store.open("u", "\n".join(f"line {i}" for i in range(100)))
    for k in range(5):
        type_at(store, "u", 10, k, "x")
    type_at(store, "u", 11, 0, "y")
    regions = store.recent_edits()
    assert len(regions) == 1
    assert (regions[0].start_line, regions[0].end_line) == (10, 11)
    type_at(store, "u", 50, 0, "z")
    regions = store.recent_edits()
    assert [(r.start_line, r.end_line) for r in regions] == [(50, 50), (10, 11)]
    assert regions[0].timestamp > regions[1].timestamp


def test_regions_shift_when_lines_are_inserted_above() -> None:
    store = DocumentStore(clock=Clock())
    store.open("u", "\n".join(f"line {i}" for i in range(100)))
    type_at(store, "u", 50, 0, "z")
    type_at(store, "u", 10, 0, "a\nb\nc\n")  # three new lines above line 50
    regions = store.recent_edits()
    assert [(r.start_line, r.end_line) for r in regions] == [(10, 13), (53, 53)]
    doc = store.get("u")
    assert doc is not None and doc.line_text(53).startswith("zline 50")
    # deleting lines above shifts it back
    store.change("u", None, [partial(R(10, 0, 13, 0), "")])
    assert (store.recent_edits()[-1].start_line, store.recent_edits()[-1].end_line) == (50, 50)


def test_recent_edits_across_documents_most_recent_first_and_bounded() -> None:
    store = DocumentStore(clock=Clock())
    store.open("a", "\n" * 200)
    store.open("b", "\n" * 200)
    for i in range(40):
        type_at(store, "a" if i % 2 else "b", i * 5, 0, "x")
    regions = store.recent_edits()
    stamps = [r.timestamp for r in regions]
    assert stamps == sorted(stamps, reverse=True)
    assert regions[0].uri == "a"
    assert len([r for r in regions if r.uri == "a"]) == 16  # ring per document
    assert len(store.recent_edits(limit=3)) == 3
    store.close("a")
    assert all(r.uri == "b" for r in store.recent_edits())
    assert store.close("a") is None


def test_by_activity_orders_documents() -> None:
    store = DocumentStore(clock=Clock())
    store.open("a", "x")
    store.open("b", "y")
    assert [d.uri for d in store.by_activity()] == ["b", "a"]
    type_at(store, "a", 0, 0, "1")
    assert [d.uri for d in store.by_activity()] == ["a", "b"]


# --- speed ------------------------------------------------------------------------------------


def test_keystrokes_in_a_large_file_keep_the_line_index_right() -> None:
    """Many keystrokes in one place, then jumps around a 20k-line file (the lazy shift of the
    line index is applied): positions stay right. (Its speed is measured by
    scripts/bench_lsp.py, not asserted here.)"""
    text = "".join(f"    value_{i} = compute({i}, 'x')  # note\n" for i in range(20_000))
    store = DocumentStore()
    doc = store.open("file:///big.py", text, 1, "python")
    assert doc.line_count == 20_001
    for k in range(300):
        line = 5_000 + k // 20
        type_at(store, "file:///big.py", line, 4, "\n" if k % 10 == 9 else "z")
    for k in range(50):
        type_at(store, "file:///big.py", (k * 7919) % 20_000, 0, "q")
    lines = doc.text.split("\n")
    for line in (0, 4_999, 5_003, 12_345, 20_029):
        assert doc.line_text(line) == lines[line]
        assert doc.offset_at(lsp.Position(line, 0)) == sum(len(x) + 1 for x in lines[:line])
    assert doc.line_count == 20_001 + 30
