"""Next-edit suggestions end to end: the real server over stdio, the real engine and model.

A parameter renamed on a function's first line; `textDocument/copilotInlineEdit` answers with
the rename of its use below, as an edit that applies to the client's text; a request for an
older version gets nothing; shown / accepted reach `gemma.status`; bad params get an error.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from tests.e2e.test_lsp_e2e import ENV, daemon  # noqa: F401 - the module's engine daemon

URI = "file:///tmp/e2e/nes_area.py"
BEFORE = "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
AFTER_USER = BEFORE.replace("def area(w,", "def area(width,", 1)
EXPECTED = AFTER_USER.replace("return w * h", "return width * h", 1)


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "gemma_lsp"], server_env=ENV),
)
async def client(lsp_client: LanguageClient) -> Any:
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=client_capabilities("neovim"),
        initialization_options={"gemma": {"completion": {"warmAfterMs": 0}}}))
    yield
    await lsp_client.shutdown_session()


def offset(text: str, pos: Any) -> int:
    lines = text.split("\n")
    return sum(len(x) + 1 for x in lines[: pos.line]) + pos.character


async def test_a_renamed_parameter_is_suggested_for_its_use(client: LanguageClient) -> None:
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=1, text=BEFORE)))
    # the user selects "w" in the signature and types "width"
    w = t.Range(t.Position(0, 9), t.Position(0, 10))
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        [t.TextDocumentContentChangePartial(range=w, text="width")]))
    stale = await client.protocol.send_request_async(
        "textDocument/copilotInlineEdit",
        {"textDocument": {"uri": URI, "version": 1}, "position": {"line": 0, "character": 14}})
    assert list(stale.edits) == []  # the client's text is not the server's: nothing
    res = await client.protocol.send_request_async(
        "textDocument/copilotInlineEdit",
        {"textDocument": {"uri": URI, "version": 2}, "position": {"line": 0, "character": 14}})
    [edit] = res.edits
    a, b = offset(AFTER_USER, edit.range.start), offset(AFTER_USER, edit.range.end)
    assert AFTER_USER[:a] + edit.text + AFTER_USER[b:] == EXPECTED
    assert edit.newText == edit.text and edit.textDocument.version == 2
    assert edit.command.command == "gemma.nextEdit.accept"

    client.protocol.notify("textDocument/didShowInlineEdit",
                           {"item": {"command": {"arguments": list(edit.command.arguments)}}})
    await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command=edit.command.command, arguments=list(edit.command.arguments)))
    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    nes = status["next_edit"] if isinstance(status, dict) else status.next_edit
    got = nes if isinstance(nes, dict) else nes._asdict()
    assert got["shown"] == 1 and got["accepted"] == 1 and got["suggested"] >= 1


async def test_bad_params_get_an_error_and_the_server_keeps_serving(
        client: LanguageClient) -> None:
    with pytest.raises(JsonRpcException):
        await client.protocol.send_request_async("textDocument/copilotInlineEdit",
                                                 {"position": {"line": 0, "character": 0}})
    res = await client.protocol.send_request_async(
        "textDocument/copilotInlineEdit",
        {"textDocument": {"uri": "file:///never/opened.py", "version": 1},
         "position": {"line": 0, "character": 0}})
    assert list(res.edits) == []
