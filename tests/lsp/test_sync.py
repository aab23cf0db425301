"""Document sync through the server's real receive path (frames -> pygls structuring -> our
handlers -> DocumentStore), checked against an independent client model (lsp_reference):
hostile text in every position encoding, clamped positions, a second initialize, changes for
unknown documents, and the edits the server returns applied to the client's text."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lsp import lsp_reference as ref
from tests.lsp.inproc import LOOP, InProcess, ScriptedBackend

URI = "file:///w/doc.py"
ENCODINGS = ["utf-16", "utf-8", "utf-32"]
FORM_FEED_DOC = "import os\n\x0c\ndef f(x):\n    b = x + 1  # one more\n    return b * x\n"
BOUNDED = settings(max_examples=40, deadline=2000, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])


RESOLVES = {"textDocument": {"codeAction": {"resolveSupport": {"properties": ["edit"]}}}}


def session(encoding: str | None = None, backend: Any = None) -> InProcess:
    s = InProcess(backend)
    s.initialize(encoding, capabilities=RESOLVES)
    return s


_SHARED: dict[str, InProcess] = {}
_URIS = itertools.count()


def shared_session(encoding: str) -> tuple[InProcess, str]:
    """One session per encoding for a property test's examples (a session costs 0.1 s of
    cattrs hook generation), and a fresh document URI per example."""
    if encoding not in _SHARED:
        _SHARED[encoding] = session(encoding, ScriptedBackend())
    return _SHARED[encoding], f"file:///w/ex{next(_URIS)}.py"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_negotiated_encoding_is_the_stores(encoding: str) -> None:
    s = InProcess()
    result = s.initialize(encoding)
    assert result["capabilities"]["positionEncoding"] == encoding
    assert s.server.store.encoding.value == encoding


def test_form_feed_does_not_shift_the_lines_an_edit_lands_on() -> None:
    """The issue's example: pygls counted the \\x0c as a line break, so an edit at line 3
    went to the wrong line and a refactor then wrote `b = x  # one more + 1`."""
    s = session()
    s.open(URI, FORM_FEED_DOC)
    client = FORM_FEED_DOC
    change = {"range": {"start": {"line": 3, "character": 13},
                        "end": {"line": 3, "character": 13}}, "text": "0"}
    s.change(URI, 2, [change])
    client = ref.apply_edit(client, change["range"], "0", "utf-16")
    assert client.splitlines()[4] == "    b = x + 10  # one more"  # splitlines: one line more
    assert s.text(URI) == client


async def test_a_refactor_after_a_form_feed_edits_the_selected_line() -> None:
    answer = "    b = x + 2  # one more\n    return b * x\n"
    s = session(backend=ScriptedBackend(answer))
    s.open(URI, FORM_FEED_DOC)
    s.change(URI, 2, [{"range": {"start": {"line": 4, "character": 16},
                                 "end": {"line": 4, "character": 16}}, "text": ""}])
    actions = await s.request("textDocument/codeAction", {
        "textDocument": {"uri": URI},
        "range": {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 0}},
        "context": {"diagnostics": []}})
    (refactor,) = [a for a in actions["result"] if a["data"]["kind"] == "refactor"]
    resolved = await s.request("codeAction/resolve", refactor)
    (change,) = resolved["result"]["edit"]["documentChanges"]
    after = ref.apply_text_edits(FORM_FEED_DOC, change["edits"], "utf-16")
    assert after == "import os\n\x0c\ndef f(x):\n    b = x + 2  # one more\n    return b * x\n"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_positions_past_a_line_or_the_document_clamp(encoding: str) -> None:
    s = session(encoding)
    text = "ab😀\r\nc\x85d\rlast"
    s.open(URI, text)
    client = text
    for rng, new in [
        ({"start": {"line": 0, "character": 99}, "end": {"line": 0, "character": 99}}, "<"),
        ({"start": {"line": 1, "character": 50}, "end": {"line": 1, "character": 60}}, "|"),
        ({"start": {"line": 40, "character": 0}, "end": {"line": 41, "character": 3}}, "$"),
        ({"start": {"line": 2, "character": 77}, "end": {"line": 2, "character": 78}}, "!"),
    ]:
        s.change(URI, 2, [{"range": rng, "text": new}])
        client = ref.apply_edit(client, rng, new, encoding)
        assert s.text(URI) == client
    assert client == "ab😀<\r\nc\x85d|\rlast$!"  # past the end of the last line: its end


@pytest.mark.parametrize("encoding", ENCODINGS)
@BOUNDED
@given(rnd=st.randoms(use_true_random=False), size=st.integers(0, 60),
       steps=st.integers(1, 25))
def test_random_incremental_edits_match_the_client(encoding: str, rnd: random.Random,
                                                   size: int, steps: int) -> None:
    s, uri = shared_session(encoding)
    client = ref.random_text(rnd, size)
    s.open(uri, client)
    for version in range(2, steps + 2):
        batch = [ref.random_change(rnd, client, encoding)]
        client = ref.apply_edit(client, batch[0]["range"], batch[0]["text"], encoding)
        if rnd.random() < 0.3:  # several changes in one notification apply in order
            batch.append(ref.random_change(rnd, client, encoding))
            client = ref.apply_edit(client, batch[1]["range"], batch[1]["text"], encoding)
        if rnd.random() < 0.05:
            client = ref.random_text(rnd, size)
            batch.append({"text": client})
        s.change(uri, version, batch)
        assert s.text(uri) == client, (version, batch)
    assert s.server.store.get(uri).version == steps + 1  # type: ignore[union-attr]
    s.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
    assert not s.shown_messages()


def test_a_second_initialize_is_refused_and_keeps_the_documents() -> None:
    s = session()
    s.open(URI, "x = 1\n")
    again = s.request_now("initialize", {"processId": None, "rootUri": None,
                                         "capabilities": {}})
    assert again is not None and again["error"]["code"] == -32600  # InvalidRequest
    s.change(URI, 2, [{"range": {"start": {"line": 0, "character": 5},
                                 "end": {"line": 0, "character": 5}}, "text": "0"}])
    assert s.text(URI) == "x = 10\n"
    assert not s.shown_messages()


def test_a_change_for_a_document_never_opened_is_logged_not_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = session()
    s.change("file:///w/never.py", 2, [{"range": {"start": {"line": 0, "character": 0},
                                                  "end": {"line": 0, "character": 0}},
                                        "text": "x"}])
    assert not s.shown_messages()
    assert "never.py, which is not open" in caplog.text
    assert s.text("file:///w/never.py") is None


def test_close_then_change_then_reopen() -> None:
    s = session()
    s.open(URI, "a\n")
    s.notify("textDocument/didClose", {"textDocument": {"uri": URI}})
    s.change(URI, 3, [{"text": "zzz"}])
    assert s.text(URI) is None
    s.open(URI, "b\r\n", version=4)
    assert s.text(URI) == "b\r\n" and not s.shown_messages()


# ---------------------------------------------------------------------- returned edits


async def _refactor(s: InProcess, rng: dict[str, Any], uri: str = URI) -> dict[str, Any]:
    actions = await s.request("textDocument/codeAction", {
        "textDocument": {"uri": uri}, "range": rng, "context": {"diagnostics": []}})
    (refactor,) = [a for a in actions["result"] if a["data"]["kind"] == "refactor"]
    return await s.request("codeAction/resolve", refactor)


def _whole_lines(text: str, rng: dict[str, Any], encoding: str) -> tuple[int, int]:
    """The selection as the server documents it: grown to whole lines; a selection ending at
    column 0 of a later line does not include that line."""
    starts = ref.line_starts(text)
    a = ref.to_offset(text, rng["start"]["line"], rng["start"]["character"], encoding)
    b = ref.to_offset(text, rng["end"]["line"], rng["end"]["character"], encoding)
    first = max(i for i, p in enumerate(starts) if p <= a)
    last = max(i for i, p in enumerate(starts) if p <= b)
    if b > a and last > first and b == starts[last]:
        last -= 1
    return starts[first], starts[last + 1] if last + 1 < len(starts) else len(text)


async def test_crlf_refactor_and_completion_use_the_documents_line_break() -> None:
    doc = "def f(x):\r\n    return x\r\n\r\nprint(f(1))\r\n"
    s = session(backend=ScriptedBackend("def f(x):\n    y = x\n    return y\n"))
    s.open(URI, doc)
    rng = {"start": {"line": 0, "character": 0}, "end": {"line": 2, "character": 0}}
    resolved = await _refactor(s, rng)
    (change,) = resolved["result"]["edit"]["documentChanges"]
    for e in change["edits"]:
        assert "\n" not in e["newText"].replace("\r\n", "")
    after = ref.apply_text_edits(doc, change["edits"], "utf-16")
    assert after == "def f(x):\r\n    y = x\r\n    return y\r\n\r\nprint(f(1))\r\n"

    # mid-line (before "return x"): the answer runs into the rest of the line
    s.backend.answer = "if x:\n        return 1\n    return x\n"
    pos = {"line": 1, "character": 4}
    menu = await s.request("textDocument/completion",
                           {"textDocument": {"uri": URI}, "position": pos})
    inline = await s.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": URI}, "position": pos, "context": {"triggerKind": 1}})
    texts = [i["textEdit"]["newText"] for i in menu["result"]["items"]]
    texts += [i["insertText"] for i in inline["result"]["items"]]
    assert texts and all("\r\n" in x and "\n" not in x.replace("\r\n", "") for x in texts)


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=25, deadline=5000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False), size=st.integers(1, 50))
def test_returned_edits_apply_to_the_clients_text(encoding: str, rnd: random.Random,
                                                  size: int) -> None:
    """A refactor's edit replaces exactly the selected lines of the client's text (with its
    line break); a completion's edit inserts at the cursor and keeps the rest."""
    client = ref.random_text(rnd, size)
    s, uri = shared_session(encoding)
    LOOP.run_until_complete(_check_returned_edits(s, uri, encoding, rnd, client))
    s.notify("textDocument/didClose", {"textDocument": {"uri": uri}})


async def _check_returned_edits(s: InProcess, uri: str, encoding: str, rnd: random.Random,
                                client: str) -> None:
    s.backend.answer = "MARK = 1\n"
    s.open(uri, client)
    for version in range(2, 4):  # the server's copy has seen edits too
        change = ref.random_change(rnd, client, encoding)
        client = ref.apply_edit(client, change["range"], change["text"], encoding)
        s.change(uri, version, [change])
    sel = ref.random_change(rnd, client, encoding)["range"]
    resolved = await _refactor(s, sel, uri)
    a, b = _whole_lines(client, sel, encoding)
    assert "result" in resolved, resolved
    (change,) = resolved["result"]["edit"]["documentChanges"]
    after = ref.apply_text_edits(client, change["edits"], encoding)
    assert after.startswith(client[:a]) and after.endswith(client[b:])
    middle = after[a: len(after) - (len(client) - b)]
    assert [ln.strip() for ln in middle.replace("\r\n", "\n").replace("\r", "\n")
            .split("\n") if ln.strip()] == ["MARK = 1"]
    s.backend.answer = "x1(\n  y)"
    cursor = ref.random_change(rnd, client, encoding)["range"]["start"]
    menu = await s.request("textDocument/completion",
                           {"textDocument": {"uri": uri}, "position": cursor})
    off = ref.to_offset(client, cursor["line"], cursor["character"], encoding)
    for item in (menu["result"] or {"items": []})["items"]:
        after = ref.apply_edit(client, item["textEdit"]["range"], item["textEdit"]["newText"],
                               encoding)
        assert after.startswith(client[:off]) and after.endswith(client[off:])
