"""Files and start-up of the real engine process: a save killed half-way, a start that
fails (its reason reaches the client at once), a runtime directory that is not private."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import protocol as P
from engine.weights import embedded_model_path
from gemma_lsp.engine_client import START_RETRY_S, EngineClient, EngineError
from tests.engine.test_daemon_process import LONG, PROMPT, Engine, text_of


@pytest.fixture()
def root() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="gf-"))  # AF_UNIX paths are short
    yield d
    subprocess.run(["pkill", "-f", str(d)], check=False)  # engines it started
    shutil.rmtree(d, ignore_errors=True)


def test_a_save_killed_half_way_leaves_a_temp_that_the_next_start_removes(root: Path) -> None:
    (root / "run").mkdir(mode=0o700)
    engine = Engine(root)
    saves = root / "saves"
    saved = saves / "prompts.safetensors"
    proc = engine.start("--cache-file", str(saved))
    c = engine.client()
    c.warm(LONG)  # ~1,600 tokens: 58 MB of K/V to save
    deadline = time.monotonic() + 120
    while c.status()["cache"]["tokens"] < 1500 and time.monotonic() < deadline:
        time.sleep(0.2)
    c.close()
    proc.send_signal(signal.SIGTERM)
    temps: list[Path] = []
    deadline = time.monotonic() + 60
    while not temps and time.monotonic() < deadline and proc.poll() is None:
        temps = list(saves.glob(".*.tmp")) if saves.exists() else []
    assert temps, "the save was not caught half-way"
    proc.kill()  # kill -9 in the middle of writing the save
    proc.wait(30)
    assert not saved.exists() and any(p.exists() for p in temps)

    engine.start("--cache-file", str(saved))
    assert not any(p.exists() for p in temps)
    assert "left by an interrupted write" in engine.log()
    c = engine.client()
    text, done = text_of(c.generate(PROMPT, max_tokens=3))
    assert text and done.reused_tokens == 0  # nothing half-written was loaded
    c.shutdown()
    assert engine.proc is not None and engine.proc.wait(60) == 0
    assert [p.name for p in saves.iterdir()] == [saved.name]
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


def test_a_start_that_fails_reports_the_engines_reason_at_once_and_retries(root: Path) -> None:
    run = root / "run"
    model = root / "model.gguf"
    model.write_bytes(b"GGUF" + os.urandom(4096))  # a corrupt model file
    sock = run / "engine.sock"
    events: list[str] = []
    c = EngineClient(socket_path=sock, model=str(model), start_wait=60, connect=False,
                     on_start=lambda e: events.append(e.kind))
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        c.connect()
    took = time.monotonic() - t0
    assert err.value.code == "start_failed" and "model.gguf" in str(err.value)
    assert "not a readable GGUF" in str(err.value) and took < 30  # not the 300 s wait
    assert events[-1] == "failed"
    assert P.read_status(sock)["state"] == "failed"  # type: ignore[index]
    # right after: answered at once, without another start
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="not a readable GGUF"):
        c.connect()
    assert time.monotonic() - t0 < 0.5
    # the cause is fixed: the next request (after START_RETRY_S) starts it and is served
    shutil.copyfile(embedded_model_path(), model)
    time.sleep(START_RETRY_S)
    c.connect()
    text, done = text_of(c.generate(PROMPT, max_tokens=3))
    assert text and done.reason == "length"
    assert events[-1] == "ready"
    c.shutdown()


def test_a_runtime_dir_that_is_not_private_is_refused_by_the_client_and_the_engine(
    root: Path,
) -> None:
    run = root / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    sock = run / "engine.sock"
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        EngineClient(socket_path=sock)
    assert err.value.code == "unsafe" and "0755" in str(err.value)
    assert time.monotonic() - t0 < 1 and not (run / "engine.log").exists()  # nothing started
    engine = subprocess.run([sys.executable, "-m", "gemma_lsp", "engine", "--socket",
                             str(sock)], capture_output=True, text=True, timeout=120)
    assert engine.returncode == 2 and "mode 0700" in engine.stderr and "0755" in engine.stderr
    os.chmod(run, 0o700)  # fixed: the next request starts the engine
    c = EngineClient(socket_path=sock)
    text, _ = text_of(c.generate(PROMPT, max_tokens=2))
    assert text
    c.shutdown()


def test_a_squatted_runtime_dir_is_refused_before_connecting(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user made /tmp/gemma-lsp-<uid> 0777 and listens there: the client must not
    connect (tests run as root, so "another owner" is simulated by the uid check)."""
    run = root / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    sock = run / "engine.sock"
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(str(sock))
    squatter.listen(1)
    squatter.settimeout(0.5)
    try:
        with pytest.raises(EngineError, match="0777.*another user could be listening"):
            EngineClient(socket_path=sock)
        with pytest.raises(EngineError, match="0777"):
            EngineClient(socket_path=sock, autostart=False)
        os.chmod(run, 0o700)
        monkeypatch.setattr(P, "_uid", lambda: os.getuid() + 1)  # the dir is someone else's
        with pytest.raises(EngineError, match=f"owner uid {os.getuid()}"):
            EngineClient(socket_path=sock)
        with pytest.raises(socket.timeout):
            squatter.accept()  # it never got a connection
    finally:
        squatter.close()


def test_flipped_bytes_in_the_model_copy_and_the_saved_cache_are_rejected_by_the_engine(
    root: Path,
) -> None:
    """Through the real engine process (a tiny model, so the rebuild is quick): 4 KB flipped
    in the engine-ready copy and 1% of the saved prompt cache's bytes flipped are warnings,
    the copy is rebuilt, the cache starts empty, and the answers equal the intact engine's."""
    import numpy as np

    from tests.engine.tiny import tiny_config, tiny_tensors, tiny_vocab, write_tiny_gguf

    cfg = tiny_config(vocab_size=len(tiny_vocab()[0]), context_length=512)
    model = root / "tiny.gguf"
    write_tiny_gguf(str(model), cfg, tiny_tensors(cfg))
    (root / "run").mkdir(mode=0o700)
    engine = Engine(root)
    engine.env["GEMMA_LSP_CACHE"] = str(root / "cache")
    saved = root / "saves" / "pc.safetensors"
    args = ("--model", str(model), "--cache-file", str(saved))
    prompt = "abcd ab a " * 20
    engine.start(*args)
    c = engine.client()
    want, _ = text_of(c.generate(prompt, max_tokens=8))
    c.shutdown()
    assert engine.proc is not None and engine.proc.wait(60) == 0 and saved.exists()

    ready = next((root / "cache" / "engine-ready").glob("*-v*")) / "model.safetensors"
    raw = bytearray(ready.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])
    ready.write_bytes(bytes(raw))
    cache = bytearray(saved.read_bytes())
    start = 8 + int.from_bytes(cache[:8], "little")
    rng = np.random.default_rng(1)
    for i in rng.choice(np.arange(start, len(cache)), size=(len(cache) - start) // 100):
        cache[i] ^= 0xFF
    saved.write_bytes(bytes(cache))

    engine.start(*args)
    log = engine.log()
    assert "fails its checksum" in log and "rebuilding" in log
    assert "prompt cache" in log and "corrupt" in log
    c = engine.client()
    got, done = text_of(c.generate(prompt, max_tokens=8))
    assert got == want and done.reused_tokens == 0
    c.shutdown()


def test_two_builders_of_one_copy_both_succeed(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes building the same engine-ready copy at once: the slower rename finds the
    first one's directory and uses it instead of failing."""
    from engine.weights import load_model_files, write_ready
    from tests.engine.tiny import tiny_config, tiny_tensors, tiny_vocab, write_tiny_gguf

    monkeypatch.setenv("GEMMA_LSP_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(vocab_size=len(tiny_vocab()[0]), context_length=256)
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(str(gguf), cfg, tiny_tensors(cfg))
    files = load_model_files(gguf)  # the first builder
    first = (files.ready_dir / "engine.json").read_text()
    write_ready(files.ready_dir, files.config, dict(files.tensors), files.tokenizer, gguf,
                files.source_sha256)  # the slower one, with the same key
    assert (files.ready_dir / "engine.json").read_text() == first
    assert [p.name for p in files.ready_dir.parent.iterdir()] == [files.ready_dir.name]
