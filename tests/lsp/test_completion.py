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


async def _started(backend: FakeBackend, n: int, timeout: float = 10.0) -> None:
    """Until `n` streams have started (`backend.start` runs in a thread)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(backend.streams) < n and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert len(backend.streams) >= n


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
    await _started(backend, 1)  # the abandoned work is running (a fixed 0.05 s was not enough
    old.cancel()  # on a loaded machine: the stream starts off the event loop)
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


MENU_TEXT = "def total(xs):\n    return sum(len("


async def test_a_menu_gets_a_complete_unit_past_the_latency_budget() -> None:
    """The budget cuts inline ghost text at the text so far; a menu item waits for the unit."""
    backend = FakeBackend(["x", ") for", " x in xs)", "\n", "\n", "def g():"])
    svc, store = service(backend, latencyBudgetMs=1)
    store.open(URI, MENU_TEXT, 2, "python")
    backend.gate.set()
    assert await svc.complete(URI, len(MENU_TEXT), unit=True) == ["x) for x in xs)"]


async def test_a_menu_gets_nothing_rather_than_a_fragment() -> None:
    backend = FakeBackend(["x", ") for"])  # the model stops mid-line (token limit)
    svc, store = service(backend)
    store.open(URI, MENU_TEXT, 2, "python")
    backend.gate.set()
    for s in backend.streams:
        s.finish = Finish(reason="length")
    assert await svc.complete(URI, len(MENU_TEXT)) == ["x) for"]  # inline: fine, re-asked
    assert await svc.complete(URI, len(MENU_TEXT), unit=True) == []


async def test_the_menu_wait_is_bounded_and_the_work_goes_on() -> None:
    backend = FakeBackend(["x) for x in xs)", "\n", "\n"])
    svc, store = service(backend, menuWaitMs=50)
    store.open(URI, MENU_TEXT, 2, "python")
    first = await svc.complete(URI, len(MENU_TEXT), unit=True)  # the model has not answered
    assert first == []
    backend.gate.set()
    await asyncio.sleep(0.2)
    assert await svc.complete(URI, len(MENU_TEXT), unit=True) == ["x) for x in xs)"]
    assert len(backend.streams) == 1  # the next ask was served by the work that went on


def test_a_large_document_is_warmed_at_its_last_edit() -> None:
    from lsprotocol import types as t

    svc, store = service(FakeBackend([]))
    small = store.get(URI)
    assert small is not None and svc.warm_offset(small) == len(small.text)
    big = store.open("file:///w/big.py", "x = 1\n" * 10_000, 1, "python")
    assert svc.warm_offset(big) is None  # nothing known about where the user is
    store.change(big.uri, 2, [t.TextDocumentContentChangePartial(
        range=t.Range(t.Position(5000, 0), t.Position(5000, 0)), text="y = 2\n")])
    at = svc.warm_offset(big)
    assert at is not None and big.line_of_offset(at) in (5000, 5001)  # the edited region's end


class _HeldStream(_Stream):
    """Gives its first piece after a moment, then holds the rest until `hold` is set."""

    def __init__(self, pieces: list[str], hold: threading.Event) -> None:
        super().__init__(pieces, hold)
        self.given = 0

    def next(self, timeout: float | None = None) -> str | None:
        if self.given == 0:
            threading.Event().wait(0.02)  # past the 1 ms latency budget
        else:
            self.gate.wait(timeout)
        self.given += 1
        if self.cancelled or not self.pieces:
            self.finish = Finish(reason="cancelled" if self.cancelled else "stop")
            return None
        return self.pieces.pop(0)


async def test_typing_away_from_a_suggestion_stops_its_background_decoding() -> None:
    """Past the budget the first line is answered and decoding goes on; when the user then
    types something the suggestion does not have, the next request does not wait on that
    decoding (it can give them nothing): it is cancelled and a new one starts."""
    backend = FakeBackend(["a + b\n", "    c = 1\n"])
    hold = threading.Event()
    backend.start = lambda prompt, **_: backend.streams.append(  # type: ignore[method-assign]
        _HeldStream(backend.pieces, hold)) or backend.streams[-1]
    svc, store = service(backend, latencyBudgetMs=1, menuWaitMs=600_000)
    assert await svc.complete(URI, len(TEXT)) == ["a + b"]
    assert len(backend.streams) == 1 and not backend.streams[0].cancelled  # it decodes on
    store.open(URI, TEXT + "z", 2, "python")
    again = await asyncio.wait_for(svc.complete(URI, len(TEXT) + 1), 30)
    assert again == ["a + b"] and len(backend.streams) == 2
    await asyncio.sleep(0.05)
    assert backend.streams[0].cancelled
    hold.set()


async def test_typing_along_a_suggestion_keeps_its_background_decoding() -> None:
    backend = FakeBackend(["a + b\n", "    c = 1\n"])
    hold = threading.Event()
    backend.start = lambda prompt, **_: backend.streams.append(  # type: ignore[method-assign]
        _HeldStream(backend.pieces, hold)) or backend.streams[-1]
    svc, store = service(backend, latencyBudgetMs=1, menuWaitMs=600_000)
    assert await svc.complete(URI, len(TEXT)) == ["a + b"]
    store.open(URI, TEXT + "a +", 2, "python")
    assert await svc.complete(URI, len(TEXT) + 3) == [" b"]
    assert len(backend.streams) == 1 and not backend.streams[0].cancelled
    hold.set()
