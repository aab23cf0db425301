"""The resident engine as a real process: clients, cancellation, crashes, bad frames, files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from engine import protocol as P
from gemma_lsp.engine_client import EngineClient, EngineError
from tests.conftest import reference_cases

PROMPT = reference_cases()[0]["prompt"]
LONG = "".join(c["prompt"] for c in reference_cases()[:5])  # ~1,600 tokens


class Engine:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "run" / "engine.sock"
        self.env = dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(root / "run"),
                        GEMMA_LSP_CACHE=os.environ.get("GEMMA_LSP_CACHE", ""),
                        XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", ""))
        self.env = {k: v for k, v in self.env.items() if v}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        log = (self.root / "engine.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_lsp", "engine", "--socket", str(self.sock), *extra],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while not self._ready():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        return self.proc

    def _ready(self) -> bool:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(self.sock))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def client(self, autostart: bool = False) -> EngineClient:
        return EngineClient(socket_path=self.sock, autostart=autostart)

    def log(self) -> str:
        p = self.root / "engine.log"
        return p.read_text() if p.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture()
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="ge-"))  # AF_UNIX paths are short
    (root / "run").mkdir(mode=0o700)
    e = Engine(root)
    yield e
    e.stop()
    subprocess.run(["pkill", "-f", str(e.sock)], check=False)  # autostarted ones too
    shutil.rmtree(root, ignore_errors=True)


def text_of(handle: object) -> tuple[str, P.Done]:
    out = ""
    for msg in handle:  # type: ignore[attr-defined]
        if isinstance(msg, P.Token):
            out += msg.text
        else:
            return out + msg.tail, msg
    raise AssertionError("no Done")


def test_hello_permissions_and_single_instance(engine: Engine) -> None:
    engine.start("--no-persist")
    c = engine.client()
    assert c.model.endswith(".gguf") and c.pid == engine.proc.pid  # type: ignore[union-attr]
    assert stat.S_IMODE(engine.sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(engine.sock.parent.stat().st_mode) == 0o700
    second = subprocess.run(
        [sys.executable, "-m", "gemma_lsp", "engine", "--socket", str(engine.sock)],
        env=engine.env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "already running" in second.stdout
    # a wrong protocol version is a clear error
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(engine.sock))
    s.sendall(P.encode(P.Hello(version=99)))
    reply = P.read_frame(s)
    assert isinstance(reply, P.Error) and reply.code == P.E_VERSION and "99" in reply.message
    c.close()


def test_two_clients_at_once(engine: Engine) -> None:
    engine.start("--no-persist")
    a, b = engine.client(), engine.client()
    results: dict[str, str] = {}

    def run(name: str, c: EngineClient) -> None:
        results[name] = text_of(c.generate(PROMPT, max_tokens=12))[0]

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert results["a"] == results["b"] != ""
    assert results["a"] == reference_cases()[0]["greedy_text"][: len(results["a"])]
    info = a.status()
    assert info["clients"] == 2 and info["cache"]["entries"] >= 1


def test_cancel_mid_decode_and_mid_prefill(engine: Engine) -> None:
    engine.start("--no-persist")
    c = engine.client()
    h = c.generate(PROMPT, max_tokens=200)
    first = h.next(120)
    assert isinstance(first, P.Token)
    h.cancel()
    with pytest.raises(EngineError) as err:
        while True:
            h.next(60)
    assert err.value.code == "cancelled"
    h2 = c.generate(LONG, max_tokens=5)
    h2.cancel()  # right away: inside the prefill
    with pytest.raises(EngineError) as err:
        while True:
            h2.next(60)
    assert err.value.code == "cancelled"
    # the engine keeps serving, and the cancelled prefill left its finished chunks cached
    text, done = text_of(c.generate(PROMPT + " ", max_tokens=3))
    assert done.reason == "length" and text


def test_kill_9_gives_a_clear_error_and_the_next_request_restarts(engine: Engine) -> None:
    proc = engine.start("--no-persist")
    c = engine.client(autostart=True)
    h = c.generate(LONG, max_tokens=100)
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(EngineError, match="connection lost"):
        while True:
            h.next(60)
    text, done = text_of(c.generate(PROMPT, max_tokens=4))  # autostarts a new engine
    assert text and done.reason == "length" and c.pid != proc.pid
    c.shutdown()


def _raw(engine: Engine) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(engine.sock))
    s.settimeout(30)
    s.sendall(P.encode(P.Hello()))
    assert isinstance(P.read_frame(s), P.HelloReply)
    return s


def test_bad_frames_get_errors_and_others_keep_being_served(engine: Engine) -> None:
    engine.start("--no-persist")
    good = engine.client()
    s = _raw(engine)

    def frame(body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + body

    cases = [
        frame(b"\xc1\xc1 not msgpack"),
        frame(msgpack.packb({"type": "explode", "id": 1})),
        frame(msgpack.packb({"type": "generate", "id": "x", "prompt": 5})),
        frame(msgpack.packb([1, 2, 3])),
        frame(msgpack.packb({"type": "generate", "id": 2, "prompt": "x", "max_tokens": -3})),
        frame(msgpack.packb({"type": "generate", "id": 3, "prompt": "x = 1\n" * 12_000})),
    ]
    for data in cases:
        s.sendall(data)
        reply = P.read_frame(s)
        assert isinstance(reply, P.Error), data
    assert reply.code == P.E_TOO_LONG and "context" in reply.message
    # the same connection still works after bad bodies
    s.sendall(P.encode(P.Status(id=7)))
    assert isinstance(P.read_frame(s), P.StatusReply)
    # an oversized length prefix: an error reply, then that connection closes
    s.sendall(struct.pack(">I", P.MAX_FRAME + 1))
    reply = P.read_frame(s)
    assert isinstance(reply, P.Error) and "exceeds" in reply.message
    assert P.read_frame(s) is None
    # a truncated frame: the connection is closed cleanly
    t = _raw(engine)
    t.sendall(struct.pack(">I", 100) + b"abc")
    t.shutdown(socket.SHUT_WR)
    reply = P.read_frame(t)
    assert reply is None or isinstance(reply, P.Error)
    # meanwhile another client is served normally
    text, done = text_of(good.generate(PROMPT, max_tokens=3))
    assert text and done.reason == "length"


def test_cache_persists_across_restart_and_a_wrong_fingerprint_is_rejected(
    engine: Engine, tmp_path: Path
) -> None:
    saved = tmp_path / "prompts.safetensors"
    engine.start("--cache-file", str(saved))
    c = engine.client()
    c.warm(PROMPT)
    deadline = time.monotonic() + 60
    while c.status()["cache"]["tokens"] < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    c.shutdown()
    assert engine.proc is not None and engine.proc.wait(30) == 0
    assert "prompt cache saved" in engine.log()

    engine.start("--cache-file", str(saved))
    c = engine.client()
    _, done = text_of(c.generate(PROMPT, max_tokens=2))
    assert done.reused_tokens >= done.prompt_tokens - 2
    c.shutdown()
    engine.proc.wait(30)

    # tamper with the save's fingerprint (same length): the next engine must ignore the file
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # one file
    raw = saved.read_bytes()
    head = 8 + int.from_bytes(raw[:8], "little")
    fp = json.loads(raw[8:head])["__metadata__"]["fingerprint"]
    saved.write_bytes(raw[:head].replace(fp.encode(), b"f" * len(fp)) + raw[head:])
    engine.start("--cache-file", str(saved))
    c = engine.client()
    _, done = text_of(c.generate(PROMPT, max_tokens=2))
    assert done.reused_tokens == 0
    assert "another model" in engine.log()
    c.close()


def test_idle_exit_and_sigterm_both_save_the_cache(engine: Engine, tmp_path: Path) -> None:
    saved = tmp_path / "prompts.safetensors"
    engine.start("--cache-file", str(saved), "--idle-timeout", "2")
    c = engine.client()
    c.warm(PROMPT)
    deadline = time.monotonic() + 60
    while c.status()["cache"]["tokens"] < 300 and time.monotonic() < deadline:
        time.sleep(0.1)
    c.close()  # no clients left: two idle seconds later the engine exits by itself
    assert engine.proc is not None and engine.proc.wait(60) == 0
    assert "stopping: idle" in engine.log() and saved.exists()
    assert engine.log().count("prompt cache saved") == 1

    engine.start("--cache-file", str(saved))
    c = engine.client()
    _, done = text_of(c.generate(PROMPT, max_tokens=2))
    assert done.reused_tokens >= done.prompt_tokens - 2  # the idle save was loaded
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.proc.wait(60) == 0
    assert engine.log().count("prompt cache saved") == 2


def test_a_client_that_disconnects_has_its_work_cancelled(engine: Engine) -> None:
    engine.start("--no-persist")
    gone, other = engine.client(), engine.client()
    h = gone.generate(PROMPT, max_tokens=400, stop=[])
    assert isinstance(h.next(120), P.Token)
    gone.close()  # mid-decode
    deadline = time.monotonic() + 30
    while other.status()["queue"] and time.monotonic() < deadline:
        time.sleep(0.05)
    info = other.status()
    assert info["queue"] == [] and info["clients"] == 1
    assert info["requests_served"] == 0  # it was stopped, not finished
    text, done = text_of(other.generate(PROMPT, max_tokens=3))  # and the engine serves on
    assert done.reason == "length" and text


def test_status_command_line(engine: Engine) -> None:
    engine.start("--no-persist")
    out = subprocess.run([sys.executable, "-m", "gemma_lsp", "status", "--socket",
                          str(engine.sock)], env=engine.env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["model"].endswith(".gguf") and "prefill_tok_s" in info
    assert info["backend"] == "builtin" and info["model_arch"] == "gemma3"
    assert info["model_source"].startswith("embedded")
