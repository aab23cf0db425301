"""How an engine start is shown in the editor: `$/progress` (begin, report, end) when the
client has `window.workDoneProgress`, else a message when a start is slow and when it is
ready; a start that fails is an error message with the engine's own reason, at once.

Start events arrive on the client's watcher thread; they are handed to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from lsprotocol import types as t

log = logging.getLogger(__name__)


class StartNotifier:
    def __init__(self, ls: Any, on_failed: Callable[[str], None],
                 on_ready: Callable[[], None]) -> None:
        self.ls = ls
        self.on_failed = on_failed
        self.on_ready = on_ready
        self.loop: asyncio.AbstractEventLoop | None = None
        self._token: str | None = None
        self._created: asyncio.Future[Any] | None = None
        self._told = False  # a client without progress heard "starting"

    def __call__(self, event: Any) -> None:
        """Any thread: an `engine_client.StartEvent`."""
        loop = self.loop
        if loop is None or loop.is_closed():
            log.info("engine start: %s %s", event.kind, event.message)
            return
        loop.call_soon_threadsafe(self._show, event)

    def _progress_supported(self) -> bool:
        caps = self.ls.client_capabilities.window
        return bool(caps is not None and caps.work_done_progress)

    def _show(self, event: Any) -> None:
        if event.kind == "failed":
            self._end(f"failed: {event.message}")
            self.on_failed(f"the engine cannot start: {event.message}")
            return
        if event.kind == "ready":
            self._end("ready")
            if self._told:
                self.ls.notify("Gemma engine: ready", t.MessageType.Info)
                self._told = False
            self.on_ready()
            return
        percent = None if event.fraction is None else max(0, min(100, int(event.fraction * 100)))
        if not self._progress_supported():
            if not self._told:
                self._told = True
                self.ls.notify(f"Gemma engine: starting ({event.message}); a first start "
                               "builds the model copy once and can take a minute",
                               t.MessageType.Info)
            return
        if self._token is None:
            self._token = f"gemma-engine-{uuid.uuid4().hex[:8]}"
            self._created = asyncio.ensure_future(self._begin(self._token, event.message,
                                                              percent))
            return
        token = self._token
        assert self._created is not None
        self._after_begin(lambda: self.ls.work_done_progress.report(
            token, t.WorkDoneProgressReport(message=event.message, percentage=percent)))

    async def _begin(self, token: str, message: str, percent: int | None) -> bool:
        try:
            await self.ls.work_done_progress.create_async(token)
        except Exception:  # noqa: BLE001 - a client that refuses the token gets no progress
            return False
        self.ls.work_done_progress.begin(token, t.WorkDoneProgressBegin(
            title="Gemma engine starting", message=message, percentage=percent,
            cancellable=False))
        return True

    def _after_begin(self, send: Callable[[], None]) -> None:
        created = self._created
        if created is None:
            return
        def go(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None and f.result():
                send()

        if created.done():
            go(created)
        else:
            created.add_done_callback(go)

    def _end(self, message: str) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        self._after_begin(lambda: self.ls.work_done_progress.end(
            token, t.WorkDoneProgressEnd(message=message)))
