"""The HTTP API's connection layer against one misbehaving local client: idle and slow
connections, too many of them, a 401 that leaves its body unread, a bad seed, a client that
disconnects while waiting, and the token kept out of the command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from engine.http_api import HttpOptions, read_token_file
from gemma_lsp.engine_client import EngineClient
from tests.openai.conftest import TOKEN, HttpEngine
from tests.openai.test_http_api import PROMPT, api

TIMEOUT_S = HttpOptions("127.0.0.1", 0).request_timeout_s
LIMIT = HttpOptions("127.0.0.1", 0).max_connections


def addr(engine: HttpEngine) -> tuple[str, int]:
    u = urllib.parse.urlsplit(engine.url)
    return u.hostname or "", u.port or 0


def closed(s: socket.socket) -> bool:
    """Whether the server closed `s` (reads EOF or a reset; a 503 first is fine)."""
    s.settimeout(0.05)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_slow_and_surplus_connections_are_closed_and_others_served(
    http_engine: HttpEngine,
) -> None:
    host_port = addr(http_engine)
    idle = [socket.create_connection(host_port) for _ in range(LIMIT - 8)]
    slow = [socket.create_connection(host_port) for _ in range(8)]
    for s in slow:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    t0 = time.monotonic()
    refused = b""
    while not refused.startswith(b"HTTP/1.1 503") and time.monotonic() < t0 + TIMEOUT_S / 2:
        probe = socket.create_connection(host_port, timeout=1)  # one more than the limit
        try:
            refused = probe.recv(4096)
        except TimeoutError:  # not all of ours were accepted yet: this one took a slot
            idle.append(probe)
            continue
        probe.close()
    assert refused.startswith(b"HTTP/1.1 503") and b"too many connections" in refused
    t0 = time.monotonic()
    for _ in range(4):  # the slow ones keep trickling headers: it does not save them
        time.sleep(TIMEOUT_S / 4)
        for s in slow:
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
    deadline = t0 + TIMEOUT_S + 5
    while not all(closed(s) for s in idle + slow):
        assert time.monotonic() < deadline, "connections still open after the request timeout"
        time.sleep(0.2)
    for s in idle + slow:
        s.close()
    out = api(http_engine).completions.create(model="g", prompt=PROMPT, max_tokens=2)
    assert out.choices and out.choices[0].text


def test_a_401_with_an_unread_body_closes_the_connection(http_engine: HttpEngine) -> None:
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + \
        TOKEN.encode() + b"\r\n\r\n"
    s = socket.create_connection(addr(http_engine), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
              b"Content-Type: application/json\r\nContent-Length: " +
              str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 401") and b"Connection: close" in data
    assert data.count(b"HTTP/1.1 ") == 1  # the body was not served as a second request


def test_a_negative_seed_is_a_400_in_openais_shape(http_engine: HttpEngine) -> None:
    import openai

    for seed in (-1, 1 << 64):
        with pytest.raises(openai.BadRequestError) as err:
            api(http_engine).completions.create(model="g", prompt=PROMPT, max_tokens=2,
                                                seed=seed)
        body = err.value.body
        assert isinstance(body, dict) and body.get("param") == "seed", body
        assert body.get("type") == "invalid_request_error" and "seed" in body["message"]


def test_a_waiting_client_that_disconnects_stops_its_generation(http_engine: HttpEngine) -> None:
    s = socket.create_connection(addr(http_engine), timeout=10)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "temperature": 0}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
              TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
              str(len(body)).encode() + b"\r\n\r\n" + body)
    client = EngineClient(socket_path=http_engine.sock, autostart=False)
    try:
        deadline = time.monotonic() + 60
        while not client.status()["queue"]:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
        s.close()  # gone without reading a byte
        deadline = time.monotonic() + 10
        while client.status()["queue"]:
            assert time.monotonic() < deadline, "the generation outlived its client"
            time.sleep(0.1)
    finally:
        client.close()


def test_the_token_stays_out_of_the_command_line(tmp_path: Path) -> None:
    def engine(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gemma_lsp", "engine", "--http",
                               "127.0.0.1:0", "--socket", str(tmp_path / "run" / "s"), *args],
                              capture_output=True, text=True, timeout=60)

    out = engine("--http-token", "s3cret")
    assert out.returncode == 2 and "--http-token-file" in out.stderr
    assert "GEMMA_LSP_HTTP_TOKEN" in out.stderr and "/proc" in out.stderr
    loose = tmp_path / "loose.token"
    loose.write_text("s3cret\n")
    os.chmod(loose, 0o644)
    out = engine("--http-token-file", str(loose))
    assert out.returncode == 2 and "chmod 600" in out.stderr
    good = tmp_path / "good.token"
    good.write_text("s3cret\n")
    os.chmod(good, 0o600)
    assert read_token_file(str(good)) == "s3cret"
    with pytest.raises(ValueError, match="missing"):
        read_token_file(str(tmp_path / "missing"))
