"""gemma.explainImage, gemma.codeFromImage and gemma.voiceInstruction end to end: the real
server over stdio and a real engine daemon on a tiny random Gemma 4 unified checkpoint built
here (its answers are nonsense, but every layer and both embedders run). Paths outside the
workspace are refused, a missing argument asks for one, and the shipped text-only model
refuses an image naming itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from gemma_lsp.multimodal import STOP, link_at
from tests.engine import tiny_unified as tu

pytest.importorskip("torch", reason="the `ref` extra builds the tiny checkpoint")

RUNTIME = Path(tempfile.gettempdir()) / f"glsp-mm-{os.getpid()}"
WORK = RUNTIME / "workspace"
ENV = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(RUNTIME), PYTHONUNBUFFERED="1",
           GEMMA_LSP_CACHE=str(RUNTIME / "cache"))
INIT = {"gemma": {"actions": {"maxTokens": 24, "temperature": 0},
                  "completion": {"warmAfterMs": 100000}}}
CODE = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"
NOTES = ("# Design\n\nThe login screen:\n\n![login](shots/login.png)\n\n"
         "<img src=\"shots/login.png\" alt=\"again\">\n\n.. image:: shots/login.png\n")


def start_engine(runtime: Path, *args: str) -> subprocess.Popen[bytes]:
    return tu.start_engine(runtime, ENV, *args)  # type: ignore[no-any-return]


stop = tu.stop_engine


@pytest.fixture(scope="module", autouse=True)
def daemon() -> Iterator[None]:
    RUNTIME.mkdir(mode=0o700, exist_ok=True)  # the engine wants its runtime dir private
    (WORK / "shots").mkdir(parents=True, exist_ok=True)
    (WORK / "shots" / "login.png").write_bytes(tu.png(60, 40, 7))
    (WORK / "say.wav").write_bytes(tu.wav(0.3, rate=22_050))
    (WORK / "code.py").write_text(CODE)
    (WORK / "notes.md").write_text(NOTES)
    tu.build(RUNTIME / "tiny-gemma4-unified")
    proc = start_engine(RUNTIME, "--model", str(RUNTIME / "tiny-gemma4-unified"))
    yield
    stop(proc)
    shutil.rmtree(RUNTIME, ignore_errors=True)


@pytest_lsp.fixture(
    params=["visual-studio-code", "neovim"],
    config=ClientServerConfig(server_command=[sys.executable, "-m", "gemma_lsp"], server_env=ENV),
)
async def client(lsp_client: LanguageClient, request: pytest.FixtureRequest) -> Any:
    applied: list[t.ApplyWorkspaceEditParams] = []
    lsp_client.applied_edits = applied  # type: ignore[attr-defined]

    @lsp_client.feature(t.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        applied.append(params)
        return t.ApplyWorkspaceEditResult(applied=True)

    caps = client_capabilities(request.param)
    lsp_client.caps = caps  # type: ignore[attr-defined]
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=caps, initialization_options=INIT, root_uri=WORK.as_uri(),
        workspace_folders=[t.WorkspaceFolder(uri=WORK.as_uri(), name="ws")]))
    yield
    await lsp_client.shutdown_session()


def open_doc(client: LanguageClient, name: str, lang: str) -> str:
    uri = (WORK / name).as_uri()
    client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
        uri=uri, language_id=lang, version=1, text=(WORK / name).read_text())))
    return uri


def engine_answer(prompt: str, media: list[dict[str, Any]], n: int = 24) -> str:
    """What the engine says for the prompt the server builds (greedy)."""
    from engine.protocol import Done, Token
    from gemma_lsp.engine_client import EngineClient

    client = EngineClient(socket_path=RUNTIME / "engine.sock", autostart=False)
    try:
        handle = client.generate(prompt, max_tokens=n, temperature=0.0, stop=STOP, media=media,
                                 priority=10)
        text = ""
        while True:
            msg = handle.next(120)
            if isinstance(msg, Token):
                text += msg.text
            else:
                assert isinstance(msg, Done)
                return text + msg.tail
    finally:
        client.close()


def reports(client: LanguageClient) -> list[str]:
    return [r.message or "" for rs in client.progress_reports.values() for r in rs
            if isinstance(r, t.WorkDoneProgressReport)]


async def test_explain_image_by_path_streams_the_engines_answer(client: LanguageClient) -> None:
    image = WORK / "shots" / "login.png"
    result = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explainImage", arguments=[str(image)]))
    prompt = ("<|turn>user\n<|image|>What does this screenshot or diagram show, and which code "
              "does it relate to?<turn|>\n<|turn>model\n")
    want = engine_answer(prompt, [{"kind": "image", "data": image.read_bytes()}]).strip()
    assert isinstance(result, str) and result == want and want
    if client.caps.window and client.caps.window.work_done_progress:  # type: ignore[attr-defined]
        assert reports(client) and reports(client)[-1].strip() == result
    # a file: URI names the same file: the same answer
    again = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explainImage", arguments=[image.as_uri()]))
    assert again == result


async def test_explain_image_under_the_cursor_in_markdown_html_and_rest(
        client: LanguageClient) -> None:
    uri = open_doc(client, "notes.md", "markdown")
    answers = []
    for line, col in ((4, 5), (6, 12), (8, 3)):  # Markdown, HTML, reStructuredText links
        answers.append(await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.explainImage", arguments=[None, uri, {"line": line,
                                                                 "character": col}])))
    assert all(isinstance(a, str) and a for a in answers)
    with pytest.raises(Exception, match="no link under the cursor"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.explainImage", arguments=[None, uri, {"line": 0, "character": 0}]))
    with pytest.raises(Exception, match="give an image .*path or file: URI"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.explainImage", arguments=[]))


async def test_paths_outside_the_workspace_are_refused(client: LanguageClient) -> None:
    outside = RUNTIME / "outside.png"
    outside.write_bytes(tu.png(10, 10))
    for target in (str(outside), "../outside.png", outside.as_uri(), "https://x.org/a.png"):
        with pytest.raises(Exception, match="outside the workspace folders|only local files"):
            await client.workspace_execute_command_async(t.ExecuteCommandParams(
                command="gemma.explainImage", arguments=[target]))
    with pytest.raises(Exception, match="code.py is not an image"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.explainImage", arguments=[str(WORK / "code.py")]))
    # the server keeps serving
    status = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.status"))
    assert status["inputs"] == ["text", "image", "audio"]


async def test_code_from_image_inserts_at_the_cursor(client: LanguageClient) -> None:
    uri = open_doc(client, "code.py", "python")
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.codeFromImage",
        arguments=["shots/login.png", uri, {"line": 5, "character": 0}]))
    if res is None:  # pragma: no cover - the tiny model may write no code block at all
        pytest.fail("codeFromImage returned nothing")
    assert res["applied"] is True
    (edit,) = client.applied_edits  # type: ignore[attr-defined]
    change = edit.edit.document_changes[0]
    assert change.text_document.uri == uri and change.text_document.version == 1
    (text_edit,) = change.edits
    assert text_edit.range.start == text_edit.range.end == t.Position(5, 0)
    assert text_edit.new_text.strip()
    with pytest.raises(Exception, match="needs the document and cursor"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.codeFromImage", arguments=["shots/login.png"]))


async def test_voice_instruction_on_the_selection(client: LanguageClient) -> None:
    uri = open_doc(client, "code.py", "python")
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.voiceInstruction",
        arguments=[str(WORK / "say.wav"), uri, {"start": {"line": 0, "character": 0},
                                                "end": {"line": 5, "character": 0}}]))
    assert isinstance(res, dict) and ("edit" in res or res["answer"])
    if "edit" in res:  # the answer held code: it replaced lines of the selection
        assert res["applied"] is True and client.applied_edits  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="say.md is not a WAV|outside"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(
            command="gemma.voiceInstruction", arguments=[str(WORK / "say.md"), uri,
                                                         {"line": 0, "character": 0}]))


def test_links_under_the_cursor() -> None:
    assert link_at("see ![a](img/x.png \"t\") and [b](y.gif)", 6) == "img/x.png"
    assert link_at("see ![a](img/x.png) and [b](y.gif)", 30) == "y.gif"
    assert link_at("<p><img alt='q' src='pic.webp'></p>", 0) == "pic.webp"
    assert link_at("   .. figure:: diagrams/flow.png", 4) == "diagrams/flow.png"
    assert link_at("plain text", 2) is None


async def test_the_text_only_model_refuses_an_image() -> None:
    """The shipped 270M over a real engine: the command fails naming the model and what it
    lacks, never a text-only answer."""
    from gemma_lsp.backend import BackendError, EngineBackend

    runtime = RUNTIME / "text-only"
    proc = start_engine(runtime)
    try:
        backend = EngineBackend(socket_path=str(runtime / "engine.sock"), autostart=False)
        stream = backend.start("<|turn>user\n<|image|>What is it?<turn|>\n<|turn>model\n",
                               max_tokens=8, media=[{"kind": "image",
                                                     "data": tu.png(20, 20)}])
        with pytest.raises(BackendError, match="model gemma-3-270m-q4_k_m.gguf cannot take "
                           "image input: it is a text-only model .* lacks any image"):
            stream.next(120)
        assert backend.status()["inputs"] == ["text"]
        backend.close()
    finally:
        stop(proc)
