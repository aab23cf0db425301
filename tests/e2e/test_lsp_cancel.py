"""`$/cancelRequest` for a running command stops its engine work (real server, real engine,
shipped model), and the issue's form-feed refactor through the real engine edits the right
line of the client's text."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pygls.exceptions import JsonRpcRequestCancelled
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from tests.e2e.test_lsp_e2e import (  # noqa: F401 (daemon: its engine)
    ENV,
    INIT,
    RUNTIME,
    _edit_of,
    _fix_code_action_parsing,
    daemon,
)
from tests.lsp import lsp_reference as ref

LOG = RUNTIME / "lsp-cancel-server.log"
URI = "file:///tmp/e2e/cancel.py"
CODE = ("def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
        "    return total / len(xs)\n\n\ndef spread(xs):\n    m = mean(xs)\n"
        "    return max(abs(x - m) for x in xs)\n")
WHOLE = {"start": {"line": 0, "character": 0}, "end": {"line": 10, "character": 0}}
FORM_FEED_DOC = "import os\n\x0c\ndef f(x):\n    b = x + 1  # one more\n    return b * x\n"


@pytest_lsp.fixture(config=ClientServerConfig(
    server_command=[sys.executable, "-m", "gemma_lsp", "--debug-commands", "--log-file",
                    str(LOG)], server_env=ENV))
async def client(lsp_client: LanguageClient) -> Any:
    applied: list[t.ApplyWorkspaceEditParams] = []
    lsp_client.applied_edits = applied  # type: ignore[attr-defined]

    @lsp_client.feature(t.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        applied.append(params)
        return t.ApplyWorkspaceEditResult(applied=True)

    caps = client_capabilities("visual-studio-code")
    lsp_client.caps = caps  # type: ignore[attr-defined]
    _fix_code_action_parsing(lsp_client)  # actions carry commands (see there)
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=caps, initialization_options=INIT, root_uri="file:///tmp"))
    yield
    await lsp_client.shutdown_session()


async def _engine_queue(client: LanguageClient) -> list[Any]:
    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    return list(status.get("queue") or [])


def _reports(client: LanguageClient) -> int:
    return sum(len(v) for v in client.progress_reports.values())


@pytest.mark.parametrize("command", ["gemma.explain", "gemma.refactor"])
async def test_cancel_request_stops_a_running_commands_engine_work(
    client: LanguageClient, command: str
) -> None:
    long = {"gemma": {**INIT["gemma"], "actions": {"maxTokens": 512, "temperature": 0}}}
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=long))
    client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
        uri=URI, language_id="python", version=1, text=CODE)))
    args: list[Any] = [URI, WHOLE] + (["rewrite it"] if command == "gemma.refactor" else [])
    msg_id = f"{command}-to-cancel"
    # with its own workDoneToken (as our VS Code and Neovim plugins send) the command answers
    # with the result, so the request is open while the engine works
    pending = asyncio.ensure_future(client.protocol.send_request_async(
        t.WORKSPACE_EXECUTE_COMMAND, t.ExecuteCommandParams(
            command=command, arguments=args, work_done_token=f"{command}-progress"),
        msg_id=msg_id))
    for _ in range(600):  # the engine is generating: its text streams as progress
        if _reports(client) >= 2:
            break
        await asyncio.sleep(0.1)
    assert _reports(client) >= 2 and await _engine_queue(client)
    for i in range(200):  # a storm around it: unknown and finished ids
        client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=f"nothing-{i}"))
    client.protocol.notify(t.CANCEL_REQUEST, t.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wait_for(pending, 10)
    for _ in range(50):  # the engine's work for it stops (512 tokens would take far longer)
        queue = await _engine_queue(client)
        if not queue:
            break
        await asyncio.sleep(0.1)
    assert not queue
    reports, messages = _reports(client), len(client.messages)
    await asyncio.sleep(1.0)
    assert _reports(client) <= reports + 1  # at most the "cancelled" end
    assert len(client.messages) == messages  # no explanation pops up later
    assert not client.shown_documents and not client.applied_edits  # type: ignore[attr-defined]
    assert "Traceback" not in LOG.read_text()


async def test_a_refactor_after_a_form_feed_edits_the_clients_selected_lines(
    client: LanguageClient,
) -> None:
    """The issue's example through the real server and engine."""
    uri = "file:///tmp/e2e/formfeed.py"
    short = {"gemma": {**INIT["gemma"], "actions": {"maxTokens": 40, "temperature": 0}}}
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=short))
    client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
        uri=uri, language_id="python", version=1, text=FORM_FEED_DOC)))
    edit = t.Range(t.Position(3, 13), t.Position(3, 13))
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=uri, version=2),
        [t.TextDocumentContentChangePartial(range=edit, text="0")]))
    text = FORM_FEED_DOC.replace("x + 1", "x + 10")
    mirror = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.debug.document", arguments=[uri]))
    assert mirror["text"] == text
    actions = await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(uri),
        range=t.Range(t.Position(3, 0), t.Position(5, 0)),
        context=t.CodeActionContext(diagnostics=[])))
    (refactor,) = [a for a in actions or [] if isinstance(a, t.CodeAction)
                   and a.data and a.data["kind"] == "refactor"]
    # the action's command answers at once; its edit arrives as workspace/applyEdit (or the
    # model saw nothing to change: a refusal, with nothing applied)
    resolved = await _edit_of(client, refactor, may_be_unchanged=True)
    if resolved is None:
        return
    assert resolved.document_changes
    (change,) = resolved.document_changes
    assert isinstance(change, t.TextDocumentEdit) and change.text_document.version == 2
    edits = [{"range": {"start": {"line": e.range.start.line,
                                  "character": e.range.start.character},
                        "end": {"line": e.range.end.line, "character": e.range.end.character}},
              "newText": e.new_text} for e in change.edits if isinstance(e, t.TextEdit)]
    assert all(3 <= e["range"]["start"]["line"] and e["range"]["end"]["line"] <= 5
               for e in edits)  # within the selected lines (3 and 4)
    after = ref.apply_text_edits(text, edits, "utf-16")
    # the lines before the selection are untouched, and so is the rest after it
    assert after.startswith("import os\n\x0c\ndef f(x):\n")
    assert "# one more + 1" not in after and "# one more+ 1" not in after
