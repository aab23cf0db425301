"""The real GemmaServer and its protocol in this process, fed raw JSON-RPC frames: every message
takes the path a client's would (decode, structure, dispatch, our handlers), without a
subprocess. A scripted backend stands in for the model where a test needs answers."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from gemma_lsp.backend import Finish
from gemma_lsp.server import GemmaServer, create_server


class ScriptedStream:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = list(pieces)
        self.cancelled = threading.Event()
        self.finish: Finish | None = None

    def next(self, timeout: float | None = None) -> str | None:
        if self.cancelled.is_set() or not self.pieces:
            self.finish = Finish(reason="cancelled" if self.cancelled.is_set() else "stop")
            return None
        return self.pieces.pop(0)

    def cancel(self) -> None:
        self.cancelled.set()


class ScriptedBackend:
    """Answers every prompt with `answer` (one piece per character when `slow`)."""

    model_name = "gemma-3-270m"

    def __init__(self, answer: str = "") -> None:
        self.answer = answer
        self.streams: list[ScriptedStream] = []

    def start(self, prompt: str, **_: Any) -> ScriptedStream:
        s = ScriptedStream([self.answer])
        self.streams.append(s)
        return s

    def warm(self, prompt: str, doc: str) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"model": self.model_name}

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Capture:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.messages.append(json.loads(data))

    def close(self) -> None:
        pass


LOOP = asyncio.new_event_loop()  # runs the handlers of tests that are not async themselves


def in_loop(fn: Any) -> Any:
    """Call `fn` with an event loop running (handlers may need one), then let the tasks it
    started take a step."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        async def step() -> Any:
            result = fn()
            await asyncio.sleep(0)
            return result

        return LOOP.run_until_complete(step())
    return fn()


class InProcess:
    """One server session; `frame(bytes)` hands it a frame body as the reader would."""

    def __init__(self, backend: Any = None, debug_commands: bool = True) -> None:
        self.backend = backend or ScriptedBackend()
        self.server: GemmaServer = create_server(lambda _opts: self.backend,
                                                 debug_commands=debug_commands)
        self.out = _Capture()
        self.server.protocol.set_writer(self.out, include_headers=False)
        self._next_id = 0

    @property
    def protocol(self) -> Any:
        return self.server.protocol

    def frame(self, body: bytes | str) -> None:
        data = body.encode() if isinstance(body, str) else body
        in_loop(lambda: self.protocol.receive(data))

    def send(self, message: Any) -> None:
        self.frame(json.dumps(message))

    def notify(self, method: str, params: Any) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def reply(self, msg_id: Any) -> dict[str, Any] | None:
        for m in self.out.messages:
            if m.get("id") == msg_id and "method" not in m:
                return m
        return None

    def replies_without_id(self) -> list[dict[str, Any]]:
        return [m for m in self.out.messages if "id" in m and m["id"] is None]

    def shown_messages(self) -> list[dict[str, Any]]:
        return [m["params"] for m in self.out.messages if m.get("method") == "window/showMessage"]

    def request_now(self, method: str, params: Any) -> dict[str, Any] | None:
        """A request whose handler answers synchronously (no event loop needed)."""
        msg_id = self.new_id()
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return self.reply(msg_id)

    async def request(self, method: str, params: Any, timeout: float = 10.0) -> dict[str, Any]:
        msg_id = self.new_id()
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return await self.wait_reply(msg_id, timeout)

    async def wait_reply(self, msg_id: Any, timeout: float = 10.0) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (r := self.reply(msg_id)) is None:
            assert loop.time() < deadline, f"no answer to request {msg_id}"
            await asyncio.sleep(0.002)
        return r

    def initialize(self, encoding: str | None = None, options: Any = None,
                   capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        caps = dict(capabilities or {})
        if encoding is not None:
            caps["general"] = {"positionEncodings": [encoding]}
        opts = options if options is not None else {"gemma": {"completion": {
            "debounceMs": 0, "warmAfterMs": 0, "latencyBudgetMs": 0, "classic": "always"}}}
        r = self.request_now("initialize", {"processId": None, "rootUri": None,
                                            "capabilities": caps, "initializationOptions": opts})
        assert r is not None and "result" in r, r
        self.notify("initialized", {})
        return r["result"]

    def open(self, uri: str, text: str, version: int = 1) -> None:
        self.notify("textDocument/didOpen", {"textDocument": {
            "uri": uri, "languageId": "python", "version": version, "text": text}})

    def change(self, uri: str, version: int, changes: list[dict[str, Any]]) -> None:
        self.notify("textDocument/didChange", {
            "textDocument": {"uri": uri, "version": version}, "contentChanges": changes})

    def text(self, uri: str) -> str | None:
        doc = self.server.store.get(uri)
        return None if doc is None else doc.text
