"""CompletionService with a scripted backend: shared in-flight work, supersede, cancel, reuse."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from gemma_lsp.backend import Finish
from gemma_lsp.completion import CompletionService
from gemma_lsp.config import parse_options
from gemma_lsp.documents import DocumentStore

URI = "file:///w/a.py"
TEXT = "def add(a, b):\n    return "


class _Stream:
    def __init__(self, pieces: list[str], gate: threading.Event) -> None:
        self.pieces = list(pieces)
        self.gate = gate
        self.cancelled = False
        self.finish: Finish | None = None

    def next(self, timeout: float | None = None) -> str | None:
        self.gate.wait(timeout)
        if self.cancelled or not self.pieces:
            self.finish = Finish(reason="cancelled" if self.cancelled else "stop")
            return None
        return self.pieces.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeBackend:
    """Answers every prompt with `pieces`; `gate` holds the stream until the test opens it."""

    model_name = "gemma-3-270m"

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.gate = threading.Event()
        self.streams: list[_Stream] = []

    def start(self, prompt: str, **_: Any) -> _Stream:
        s = _Stream(self.pieces, self.gate)
        self.streams.append(s)
        return s

    def warm(self, prompt: str, doc: str) -> None:
        pass


def service(backend: FakeBackend, **completion: Any) -> tuple[CompletionService, DocumentStore]:
    opts, warnings = parse_options({"completion": {"debounceMs": 0, "warmAfterMs": 0,
                                                   "latencyBudgetMs": 0, **completion}})
    assert not warnings
    store = DocumentStore()
    store.open(URI, TEXT, 1, "python")
    errors: list[str] = []
    return CompletionService(store, lambda: backend, lambda: opts, errors.append), store


async def test_requests_for_the_same_cursor_share_one_generation() -> None:
    backend = FakeBackend(["a + b", "\n"])
    svc, _ = service(backend)
    inline = asyncio.create_task(svc.complete(URI, len(TEXT)))
    classic = asyncio.create_task(svc.complete(URI, len(TEXT)))
    await asyncio.sleep(0.05)
    backend.gate.set()
    assert await inline == ["a + b"] and await classic == ["a + b"]
    assert len(backend.streams) == 1 and svc.stats.superseded == 0


async def test_a_cancelled_request_leaves_the_shared_work_to_the_other() -> None:
    backend = FakeBackend(["a + b", "\n"])
    svc, _ = service(backend)
    first = asyncio.create_task(svc.complete(URI, len(TEXT)))
    second = asyncio.create_task(svc.complete(URI, len(TEXT)))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.sleep(0.05)
    backend.gate.set()
    assert await second == ["a + b"]
    finish = backend.streams[0].finish
    assert first.cancelled() and finish is not None and finish.reason == "stop"


async def test_cancelled_work_for_the_current_cursor_is_kept_for_the_next_ask() -> None:
    backend = FakeBackend(["a + b", "\n"])
    svc, _ = service(backend)
    only = asyncio.create_task(svc.complete(URI, len(TEXT)))
    await asyncio.sleep(0.05)
    only.cancel()  # VS Code cancels and asks again later
    await asyncio.sleep(0.05)
    backend.gate.set()
    await asyncio.sleep(0.1)
    finish = backend.streams[0].finish
    assert finish is not None and finish.reason == "stop"
    assert await svc.complete(URI, len(TEXT)) == ["a + b"]
    assert len(backend.streams) == 1  # answered from the finished work


async def test_a_newer_document_state_cancels_abandoned_work() -> None:
    backend = FakeBackend(["a + b", "\n"])
    svc, store = service(backend)
    old = asyncio.create_task(svc.complete(URI, len(TEXT)))
    await asyncio.sleep(0.05)
    old.cancel()
    await asyncio.sleep(0.05)
    store.open(URI, TEXT + "x", 2, "python")
    new = asyncio.create_task(svc.complete(URI, len(TEXT) + 1))
    await asyncio.sleep(0.05)
    backend.gate.set()
    assert await new == ["a + b"]
    finish = backend.streams[0].finish
    assert finish is not None and finish.reason == "cancelled"


async def test_a_newer_cursor_supersedes_a_debounced_request() -> None:
    backend = FakeBackend(["a + b", "\n"])
    backend.gate.set()
    svc, store = service(backend, debounceMs=50)
    old = asyncio.create_task(svc.complete(URI, len(TEXT)))
    await asyncio.sleep(0.01)
    store.open(URI, TEXT + "a", 2, "python")
    new = asyncio.create_task(svc.complete(URI, len(TEXT) + 1))
    assert await old == [] and svc.stats.superseded == 1
    assert await new == ["a + b"]


async def test_typed_ahead_serves_the_rest_without_the_engine() -> None:
    backend = FakeBackend(["a + b", "\n"])
    backend.gate.set()
    svc, store = service(backend)
    assert await svc.complete(URI, len(TEXT)) == ["a + b"]
    store.open(URI, TEXT + "a +", 2, "python")
    assert await svc.complete(URI, len(TEXT) + 3) == [" b"]
    assert len(backend.streams) == 1 and svc.stats.typed_ahead == 1
