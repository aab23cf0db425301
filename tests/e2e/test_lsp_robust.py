"""The real server process over stdio against a hostile client: raw malformed frames, frame
bounds, cancellation storms (no engine needed: autostart is off), and document sync checked
against an independent client model by reading the server's copy back through
`gemma.debug.document` (the `--debug-commands` flag)."""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.lsp import lsp_reference as ref

RUNTIME = Path(tempfile.gettempdir()) / f"glsp-robust-{os.getpid()}"
ENV = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(RUNTIME), PYTHONUNBUFFERED="1")
INIT = {"gemma": {"engine": {"autostart": False},
                  "completion": {"debounceMs": 0, "warmAfterMs": 0}}}
ANSWER_S = 10.0  # how long a test waits for an answer (the server answers in milliseconds)


def frame(body: bytes | dict[str, Any], length: int | None = None) -> bytes:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return b"Content-Length: %d\r\n\r\n" % (len(raw) if length is None else length) + raw


class RawServer:
    """`python -m gemma_lsp` on pipes; its messages are parsed on a thread."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_lsp", "--debug-commands", "--log-file", str(log),
             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV)
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            header = b""
            while not header.endswith(b"\r\n\r\n"):
                ch = out.read(1)
                if not ch:
                    return
                header += ch
            n = int(header.split(b":", 1)[1].split(b"\r\n", 1)[0])
            self.inbox.put(json.loads(out.read(n)))

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait(self, match: Any, timeout: float = ANSWER_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for m in self.seen:
            if match(m):
                self.seen.remove(m)
                return m
        while True:
            try:
                m = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no answer from the server") from None
            if match(m):
                return m
            self.seen.append(m)

    def reply(self, msg_id: Any) -> dict[str, Any]:
        return self.wait(lambda m: m.get("id") == msg_id and "method" not in m)

    def request(self, msg_id: Any, method: str, params: Any) -> dict[str, Any]:
        self.send(frame({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}))
        return self.reply(msg_id)

    def notify(self, method: str, params: Any) -> None:
        self.send(frame({"jsonrpc": "2.0", "method": method, "params": params}))

    def document(self, uri: str) -> dict[str, Any] | None:
        r = self.request(f"doc-{time.monotonic_ns()}", "workspace/executeCommand",
                         {"command": "gemma.debug.document", "arguments": [uri]})
        return r["result"]  # type: ignore[no-any-return]

    def close(self) -> int:
        try:
            self.request("bye", "shutdown", None)
            self.notify("exit", None)
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawServer]:
    server = RawServer(tmp_path / "server.log", "--max-frame-mb", "1")
    r = server.request(0, "initialize", {"processId": None, "rootUri": None, "capabilities": {},
                                         "initializationOptions": INIT})
    assert "result" in r
    server.notify("initialized", {})
    yield server
    if server.proc.poll() is None:
        server.proc.kill()


URI = "file:///tmp/robust/a.py"
POS = {"line": 0, "character": 0}


def test_every_malformed_request_is_answered_and_the_server_keeps_serving(
    raw: RawServer,
) -> None:
    raw.notify("textDocument/didOpen", {"textDocument": {
        "uri": URI, "languageId": "python", "version": 1, "text": "x = 1\n"}})
    doc = {"uri": URI}
    invalid_params = [
        ("textDocument/inlineCompletion", {"textDocument": doc, "context": {"triggerKind": 1},
                                           "position": {"line": -1, "character": 0}}),
        ("textDocument/inlineCompletion", {"textDocument": doc, "context": {"triggerKind": 1},
                                           "position": {"line": 0, "character": 2**31}}),
        ("textDocument/inlineCompletion", {"textDocument": doc, "position": POS}),
        ("textDocument/completion", {"textDocument": doc, "position": None}),
        ("textDocument/completion", {"position": POS}),
        ("textDocument/completion", None),
        ("textDocument/completion", [doc]),
        ("textDocument/codeAction", {"textDocument": doc, "range": {"start": POS, "end": POS}}),
        ("codeAction/resolve", {"data": {"kind": "refactor"}}),
        ("workspace/executeCommand", {"arguments": [URI]}),
    ]
    for i, (method, params) in enumerate(invalid_params):
        r = raw.request(i + 1, method, params)
        assert r["error"]["code"] == -32602, (method, params, r)
    raw.send(frame({"jsonrpc": "2.0", "id": 50, "method": "textDocument/completion"}))
    assert raw.reply(50)["error"]["code"] == -32602  # no params at all
    raw.send(frame({"jsonrpc": "1.0", "id": 51, "method": "shutdown"}))
    assert raw.reply(51)["error"]["code"] == -32600
    for body, code in [(b'{"jsonrpc": "2.0", "id": 52, "method": "x", "params": "\xc3\x28"}',
                        -32700),
                       (json.dumps([{"jsonrpc": "2.0", "id": 53, "method": "shutdown"}])
                        .encode(), -32600),
                       (b"[" * 100_000, -32700),
                       (b'{"jsonrpc": "2.0", "id": 54, "method": "shutdo', -32700)]:
        raw.send(frame(body))
        r = raw.reply(None)
        assert r["error"]["code"] == code, (body[:40], r)
    assert raw.document(URI) == {"uri": URI, "version": 1, "text": "x = 1\n",
                                 "encoding": "utf-16"}
    assert raw.close() == 0
    log = raw.log.read_text()
    assert "Traceback" not in log and "MemoryError" not in log


def test_frame_bounds_and_wrong_content_lengths_never_wedge_the_stream(raw: RawServer) -> None:
    def status_request(msg_id: int) -> bytes:
        return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "workspace/executeCommand",
                           "params": {"command": "gemma.debug.document",
                                      "arguments": [URI]}}).encode()

    raw.send(b"Content-Length: 1000000000000\r\n\r\n{}")
    assert "limit" in raw.reply(None)["error"]["message"]
    raw.send(frame(status_request(1)))
    assert raw.reply(1)["result"] is None  # answered: the 1e12 frame did not swallow it
    big = json.dumps({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {
        "textDocument": {"uri": URI, "languageId": "python", "version": 1,
                         "text": "x" * (2 << 20)}}}).encode()
    raw.send(frame(big))  # 2 MB over the 1 MB --max-frame-mb of this server
    assert "limit" in raw.reply(None)["error"]["message"]
    raw.send(frame(status_request(2)))
    assert raw.reply(2)["result"] is None
    body = status_request(3)
    raw.send(frame(body, len(body) - 100))  # too small: the rest is found and used
    assert "result" in raw.reply(3)
    body = status_request(4)
    raw.send(frame(body, len(body) + 100))  # too large: answered when the next header comes
    raw.send(frame(status_request(5)))
    assert "result" in raw.reply(4) and "result" in raw.reply(5)
    assert raw.proc.poll() is None
    assert raw.close() == 0
    assert "Traceback" not in raw.log.read_text()


def test_a_cancellation_storm_is_normal_traffic(raw: RawServer) -> None:
    raw.notify("textDocument/didOpen", {"textDocument": {
        "uri": URI, "languageId": "python", "version": 1, "text": "def f(x):\n    return "}})
    storm = b""
    for i in range(300):
        # requests that finish at once (no engine), interleaved with cancels for them, for
        # finished ones and for ids never used
        storm += frame({"jsonrpc": "2.0", "id": 1000 + i, "method": "workspace/executeCommand",
                        "params": {"command": "gemma.explain", "arguments": [
                            URI, {"start": POS, "end": {"line": 1, "character": 0}}]}})
        storm += frame({"jsonrpc": "2.0", "id": 5000 + i, "method": "textDocument/completion",
                        "params": {"textDocument": {"uri": URI},
                                   "position": {"line": 1, "character": 11}}})
        for target in (1000 + i, 5000 + i, i, f"never-{i}", 999_999):
            storm += frame({"jsonrpc": "2.0", "method": "$/cancelRequest",
                            "params": {"id": target}})
    raw.send(storm)
    for i in range(300):  # every request is answered (a result, its error, or cancelled)
        raw.reply(1000 + i)
        raw.reply(5000 + i)
    assert raw.document(URI) is not None
    assert raw.close() == 0
    log = raw.log.read_text()
    assert "Traceback" not in log and "Cancel notification for unknown" not in log


# ---------------------------------------------------------------------- document sync


def _client(encoding: str) -> Any:
    @pytest_lsp.fixture(config=ClientServerConfig(
        server_command=[sys.executable, "-m", "gemma_lsp", "--debug-commands"], server_env=ENV))
    async def client(lsp_client: LanguageClient) -> Any:
        caps = t.ClientCapabilities(general=t.GeneralClientCapabilities(
            position_encodings=[t.PositionEncodingKind(encoding)]))
        result = await lsp_client.initialize_session(t.InitializeParams(
            capabilities=caps, initialization_options=INIT))
        assert result.capabilities.position_encoding == encoding
        yield
        await lsp_client.shutdown_session()

    return client


utf16_client = _client("utf-16")
utf8_client = _client("utf-8")
utf32_client = _client("utf-32")


async def _server_text(client: LanguageClient, uri: str) -> dict[str, Any]:
    res = await client.workspace_execute_command_async(t.ExecuteCommandParams(
        command="gemma.debug.document", arguments=[uri]))
    assert res is not None
    return dict(res)


def _change(uri: str, version: int, changes: list[dict[str, Any]]) -> Any:
    return t.DidChangeTextDocumentParams(
        text_document=t.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[t.TextDocumentContentChangePartial(
            range=t.Range(t.Position(**c["range"]["start"]), t.Position(**c["range"]["end"])),
            text=c["text"]) for c in changes])


async def _random_sessions(client: LanguageClient, encoding: str, seed: int) -> None:
    rnd = random.Random(seed)
    for n in range(12):
        uri = f"file:///tmp/robust/doc{n}.txt"
        text = ref.random_text(rnd, rnd.randrange(0, 80))
        client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
            uri=uri, language_id="plaintext", version=1, text=text)))
        for version in range(2, 14):
            change = ref.random_change(rnd, text, encoding)
            text = ref.apply_edit(text, change["range"], change["text"], encoding)
            client.text_document_did_change(_change(uri, version, [change]))
        got = await _server_text(client, uri)
        assert got == {"uri": uri, "version": 13, "text": text, "encoding": encoding}


async def test_random_edits_through_the_real_server_utf16(utf16_client: LanguageClient) -> None:
    await _random_sessions(utf16_client, "utf-16", 16)
    # the example, and 1,000 edits sent without waiting
    uri = "file:///tmp/robust/ff.py"
    text = "import os\n\x0c\ndef f(x):\n    b = x + 1  # one more\n    return b * x\n"
    utf16_client.text_document_did_open(t.DidOpenTextDocumentParams(t.TextDocumentItem(
        uri=uri, language_id="python", version=1, text=text)))
    edit = {"range": {"start": {"line": 3, "character": 13},
                      "end": {"line": 3, "character": 13}}, "text": "0"}
    utf16_client.text_document_did_change(_change(uri, 2, [edit]))
    text = ref.apply_edit(text, edit["range"], "0", "utf-16")
    assert (await _server_text(utf16_client, uri))["text"] == text
    rnd = random.Random(1000)
    for version in range(3, 1003):
        change = ref.random_change(rnd, text, "utf-16")
        text = ref.apply_edit(text, change["range"], change["text"], "utf-16")
        utf16_client.text_document_did_change(_change(uri, version, [change]))
    got = await _server_text(utf16_client, uri)
    assert got["text"] == text and got["version"] == 1002
    assert not [m for m in utf16_client.messages if m.type == t.MessageType.Error]


async def test_random_edits_through_the_real_server_utf8(utf8_client: LanguageClient) -> None:
    await _random_sessions(utf8_client, "utf-8", 8)


async def test_random_edits_through_the_real_server_utf32(utf32_client: LanguageClient) -> None:
    await _random_sessions(utf32_client, "utf-32", 32)
