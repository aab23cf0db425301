"""Long work never holds a request, for every editor's capability set: the real server over
stdio with a scripted backend whose answers take ~3 s (tests/lsp/scripted_server.py). Code
actions carry their command before resolve; resolve and the command are answered at once; the
edit comes as workspace/applyEdit, Explain's text as a message or document, progress on a
server-created token; cancelling the progress or gemma.cancel stops the work."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.e2e.test_lsp_e2e import ALL_CLIENTS, _fix_code_action_parsing, capabilities

ROOT = Path(__file__).resolve().parents[2]
URI = "file:///tmp/async/account.py"
CODE = (ROOT / "examples" / "sample.py").read_text()
RANGE = t.Range(t.Position(8, 0), t.Position(12, 0))


@pytest_lsp.fixture(params=ALL_CLIENTS, config=ClientServerConfig(
    server_command=[sys.executable, "-m", "tests.lsp.scripted_server"],
    server_env={"PYTHONPATH": str(ROOT), "GEMMA_TEST_PIECE_S": "0.4"}))
async def client(lsp_client: LanguageClient, request: pytest.FixtureRequest) -> Any:
    applied: list[t.ApplyWorkspaceEditParams] = []
    lsp_client.applied = applied  # type: ignore[attr-defined]

    @lsp_client.feature(t.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        applied.append(params)
        return t.ApplyWorkspaceEditResult(applied=True)

    caps = capabilities(request.param)
    lsp_client.caps = caps  # type: ignore[attr-defined]
    _fix_code_action_parsing(lsp_client)
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=caps, root_uri="file:///tmp",
        initialization_options={"gemma": {"completion": {"warmAfterMs": 0}}}))
    lsp_client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=1, text=CODE)))
    # the server has started and read the document (a loaded machine: not timed)
    await lsp_client.workspace_execute_command_async(t.ExecuteCommandParams("gemma.status"))
    yield
    await lsp_client.shutdown_session()


async def _timed(coro: Any) -> Any:
    t0 = time.perf_counter()
    res = await coro
    took = time.perf_counter() - t0
    assert took < 1.0, took
    return res


async def _wait(cond: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        await asyncio.sleep(0.05)
    return cond()


async def _actions(client: LanguageClient) -> dict[str, t.CodeAction]:
    listed = await _timed(client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(URI), range=RANGE,
        context=t.CodeActionContext(diagnostics=[]))))
    out = {}
    for a in listed:
        assert isinstance(a, t.CodeAction) and a.command is not None  # before any resolve
        out[a.command.command] = a
    return out


async def test_docstring_answers_at_once_and_the_edit_follows(client: LanguageClient) -> None:
    action = (await _actions(client))["gemma.docstring"]
    resolved = await _timed(client.code_action_resolve_async(action))
    assert resolved.edit is None and resolved.command == action.command
    assert action.command is not None
    res = await _timed(client.workspace_execute_command_async(t.ExecuteCommandParams(
        command=action.command.command, arguments=action.command.arguments)))
    assert res["started"] == "gemma.docstring" and not client.applied  # type: ignore
    (applied,) = await _wait(lambda: client.applied)  # type: ignore[attr-defined]
    (edit,) = applied.edit.document_changes[0].edits
    assert '"""adds the amount to the balance."""' in edit.new_text
    caps = client.caps  # type: ignore[attr-defined]
    if caps.window and caps.window.work_done_progress:
        kinds = [type(r) for r in client.progress_reports[res["token"]]]
        assert kinds[0] is t.WorkDoneProgressBegin and kinds[-1] is t.WorkDoneProgressEnd
        assert t.WorkDoneProgressReport in kinds  # the text so far


async def test_explain_answers_at_once_and_the_text_follows(client: LanguageClient) -> None:
    action = (await _actions(client))["gemma.explain"]
    assert action.command is not None
    res = await _timed(client.workspace_execute_command_async(t.ExecuteCommandParams(
        command=action.command.command, arguments=action.command.arguments)))
    assert res["started"] == "gemma.explain"
    (msg,) = await _wait(lambda: [m for m in client.messages if m.type == t.MessageType.Info])
    assert msg.message == "`deposit` adds the amount to the balance."


@pytest.mark.parametrize("how", ["progress", "gemma.cancel"])
async def test_cancel_stops_the_work(client: LanguageClient, how: str) -> None:
    action = (await _actions(client))["gemma.docstring"]
    assert action.command is not None
    res = await _timed(client.workspace_execute_command_async(t.ExecuteCommandParams(
        command=action.command.command, arguments=action.command.arguments)))
    await asyncio.sleep(0.6)
    if how == "progress":
        if res["token"] is None:
            pytest.skip("this client shows no progress, so it cannot cancel one")
        client.window_work_done_progress_cancel(t.WorkDoneProgressCancelParams(res["token"]))
    else:
        n = await _timed(client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.cancel")))
        assert n == {"cancelled": 1}
    warned = await _wait(lambda: [m for m in client.messages
                                  if m.type == t.MessageType.Warning])
    assert "cancelled" in warned[0].message
    await asyncio.sleep(3)
    assert not client.applied  # type: ignore[attr-defined]


async def test_a_stale_or_bad_request_is_refused_in_its_answer(client: LanguageClient) -> None:
    action = (await _actions(client))["gemma.docstring"]
    assert action.command is not None
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        [t.TextDocumentContentChangePartial(range=t.Range(t.Position(0, 0), t.Position(0, 0)),
                                            text="# edited\n")]))
    with pytest.raises(Exception, match="changed since"):
        await _timed(client.workspace_execute_command_async(t.ExecuteCommandParams(
            command=action.command.command, arguments=action.command.arguments)))
    with pytest.raises(Exception, match="expected arguments"):
        await _timed(client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.explain", arguments=[42])))


async def test_a_client_token_waits_for_the_text(client: LanguageClient) -> None:
    """Our plugins pass their own workDoneToken for Explain: the answer is the text."""
    text = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, {"start": {"line": 8, "character": 0},
                                                  "end": {"line": 12, "character": 0}}],
        work_done_token="mine-1"))
    assert text == "`deposit` adds the amount to the balance."
    caps = client.caps  # type: ignore[attr-defined]
    if caps.window and caps.window.work_done_progress:
        reports = [r for r in client.progress_reports.get("mine-1", [])
                   if isinstance(r, t.WorkDoneProgressReport)]
        assert reports and reports[-1].message == text
    assert not [m for m in client.messages if m.type == t.MessageType.Info]  # not twice
