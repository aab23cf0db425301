"""The resident engine process: a Unix-socket server (frames in -> scheduler -> frames out)
and its lifecycle (single-instance lock, idle exit, signals, prompt-cache persistence, and
the start-up status file the client watches: progress while a first start builds the model
copy, the reason when it cannot start).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import protocol as P
from engine.http_api import ApiServer, HttpOptions
from engine.integrity import atomic_write, private_dir, remove_stale_temps
from engine.prompt_cache import PromptCache, prune_saves
from engine.runtime import Model, pin_blas_threads
from engine.scheduler import Scheduler
from engine.weights import cache_root

log = logging.getLogger("gemma-lsp.engine")


@dataclass(frozen=True)
class DaemonOptions:
    socket: Path | None = None  # None: protocol.socket_path()
    idle_timeout_s: float = 1800.0  # 0 = never exit when idle
    cache_mb: int = 512
    model: str | None = None  # None: the embedded model
    threads: int | None = None
    persist: bool = True
    cache_file: Path | None = None  # None: in the user cache dir, named by model fingerprint
    http: HttpOptions | None = None  # also serve the OpenAI-compatible API (engine.http_api)
    client_buffer_kb: int = 256  # replies queued for a client before its work pauses
    client_stall_s: float = 30.0  # a paused client that reads nothing this long is dropped
    draft_model: str | None = None  # a Gemma 4 assistant to draft with (None: prompt lookup)
    speculate: bool = True  # False: never draft, whatever requests ask
    kernels: bool = True  # False: no packed matmul kernels (engine/kernels), numpy only
    quant: str | None = None  # a Hugging Face checkpoint's weight type (None: by its size)

    def __post_init__(self) -> None:
        if self.client_buffer_kb < 4:
            raise ValueError(f"client buffer must be >= 4 KB, got {self.client_buffer_kb}")
        if not self.client_stall_s > 0:
            raise ValueError(f"client stall timeout must be > 0 s, got {self.client_stall_s}")
        if self.idle_timeout_s < 0:
            raise ValueError(f"idle timeout must be >= 0, got {self.idle_timeout_s}")
        if self.cache_mb < 0:
            raise ValueError(f"cache size must be >= 0 MB, got {self.cache_mb}")


class AlreadyRunning(Exception):
    def __init__(self, pid: str) -> None:
        super().__init__(f"an engine is already running (pid {pid or '?'})")


class Connection:
    """One client: a reader thread (requests in) and a writer thread (replies out).

    Sending never blocks the sender (the compute thread least of all): replies go into a
    bounded outbound buffer that the writer thread drains into the socket. A client whose
    buffer passes `buffer_bytes` is not reading: `writable()` turns false and the scheduler
    pauses its work until the writer has drained half of it; a client that stays that way for
    `stall_s` is dropped (its work cancelled) and the others never notice.
    """

    def __init__(self, daemon: Daemon, sock: socket.socket, buffer_bytes: int = 256 << 10,
                 stall_s: float = 30.0) -> None:
        self.daemon = daemon
        self.sock = sock
        self.buffer_bytes = buffer_bytes
        self.stall_s = stall_s
        self.name = ""  # the client's name from its hello
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._out_cv = threading.Condition()
        self._paused_since: float | None = None  # when the buffer last passed buffer_bytes
        self.closed = False
        try:  # the kernel's share of the buffer is bounded too (Linux doubles the value)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(buffer_bytes // 2, 4096))
        except OSError:
            pass

    def send(self, msg: P.Message) -> None:
        """Queue one message for the writer; OSError if the connection is closed or so far
        behind that even a paused client's buffer overflowed (it is then dropped)."""
        data = P.encode(msg)
        with self._out_cv:
            if self.closed:
                raise OSError("connection closed")
            overflow = bool(self._out) and self._out_bytes + len(data) > 4 * self.buffer_bytes
            if not overflow:
                self._out.append(data)
                self._out_bytes += len(data)
                if self._paused_since is None and self._out_bytes > self.buffer_bytes:
                    self._paused_since = time.monotonic()
                    log.info("client %s is not reading its replies: its work is paused",
                             self.name or "?")
                self._out_cv.notify()
        if overflow:
            self._drop(f"its reply buffer overflowed ({self._out_bytes} bytes queued)")
            raise OSError("client dropped: not reading its replies")

    def writable(self) -> bool:
        """False while the client is not reading (the scheduler pauses its work)."""
        return self._paused_since is None and not self.closed

    def serve(self) -> None:
        threading.Thread(target=self._write, name="client-writer", daemon=True).start()
        try:
            if not self._handshake():
                return
            while not self.closed:
                try:
                    msg = P.read_frame(self.sock)
                except P.FrameError as e:  # out of step: answer if we can, then close
                    self._reply(P.Error(0, P.E_BAD_REQUEST, str(e)))
                    return
                except P.ProtocolError as e:  # a bad message in a whole frame: go on
                    self._reply(P.Error(e.req_id, P.E_BAD_REQUEST, str(e)))
                    continue
                if msg is None:
                    return
                self.daemon.touch()
                try:
                    self._dispatch(msg)
                except Exception as e:  # the daemon turns every exception into an error reply
                    log.exception("handling %s failed", msg.TYPE)
                    self._reply(P.Error(getattr(msg, "id", 0), P.E_INTERNAL,
                                        f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        finally:
            self.close(flush=True)

    def _handshake(self) -> bool:
        """The first frame must be a well-formed hello of our version; else an error reply."""
        try:
            msg = P.read_frame(self.sock)
        except P.ProtocolError as e:
            self._reply(P.Error(0, P.E_BAD_REQUEST, f"bad hello: {e}"))
            return False
        if msg is None:
            return False
        if not isinstance(msg, P.Hello):
            self._reply(P.Error(0, P.E_BAD_REQUEST, f"expected hello first, got {msg.TYPE}"))
            return False
        if msg.version != P.PROTOCOL_VERSION:
            self._reply(P.Error(0, P.E_VERSION, f"client speaks protocol {msg.version}, this "
                                               f"engine speaks {P.PROTOCOL_VERSION}"))
            return False
        self.name = msg.client
        self.send(P.HelloReply(model=self.daemon.model.name, pid=os.getpid()))
        return True

    def _dispatch(self, msg: P.Message) -> None:
        sched = self.daemon.scheduler
        if isinstance(msg, P.Generate | P.Warm | P.Score):
            sched.submit(self, msg)
        elif isinstance(msg, P.Cancel):
            sched.cancel(self, msg.id)
        elif isinstance(msg, P.Status):
            self.send(P.StatusReply(msg.id, sched.status() | self.daemon.info()))
        elif isinstance(msg, P.Shutdown):
            self.send(P.Done(msg.id, "shutdown"))
            self.daemon.request_stop("shutdown requested by a client")
        else:
            self._reply(P.Error(getattr(msg, "id", 0), P.E_BAD_REQUEST,
                                f"{msg.TYPE} is not a request"))

    def _reply(self, msg: P.Message) -> None:
        try:
            self.send(msg)
        except OSError:
            pass

    def _write(self) -> None:
        """The writer thread: drain the buffer; the only thread that may wait on the socket."""
        try:
            while True:
                with self._out_cv:
                    while not self._out and not self.closed:
                        self._out_cv.wait()
                    if not self._out:
                        return
                    data = self._out[0]
                if not self._send_all(data):
                    return
                with self._out_cv:
                    self._out.popleft()
                    self._out_bytes -= len(data)
                    resumed = (self._paused_since is not None
                               and self._out_bytes <= self.buffer_bytes // 2)
                    if resumed:
                        self._paused_since = None
                if resumed:
                    log.info("client %s reads again: its work resumes", self.name or "?")
                    self.daemon.scheduler.wake()
        except (OSError, ValueError):  # the socket went away under us
            self._drop("")

    def _send_all(self, data: bytes) -> bool:
        """Write `data` without blocking forever: False once the client was dropped."""
        view = memoryview(data)
        while view:
            if self.closed and not self._flushing:
                return False
            _, ready, _ = select.select([], [self.sock], [], 0.5)
            if not ready:
                since = self._paused_since
                if since is not None and time.monotonic() - since > self.stall_s:
                    self._drop(f"it read nothing for {self.stall_s:.0f}s")
                    return False
                continue
            try:
                n = self.sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            view = view[n:]
        return True

    _flushing = False

    def _drop(self, why: str) -> None:
        if why and not self.closed:
            log.warning("dropping client %s: %s", self.name or "?", why)
        self.close()

    def close(self, flush: bool = False) -> None:
        """Stop this client's work and close; `flush` first sends what is queued (briefly)."""
        with self._out_cv:
            if self.closed:
                return
            self.closed = True
            self._flushing = flush and bool(self._out) and self._paused_since is None
            self._out_cv.notify_all()
        self.daemon.scheduler.cancel_client(self)
        self.daemon.forget(self)
        if self._flushing:  # e.g. the error reply to a bad hello, before the socket closes
            deadline = time.monotonic() + 2.0
            while self._out and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def _glibc() -> Any:
    """The C library when it is glibc on Linux (mallopt, malloc_trim), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def limit_malloc_arenas() -> None:
    """glibc: two malloc arenas, not one per thread (writers, HTTP, compute, kernel build).
    (A fixed 128 KB mmap threshold, tried to make freed per-request arrays go back to the
    system, cost next-edit scoring 75 ms a request in page faults: not kept.) No-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-8, 2)  # M_ARENA_MAX (leaves the mmap threshold dynamic)


def malloc_trimmer() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`: give the pages of freed heap blocks back to the system. With
    the dynamic mmap threshold, freed arrays of up to 32 MB (a request's logits, attention
    scores, temporaries) stay in the heap, counted in RSS until reused. None elsewhere."""
    import ctypes

    libc = _glibc()
    if libc is None:
        return None
    trim = libc.malloc_trim
    trim.argtypes = [ctypes.c_size_t]

    def release() -> None:
        trim(0)

    return release


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.path = opts.socket or P.socket_path()
        self.started = time.monotonic()
        self._last_active = time.monotonic()
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock_fd: int | None = None
        self._status_at = 0.0
        self._building = False  # the model copy is being built (a slow first start)
        self._steps: list[str] = []  # a build's milestones, so a watcher that polls sees all
        self._kernel_build: threading.Thread | None = None
        self._trim: Callable[[], None] | None = None  # glibc's malloc_trim, where there is one
        self._rss_ready = 0
        self.http_url: str | None = None
        self.model: Model
        self.scheduler: Scheduler
        self.cache: PromptCache

    def _release_memory(self) -> None:
        """The queue emptied (at most once a second): give freed heap memory back, but only
        when RSS is past what the model, its packed kernels and the cache budget explain.
        Pages given back are paged in again by the next request (trimming whenever the queue
        emptied cost next-edit scoring 50-80 ms a request), so below that line they stay."""
        if self._trim is None:
            return
        packed = self.model.kernel_status().get("packed_bytes")
        line = (self._rss_ready + (packed if isinstance(packed, int) else 0)
                + (self.opts.cache_mb << 20))
        if resident_bytes() > line:
            self._trim()

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        os.umask(0o077)  # everything the engine creates is the user's alone
        limit_malloc_arenas()
        self._take_lock()  # before loading anything: a second daemon exits at once
        try:
            self._status("starting", "loading the model")
            blas, threads = pin_blas_threads(self.opts.threads)
            t0 = time.perf_counter()
            self.model = Model.load(self.opts.model, progress=self._progress,
                                    quant=self.opts.quant)
            self._status("starting", "warming up the model")
            self.model.build_quantized(threads)  # ~0.9 s for the shipped model
            self.model.warm_up()
            cfg = self.model.config
            self.cache = PromptCache(cfg.n_layers, cfg.kv_heads_max, cfg.head_dim_max,
                                     self.opts.cache_mb << 20)
            if self.opts.persist:
                if self.opts.cache_file is None:  # our own directory (older versions: 0755)
                    private_dir(self.cache_file.parent, tighten=True)
                remove_stale_temps(self.cache_file.parent)  # a save killed half-way
                if self.cache.load(self.cache_file, self.model.fingerprint):
                    log.info("prompt cache loaded: %d tokens", self.cache.n_tokens)
            draft = None
            if self.opts.draft_model:
                from engine.assistant import Assistant

                draft = Assistant.load(self.opts.draft_model)
                draft.check_target(cfg)
                log.info("drafting with the assistant %s", draft.name)
            self._trim = malloc_trimmer()
            self._rss_ready = resident_bytes()  # the model as loaded, before any request
            self.scheduler = Scheduler(self.model, self.cache, draft_model=draft,
                                       speculate=self.opts.speculate,
                                       release_memory=self._release_memory)
            self.scheduler.start()
            listener = self._listen()
            http = self._serve_http()
            log.info("engine ready in %.1fs on %s (%s, %d threads)", time.perf_counter() - t0,
                     self.path, blas, threads)
            self._install_signals()
            threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
            self._status("ready", f"serving {self.model.name}")
            if self.opts.kernels:  # numpy works until they are built
                self._kernel_build = self.model.build_kernels(threads, background=True)
            elif self.model.weights.kernels is not None:
                self.model.weights.kernels.stats.state = "off: --no-kernels"
            while not self._stop.wait(0.5):
                if self._idle_expired():
                    self.request_stop("idle")
            log.info("stopping: %s", self._stop_reason)
            listener.close()
            if http is not None:
                http.shutdown()
                http.server_close()
            self.scheduler.stop()
            self.save_cache()
            self._status("stopped", self._stop_reason)
            return 0
        except Exception as e:
            self._status("failed", str(e) if isinstance(e, ValueError)
                         else f"{type(e).__name__}: {e}")
            raise
        finally:
            self._cleanup()

    def _status(self, state: str, message: str, fraction: float | None = None) -> None:
        """Tell clients waiting for this engine how its start goes (P.status_path)."""
        self._status_at = time.monotonic()
        info = {"pid": os.getpid(), "state": state, "message": message, "fraction": fraction,
                "building": self._building, "steps": self._steps, "time": time.time()}
        try:
            atomic_write(P.status_path(self.path), json.dumps(info))
        except OSError as e:
            log.warning("cannot write the status file: %s", e)

    def _progress(self, message: str, fraction: float | None) -> None:
        """Model loading calls this only on its slow path (a first build)."""
        self._building = True
        if fraction is None:
            log.info("%s", message)
        kind = re.sub(r"[\d/]+", "", message)  # "dequantizing m (3/90 tensors)": one step
        if len(self._steps) < 32 and (not self._steps or
                                      re.sub(r"[\d/]+", "", self._steps[-1]) != kind):
            self._steps.append(message)
        if time.monotonic() - self._status_at >= 0.2 or fraction is None:
            self._status("starting", message, fraction)

    def _serve_http(self) -> ApiServer | None:
        opts = self.opts.http
        if opts is None:
            return None
        try:
            server = ApiServer(opts, self.scheduler, self.model.name, touch=self.touch)
        except OSError as e:
            raise ValueError(f"cannot serve HTTP on {opts.host}:{opts.port}: {e.strerror}") from e
        server.start()
        host, port = server.server_address[:2]
        self.http_url = f"http://{host!s}:{port}/v1"
        log.info("OpenAI-compatible API on %s%s", self.http_url,
                 " (bearer token required)" if opts.token else "")
        return server

    @property
    def cache_file(self) -> Path:
        if self.opts.cache_file is not None:
            return self.opts.cache_file
        return cache_root() / "prompt-cache" / f"{self.model.fingerprint[:16]}.safetensors"

    def save_cache(self) -> None:
        if not self.opts.persist:
            return
        try:
            self.cache.save(self.cache_file, self.model.fingerprint)
            log.info("prompt cache saved: %d tokens to %s", self.cache.n_tokens, self.cache_file)
        except OSError as e:
            log.warning("could not save the prompt cache: %s", e)
        if self.opts.cache_file is None:  # our own directory: keep it bounded
            prune_saves(self.cache_file.parent, self.cache_file)

    def request_stop(self, reason: str) -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def touch(self) -> None:
        self._last_active = time.monotonic()

    def forget(self, conn: Connection) -> None:
        with self._conns_lock:
            self._conns.discard(conn)
        self.touch()

    def info(self) -> dict[str, Any]:
        with self._conns_lock:
            clients = len(self._conns)
        return {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 1),
                "clients": clients, "socket": str(self.path),
                "idle_timeout_s": self.opts.idle_timeout_s, "http": self.http_url}

    def _idle_expired(self) -> bool:
        if self.opts.idle_timeout_s <= 0:
            return False
        with self._conns_lock:
            if self._conns:
                return False
        if self.scheduler.busy():
            self.touch()
            return False
        return time.monotonic() - self._last_active > self.opts.idle_timeout_s

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, f: self.request_stop(signal.Signals(s).name))

    # ------------------------------------------------------------------ socket

    def _take_lock(self) -> None:
        d = self.path.parent
        P.ensure_runtime_dir(d)
        lock_path = d / (self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(pid) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _listen(self) -> socket.socket:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # we hold the lock: whoever made it is gone
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        s.listen(16)
        return s

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            conn = Connection(self, sock, self.opts.client_buffer_kb << 10,
                              self.opts.client_stall_s)
            with self._conns_lock:
                self._conns.add(conn)
            self.touch()
            threading.Thread(target=conn.serve, name="client", daemon=True).start()

    def _cleanup(self) -> None:
        if self._kernel_build is not None:
            self._kernel_build.join()  # onnxruntime aborts if torn down mid-build
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        try:
            if self._lock_fd is not None and self.path.exists():
                self.path.unlink()
        except OSError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def serve(opts: DaemonOptions) -> int:
    """Run the engine in the foreground until idle, SIGTERM/SIGINT or a shutdown request."""
    try:
        return Daemon(opts).run()
    except AlreadyRunning as e:
        print(f"gemma-lsp engine: {e}; nothing to do")
        return 0
