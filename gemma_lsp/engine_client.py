"""Client side of the engine socket: connect (starting the daemon if none runs), stream replies
by request id, cancel, and reconnect after the engine died. Imports no numpy: only
`engine.protocol` from the engine package.

Before connecting, the runtime directory must be the user's own (0700): a socket elsewhere may
belong to someone else. Starting an engine is one `_Start` per socket path, watched from a
thread: progress from the engine's status file, and when it cannot start, its own reason (the
status file, else its exit status and the end of its log) the moment it exits. A caller waits
for an engine that only loads its model (a warm start), but at most `start_wait` seconds for
one that builds its model copy (a first start: its progress is shown instead); a failure is
answered at once for START_RETRY_S, then the next request tries again.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import protocol as P

log = logging.getLogger(__name__)


class EngineError(Exception):
    """The engine is unreachable, went away, or answered a request with an error."""

    def __init__(self, message: str, code: str = "unavailable") -> None:
        super().__init__(message)
        self.code = code


START_RETRY_S = 2.0  # after a failed start, requests fail at once this long, then retry
WARM_START_WAIT_S = 60.0  # a request waits this long for an engine that is not building
LOG_MAX_BYTES = 4 << 20  # engine.log is rotated to engine.log.1 past this


@dataclass(frozen=True)
class StartEvent:
    """How an engine start goes: kind is "progress", "ready" or "failed"."""

    kind: str
    message: str
    fraction: float | None = None


StartListener = Callable[[StartEvent], None]


class _Start:
    """One attempt to bring up the engine at `path`: spawn it, then watch its status file, the
    process and the socket until it listens, fails or `timeout` passes."""

    def __init__(self, path: Path, cmd: list[str], timeout: float,
                 listener: StartListener | None) -> None:
        self.path = path
        self.timeout = timeout
        self.listener = listener
        self.state = "starting"  # -> ready | failed
        self.message = "starting the engine"
        self.fraction: float | None = None
        self.building = False  # the engine said it builds its model copy (a first start)
        self.ended_at = 0.0
        self.started_at = time.time()
        self.done = threading.Event()
        self.logfile = path.parent / "engine.log"
        self._log_start = 0
        self.proc = self._spawn(cmd)
        threading.Thread(target=self._watch, name="engine-start", daemon=True).start()

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        try:
            if self.logfile.stat().st_size > LOG_MAX_BYTES:
                os.replace(self.logfile, self.logfile.with_name("engine.log.1"))
        except OSError:
            pass
        fd = os.open(self.logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # one an older version made may be 0644
        self._log_start = os.fstat(fd).st_size
        log.info("starting the engine: %s (log: %s)", " ".join(cmd), self.logfile)
        try:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                    start_new_session=True, env=dict(os.environ))
        finally:
            os.close(fd)

    def _watch(self) -> None:
        deadline = time.monotonic() + self.timeout
        seen: tuple[Any, ...] = ()
        steps_told = 0  # the engine's milestones already told (a fast step is not missed)
        while time.monotonic() < deadline:
            if _connectable(self.path):  # a start too fast to watch still tells its steps
                self._tell_steps(P.read_status(self.path) or {}, steps_told, None)
                return self._end("ready", "the engine is ready")
            status = P.read_status(self.path) or {}
            alive = _alive(status.get("pid"))
            state, message = status.get("state"), str(status.get("message"))
            if state == "failed" and not status.get("time", 0) >= self.started_at:
                state = "stale"  # an earlier attempt's failure (that engine may still exit)
            if alive and state == "failed":
                return self._end("failed", message)
            if alive and state == "starting":
                self.building = self.building or bool(status.get("building"))
                steps_told = self._tell_steps(status, steps_told, message)
            if alive and state == "starting" and (message, status.get("fraction")) != seen:
                seen = (message, status.get("fraction"))
                fraction = status.get("fraction")
                self.message = message
                self.fraction = float(fraction) if isinstance(fraction, int | float) else None
                self._tell(StartEvent("progress", self.message, self.fraction))
            rc = self.proc.poll()
            if rc is not None:
                if status.get("pid") == self.proc.pid and state == "failed":
                    return self._end("failed", message)  # ours, and it said why
                if not (rc == 0 and alive and state == "starting"):  # not: another one starts
                    if _connectable(self.path):
                        return self._end("ready", "the engine is ready")
                    return self._end("failed", self._exit_reason(rc))
            time.sleep(0.1)
        self.proc.poll()
        self._end("failed", f"the engine did not start within {self.timeout:.0f}s (see "
                            f"{self.logfile})")

    def _tell_steps(self, status: dict[str, Any], told: int, current: str | None) -> int:
        """Tell the milestones of `status` after the first `told` (but `current`, which is
        told as the progress itself); returns how many there are now."""
        steps = status.get("steps")
        if not isinstance(steps, list):
            return told
        for step in steps[told:]:
            if str(step) != current:
                self._tell(StartEvent("progress", str(step), None))
        return len(steps)

    def _exit_reason(self, rc: int) -> str:
        """The last meaningful line the engine wrote to its log, and how it exited."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(self._log_start)
                tail = f.read()[-4000:].decode(errors="replace")
        except OSError:
            tail = ""
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith("gemma-lsp:")]
        last = (errors or lines or [""])[-1].removeprefix("gemma-lsp: error: ")
        how = f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
        return f"{last} ({how}; log: {self.logfile})" if last else \
            f"the engine exited ({how}; log: {self.logfile})"

    def _end(self, state: str, message: str) -> None:
        self.state, self.message = state, message
        self.ended_at = time.monotonic()
        self.done.set()
        self._tell(StartEvent(state, message))

    def _tell(self, event: StartEvent) -> None:
        if self.listener is not None:
            try:
                self.listener(event)
            except Exception:  # noqa: BLE001 - a listener must not stop the watch
                log.exception("start listener failed")


def _connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        start_wait: float | None = None,
        on_start: StartListener | None = None,
        connect: bool = True,
        draft_model: str | None = None,
        kernels: bool = True,
        quant: str | None = None,
    ) -> None:
        """`start_wait`: how long a request waits for an engine that builds its model copy
        (a first start) before it fails with code "starting" (default: `start_timeout`; one
        that only loads is waited for up to WARM_START_WAIT_S); `on_start` hears how a start
        goes;
        `connect=False` connects on the first request."""
        self.path = Path(socket_path) if socket_path else P.socket_path()
        self.autostart = autostart
        self.model_path = model
        self.draft_model = draft_model
        self.kernels = kernels
        self.quant = quant
        self.start_timeout = start_timeout
        self.start_wait = start_timeout if start_wait is None else start_wait
        self.on_start = on_start
        self.name = name
        self.model = ""
        self.pid = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards the socket, pending map and reconnects
        self._sock: socket.socket | None = None
        self._pending: dict[int, RequestHandle | None] = {}  # None: replies are discarded
        self._start: _Start | None = None
        if connect:
            self._connect()

    # ------------------------------------------------------------------ requests

    def generate(self, prompt: str, **opts: Any) -> RequestHandle:
        """Start a completion; iterate the handle for Token messages and a final Done."""
        return self._request(lambda i: P.Generate(id=i, prompt=prompt, **opts))

    def warm(self, prompt: str, doc: str = "") -> None:
        """Prefill `prompt` at the lowest priority; fire and forget."""
        self._request(lambda i: P.Warm(id=i, prompt=prompt, doc=doc), keep=False)

    def score(self, prompt: str, continuations: list[str], *, doc: str = "",
              priority: int = 0, timeout: float = 60.0) -> P.ScoreReply:
        """Log-probabilities of each continuation of `prompt` (blocks until the reply)."""
        handle = self._request(lambda i: P.Score(id=i, prompt=prompt,
                                                  continuations=continuations, doc=doc,
                                                  priority=priority))
        try:
            msg = handle.queue.get(timeout=timeout)
        except queue.Empty:
            self.cancel(handle.id)
            raise EngineError(f"no reply from the engine in {timeout:.0f}s", "timeout") from None
        if msg is _CLOSED:
            raise EngineError("engine connection lost (the engine stopped or crashed); the next "
                              "request restarts it")
        if msg is _CANCELLED:
            raise EngineError(f"request {handle.id} was cancelled", "cancelled")
        if isinstance(msg, P.Error):
            raise EngineError(msg.message, msg.code)
        assert isinstance(msg, P.ScoreReply)
        return msg

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

    def connect(self) -> None:
        """Connect now if not connected (EngineError as for a request)."""
        self._connect()

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
            for attempt in (1, 2):
                sock = self._open()
                try:
                    sock.sendall(P.encode(P.Hello(client=self.name)))
                    reply = P.read_frame(sock)
                    if reply is None:
                        raise ConnectionResetError("closed before its hello reply")
                    break
                except (OSError, P.ProtocolError) as e:
                    sock.close()
                    # a dying engine's listener may still take a connection, then drop it
                    if attempt == 2 or not isinstance(e, ConnectionError):
                        raise EngineError(f"engine handshake failed: {e}") from e
                    time.sleep(0.2)
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

    def _open(self) -> socket.socket:
        """A connected socket to a trusted engine, starting one if allowed (lock held)."""
        try:
            if self.autostart:
                P.ensure_runtime_dir(self.path.parent)
            elif os.path.lexists(self.path.parent):
                P.check_private_dir(self.path.parent)
            P.check_socket_owner(self.path)
        except (ValueError, OSError) as e:
            raise EngineError(str(e), "unsafe") from e
        sock = self._try_connect()
        if sock is not None:
            return sock
        if not self.autostart:
            raise EngineError(f"no engine is listening on {self.path} (autostart is off)")
        start = self._start
        if start is not None and start.state == "failed" and \
                time.monotonic() - start.ended_at < START_RETRY_S:
            raise EngineError(f"the engine cannot start: {start.message}", "start_failed")
        if start is None or start.state != "starting":
            start = self._start = _Start(self.path, self._command(), self.start_timeout,
                                         self.on_start)
        t0 = time.monotonic()
        while not start.done.wait(0.05):  # a warm start is worth waiting for; a build is not
            waited = time.monotonic() - t0
            if waited >= self.start_wait and (start.building or waited >= max(
                    self.start_wait, WARM_START_WAIT_S)):
                break
        sock = self._try_connect()
        if sock is not None:
            return sock
        if start.state == "failed":
            raise EngineError(f"the engine cannot start: {start.message}", "start_failed")
        if start.state == "ready":  # it listened, then went away again
            raise EngineError(f"the engine stopped right after starting (log: "
                              f"{start.logfile})")
        raise EngineError(f"the engine is starting ({start.message})", "starting")

    def _try_connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
            return s
        except OSError:
            s.close()
            return None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gemma_lsp", "engine", "--socket", str(self.path)]
        if self.model_path:
            cmd += ["--model", self.model_path]
        if self.draft_model:
            cmd += ["--draft-model", self.draft_model]
        if not self.kernels:
            cmd += ["--no-kernels"]
        if self.quant:
            cmd += ["--quant", self.quant]
        return cmd

    def _read(self, sock: socket.socket) -> None:
        try:
            while True:
                msg = P.read_frame(sock)
                if msg is None:
                    break
                req_id = getattr(msg, "id", 0)
                with self._lock:
                    handle = self._pending.get(req_id)
                    if isinstance(msg, P.Done | P.Error | P.StatusReply | P.ScoreReply):
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
