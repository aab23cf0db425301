"""The real language server over stdio with a scripted backend: every answer is the same few
words, one every `GEMMA_TEST_PIECE_S` seconds, so that long work is long whatever the machine.
Run as `python -m tests.lsp.scripted_server`."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from gemma_lsp.backend import Finish
from gemma_lsp.server import create_server

PIECES = [" adds", " the", " amount", " to", " the", " balance", "."]


class _Stream:
    def __init__(self, delay: float) -> None:
        self.pieces = list(PIECES)
        self.delay = delay
        self.stopped = threading.Event()
        self.finish: Finish | None = None

    def next(self, timeout: float | None = None) -> str | None:
        if self.stopped.wait(self.delay) or not self.pieces:
            self.finish = Finish(reason="cancelled" if self.stopped.is_set() else "stop")
            return None
        return self.pieces.pop(0)

    def cancel(self) -> None:
        self.stopped.set()


class ScriptedBackend:
    model_name = "gemma-3-270m"

    def __init__(self) -> None:
        self.delay = float(os.environ.get("GEMMA_TEST_PIECE_S", "0.4"))
        self.started = 0

    def start(self, prompt: str, **_: Any) -> _Stream:
        self.started += 1
        return _Stream(self.delay)

    def warm(self, prompt: str, doc: str) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"model": "scripted", "started": self.started, "queue": []}

    def restart(self) -> None:
        pass

    def close(self) -> None:
        pass


if __name__ == "__main__":
    backend = ScriptedBackend()
    time.sleep(0)
    create_server(lambda _opts: backend).start_io()
