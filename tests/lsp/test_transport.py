"""The transport: frame bounds and resynchronisation (FrameReader), and one answer per request
for every malformed message (GemmaProtocol.receive, in-process)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gemma_lsp.transport import BadFrame, Frame, FrameReader, read_loop
from tests.lsp.inproc import InProcess

PARSE_ERROR, INVALID_REQUEST, INVALID_PARAMS = -32700, -32600, -32602


def frame(body: bytes | str | dict[str, Any], length: int | None = None) -> bytes:
    raw = json.dumps(body).encode() if isinstance(body, dict) else (
        body.encode() if isinstance(body, str) else body)
    return b"Content-Length: %d\r\n\r\n" % (len(raw) if length is None else length) + raw


class Source:
    """Bytes handed over in the given chunks; records the reader's largest buffer."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.reader: FrameReader | None = None
        self.peak = 0

    async def read_some(self, n: int) -> bytes:
        if self.reader is not None:
            self.peak = max(self.peak, len(self.reader._buf))
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            self.chunks.insert(0, chunk[n:])
            chunk = chunk[:n]
        return chunk


async def frames(*chunks: bytes, limit: int = 1 << 20) -> tuple[list[Any], Source]:
    src = Source(*chunks)
    reader = FrameReader(src.read_some, limit)
    src.reader = reader
    out = []
    while (f := await reader.next()) is not None:
        out.append(f)
    return out, src


MSG = {"jsonrpc": "2.0", "id": 1, "method": "shutdown"}
BODY = json.dumps(MSG).encode()


async def test_frames_split_anywhere_come_out_whole() -> None:
    data = frame(MSG) + b"Content-Length: 2\r\nContent-Type: x\r\n\r\n{}" + frame(MSG)
    out, _ = await frames(*[data[i:i + 1] for i in range(len(data))])
    assert out == [Frame(BODY), Frame(b"{}"), Frame(BODY)]


async def test_an_oversized_frame_is_reported_then_skipped_in_chunks() -> None:
    big = b"x" * (3 << 20)
    out, src = await frames(frame(big), frame(MSG), limit=1 << 20)
    assert isinstance(out[0], BadFrame) and "limit" in out[0].message
    assert out[1:] == [Frame(BODY)]
    assert src.peak < 1 << 18  # read and discarded in chunks, never held whole


async def test_content_length_of_a_terabyte_does_not_wait_for_a_terabyte() -> None:
    out, _ = await frames(b"Content-Length: 1000000000000\r\n\r\n{}", frame(MSG))
    assert isinstance(out[0], BadFrame) and out[1:] == [Frame(BODY)]


async def test_a_content_length_too_large_ends_at_the_next_header() -> None:
    out, _ = await frames(frame(BODY, len(BODY) + 100), frame(MSG))
    assert out == [Frame(BODY), Frame(BODY)]


async def test_a_next_header_split_across_reads_still_ends_the_body() -> None:
    nxt = frame(MSG)
    out, _ = await frames(frame(BODY, len(BODY) + 10) + nxt[:9], nxt[9:])
    assert out == [Frame(BODY), Frame(BODY)]


async def test_junk_before_a_header_is_skipped() -> None:
    out, _ = await frames(b"garbage\r\n\r\nmore}" + frame(MSG) + b"\r\n" + frame(MSG))
    assert out == [Frame(BODY), Frame(BODY)]


async def test_a_header_block_without_a_body_is_dropped() -> None:
    out, _ = await frames(b"Content-Length: 5\r\n" + frame(MSG))
    assert out == [Frame(BODY)]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        FrameReader(Source().read_some, 0)


# ---------------------------------------------------------------------- every request answered


@pytest.fixture
def s() -> InProcess:
    session = InProcess()
    session.initialize()
    session.open("file:///w/a.py", "x = 1\n")
    return session


def code(reply: dict[str, Any] | None) -> int:
    assert reply is not None and "error" in reply, reply
    return int(reply["error"]["code"])


POS = {"line": 0, "character": 0}
DOC = {"uri": "file:///w/a.py"}
INVALID = [
    ("textDocument/inlineCompletion", {"textDocument": DOC, "position": {"line": -1,
                                       "character": 0}, "context": {"triggerKind": 1}}),
    ("textDocument/inlineCompletion", {"textDocument": DOC, "position": {"line": 0,
                                       "character": 2**31}, "context": {"triggerKind": 1}}),
    ("textDocument/completion", {"textDocument": DOC, "position": None}),
    ("textDocument/completion", {"textDocument": DOC}),
    ("textDocument/completion", {"position": POS}),
    ("textDocument/completion", None),
    ("textDocument/completion", [DOC, POS]),
    ("textDocument/inlineCompletion", {"textDocument": DOC, "position": POS}),
    ("textDocument/codeAction", {"textDocument": DOC,
                                 "range": {"start": POS, "end": POS}}),
    ("codeAction/resolve", {"kind": "refactor.rewrite", "data": {}}),
    ("workspace/executeCommand", {"arguments": []}),
    ("workspace/executeCommand", "gemma.status"),
]


@pytest.mark.parametrize(("method", "params"), INVALID)
async def test_invalid_params_get_an_invalid_params_error(s: InProcess, method: str,
                                                          params: Any) -> None:
    reply = await s.request(method, params, timeout=1.0)
    assert code(reply) == INVALID_PARAMS and method in reply["error"]["message"]
    assert not s.shown_messages()


async def test_a_request_without_params_is_answered(s: InProcess) -> None:
    s.send({"jsonrpc": "2.0", "id": 77, "method": "textDocument/completion"})
    assert code(await s.wait_reply(77, 1.0)) == INVALID_PARAMS
    s.send({"jsonrpc": "2.0", "id": 78, "method": "gemma/unknown"})
    assert code(await s.wait_reply(78, 1.0)) == -32601  # MethodNotFound


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"jsonrpc": "2.0", "id": 5, "method": "shutdown", "params": "\xff\xfe"}', PARSE_ERROR),
    (b'{"jsonrpc": "2.0", "id": 5, "meth', PARSE_ERROR),
    (b"[" * 100_000 + b"]" * 100_000, PARSE_ERROR),
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, PARSE_ERROR),
    (json.dumps([{"jsonrpc": "2.0", "id": 5, "method": "shutdown"}]).encode(), INVALID_REQUEST),
    (b"[]", INVALID_REQUEST),
    (b"42", INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "id": [1], "method": "shutdown"}', INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "method": 7}', INVALID_REQUEST),
    (b'{"jsonrpc": "2.0", "result": 1}', INVALID_REQUEST),
])
def test_undecodable_messages_get_an_error_with_id_null(s: InProcess, body: bytes,
                                                        expected: int) -> None:
    s.frame(body)
    (reply,) = s.replies_without_id()
    assert reply["error"]["code"] == expected
    assert s.request_now("workspace/executeCommand", {
        "command": "gemma.debug.document", "arguments": ["file:///w/a.py"]}) is not None


def test_jsonrpc_1_0_is_an_invalid_request_with_its_id(s: InProcess) -> None:
    s.send({"jsonrpc": "1.0", "id": 9, "method": "shutdown"})
    assert code(s.reply(9)) == INVALID_REQUEST
    s.send({"jsonrpc": "2.0", "id": 10, "method": 7})
    assert code(s.reply(10)) == INVALID_REQUEST


def test_deeply_nested_params_are_answered(s: InProcess) -> None:
    for depth in (50, 900, 5000):
        deep = '{"a":' * depth + "1" + "}" * depth
        s.frame(f'{{"jsonrpc": "2.0", "id": {depth}, "method": "workspace/executeCommand", '
                f'"params": {{"command": "gemma.debug.document", "arguments": [{deep}]}}}}')
        # an answer (an error for a bad argument, or a ParseError), never silence
        assert s.reply(depth) is not None or s.replies_without_id()


def test_a_notification_with_bad_params_is_logged_not_shown(
    s: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    s.notify("textDocument/didChange", {"textDocument": DOC, "contentChanges": [
        {"range": {"start": {"line": -3, "character": 0}, "end": POS}, "text": "y"}]})
    assert not s.shown_messages() and not s.replies_without_id()
    assert "dropped a notification" in caplog.text
    assert s.text("file:///w/a.py") == "x = 1\n"


def test_requests_after_shutdown_are_refused(s: InProcess) -> None:
    assert s.request_now("shutdown", None) == {"jsonrpc": "2.0", "id": 1 + 1, "result": None}
    reply = s.request_now("textDocument/completion", {"textDocument": DOC, "position": POS})
    assert code(reply) == INVALID_REQUEST


async def test_a_too_short_content_length_is_recovered_by_the_read_loop(s: InProcess) -> None:
    req = json.dumps({"jsonrpc": "2.0", "id": 31, "method": "workspace/executeCommand",
                      "params": {"command": "gemma.debug.document",
                                 "arguments": ["file:///w/a.py"]}}).encode()
    src = Source(frame(req, len(req) - 100) + frame(req.replace(b"31", b"32")))
    await read_loop(s.protocol, FrameReader(src.read_some))
    assert s.reply(31)["result"]["text"] == "x = 1\n"  # type: ignore[index]
    assert s.reply(32)["result"]["text"] == "x = 1\n"  # type: ignore[index]


async def test_a_cancel_storm_is_quiet(s: InProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    for i in range(2000):
        s.notify("$/cancelRequest", {"id": i % 50})
        s.notify("$/cancelRequest", {"id": f"nope-{i}"})
    await asyncio.sleep(0.05)
    assert not s.shown_messages() and "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
