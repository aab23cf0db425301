"""The JSON-RPC transport under the language server: frames in, one answer per request out.

pygls 2.x reads frames with an unbounded ``readexactly(Content-Length)`` and decodes them with
``json.loads(object_hook=...)``; a frame it cannot decode, structure or size is logged and
dropped, so the client waits forever for an answer (or the process dies of a MemoryError).
This room replaces that path:

- `FrameReader` cuts the byte stream into frames. Frames are bounded (`DEFAULT_MAX_FRAME_BYTES`,
  ``--max-frame-mb``); a larger one is read and discarded in chunks with a log line and an
  error reply with id null. A wrong Content-Length does not wedge the stream. The rule: valid
  JSON never contains a raw CR or LF inside a string, so the bytes ``Content-Length: N\\r\\n``
  can only be a header. A body is cut where such a header begins (a Content-Length too large
  is answered as soon as the next message's header arrives), junk before a header is skipped,
  and a body that does not parse is retried once with the bytes up to the next header (a
  Content-Length too small).
- `GemmaProtocol.receive` decodes one frame: bad UTF-8 or JSON (100k-deep nesting included) is a
  ParseError with id null; a batch, a wrong ``jsonrpc`` or a malformed envelope is an
  InvalidRequest (with the id when it is known); params that do not structure into the
  method's lsprotocol type (negative or 2^31+ positions, null or list params, missing fields)
  are an InvalidParams error for that request. Then pygls dispatches as usual.
- The protocol also owns what pygls' built-in handlers got wrong for us: text synchronisation
  goes to our `DocumentStore` only (pygls' workspace counts lines with ``str.splitlines``);
  a second ``initialize`` is refused instead of resetting the session; ``$/cancelRequest``
  reaches the task of an ``executeCommand`` (pygls cancelled only its outer future, so the
  command's engine work went on); cancels of finished or unknown requests are normal traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

import cattrs
from lsprotocol import types as t
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInternalError,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcRequestCancelled,
)
from pygls.io_ import StdoutWriter
from pygls.protocol import JsonRPCNotification, JsonRPCRequestMessage
from pygls.protocol.language_server import LanguageServerProtocol, lsp_method

log = logging.getLogger(__name__)

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 8192  # a header block longer than this is junk
READ_CHUNK = 1 << 16
# a header can only begin here: JSON strings never hold a raw CR/LF
_CONTENT_LENGTH = re.compile(rb"Content-Length[ \t]*:[ \t]*(\d{1,20})[ \t]*\r?\n", re.IGNORECASE)


def _prefixes_of(word: bytes, rest: bytes) -> bytes:
    """A regex matching every prefix of `word` followed by a prefix of `rest`."""
    out = rest
    for ch in reversed(word[1:]):
        out = b"(" + re.escape(bytes([ch])) + out + b")?"
    return re.escape(word[:1]) + out


# what the start of a header looks like when a read stopped inside it
_PARTIAL_HEADER = re.compile(
    _prefixes_of(b"Content-Length", rb"([ \t]*(:[ \t]*\d*[ \t]*\r?)?)?"), re.IGNORECASE)
_LINE = re.compile(rb"[^\n]*\n")
_PATTERN_SPAN = 64  # bytes kept between reads so that a header split across reads is found


def _next_header(buf: bytearray, start: int = 0) -> re.Match[bytes] | None:
    """The first header line at or after `start` inside a body. A fast literal search for
    the spelling every client sends (bodies can be 64 MB); the header phase takes any case."""
    while (i := buf.find(b"Content-Length", start)) >= 0:
        if (m := _CONTENT_LENGTH.match(buf, i)) is not None:
            return m
        start = i + 1
    return None


@dataclass(frozen=True)
class Frame:
    """One message body as sent (not yet decoded)."""

    body: bytes


@dataclass(frozen=True)
class BadFrame:
    """A frame that was skipped; the client is told with an error whose id is null."""

    message: str


class FrameReader:
    """Frames from a byte stream: ``read_some(n)`` returns up to n bytes, b"" at the end."""

    def __init__(self, read_some: Callable[[int], Awaitable[bytes]],
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError(f"max frame size must be positive, got {max_frame_bytes}")
        self._read_some = read_some
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._eof = False
        self._skipping = 0  # bytes of an oversized frame still to discard

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self._read_some(READ_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def next(self) -> Frame | BadFrame | None:
        """The next frame, a skipped one, or None at the end of the stream. An oversized
        frame is reported first (so the client hears of it at once) and skipped after."""
        if self._skipping:
            big, self._skipping = self._skipping, 0
            skipped = await self._skip(big)
            log.warning("skipped %d bytes of a frame of %d (the limit is %d)",
                        skipped, big, self.max_frame_bytes)
        length = await self._header()
        if length is None:
            return None
        if length > self.max_frame_bytes:
            self._skipping = length
            return BadFrame(f"a frame of {length} bytes is over the {self.max_frame_bytes}"
                            " byte limit: skipped")
        return Frame(await self._body(length))

    async def _header(self) -> int | None:
        """Consume a header block; its Content-Length (junk before it is skipped)."""
        while True:
            m = _CONTENT_LENGTH.search(self._buf)
            if m is None:
                if len(self._buf) > MAX_HEADER_BYTES:
                    self._drop(len(self._buf) - _PATTERN_SPAN, "junk with no header")
                if not await self._fill():
                    if self._buf.strip():
                        log.warning("the stream ended inside a header: %d bytes dropped",
                                    len(self._buf))
                    return None
                continue
            length, span = int(m.group(1)), m.end() - m.start()  # before the buffer moves
            if m.start() and self._buf[: m.start()].strip():
                self._drop(m.start(), "junk before a header")
            elif m.start():
                del self._buf[: m.start()]
            end = self._header_end(span)
            if end is None:
                if len(self._buf) > MAX_HEADER_BYTES:
                    self._drop(span, "a header block with no end")
                    continue
                if not await self._fill():
                    return None
                continue
            if end < 0:  # another Content-Length inside the block: start again from it
                continue
            del self._buf[:end]
            return length

    def _header_end(self, pos: int) -> int | None:
        """Offset just past the blank line ending the header block that starts at 0; None if
        more bytes are needed; -1 if a second Content-Length line came first (block dropped)."""
        while True:
            line = _LINE.match(self._buf, pos)
            if line is None:
                return None
            text = line.group(0)
            if text in (b"\r\n", b"\n"):
                return line.end()
            if _CONTENT_LENGTH.match(text):
                self._drop(pos, "a header block without a body")
                return -1
            pos = line.end()

    async def _body(self, length: int) -> bytes:
        """``length`` bytes, or fewer when a header begins inside them. Scanned bytes move to
        a list of parts as they arrive, so the buffer stays one read long."""
        parts: list[bytes] = []
        need = length
        while True:
            m = _next_header(self._buf)
            if m is not None and m.start() < need:
                parts.append(bytes(self._buf[: m.start()]))
                del self._buf[: m.start()]
                body = b"".join(parts)
                log.warning("Content-Length said %d bytes but a header began after %d",
                            length, len(body))
                return body
            if len(self._buf) >= need and not self._partial_header_at_end(need):
                parts.append(bytes(self._buf[:need]))
                del self._buf[:need]
                return b"".join(parts)
            take = min(need, len(self._buf) - _PATTERN_SPAN)  # a header may straddle reads
            if take > 0:
                parts.append(bytes(self._buf[:take]))
                del self._buf[:take]
                need -= take
            if not await self._fill():
                parts.append(bytes(self._buf[:need]))
                self._buf.clear()
                return b"".join(parts)

    def _partial_header_at_end(self, length: int) -> bool:
        """Whether the buffer ends with the start of a header that begins inside the body
        (then the next read decides where the body ends)."""
        for i in range(max(0, length - _PATTERN_SPAN), min(length, len(self._buf))):
            if self._buf[i] in b"Cc" and _PARTIAL_HEADER.fullmatch(self._buf, i):
                return True
        return False

    def following_bytes(self) -> bytes:
        """What is already buffered up to the next header (for a Content-Length too small)."""
        m = _next_header(self._buf)
        return bytes(self._buf[: m.start() if m else len(self._buf)])

    def consume(self, n: int) -> None:
        del self._buf[:n]

    async def _skip(self, length: int) -> int:
        """Discard up to ``length`` bytes in chunks, stopping early at a header."""
        skipped, remaining = 0, length
        while True:
            m = _next_header(self._buf)
            if m is not None and m.start() < remaining:
                del self._buf[: m.start()]
                return skipped + m.start()
            if len(self._buf) >= remaining:
                del self._buf[:remaining]
                return length
            drop = max(0, len(self._buf) - _PATTERN_SPAN)
            del self._buf[:drop]
            skipped, remaining = skipped + drop, remaining - drop
            if not await self._fill():
                skipped += len(self._buf)
                self._buf.clear()
                return skipped

    def _drop(self, n: int, why: str) -> None:
        log.warning("skipped %d bytes of %s", n, why)
        del self._buf[:n]


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _problem(exc: BaseException) -> str:
    """A short description of why params did not structure."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, cattrs.BaseValidationError):
        try:
            return "; ".join(cattrs.transform_error(exc))[:500]
        except Exception:  # noqa: BLE001 - fall back to the exception's own text
            pass
    return str(exc)[:500] or type(exc).__name__


class GemmaProtocol(LanguageServerProtocol):
    """pygls' LanguageServerProtocol with the receive path, text sync, initialize and
    cancellation described in the module docstring."""

    def __init__(self, server: Any, converter: Any) -> None:
        super().__init__(server, converter)
        self._initialize_seen = False
        self._children: dict[int, Future[Any]] = {}  # id(result future) -> running handler

    # ------------------------------------------------------------------ receiving

    def receive(self, body: bytes, reader: FrameReader | None = None) -> None:
        """Decode, check and dispatch one frame; every request gets an answer."""
        raw = self._decode(body, reader)
        if raw is None:
            return
        message = self._checked(raw)
        if message is None:
            return
        method, msg_id = getattr(message, "method", None), getattr(message, "id", None)
        if self._shutdown and method not in (None, t.EXIT):
            if _is_id(msg_id):  # pygls dropped these silently: the client waited forever
                self._reply_error(msg_id, JsonRpcInvalidRequest("the server is shutting down"))
            return
        try:
            self.handle_message(message)
        except Exception as exc:  # noqa: BLE001 - a dispatch bug must not stop the reader
            log.exception("could not dispatch %s", method or "a message")
            if method and _is_id(msg_id):
                self._reply_error(msg_id, JsonRpcInternalError(str(exc)))

    def _decode(self, body: bytes, reader: FrameReader | None) -> Any:
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._reply_error(None, JsonRpcParseError(f"the message is not UTF-8 (byte {e.start})"))
        except RecursionError:
            self._reply_error(None, JsonRpcParseError("the message is nested too deeply"))
        except ValueError as e:
            more = reader.following_bytes() if reader is not None else b""
            if more:  # a Content-Length too small: the rest of the body follows it
                try:
                    raw = json.loads((body + more).decode("utf-8"))
                except (ValueError, RecursionError):
                    pass
                else:
                    assert reader is not None
                    reader.consume(len(more))
                    log.warning("Content-Length was %d bytes short", len(more))
                    return raw
            log.warning("not JSON: %s", e)
            self._reply_error(None, JsonRpcParseError(f"the message is not JSON: {e}"))
        return None

    def _checked(self, raw: Any) -> Any:
        """The structured message, or None after answering why it cannot be handled."""
        if isinstance(raw, list):
            self._reply_error(None, JsonRpcInvalidRequest(
                "JSON-RPC batches are not part of LSP: send one message per frame"))
            return None
        if not isinstance(raw, dict):
            self._reply_error(None, JsonRpcInvalidRequest("a message is a JSON object"))
            return None
        method, msg_id = raw.get("method"), raw.get("id")
        is_request = "id" in raw and "method" in raw
        known_id = msg_id if is_request and _is_id(msg_id) else None
        if raw.get("jsonrpc") != "2.0":
            self._reply_error(known_id, JsonRpcInvalidRequest(
                f"jsonrpc must be \"2.0\", got {raw.get('jsonrpc')!r}"))
            return None
        if "method" in raw:
            if not isinstance(method, str) or ("id" in raw and not _is_id(msg_id)):
                self._reply_error(known_id, JsonRpcInvalidRequest(
                    "method must be a string and id an integer or a string"))
                return None
            return self._structure_call(raw, method, known_id, is_request)
        if _is_id(msg_id) and ("result" in raw or "error" in raw):
            return self._structure_response(raw, msg_id)
        self._reply_error(None, JsonRpcInvalidRequest("neither a request, a notification "
                                                      "nor a response"))
        return None

    def _structure_call(self, raw: dict[str, Any], method: str, msg_id: Any,
                        is_request: bool) -> Any:
        kind = self.get_message_type(method)
        if kind is None:
            raw.setdefault("params", None)
            kind = JsonRPCRequestMessage if is_request else JsonRPCNotification
        try:
            return self._converter.structure(raw, kind)
        except (Exception, RecursionError) as exc:  # noqa: BLE001 - any bad shape
            why = f"invalid params for {method}: {_problem(exc)}"
            if is_request:
                log.info("%s (request %r)", why, msg_id)
                self._reply_error(msg_id, JsonRpcInvalidParams(why))
            else:
                log.warning("dropped a notification: %s", why)
            return None

    def _structure_response(self, raw: dict[str, Any], msg_id: Any) -> Any:
        try:
            return self.structure_message(raw)
        except (Exception, RecursionError) as exc:  # noqa: BLE001 - the client answered badly
            log.warning("the client's answer to %r does not structure: %s", msg_id,
                        _problem(exc))
            future = self._request_futures.pop(msg_id, None)
            if future is not None and not future.done():
                future.set_exception(JsonRpcInvalidParams(f"bad answer: {_problem(exc)}"))
            return None

    def _reply_error(self, msg_id: Any, error: JsonRpcException) -> None:
        if msg_id is None:
            # JSON-RPC: an error about a message whose id is unknown has id null
            self._send_data({"jsonrpc": "2.0", "id": None,
                             "error": {"code": error.code, "message": error.message}})
        else:
            self._send_response(msg_id, error=error.to_response_error())

    # ------------------------------------------------------------------ answers and errors

    def _send_handler_result(self, future: Future[Any], *, msg_id: Any) -> None:
        """pygls' version, minus a traceback in the log for every expected error reply."""
        self._request_futures.pop(msg_id, None)
        if future.cancelled():
            self._send_response(msg_id, error=JsonRpcRequestCancelled(
                f"request {msg_id!r} was cancelled").to_response_error())
            return
        exc = future.exception()
        if exc is None:
            self._send_response(msg_id, result=future.result())
        elif isinstance(exc, JsonRpcException):
            log.info("request %r: %s", msg_id, exc.message)
            self._send_response(msg_id, error=exc.to_response_error())
        else:
            log.error("request %r failed", msg_id, exc_info=exc)
            self._send_response(msg_id, error=JsonRpcInternalError(
                f"{type(exc).__name__}: {exc}").to_response_error())

    # ------------------------------------------------------------------ cancellation

    def _handle_cancel_notification(self, msg_id: Any) -> None:
        """Cancel a running request (and the handler an executeCommand runs); finished or
        unknown ids are normal traffic."""
        future = self._request_futures.pop(msg_id, None)
        if future is None:
            log.debug("cancel for %r: not running", msg_id)
            return
        child = self._children.pop(id(future), None)
        if future.cancel():
            log.info("cancelled request %r", msg_id)
        if child is not None:
            child.cancel()

    def _run_generator(self, future: Future[Any] | None, *, gen: Generator[Any, Any, Any],
                       result_future: Future[Any]) -> None:
        """pygls' version, remembering the handler a built-in generator runs so that
        cancelling the request cancels it; a cancelled step is not a traceback."""
        self._children.pop(id(result_future), None)
        if result_future.done():
            gen.close()
            return
        try:
            if future is not None and future.cancelled():
                gen.close()
                result_future.cancel()
                return
            value = future.result() if future is not None else None
            handler, args, kwargs = gen.send(value)
        except StopIteration as result:
            result_future.set_result(result.value)
            return
        except Exception as exc:  # noqa: BLE001 - becomes the request's error reply
            result_future.set_exception(exc)
            return
        child_id = str(uuid.uuid4())
        self._execute_handler(child_id, handler, args=args, kwargs=kwargs, callback=partial(
            self._run_generator, gen=gen, result_future=result_future))
        child = self._request_futures.pop(child_id, None)  # never a client's id
        if child is not None and not child.done():
            self._children[id(result_future)] = child

    # ------------------------------------------------------------------ session and documents

    @lsp_method(t.INITIALIZE)
    def lsp_initialize(self, params: t.InitializeParams) -> Generator[Any, Any, Any]:
        """Only the first initialize sets the session up (LSP: it is sent once); a second one
        is an error and changes nothing (open documents, options, features)."""
        if self._initialize_seen:
            raise JsonRpcInvalidRequest("the server is already initialized")
        self._initialize_seen = True
        return (yield from super().lsp_initialize(params))

    @lsp_method(t.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(
        self, params: t.DidOpenTextDocumentParams
    ) -> Generator[Any, Any, None]:
        """Text sync goes to the server's own DocumentStore only (see documents.py)."""
        if (handler := self.fm.features.get(t.TEXT_DOCUMENT_DID_OPEN)) is not None:
            yield handler, (params,), None

    @lsp_method(t.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(
        self, params: t.DidChangeTextDocumentParams
    ) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(t.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    @lsp_method(t.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(
        self, params: t.DidCloseTextDocumentParams
    ) -> Generator[Any, Any, None]:
        if (handler := self.fm.features.get(t.TEXT_DOCUMENT_DID_CLOSE)) is not None:
            yield handler, (params,), None


# ---------------------------------------------------------------------- serving


async def read_loop(protocol: GemmaProtocol, reader: FrameReader,
                    stop: threading.Event | None = None) -> None:
    """Feed frames to the protocol until the stream ends (or `stop` is set)."""
    while stop is None or not stop.is_set():
        frame = await reader.next()
        if frame is None:
            log.info("the client closed the connection")
            return
        if isinstance(frame, BadFrame):
            protocol._reply_error(None, JsonRpcInvalidRequest(frame.message))
            continue
        protocol.receive(frame.body, reader)
        await asyncio.sleep(0)  # let handlers started by this frame run between frames


def _stdin_source(stdin: BinaryIO) -> Callable[[int], Awaitable[bytes]]:
    """Reads stdin on a daemon thread (a blocked read must not keep the process alive after
    `exit`), handing over at most a few chunks at a time."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
    try:  # the file descriptor itself: a daemon thread must not hold the buffer's lock at exit
        fd = stdin.fileno()
        read: Callable[[int], bytes] = lambda n: os.read(fd, n)  # noqa: E731
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests)
        read = getattr(stdin, "read1", stdin.read)

    def pump() -> None:
        while True:
            try:
                chunk = read(READ_CHUNK)
            except (OSError, ValueError):
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            except RuntimeError:  # the loop is gone
                return
            if not chunk:
                return

    threading.Thread(target=pump, name="gemma-lsp-stdin", daemon=True).start()

    async def read_some(_: int) -> bytes:
        return await queue.get()

    return read_some


def serve_stdio(server: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """pygls' start_io with our reader; the exit status (1 for `exit` before `shutdown`)."""
    server._stop_event = stop = threading.Event()
    server.protocol.set_writer(StdoutWriter(stdout or sys.stdout.buffer))

    async def main() -> None:
        source = _stdin_source(stdin or sys.stdin.buffer)
        await read_loop(server.protocol, FrameReader(source, max_frame_bytes), stop)

    code = 0
    try:
        asyncio.run(main())
    except BrokenPipeError:
        log.error("the client is gone (broken pipe): shutting down")
    except KeyboardInterrupt:
        pass
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    finally:
        server.shutdown()
    return code


def serve_tcp(server: Any, host: str, port: int,
              max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
    """pygls' start_tcp with our reader (one client connection at a time, as in pygls)."""
    server._stop_event = stop = threading.Event()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.protocol.set_writer(writer)
        await read_loop(server.protocol, FrameReader(reader.read, max_frame_bytes), stop)
        server.shutdown()

    async def main() -> None:
        server._server = await asyncio.start_server(connection, host, port)
        log.info("serving on %s:%s", host, port)
        async with server._server:
            await server._server.serve_forever()

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
