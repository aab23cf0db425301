"""Next-edit suggestions' pure room: history coalescing, regions, candidates, minimal edits,
gating; and the service with a scripted backend (stale suggestions, feedback, LSP shapes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lsprotocol import types as lsp

from gemma_lsp.backend import Scores
from gemma_lsp.config import ServerOptions, parse_options
from gemma_lsp.documents import DocumentStore
from gemma_lsp.next_edit import (
    Candidate,
    EditHistory,
    carry_over_candidates,
    choose,
    editable_region,
    minimal_edits,
)
from gemma_lsp.next_edit_service import ACCEPT_COMMAND, NextEditService


def type_chars(h: EditHistory, uri: str, text: str, at: int, chars: str, t0: float,
               step: float = 0.1) -> str:
    for i, ch in enumerate(chars):
        h.record(uri, text, at + i, at + i, ch, t0 + i * step)
        text = text[: at + i] + ch + text[at + i :]
    return text


def test_typing_a_word_coalesces_into_one_group() -> None:
    h = EditHistory()
    text = "def area(w, h):\n    return w * h\n"
    i = text.index("w")
    h.record("a", text, i, i + 1, "", 0.0)  # delete "w"
    text = text[:i] + text[i + 1 :]
    text = type_chars(h, "a", text, i, "width", 0.1)
    [g] = h.groups()
    assert (g.old, g.new, g.start) == ("w", "width", i)
    assert g.before == "def area(w, h):" and g.after == "def area(width, h):"


def test_a_pause_another_place_or_another_file_starts_a_new_group() -> None:
    h = EditHistory(coalesce_s=1.0)
    text = "a = 1\nb = 2\n"
    text = type_chars(h, "x", text, 5, "0", 0.0)  # "a = 10"
    text = type_chars(h, "x", text, 6, "1", 5.0)  # later: a new group
    text = type_chars(h, "x", text, len(text), "c = 3\n", 5.1)  # another place
    type_chars(h, "y", "z\n", 0, "q", 5.2)  # another file
    assert [(g.uri, g.new) for g in h.groups()] == [
        ("x", "0"), ("x", "1"), ("x", "c = 3\n"), ("y", "q")]
    assert [g.new for g in h.groups("x")] == ["0", "1", "c = 3\n"]


def test_typed_and_undone_is_no_edit_and_history_is_bounded() -> None:
    h = EditHistory(max_groups=3)
    text = type_chars(h, "x", "ab\n", 1, "zz", 0.0)
    h.record("x", text, 1, 3, "", 0.3)
    assert h.groups() == [] and h.last() is None
    for k in range(10):
        h.record("x", "0123456789\n", k, k + 1, "#", 10.0 * k)
    assert len(h) == 3


def test_an_edit_before_a_group_moves_it_and_one_inside_an_old_group_spoils_its_offsets() -> None:
    h = EditHistory(coalesce_s=0.5)
    text = "one two three\n"
    h.record("x", text, 4, 7, "TWO", 0.0)
    h.record("x", text, 0, 0, ">> ", 5.0)  # 3 characters before it, later
    first = h.groups()[0]
    assert first.start == 7 and first.new == "TWO"
    h.record("x", ">> one TWO three\n", 8, 9, "w", 10.0)  # inside it, much later
    assert h.groups()[0].start == -1


def test_editable_region_is_whole_lines_around_the_edit() -> None:
    text = "\n".join(f"line {i}" for i in range(20)) + "\n"
    r = editable_region(text, text.index("line 10"), above=2, below=3)
    assert (r.first, r.last) == (8, 13)
    assert r.text == "\n".join(f"line {i}" for i in range(8, 14))
    assert text[r.start : r.end] == r.text
    crlf = "a\r\nb\r\nc\r\n"
    r = editable_region(crlf, crlf.index("b"), above=1, below=1)
    assert r.text == "a\r\nb\r\nc" and crlf[r.start : r.end] == r.text


def scenario(text: str, old: str, new: str) -> tuple[str, EditHistory]:
    h = EditHistory()
    i = text.index(old)
    h.record("f", text, i, i + len(old), new, 0.0)
    return text[:i] + new + text[i + len(old) :], h


def candidates(text: str, h: EditHistory) -> list[str]:
    g = h.last()
    assert g is not None
    r = editable_region(text, g.start)
    return [text[: r.start] + c + text[r.end :]
            for c in carry_over_candidates(r, h.groups(), skip=(g.start, g.end))]


def test_a_renamed_parameter_reaches_its_body_only() -> None:
    text, h = scenario("def area(w, h):\n    return w * h\n\n\ndef per(w, h):\n    return w\n",
                       "area(w,", "area(width,")
    assert candidates(text, h) == [
        "def area(width, h):\n    return width * h\n\n\ndef per(w, h):\n    return w\n"]


def test_a_fixed_typo_is_fixed_inside_other_names_too() -> None:
    text, h = scenario("def recieve(m):\n    return on_recieve(m)\n", "def recieve", "def receive")
    assert "def receive(m):\n    return on_receive(m)\n" in candidates(text, h)


def test_an_argument_added_at_one_call_reaches_the_others() -> None:
    text, h = scenario("run(a)\nrun(b)\nrun()\nrerun(c)\n", "run(a)", "run(a, v)")
    assert candidates(text, h) == ["run(a, v)\nrun(b, v)\nrun()\nrerun(c)\n"]
    text, h = scenario("go(a)\ngo(b)\n", "go(a)", "go(ctx, a)")
    assert candidates(text, h) == ["go(ctx, a)\ngo(ctx, b)\n"]


def test_a_statement_prefix_is_repeated_on_lines_at_the_same_indent() -> None:
    text, h = scenario("def f():\n    a()\n    b()\n        c()\n", "    a()", "    await a()")
    assert candidates(text, h) == ["def f():\n    await a()\n    await b()\n        c()\n"]


def test_minimal_edits_merge_within_a_line_and_keep_crlf() -> None:
    text = "x = w + w\r\ny = 1\r\nz = w\r\n"
    r = editable_region(text, 0, above=0, below=2)
    rewrite = r.text.replace("w", "width")
    spans = minimal_edits(r, rewrite)
    assert len(spans) == 2  # one for line 0 (two changes), one for line 2
    out = text
    for s in reversed(spans):
        out = out[: s.start] + s.new + out[s.end :]
    assert out == text.replace("w", "width") and "\r\n" in out
    assert minimal_edits(r, r.text) == []


def test_choose_shows_only_what_beats_unchanged_by_the_threshold() -> None:
    same = Candidate("a", "unchanged", -5.0)
    better = Candidate("b", "carry", -3.0)
    assert choose(same, [better], 1.5).candidate == better
    got = choose(same, [better], 2.5)
    assert got.candidate is None and got.margin == pytest.approx(2.0)
    assert choose(same, [], 0.0).candidate is None


class ScriptedScores:
    """A backend whose `score` prefers the candidate containing `likes`."""

    model_name = "scripted"

    def __init__(self, likes: str) -> None:
        self.likes = likes
        self.calls: list[tuple[str, list[str]]] = []
        self.before_reply: Any = None

    def score(self, prompt: str, continuations: list[str], *, doc: str = "") -> Scores:
        self.calls.append((prompt, continuations))
        if self.before_reply is not None:
            self.before_reply()
        lps = [[-1.0 if self.likes in c else -9.0] for c in continuations]
        return Scores(lps, [[len(c)] for c in continuations])


def service(backend: ScriptedScores, raw: Any = None) -> tuple[NextEditService, DocumentStore]:
    store = DocumentStore(encoding=lsp.PositionEncodingKind.Utf16)
    opts = parse_options(raw)[0] if raw else ServerOptions()
    svc = NextEditService(store, lambda: backend, lambda: opts,  # type: ignore[arg-type,return-value]
                          lambda doc, off: doc.text[:off])
    store.on_edit = svc.on_edit
    return svc, store


def edit(store: DocumentStore, uri: str, version: int, old: str, new: str) -> None:
    doc = store.get(uri)
    assert doc is not None
    a = doc.text.index(old)
    rng = doc.range_of(a, a + len(old))
    store.change(uri, version, [lsp.TextDocumentContentChangePartial(range=rng, text=new)])


def test_service_suggests_scores_and_counts_feedback() -> None:
    backend = ScriptedScores("return width")
    svc, store = service(backend)
    store.open("file:///a.py", "# 😀\ndef area(w, h):\n    return w * h\n", 1, "python")
    edit(store, "file:///a.py", 2, "area(w", "area(width")
    sug = asyncio.run(svc.suggest("file:///a.py", 2))
    assert sug is not None and sug.version == 2
    doc = store.get("file:///a.py")
    assert doc is not None
    shape = svc.to_lsp(doc, sug)
    # UTF-16 positions: the emoji counts 2 on line 0; the change is on line 2
    assert shape["range"] == {"start": {"line": 2, "character": 11},
                              "end": {"line": 2, "character": 12}}
    assert shape["text"] == shape["newText"] == "width"
    assert shape["command"]["command"] == ACCEPT_COMMAND
    assert shape["textDocument"] == {"uri": "file:///a.py", "version": 2}
    # the same text asks again: the same suggestion, no new scoring
    assert asyncio.run(svc.suggest("file:///a.py", 2)) is sug and len(backend.calls) == 1
    svc.shown(sug.id)
    svc.decide(sug.id, "accepted")
    svc.decide(sug.id, "rejected")  # counted once
    assert svc.status()["accepted"] == 1 and svc.status()["rejected"] == 0
    assert svc.status()["shown"] == 1


def test_service_drops_stale_suggestions() -> None:
    backend = ScriptedScores("return width")
    svc, store = service(backend)
    store.open("file:///a.py", "def area(w, h):\n    return w * h\n", 1, "python")
    edit(store, "file:///a.py", 2, "area(w", "area(width")
    assert asyncio.run(svc.suggest("file:///a.py", 1)) is None  # the client's text is older
    # the user types while the engine scores: the answer is for text that is gone
    backend.before_reply = lambda: edit(store, "file:///a.py", 3, "h)", "height)")
    assert asyncio.run(svc.suggest("file:///a.py", 2)) is None
    assert svc.current("file:///a.py", 3) is None


def test_service_gate_and_option_to_turn_it_off() -> None:
    backend = ScriptedScores("nothing matches this")
    svc, store = service(backend)
    store.open("file:///a.py", "def area(w, h):\n    return w * h\n", 1, "python")
    edit(store, "file:///a.py", 2, "area(w", "area(width")
    assert asyncio.run(svc.suggest("file:///a.py", 2)) is None  # unchanged scores as high
    off, store2 = service(ScriptedScores("return width"), {"nextEdit": {"enabled": False}})
    store2.open("file:///b.py", "def area(w, h):\n    return w * h\n", 1, "python")
    edit(store2, "file:///b.py", 2, "area(w", "area(width")
    assert asyncio.run(off.suggest("file:///b.py", 2)) is None


def test_rejections_raise_the_threshold() -> None:
    svc, _ = service(ScriptedScores("x"))
    base = svc.threshold()
    for i in range(8):
        svc.decide(f"s{i}", "rejected")
    assert svc.threshold() > base + 1.5
    svc2, _ = service(ScriptedScores("x"), {"nextEdit": {"adaptive": False}})
    for i in range(8):
        svc2.decide(f"s{i}", "rejected")
    assert svc2.threshold() == base


def test_scored_window_stops_a_line_after_the_last_difference() -> None:
    from gemma_lsp.next_edit_service import scored_window

    same = "tail one\ntail two\ntail three\n"
    got = scored_window(["a = w\nb = 1\n" + same, "a = width\nb = 1\n" + same])
    assert got == ["a = w\nb = 1\n", "a = width\nb = 1\n"]
    assert scored_window(["only\n"]) == ["only\n"]


def test_candidates_count_lines_at_lsp_line_breaks_only() -> None:
    # a form feed is not a line break: the renamed parameter's body is still the next line
    text, h = scenario("import os\n\x0c\ndef area(w, h):\n    return w * h\n",
                       "area(w,", "area(width,")
    assert candidates(text, h) == ["import os\n\x0c\ndef area(width, h):\n    return width * h\n"]
    text, h = scenario("def f():\r\n    a()\r\n    b()\r\n", "    a()", "    await a()")
    assert candidates(text, h) == ["def f():\r\n    await a()\r\n    await b()\r\n"]


def test_tab_indented_code_keeps_its_tabs() -> None:
    text, h = scenario("func f() {\n\tmust(a())\n\tmust(b())\n}\n", "\tmust(a())", "\tcheck(a())")
    assert candidates(text, h) == ["func f() {\n\tcheck(a())\n\tcheck(b())\n}\n"]
    g = h.last()
    assert g is not None
    r = editable_region(text, g.start)
    cand = candidates(text, h)[0]
    [span] = minimal_edits(r, cand[r.start : len(cand) - (len(text) - r.end)])
    assert text[span.start : span.end] == "must" and span.new == "check"
    assert text[span.start - 1] == "\t"  # on the second call's line, after its tab
