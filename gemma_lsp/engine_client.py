"""Client side of the engine socket: connect (starting the daemon if none runs), stream replies
by request id, cancel, and reconnect after the engine died. Imports no numpy: only
`engine.protocol` from the engine package.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine import protocol as P

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The engine is unreachable, went away, or answered a request with an error."""

    def __init__(self, message: str, code: str = "unavailable") -> None:
        super().__init__(message)
        self.code = code


_CLOSED = object()  # queued to every pending request when the connection drops
_CANCELLED = object()  # queued by cancel(): a blocked next() returns at once


class RequestHandle:
    """One request's replies: Token messages, then Done (errors raise EngineError)."""

    def __init__(self, client: EngineClient, req_id: int) -> None:
        self.client = client
        self.id = req_id
        self.queue: queue.Queue[Any] = queue.Queue()
        self.done = False

    def next(self, timeout: float | None = None) -> P.Token | P.Done:
        if self.done:
            raise EngineError(f"request {self.id} has already ended", "ended")
        try:
            msg = self.queue.get(timeout=timeout)
        except queue.Empty:
            raise EngineError(f"no reply from the engine in {timeout:.0f}s", "timeout") from None
        if msg is _CANCELLED:
            self.done = True
            raise EngineError(f"request {self.id} was cancelled", "cancelled")
        if msg is _CLOSED:
            self.done = True
            raise EngineError("engine connection lost (the engine stopped or crashed); the next "
                              "request restarts it")
        if isinstance(msg, P.Error):
            self.done = True
            raise EngineError(msg.message, msg.code)
        if isinstance(msg, P.Done):
            self.done = True
        return msg  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[P.Token | P.Done]:
        while not self.done:
            yield self.next()

    def cancel(self) -> None:
        """Stop the engine's work and wake a reader blocked in `next` (its replies from now
        on are dropped)."""
        if not self.done:
            self.client.cancel(self.id)
            self.queue.put(_CANCELLED)


class EngineClient:
    def __init__(
        self,
        socket_path: str | Path | None = None,
        autostart: bool = True,
        model: str | None = None,
        start_timeout: float = 300.0,
        name: str = "gemma-lsp",
    ) -> None:
        self.path = Path(socket_path) if socket_path else P.socket_path()
        self.autostart = autostart
        self.model_path = model
        self.start_timeout = start_timeout
        self.name = name
        self.model = ""
        self.pid = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the socket, pending map and reconnects
        self._sock: socket.socket | None = None
        self._pending: dict[int, RequestHandle | None] = {}  # None: replies are discarded
        self._connect()

    # ------------------------------------------------------------------ requests

    def generate(self, prompt: str, **opts: Any) -> RequestHandle:
        """Start a completion; iterate the handle for Token messages and a final Done."""
        return self._request(lambda i: P.Generate(id=i, prompt=prompt, **opts))

    def warm(self, prompt: str, doc: str = "") -> None:
        """Prefill `prompt` at the lowest priority; fire and forget."""
        self._request(lambda i: P.Warm(id=i, prompt=prompt, doc=doc), keep=False)

    def cancel(self, req_id: int) -> None:
        with self._lock:
            if req_id in self._pending:
                self._pending[req_id] = None  # discard what still arrives for it
        try:
            self._send(P.Cancel(id=req_id))
        except EngineError:
            pass  # the engine is gone: nothing runs for us any more

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        handle = self._request(lambda i: P.Status(id=i))
        msg = handle.queue.get(timeout=timeout)
        if msg is _CLOSED:
            raise EngineError("engine connection lost while asking for status")
        if isinstance(msg, P.Error):
            raise EngineError(msg.message, msg.code)
        assert isinstance(msg, P.StatusReply)
        return dict(msg.info)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Ask the engine to save its cache and exit; returns once the connection closes."""
        handle = self._request(lambda i: P.Shutdown(id=i))
        try:
            handle.queue.get(timeout=timeout)
        except queue.Empty:
            pass
        deadline = time.monotonic() + timeout
        while self._sock is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, make: Any, keep: bool = True) -> RequestHandle:
        req_id = next(self._ids)
        handle = RequestHandle(self, req_id)
        with self._lock:
            self._pending[req_id] = handle if keep else None
        try:
            self._send(make(req_id))
        except EngineError:
            with self._lock:
                self._pending.pop(req_id, None)
            raise
        return handle

    def _send(self, msg: P.Message) -> None:
        data = P.encode(msg)
        for attempt in (1, 2):
            with self._lock:
                sock = self._sock
            if sock is None:
                self._connect()
                with self._lock:
                    sock = self._sock
            try:
                assert sock is not None
                with self._lock:
                    sock.sendall(data)
                return
            except OSError as e:
                self._drop(sock)
                if attempt == 2:
                    raise EngineError(f"cannot reach the engine: {e}") from e

    def _connect(self) -> None:
        with self._lock:
            if self._sock is not None:
                return
            sock = self._try_connect()
            if sock is None and self.autostart:
                self._start_daemon()
                deadline = time.monotonic() + self.start_timeout
                while sock is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                    sock = self._try_connect()
            if sock is None:
                hint = " (autostart is off)" if not self.autostart else ""
                raise EngineError(f"no engine is listening on {self.path}{hint}")
            try:
                sock.sendall(P.encode(P.Hello(client=self.name)))
                reply = P.read_frame(sock)
            except (OSError, P.ProtocolError) as e:
                sock.close()
                raise EngineError(f"engine handshake failed: {e}") from e
            if isinstance(reply, P.Error):
                sock.close()
                raise EngineError(reply.message, reply.code)
            if not isinstance(reply, P.HelloReply):
                sock.close()
                raise EngineError(f"engine handshake failed: got {reply!r}")
            self.model, self.pid = reply.model, reply.pid
            self._sock = sock
        threading.Thread(target=self._read, args=(sock,), name="engine-reader",
                         daemon=True).start()

    def _try_connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
            return s
        except OSError:
            s.close()
            return None

    def _start_daemon(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gemma_lsp", "engine", "--socket", str(self.path)]
        if self.model_path:
            cmd += ["--model", self.model_path]
        logfile = self.path.parent / "engine.log"
        log.info("starting the engine: %s (log: %s)", " ".join(cmd), logfile)
        with open(logfile, "ab") as out:
            subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True, env=dict(os.environ))

    def _read(self, sock: socket.socket) -> None:
        try:
            while True:
                msg = P.read_frame(sock)
                if msg is None:
                    break
                req_id = getattr(msg, "id", 0)
                with self._lock:
                    handle = self._pending.get(req_id)
                    if isinstance(msg, P.Done | P.Error | P.StatusReply):
                        self._pending.pop(req_id, None)
                if handle is not None:
                    handle.queue.put(msg)
                elif isinstance(msg, P.Error) and req_id == 0:
                    log.warning("engine: %s", msg.message)
        except (OSError, P.ProtocolError) as e:
            log.info("engine connection ended: %s", e)
        finally:
            self._drop(sock)

    def _drop(self, sock: socket.socket | None) -> None:
        """Forget a dead connection and fail everything that waited on it."""
        with self._lock:
            if sock is None or self._sock is not sock:
                return
            self._sock = None
            pending, self._pending = self._pending, {}
        try:
            sock.close()
        except OSError:
            pass
        for handle in pending.values():
            if handle is not None:
                handle.queue.put(_CLOSED)
