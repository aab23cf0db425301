"""The language server with `engine.backend: "openai"`, pointed at the real OpenAI-compatible
API of a resident engine (`gemma-lsp engine --http`): the same suggestions as the built-in
backend, streamed explanations through /v1/chat/completions, clear errors, cancellation."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from gemma_lsp.engine_client import EngineClient
from gemma_lsp.openai_backend import chat_messages
from tests.e2e.test_lsp_e2e import CODE, INIT, URI, end_of, expected_completion
from tests.openai.conftest import TOKEN, HttpEngine, free_port


def settings(url: str) -> dict[str, Any]:
    return {"gemma": {**INIT["gemma"], "engine": {
        "backend": "openai", "url": url, "apiKey": TOKEN,
        "modelName": "gemma-3-270m-it",  # an instruction model: actions use the chat endpoint
        "requestTimeoutS": 120}}}


@pytest_lsp.fixture(config=ClientServerConfig(
    server_command=[sys.executable, "-m", "gemma_lsp"],
    server_env=dict(os.environ, GEMMA_LSP_RUNTIME_DIR="/nonexistent-builtin-engine-not-used")))
async def client(lsp_client: LanguageClient, http_engine: HttpEngine) -> Any:
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"),
        initialization_options=settings(http_engine.url), root_uri="file:///tmp"))
    lsp_client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=1, text=CODE)))
    yield
    await lsp_client.shutdown_session()


def inline(client: LanguageClient) -> Any:
    return client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))


def test_chat_prompts_become_messages_and_plain_prompts_stay() -> None:
    chat = ("<start_of_turn>user\nExplain.\n\nx = 1<end_of_turn>\n<start_of_turn>model\nok"
            "<end_of_turn>\n<start_of_turn>user\nmore<end_of_turn>\n<start_of_turn>model\n")
    assert chat_messages(chat) == [{"role": "user", "content": "Explain.\n\nx = 1"},
                                   {"role": "assistant", "content": "ok"},
                                   {"role": "user", "content": "more"}]
    assert chat_messages("def f(x):\n    return") is None
    assert chat_messages("<start_of_turn>user\nunfinished") is None


async def test_inline_completion_equals_the_builtin_backends(
    client: LanguageClient, http_engine: HttpEngine,
) -> None:
    res = await inline(client)
    assert res is not None and res.items
    want = await asyncio.to_thread(expected_completion, CODE, http_engine.sock)
    assert res.items[0].insert_text == want and want.strip()
    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    assert status["backend"] == "openai" and status["url"] == http_engine.url
    assert status["state"] == "running" and status["models"] == ["gemma-3-270m-q4_k_m.gguf"]


async def test_explain_streams_through_chat_completions(client: LanguageClient) -> None:
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain",
        arguments=[URI, {"start": {"line": 8, "character": 0},
                         "end": {"line": 12, "character": 0}}],
        work_done_token="explain-progress"))  # as our plugins send: the answer is the text
    reports = [r for rs in client.progress_reports.values() for r in rs
               if isinstance(r, t.WorkDoneProgressReport) and r.message]
    assert isinstance(res, str) and res.strip()
    assert len(reports) >= 2 and reports[-1].message.strip() in res


async def test_a_dead_server_is_a_clear_error_and_the_server_keeps_serving(
    client: LanguageClient, http_engine: HttpEngine,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings(dead)))
    res = await inline(client)
    assert res is None or not res.items
    for _ in range(50):
        if any("no OpenAI-compatible server" in m.message for m in client.messages):
            break
        await asyncio.sleep(0.1)
    assert any(f"no OpenAI-compatible server at {dead}" in m.message for m in client.messages)
    client.workspace_did_change_configuration(
        t.DidChangeConfigurationParams(settings(http_engine.url)))
    again = await inline(client)
    assert again is not None and again.items


async def test_cancel_closes_the_stream_and_the_engine_stops(
    client: LanguageClient, http_engine: HttpEngine,
) -> None:
    long = {"gemma": {**settings(http_engine.url)["gemma"], "actions": {"maxTokens": 2000}}}
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(long))
    task = asyncio.ensure_future(client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, {"start": {"line": 0, "character": 0},
                                                  "end": {"line": 14, "character": 0}}],
        work_done_token="explain-progress")))  # the request stays open while it runs
    engine = EngineClient(socket_path=http_engine.sock, autostart=False)
    try:
        for _ in range(100):  # the request reaches the engine through HTTP
            if (await asyncio.to_thread(engine.status))["queue"]:
                break
            await asyncio.sleep(0.1)
        cancelled = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.cancel"))
        assert cancelled["cancelled"] == 1
        with pytest.raises(Exception, match="[Cc]ancel"):
            await task
        for _ in range(100):  # closing the HTTP stream stopped the engine's work
            status = await asyncio.to_thread(engine.status)
            if not status["queue"]:
                break
            await asyncio.sleep(0.1)
        assert not status["queue"], status
    finally:
        engine.close()
