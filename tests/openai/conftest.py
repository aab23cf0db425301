"""One real engine process serving both its socket and `--http`, shared by the OpenAI tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TOKEN = "test-token"


@dataclass
class HttpEngine:
    url: str  # the /v1 base
    sock: Path
    run: Path
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def http_engine() -> Iterator[HttpEngine]:
    run = Path(tempfile.mkdtemp(prefix="gh-", dir="/tmp"))
    port = free_port()
    log = run / "engine.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0",
             "--socket", str(run / "engine.sock"), "--http", f"127.0.0.1:{port}"],
            env=dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run), GEMMA_LSP_HTTP_TOKEN=TOKEN),
            stdout=out,
            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the engine's HTTP API did not come up"
            time.sleep(0.1)
    yield HttpEngine(f"http://127.0.0.1:{port}/v1", run / "engine.sock", run, log)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(run, ignore_errors=True)
