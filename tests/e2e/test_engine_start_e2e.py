"""The engine's start as the editor sees it, through the real server over stdio: a start
that fails is an error message with the engine's own reason within 2 s of its failure,
requests answer empty at once, and the next request after the fix starts it; a first start
(the engine-ready copy being built) shows `$/progress`, or messages where the client has no
work-done progress."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from engine import protocol as P
from gemma_lsp.engine_client import START_RETRY_S
from tests.engine.tiny import tiny_config, tiny_tensors, tiny_vocab, write_tiny_gguf

ROOT = Path(tempfile.gettempdir()) / f"glsp-start-{os.getpid()}"
FAIL_RUN, TINY_RUN, TINY_CACHE = ROOT / "fail-run", ROOT / "tiny-run", ROOT / "tiny-cache"
JUNK, TINY = ROOT / "model.gguf", ROOT / "tiny.gguf"
URI = "file:///tmp/e2e/start.py"
CODE = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    "
FAST = {"debounceMs": 0, "maxTokens": 8, "warmAfterMs": 0, "latencyBudgetMs": 0}


def _env(run: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run), PYTHONUNBUFFERED="1", **extra)


@pytest.fixture(scope="module", autouse=True)
def files() -> Iterator[None]:
    ROOT.mkdir(mode=0o700, exist_ok=True)
    JUNK.write_bytes(b"GGUF" + os.urandom(8192))  # a corrupt model file
    cfg = tiny_config(vocab_size=len(tiny_vocab()[0]), context_length=4096)
    write_tiny_gguf(str(TINY), cfg, tiny_tensors(cfg))
    yield
    subprocess.run(["pkill", "-f", str(ROOT)], check=False)  # the engines the servers started
    shutil.rmtree(ROOT, ignore_errors=True)


def _complete(client: LanguageClient) -> Any:
    return client.text_document_inline_completion_async(t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(URI), position=t.Position(5, 4),
        context=t.InlineCompletionContext(trigger_kind=t.InlineCompletionTriggerKind.Invoked)))


def _open(client: LanguageClient) -> None:
    client.text_document_did_open(t.DidOpenTextDocumentParams(
        t.TextDocumentItem(uri=URI, language_id="python", version=1, text=CODE)))


@pytest_lsp.fixture(config=ClientServerConfig(
    server_command=[sys.executable, "-m", "gemma_lsp"], server_env=_env(FAIL_RUN)))
async def failing(lsp_client: LanguageClient) -> Any:
    await lsp_client.initialize_session(t.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri="file:///tmp",
        initialization_options={"gemma": {"completion": FAST,
                                          "engine": {"model": str(JUNK)}}}))
    yield
    await lsp_client.shutdown_session()


async def test_a_failed_start_is_shown_at_once_and_the_next_request_retries(
    failing: LanguageClient,
) -> None:
    _open(failing)
    t0 = time.monotonic()
    first = asyncio.ensure_future(_complete(failing))
    while not any("cannot start" in m.message for m in failing.messages):
        assert time.monotonic() - t0 < 120, [m.message for m in failing.messages]
        await asyncio.sleep(0.02)
    shown = time.time()  # within 20 ms of its arrival
    msg = next(m for m in failing.messages if "cannot start" in m.message)
    res = await asyncio.wait_for(first, 30)
    assert res is None or not res.items
    assert msg.type == t.MessageType.Error
    assert str(JUNK) in msg.message and "not a readable GGUF" in msg.message
    status = P.read_status(FAIL_RUN / "engine.sock")
    assert status is not None and status["state"] == "failed"
    assert shown - status["time"] < 2.0  # in the editor within 2 s of the engine's failure
    # while the cause lasts, requests answer empty at once, with no new popup
    t1 = time.monotonic()
    again = await asyncio.wait_for(_complete(failing), 30)
    assert (again is None or not again.items) and time.monotonic() - t1 < 1.0
    assert sum("cannot start" in m.message for m in failing.messages) == 1
    # fixed: the next request starts the engine, and completions come back
    shutil.copyfile(os.environ.get("GEMMA_LSP_TEST_GGUF") or _embedded(), JUNK)
    await asyncio.sleep(START_RETRY_S)
    deadline = time.monotonic() + 180
    while True:
        res = await asyncio.wait_for(_complete(failing), 60)
        if res is not None and res.items:
            break
        assert time.monotonic() < deadline, [m.message for m in failing.messages]
        await asyncio.sleep(0.5)
    assert str(res.items[0].insert_text)
    status = P.read_status(FAIL_RUN / "engine.sock")
    assert status is not None and status["state"] == "ready"


def _embedded() -> str:
    from engine.weights import embedded_model_path

    return str(embedded_model_path())


def _tiny_config(spec: str) -> ClientServerConfig:
    return ClientServerConfig(server_command=[sys.executable, "-m", "gemma_lsp"],
                              server_env=_env(TINY_RUN / spec, GEMMA_LSP_CACHE=str(
                                  TINY_CACHE / spec)))


async def _first_start(client: LanguageClient, caps: t.ClientCapabilities) -> None:
    await client.initialize_session(t.InitializeParams(
        capabilities=caps, root_uri="file:///tmp",
        initialization_options={"gemma": {"completion": FAST,
                                          "engine": {"model": str(TINY)}}}))
    _open(client)
    await asyncio.wait_for(_complete(client), 60)  # starts the engine: a first build


@pytest_lsp.fixture(config=_tiny_config("progress"))
async def with_progress(lsp_client: LanguageClient) -> Any:
    yield
    await lsp_client.shutdown_session()


async def test_a_first_start_shows_work_done_progress(with_progress: LanguageClient) -> None:
    await _first_start(with_progress, client_capabilities("visual-studio-code"))
    deadline = time.monotonic() + 120
    while True:
        reports = [v for tok, vs in with_progress.progress_reports.items()
                   if str(tok).startswith("gemma-engine-") for v in vs]
        if reports and isinstance(reports[-1], t.WorkDoneProgressEnd):
            break
        assert time.monotonic() < deadline, reports
        await asyncio.sleep(0.1)
    begin = reports[0]
    assert isinstance(begin, t.WorkDoneProgressBegin) and "Gemma engine" in begin.title
    steps = " ".join(str(getattr(r, "message", "")) for r in reports)
    assert "dequantizing" in steps or "engine-ready" in steps, steps
    assert reports[-1].message == "ready"


@pytest_lsp.fixture(config=_tiny_config("messages"))
async def without_progress(lsp_client: LanguageClient) -> Any:
    yield
    await lsp_client.shutdown_session()


async def test_a_client_without_progress_is_told_by_messages(
    without_progress: LanguageClient,
) -> None:
    caps = client_capabilities("emacs")
    caps.window = t.WindowClientCapabilities(work_done_progress=False)
    await _first_start(without_progress, caps)
    deadline = time.monotonic() + 120
    while not any("ready" in m.message for m in without_progress.messages):
        assert time.monotonic() < deadline, [m.message for m in without_progress.messages]
        await asyncio.sleep(0.1)
    texts = [m.message for m in without_progress.messages]
    assert any("starting" in m for m in texts) and without_progress.progress_reports == {}
