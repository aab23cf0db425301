"""What the language server needs from a model backend, and the built-in engine's adapter.

Handlers never talk to a socket: they ask a `Backend` for a `Stream` of text pieces, and
iterate it from asyncio without blocking the event loop (`astream`). A backend that fails
raises `BackendError`; the next request reconnects.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

# Backend calls block (socket reads, an engine starting): they get their own threads so that
# a burst of keystrokes waiting on a starting engine cannot starve asyncio's default pool.
_IO = ThreadPoolExecutor(max_workers=32, thread_name_prefix="gemma-backend")


class BackendError(Exception):
    """The model backend is unreachable or refused a request (message is user-facing)."""


class BackendStarting(BackendError):
    """The backend is still starting (its progress is shown separately): answer empty."""


START_WAIT_S = 3.0  # a request waits this long for a starting engine, then answers empty


@dataclass
class Finish:
    """How a stream ended (mirrors the engine's Done message)."""

    reason: str = ""
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evaluated_tokens: int = 0
    first_token_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scores:
    """Per continuation: each token's log-probability and where (characters into the
    continuation) that token ends. Tokens all continuations share at their start count 0."""

    logprobs: list[list[float]]
    ends: list[list[int]]
    compute_ms: float = 0.0
    reused_tokens: int = 0
    evaluated_tokens: int = 0
    queue_ms: float = 0.0  # waiting in the engine before its compute began


class Stream(Protocol):
    finish: Finish | None

    def next(self, timeout: float | None = None) -> str | None:
        """The next text piece ('' is possible), or None when the stream has ended."""
        ...

    def cancel(self) -> None:
        """Stop the work now (idempotent); `next` then returns None."""
        ...


class Backend(Protocol):
    model_name: str

    def start(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        doc: str = "",
        priority: int = 0,
        seed: int | None = None,
        media: list[dict[str, Any]] | None = None,  # images / audio for the prompt's markers
        kind: str = "",
    ) -> Stream: ...

    def warm(self, prompt: str, doc: str) -> None: ...

    def score(self, prompt: str, continuations: list[str], *, doc: str = "") -> Scores:
        """How likely each continuation of `prompt` is (BackendError if the backend cannot
        say: an OpenAI-compatible server returns no prompt log-probabilities)."""
        ...

    def status(self) -> dict[str, Any]: ...

    def restart(self) -> None: ...

    def close(self) -> None: ...


async def astart(backend: Backend, prompt: str, **opts: Any) -> Stream:
    """`backend.start` off the event loop. If the caller is cancelled while the backend is
    still starting (an engine coming up), the stream it returns later is cancelled at once
    instead of generating for nobody."""
    future = asyncio.get_running_loop().run_in_executor(
        _IO, lambda: backend.start(prompt, **opts))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        def _orphan(f: asyncio.Future[Stream]) -> None:
            if not f.cancelled() and f.exception() is None:
                f.result().cancel()

        future.add_done_callback(_orphan)
        raise


async def astream(stream: Stream, poll_s: float = 60.0) -> AsyncGenerator[str, None]:
    """Iterate a blocking Stream from asyncio; cancelling the task cancels the stream."""
    try:
        while True:
            piece = await asyncio.get_running_loop().run_in_executor(_IO, stream.next, poll_s)
            if piece is None:
                return
            yield piece
    finally:
        stream.cancel()  # a no-op when it ended by itself


class EngineBackend:
    """The resident engine (`gemma-lsp engine`) through `engine_client.EngineClient`."""

    def __init__(self, socket_path: str | None = None, autostart: bool = True,
                 model: str | None = None, draft_model: str | None = None,
                 kernels: bool = True, quant: str | None = None) -> None:
        from gemma_lsp.engine_client import EngineClient

        self._lock = threading.Lock()
        self._socket_path = socket_path
        self._make = lambda: EngineClient(socket_path=socket_path, autostart=autostart,
                                          model=model, start_wait=START_WAIT_S,
                                          on_start=self._on_start, connect=False,
                                          draft_model=draft_model, kernels=kernels,
                                          quant=quant)
        self._client: Any = None
        self._listener: Any = None
        self.model_name = "gemma-3-270m"

    def listen(self, listener: Any) -> None:
        """`listener(engine_client.StartEvent)` hears how an engine start goes (any thread)."""
        self._listener = listener

    def _on_start(self, event: Any) -> None:
        if self._listener is not None:
            self._listener(event)

    def _get(self) -> Any:
        from gemma_lsp.engine_client import EngineError

        with self._lock:
            if self._client is None:
                self._client = self._make()
            client = self._client
        try:
            client.connect()
        except EngineError as e:
            raise (BackendStarting if e.code == "starting" else BackendError)(str(e)) from e
        self.model_name = getattr(client, "model", "") or self.model_name
        return client

    def start(self, prompt: str, *, max_tokens: int, temperature: float = 0.0,
              stop: list[str] | None = None, doc: str = "", priority: int = 0,
              seed: int | None = None, media: list[dict[str, Any]] | None = None,
              kind: str = "") -> Stream:
        from gemma_lsp.engine_client import EngineError

        client = self._get()
        try:
            handle = client.generate(prompt, max_tokens=max_tokens, temperature=temperature,
                                     stop=list(stop or []), doc=doc, priority=priority, seed=seed,
                                     media=list(media or []), kind=kind)
        except EngineError as e:
            raise BackendError(str(e)) from e
        return _EngineStream(client, handle)

    def warm(self, prompt: str, doc: str) -> None:
        from gemma_lsp.engine_client import EngineError

        try:
            self._get().warm(prompt, doc=doc)
        except EngineError as e:
            raise BackendError(str(e)) from e

    def score(self, prompt: str, continuations: list[str], *, doc: str = "") -> Scores:
        from gemma_lsp.engine_client import EngineError

        try:
            r = self._get().score(prompt, continuations, doc=doc)
        except EngineError as e:
            raise BackendError(str(e)) from e
        return Scores(r.logprobs, r.ends, r.compute_ms, r.reused_tokens, r.evaluated_tokens,
                      r.queue_ms)

    def status(self) -> dict[str, Any]:
        from gemma_lsp.engine_client import EngineError

        try:
            return dict(self._get().status())
        except EngineError as e:
            raise BackendError(str(e)) from e

    def restart(self) -> None:
        from gemma_lsp.engine_client import EngineClient, EngineError

        with self._lock:
            client, self._client = self._client, None
        try:
            if client is None:  # stop whatever runs there, without starting one to stop it
                client = EngineClient(socket_path=self._socket_path, autostart=False,
                                      connect=False)
            client.shutdown()
        except EngineError:
            pass  # already gone: the next request starts a fresh one
        finally:
            if client is not None:
                client.close()

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _EngineStream:
    def __init__(self, client: Any, handle: Any) -> None:
        self._client = client
        self._handle = handle
        self._ended = False
        self.finish: Finish | None = None

    def next(self, timeout: float | None = None) -> str | None:
        from engine.protocol import Done, Token
        from gemma_lsp.engine_client import EngineError

        if self._ended:
            return None
        try:
            msg = self._handle.next(timeout)
        except EngineError as e:
            self._ended = True
            if getattr(e, "code", "") in ("cancelled", "superseded"):
                return None
            try:  # e.g. no reply in time: the engine must not go on with work nobody reads
                self._handle.cancel()
            except Exception:  # noqa: BLE001 - the engine may be gone already
                pass
            raise BackendError(str(e)) from e
        if isinstance(msg, Token):
            return str(msg.text)
        self._ended = True
        if isinstance(msg, Done):
            self.finish = Finish(msg.reason, msg.prompt_tokens, msg.reused_tokens,
                                 msg.evaluated_tokens, msg.first_token_ms)
            return msg.tail or None
        return None

    def cancel(self) -> None:
        if not self._ended:
            self._ended = True
            try:
                self._handle.cancel()
            except Exception:  # noqa: BLE001 - the engine may be gone already
                pass


class UnavailableBackend:
    """Stands in for a backend that cannot run; every request fails with the reason."""

    model_name = ""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def start(self, prompt: str, **_: Any) -> Stream:
        raise BackendError(self.reason)

    def warm(self, prompt: str, doc: str) -> None:
        raise BackendError(self.reason)

    def score(self, prompt: str, continuations: list[str], *, doc: str = "") -> Scores:
        raise BackendError(self.reason)

    def status(self) -> dict[str, Any]:
        raise BackendError(self.reason)

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass
