"""The real server over stdio, the real engine daemon and the shipped model, driven by pytest-lsp
with the client capabilities of VS Code, Neovim, Emacs 29 (pytest-lsp's sets), Helix 25.01.1 and
eglot 1.17.30 (recorded from the editors: tests/data/clients/)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import pytest
import pytest_lsp
from lsprotocol import types as t
from lsprotocol.converters import get_converter
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from gemma_lsp.actions import NO_CHANGE
from tests.rewrite_template import REFACTOR_FEWSHOT

RUNTIME = Path(tempfile.gettempdir()) / f"glsp-e2e-{os.getpid()}"
ENV = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(RUNTIME), PYTHONUNBUFFERED="1")
INIT = {"gemma": {"completion": {"debounceMs": 0, "maxTokens": 24, "warmAfterMs": 0,
                                 # menu items wait for the unit (a shared machine is slow)
                                 "latencyBudgetMs": 0, "menuWaitMs": 600_000},
                  "actions": {"maxTokens": 96, "temperature": 0},
                  "templates": {"refactorFewshot": REFACTOR_FEWSHOT}}}
URI = "file:///tmp/e2e/account.py"
CODE = (Path(__file__).resolve().parents[2] / "examples" / "sample.py").read_text()
RECORDED = Path(__file__).resolve().parents[1] / "data" / "clients"
# clients without inline completion: they get completion-menu items
MENU_CLIENTS = ["helix@25.01.1", "eglot@1.17.30", "emacs"]
ALL_CLIENTS = ["visual-studio-code", "neovim", "emacs", "helix@25.01.1", "eglot@1.17.30"]


def capabilities(spec: str) -> t.ClientCapabilities:
    """pytest-lsp's capability set for `spec`, or one recorded from the editor
    (tests/data/clients/NAME_VERSION.json: the `initialize` params the editor sent)."""
    name, _, version = spec.partition("@")
    path = RECORDED / f"{name}_{version}.json"
    if not path.exists():
        return client_capabilities(spec)
    raw = json.loads(path.read_text())["capabilities"]
    return get_converter().structure(raw, t.ClientCapabilities)


@pytest.fixture(scope="module", autouse=True)
def daemon() -> Iterator[None]:
    """One engine daemon for the module (the servers would autostart it; this makes its
    lifetime and log explicit)."""
    RUNTIME.mkdir(mode=0o700, exist_ok=True)
    log = (RUNTIME / "test-daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0"],
        env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while not (RUNTIME / "engine.sock").exists():
        assert proc.poll() is None, (RUNTIME / "test-daemon.log").read_text()
        assert time.monotonic() < deadline, "engine did not start"
        time.sleep(0.1)
    yield
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(["pkill", "-f", str(RUNTIME)], check=False)  # engines started on demand
    shutil.rmtree(RUNTIME, ignore_errors=True)


@pytest_lsp.fixture(
    params=ALL_CLIENTS,
    config=ClientServerConfig(server_command=[sys.executable, "-m", "gemma_lsp"], server_env=ENV),
)
async def client(lsp_client: LanguageClient, request: pytest.FixtureRequest) -> Any:
    applied: list[t.ApplyWorkspaceEditParams] = []
    lsp_client.applied_edits = applied  # type: ignore[attr-defined]

    @lsp_client.feature(t.WORKSPACE_APPLY_EDIT)
    def apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        applied.append(params)
        return t.ApplyWorkspaceEditResult(applied=True)

    caps = capabilities(request.param)
    lsp_client.caps = caps  # type: ignore[attr-defined]
    lsp_client.name = request.param  # type: ignore[attr-defined]
    _fix_code_action_parsing(lsp_client)
    await lsp_client.initialize_session(
        t.InitializeParams(capabilities=caps, initialization_options=INIT, root_uri="file:///tmp")
    )
    yield
    await lsp_client.shutdown_session()


def _fix_code_action_parsing(client: LanguageClient) -> None:
    """lsprotocol structures every `Command | CodeAction` that has a "command" key as a
    Command, so a CodeAction carrying a command (what eglot 1.9 gets) came back mangled:
    decide by the type of "command" instead, as the spec does."""
    conv = client.protocol._converter

    def hook(obj: Any, _: Any) -> t.Command | t.CodeAction:
        if isinstance(obj.get("command"), str):
            return conv.structure(obj, t.Command)
        return conv.structure(obj, t.CodeAction)

    conv.register_structure_hook(t.Command | t.CodeAction, hook)
    conv.register_structure_hook(Union[t.Command, t.CodeAction], hook)  # noqa: UP007


def open_doc(client: LanguageClient, text: str = CODE, uri: str = URI, version: int = 1) -> None:
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)))


def end_of(text: str) -> t.Position:
    lines = text.split("\n")
    return t.Position(len(lines) - 1, len(lines[-1]))


def expected_completion(text: str, sock: Path | None = None) -> str:
    """What the engine gives for the prompt the server builds (greedy), trimmed the same way
    (the engine at `sock`; default: this module's)."""
    from engine.protocol import Done, Token
    from gemma_lsp.config import parse_options
    from gemma_lsp.context import build_context
    from gemma_lsp.documents import Document
    from gemma_lsp.engine_client import EngineClient
    from gemma_lsp.postprocess import finalize, should_stop_early
    from gemma_lsp.prompts import completion_prompt, template_for_model

    opts, _ = parse_options(INIT)
    doc = Document(URI, text, 1, "python")
    ctx = build_context(doc, len(text), None, opts.completion.budgets())
    prompt, stop = completion_prompt(ctx, template_for_model("gemma-3-270m"))
    if sock is None:
        os.environ["GEMMA_LSP_RUNTIME_DIR"] = str(RUNTIME)
    ec = EngineClient(socket_path=sock, autostart=False)
    try:
        handle = ec.generate(prompt, max_tokens=opts.completion.max_tokens, stop=stop)
        out = ""
        while True:
            msg = handle.next(120)
            if isinstance(msg, Token):
                out += msg.text
                if should_stop_early(out, ctx, opts.completion.max_lines):
                    handle.cancel()
                    break
            else:
                assert isinstance(msg, Done)
                out += msg.tail
                break
    finally:
        ec.close()
    return (finalize([out], ctx, opts.completion.max_lines) or [""])[0]


async def test_inline_completion_is_the_engines_completion(client: LanguageClient) -> None:
    open_doc(client)
    res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
    assert res is not None and len(res.items) == 1
    text = res.items[0].insert_text
    assert isinstance(text, str) and text.strip()
    assert text == await asyncio.to_thread(expected_completion, CODE)


async def test_latency_budget_answers_a_prefix_then_the_rest(client: LanguageClient) -> None:
    open_doc(client)
    settings = {"gemma": {"completion": {**INIT["gemma"]["completion"], "latencyBudgetMs": 1}}}
    client.workspace_did_change_configuration(t.DidChangeConfigurationParams(settings=settings))
    res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
    assert res is not None and res.items
    quick = str(res.items[0].insert_text)
    full = await asyncio.to_thread(expected_completion, CODE)
    assert quick and full.startswith(quick)


async def test_typed_ahead_reuses_the_suggestion(client: LanguageClient) -> None:
    open_doc(client)
    pos = end_of(CODE)
    first = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=pos,
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic)))
    assert first is not None and first.items
    suggestion = str(first.items[0].insert_text)
    typed = suggestion[:2]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        [t.TextDocumentContentChangePartial(range=t.Range(pos, pos), text=typed)]))
    after = t.Position(pos.line, pos.character + len(typed))
    t0 = time.perf_counter()
    second = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=after,
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic)))
    assert second is not None and second.items
    assert second.items[0].insert_text == suggestion[2:]
    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    assert status["state"] == "running" and (time.perf_counter() - t0) < 60


async def test_completion_fallback_carries_the_suggestion(client: LanguageClient) -> None:
    open_doc(client)
    res = await client.text_document_completion_async(t.CompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE)))
    assert res is not None
    items = res.items if isinstance(res, t.CompletionList) else res
    assert len(items) == 1 and items[0].text_edit is not None
    assert items[0].text_edit.new_text.strip()


def _range(l0: int, l1: int) -> t.Range:
    return t.Range(t.Position(l0, 0), t.Position(l1, 0))


BUGGY_URI = "file:///tmp/e2e/stats.py"
BUGGY = "import math\n\n\ndef mean(xs):\n    return sum(xs) / len(x)\n"


def _data(action: t.CodeAction | t.Command) -> dict[str, Any]:
    """An action's data: lazy actions carry it, command actions pass it to their command."""
    assert isinstance(action, t.CodeAction)
    if action.data is not None:
        return dict(action.data)
    assert action.command is not None and action.command.arguments
    return dict(action.command.arguments[0])


def _resolves(client: LanguageClient) -> bool:
    caps = client.caps  # type: ignore[attr-defined]
    action = caps.text_document.code_action
    return bool(action and action.resolve_support and "edit" in action.resolve_support.properties)


async def _wait_for(cond: Any, timeout: float = 900) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := cond():
            return value
        await asyncio.sleep(0.05)
    return cond()


async def _edit_of(client: LanguageClient, action: t.CodeAction,
                   may_be_unchanged: bool = False) -> t.WorkspaceEdit | None:
    """The edit an action makes, as the editor gets it: every action carries its command
    (resolving it, as VS Code, Neovim and Helix do, is instant and changes nothing), which
    answers at once; the edit then arrives as workspace/applyEdit."""
    if _resolves(client):
        t0 = time.perf_counter()
        resolved = await client.code_action_resolve_async(action)
        assert time.perf_counter() - t0 < 1.0
        assert resolved.edit is None and resolved.command == action.command
    assert action.command is not None
    before = len(client.applied_edits)  # type: ignore[attr-defined]
    warned = len(client.messages)
    t0 = time.perf_counter()
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command=action.command.command, arguments=action.command.arguments))
    answered = time.perf_counter() - t0
    assert answered < 1.0, answered  # long work never holds the request
    assert res["started"] == action.command.command
    assert len(client.applied_edits) == before  # type: ignore[attr-defined]
    applied = await _wait_for(
        lambda: client.applied_edits[before:]  # type: ignore[attr-defined]
        or [m for m in client.messages[warned:] if m.type == t.MessageType.Warning])
    if (may_be_unchanged and isinstance(applied[0], t.ShowMessageParams)
            and NO_CHANGE in applied[0].message):
        return None  # the model saw nothing to change: said so, nothing applied
    assert isinstance(applied[0], t.ApplyWorkspaceEditParams), applied[0]
    assert len(applied) == 1
    if res["token"] is not None:  # progress on the server's token, begun and ended
        kinds = [type(r) for r in client.progress_reports[res["token"]]]
        assert kinds[0] is t.WorkDoneProgressBegin and kinds[-1] is t.WorkDoneProgressEnd
    return applied[0].edit


async def test_code_actions_resolve_to_applicable_edits(client: LanguageClient) -> None:
    open_doc(client)
    open_doc(client, BUGGY, uri=BUGGY_URI)
    actions = await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(URI), range=_range(8, 12),
        context=t.CodeActionContext(diagnostics=[])))
    diag = t.Diagnostic(range=_range(4, 5), message="undefined name 'x'",
                        severity=t.DiagnosticSeverity.Error)
    fixes = await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(BUGGY_URI), range=_range(4, 4),
        context=t.CodeActionContext(diagnostics=[diag])))
    assert actions is not None and fixes is not None
    assert {_data(a)["kind"] for a in actions} == {"explain", "refactor", "docstring"}
    fixes = [a for a in fixes if _data(a)["kind"] == "fix"]
    assert len(fixes) == 1
    lines = CODE.split("\n")
    for action in [*actions, *fixes]:
        assert isinstance(action, t.CodeAction) and action.edit is None  # listing is instant
        # the command is there before any resolve (Helix 25.01 runs the listed action's)
        assert action.command is not None
        assert action.command.command == f"gemma.{_data(action)['kind']}"
        if _data(action)["kind"] == "explain":
            continue
        # a base model may find the buggy line fine as it is (the Fix prompt shows it no
        # answer to copy): that is a refusal, told to the user, with nothing applied
        edit = await _edit_of(client, action, may_be_unchanged=_data(action)["kind"] == "fix")
        if edit is None:
            continue
        assert edit.document_changes
        change = edit.document_changes[0]
        assert isinstance(change, t.TextDocumentEdit)
        assert change.text_document.version == 1
        (text_edit,) = change.edits
        assert isinstance(text_edit, t.TextEdit)
        assert 0 <= text_edit.range.start.line <= text_edit.range.end.line <= len(lines)


async def test_stale_version_is_refused(client: LanguageClient) -> None:
    open_doc(client)
    (action,) = [a for a in await client.text_document_code_action_async(t.CodeActionParams(
        text_document=t.TextDocumentIdentifier(URI), range=_range(8, 12),
        context=t.CodeActionContext(diagnostics=[]))) or []
        if _data(a)["kind"] == "refactor"]
    client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        [t.TextDocumentContentChangePartial(range=_range(0, 0), text="# edited\n")]))
    with pytest.raises(Exception, match="changed since"):
        await _edit_of(client, action)


EXPLAIN_RANGE = {"start": {"line": 8, "character": 0}, "end": {"line": 12, "character": 0}}


async def test_explain_answers_at_once_and_shows_the_text(client: LanguageClient) -> None:
    """Without a workDoneToken (Helix, eglot, VS Code's code actions) Explain answers at once;
    the text streams as progress on a server-created token, then arrives as a message (or a
    document when it is long and the client can show one)."""
    open_doc(client)
    t0 = time.perf_counter()
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, EXPLAIN_RANGE]))
    assert time.perf_counter() - t0 < 1.0
    assert res["started"] == "gemma.explain"
    shown = await _wait_for(lambda: [m for m in client.messages
                                     if m.type == t.MessageType.Info] or client.shown_documents)
    if isinstance(shown[0], t.ShowDocumentParams):
        caps = client.caps  # type: ignore[attr-defined]
        assert caps.window.show_document and caps.window.show_document.support
        text = Path(shown[0].uri.removeprefix("file://")).read_text().strip()
    else:
        text = shown[0].message.strip()
    assert text and "circle" not in text  # not the prompt's example
    caps = client.caps  # type: ignore[attr-defined]
    if caps.window and caps.window.work_done_progress:
        reports = [r for r in client.progress_reports[res["token"]]
                   if isinstance(r, t.WorkDoneProgressReport)]
        assert reports and reports[-1].message.strip() == text  # the text so far, streamed
    else:
        assert res["token"] is None and not client.progress_reports


async def test_explain_with_a_client_token_answers_the_text(client: LanguageClient) -> None:
    """Our plugins pass a workDoneToken for Explain: progress on it, the text as the answer."""
    open_doc(client)
    result = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, EXPLAIN_RANGE], work_done_token="mine-1"))
    assert isinstance(result, str) and result.strip()
    reports = [r for r in client.progress_reports.get("mine-1", [])
               if isinstance(r, t.WorkDoneProgressReport)]
    caps = client.caps  # type: ignore[attr-defined]
    if caps.window and caps.window.work_done_progress:
        assert len(reports) >= 2  # the text so far, streamed
        assert all(r.message for r in reports)
        assert reports[-1].message.strip() == result
        assert len(reports[0].message) < len(reports[-1].message)
    assert not [m for m in client.messages if m.type == t.MessageType.Info]  # not twice


async def test_refactor_command_applies_a_versioned_edit(client: LanguageClient) -> None:
    open_doc(client)
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.refactor",
        arguments=[URI, {"start": {"line": 8, "character": 0}, "end": {"line": 12, "character": 0}},
                   "use a guard clause"]))
    assert res["started"] == "gemma.refactor"
    (applied,) = await _wait_for(lambda: client.applied_edits)  # type: ignore[attr-defined]
    change = applied.edit.document_changes[0]
    assert change.text_document.version == 1


async def _queue_drains(client: LanguageClient) -> None:
    for _ in range(50):  # the engine's queue drains: nothing keeps decoding for us
        status = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.status"))
        if not status.get("queue"):
            break
        await asyncio.sleep(0.2)
    assert not status.get("queue")


async def _begun(client: LanguageClient, token: str) -> None:
    """Until the command's progress `token` has begun (its work is running)."""
    await _wait_for(lambda: [r for r in client.progress_reports.get(token, [])
                             if isinstance(r, t.WorkDoneProgressBegin)], 60)


@pytest.mark.parametrize("how", ["gemma.cancel", "progress"])
async def test_cancel_stops_engine_work(client: LanguageClient, how: str) -> None:
    open_doc(client)
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, {"start": {"line": 0, "character": 0},
                                                  "end": {"line": 14, "character": 0}}]))
    # cancel once the work has begun, not after a fixed wait: on a warm prompt cache the whole
    # explanation can take under a second (CI's quantized engine finished before a 1 s sleep)
    if res["token"] is not None:
        await _begun(client, res["token"])
    if how == "progress":
        if res["token"] is None:
            pytest.skip("the client shows no progress, so it cannot cancel one")
        client.window_work_done_progress_cancel(t.WorkDoneProgressCancelParams(res["token"]))
    else:
        cancelled = await client.workspace_execute_command_async(
            t.ExecuteCommandParams(command="gemma.cancel"))
        assert cancelled["cancelled"] == 1
    if res["token"] is not None:  # its progress ends, saying so
        ends = await _wait_for(lambda: [r for r in client.progress_reports[res["token"]]
                                        if isinstance(r, t.WorkDoneProgressEnd)], 60)
        assert "cancel" in (ends[0].message or "")
    await _queue_drains(client)
    assert not [m for m in client.messages if m.type == t.MessageType.Info]  # no explanation


async def test_cancel_stops_work_a_client_waits_for(client: LanguageClient) -> None:
    open_doc(client)
    task = asyncio.ensure_future(client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.explain", arguments=[URI, {"start": {"line": 0, "character": 0},
                                                  "end": {"line": 14, "character": 0}}],
        work_done_token="mine-2")))
    await _begun(client, "mine-2")  # the work is registered before its progress begins
    cancelled = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.cancel"))
    assert cancelled["cancelled"] == 1
    with pytest.raises(Exception, match="[Cc]ancel"):
        await task  # the explain request ends with a cancellation error
    await _queue_drains(client)


async def test_bad_inputs_keep_the_server_serving(client: LanguageClient) -> None:
    open_doc(client)
    # a position past the end is clamped
    far = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=t.Position(9999, 9999),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
    assert far is not None
    # an unknown document gives no result
    none = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier("file:///nope.py"), position=t.Position(0, 0),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
    assert none is None or not none.items
    # binary and huge files are skipped
    open_doc(client, "abc\x00def", uri="file:///tmp/e2e/blob.bin")
    open_doc(client, "x = 1\n" * 3_500_000, uri="file:///tmp/e2e/huge.py")
    for uri in ("file:///tmp/e2e/blob.bin", "file:///tmp/e2e/huge.py"):
        res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(uri), position=t.Position(0, 3),
            context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
        assert res is None or not res.items
    # unknown commands are an error reply
    with pytest.raises(Exception, match="not defined"):
        await client.workspace_execute_command_async(t.ExecuteCommandParams(command="gemma.nope"))
    # and the server still completes
    again = await client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))
    assert again is not None and again.items


async def test_dead_engine_is_a_clear_error_and_the_next_request_restarts_it(
    client: LanguageClient,
) -> None:
    open_doc(client)
    status = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    os.kill(int(status["pid"]), 9)
    params = t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked))
    first = await client.text_document_inline_completion_async(params)
    # answered (an empty result while the engine is down or starting, or a result from a new
    # engine: a request waits at most backend.START_WAIT_S for a starting one)
    deadline = time.monotonic() + 120
    while True:  # the engine is started again on demand
        res = await client.text_document_inline_completion_async(params)
        if (res is not None and res.items) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert res is not None and res.items
    after = await client.workspace_execute_command_async(
        t.ExecuteCommandParams(command="gemma.status"))
    assert after["state"] == "running" and after["pid"] != status["pid"]
    if not (first is not None and first.items):
        assert any("engine" in m.message.lower() for m in client.messages)


async def test_the_server_over_tcp(tmp_path: Path) -> None:
    """`gemma-lsp --tcp HOST:PORT`: the same server for clients that connect to a port."""
    from pygls.lsp.client import LanguageClient as PlainClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gemma_lsp", "--tcp", f"127.0.0.1:{port}", env=ENV,
        stdout=log.open("wb"), stderr=asyncio.subprocess.STDOUT)
    client = PlainClient("tcp-test", "1")
    try:
        for _ in range(200):
            try:
                await client.start_tcp("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.05)
        caps = t.ClientCapabilities(text_document=t.TextDocumentClientCapabilities(
            inline_completion=t.InlineCompletionClientCapabilities()))
        await client.initialize_async(t.InitializeParams(
            capabilities=caps, initialization_options=INIT, root_uri="file:///tmp"))
        client.initialized(t.InitializedParams())
        client.text_document_did_open(t.DidOpenTextDocumentParams(
            t.TextDocumentItem(uri=URI, language_id="python", version=1, text=CODE)))
        res = await client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(URI), position=end_of(CODE),
            context=t.InlineCompletionContext(t.InlineCompletionTriggerKind.Invoked)))
        assert res is not None and str(res.items[0].insert_text).strip()
        await client.shutdown_async(None)
        client.exit(None)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        await client.stop()
    assert "Traceback" not in log.read_text()  # `exit` ends it quietly


@pytest_lsp.fixture(
    config=ClientServerConfig(server_command=[sys.executable, "-m", "gemma_lsp"], server_env=ENV),
)
async def inline_client(lsp_client: LanguageClient) -> Any:
    """VS Code as it is today: it has both inline completion and the suggest widget."""
    registered: list[str] = []
    lsp_client.registered = registered  # type: ignore[attr-defined]

    @lsp_client.feature(t.CLIENT_REGISTER_CAPABILITY)
    def register(params: t.RegistrationParams) -> None:
        registered.extend(r.method for r in params.registrations)

    caps = client_capabilities("visual-studio-code")
    assert caps.text_document is not None
    caps.text_document.inline_completion = t.InlineCompletionClientCapabilities()
    result = await lsp_client.initialize_session(
        t.InitializeParams(capabilities=caps, initialization_options=INIT, root_uri="file:///tmp")
    )
    lsp_client.init_result = result  # type: ignore[attr-defined]
    yield
    await lsp_client.shutdown_session()


async def test_a_client_with_inline_completion_gets_one_suggestion_not_two(
    inline_client: LanguageClient,
) -> None:
    open_doc(inline_client)
    pos = end_of(CODE)
    # no completion provider is advertised, so the editor shows the suggestion once, as
    # ghost text (and VS Code's suggest widget cannot cancel the inline request)
    assert inline_client.init_result.capabilities.completion_provider is None  # type: ignore
    res = await inline_client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=pos,
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Automatic)))
    assert res is not None and res.items and str(res.items[0].insert_text).strip()
    # `classic: always` registers the provider; both requests for one keystroke then share
    # one generation and carry the same suggestion
    settings = {"gemma": {"completion": {**INIT["gemma"]["completion"], "classic": "always"}}}
    inline_client.workspace_did_change_configuration(
        t.DidChangeConfigurationParams(settings=settings))
    inline_client.text_document_did_change(t.DidChangeTextDocumentParams(
        t.VersionedTextDocumentIdentifier(uri=URI, version=2),
        [t.TextDocumentContentChangePartial(range=t.Range(pos, pos), text="\n")]))
    pos2 = t.Position(pos.line + 1, 0)
    for _ in range(100):  # the registration reaches the client
        if t.TEXT_DOCUMENT_COMPLETION in inline_client.registered:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.05)
    assert inline_client.registered == [t.TEXT_DOCUMENT_COMPLETION]  # type: ignore[attr-defined]
    res2, menu2 = await asyncio.gather(
        inline_client.text_document_inline_completion_async(t.InlineCompletionParams(
            text_document=t.TextDocumentIdentifier(URI), position=pos2,
            context=t.InlineCompletionContext(
                trigger_kind=t.InlineCompletionTriggerKind.Automatic))),
        inline_client.text_document_completion_async(t.CompletionParams(
            text_document=t.TextDocumentIdentifier(URI), position=pos2)))
    assert res2 is not None and res2.items
    items = menu2.items if isinstance(menu2, t.CompletionList) else (menu2 or [])
    assert items and items[0].text_edit is not None
    assert items[0].text_edit.new_text.endswith(str(res2.items[0].insert_text))
