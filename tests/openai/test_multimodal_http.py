"""Images and audio through the HTTP API with the official `openai` client: `image_url` data
URLs and `input_audio` WAV parts on a tiny random Gemma 4 unified engine give what the engine
says over its socket; http(s) image URLs are refused; the shipped text-only model refuses
media naming itself and what it lacks."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from engine.http_api import ApiError, chat_prompt, plan_chat
from engine.protocol import Done, Token
from gemma_lsp.engine_client import EngineClient
from tests.engine import tiny_unified as tu
from tests.openai.conftest import TOKEN, HttpEngine, free_port


@pytest.fixture(scope="module")
def unified_engine() -> Iterator[HttpEngine]:
    pytest.importorskip("torch", reason="the `ref` extra builds the tiny checkpoint")
    run = Path(tempfile.mkdtemp(prefix="gu-", dir="/tmp"))
    tu.build(run / "tiny-gemma4-unified")
    port = free_port()
    log = run / "engine.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gemma_lsp", "engine", "--no-persist", "--idle-timeout", "0",
             "--model", str(run / "tiny-gemma4-unified"), "--socket", str(run / "engine.sock"),
             "--http", f"127.0.0.1:{port}"],
            env=dict(os.environ, GEMMA_LSP_RUNTIME_DIR=str(run), GEMMA_LSP_HTTP_TOKEN=TOKEN,
                     GEMMA_LSP_CACHE=str(run / "cache")), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not (run / "engine.sock").exists() or not _up(port):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the engine did not come up"
        time.sleep(0.2)
    yield HttpEngine(f"http://127.0.0.1:{port}/v1", run / "engine.sock", run, log)
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(run, ignore_errors=True)


def _up(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def api(engine: HttpEngine) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.url, api_key=TOKEN, max_retries=0, timeout=120)


def messages() -> list[dict[str, Any]]:
    image = base64.b64encode(tu.png(40, 30, 5)).decode()
    clip = base64.b64encode(tu.wav(0.2, rate=8000)).decode()
    return [{"role": "user", "content": [
        {"type": "text", "text": "What is in "},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}",
                                            "detail": "low"}},
        {"type": "text", "text": " and what is said in "},
        {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
        {"type": "text", "text": "?"}]}]


def over_socket(engine: HttpEngine, msgs: list[dict[str, Any]], n: int) -> str:
    media: list[dict[str, Any]] = []
    # the prompt the HTTP API builds for a Gemma 4 model (its own chat template)
    prompt = plan_chat({"messages": msgs}, "gemma4", None, media).prompt
    client = EngineClient(socket_path=engine.sock, autostart=False)
    try:
        handle = client.generate(prompt, max_tokens=n, temperature=0.0, media=media)
        text = ""
        while True:
            msg = handle.next(120)
            if isinstance(msg, Token):
                text += msg.text
            else:
                assert isinstance(msg, Done)
                return text + msg.tail
    finally:
        client.close()


def test_image_and_audio_parts_with_the_openai_client(unified_engine: HttpEngine) -> None:
    want = over_socket(unified_engine, messages(), 10)
    res = api(unified_engine).chat.completions.create(
        model="tiny", messages=messages(), max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert res.choices[0].message.content == want
    assert res.usage is not None and res.usage.prompt_tokens > 70 + 10  # soft tokens counted
    chunks = api(unified_engine).chat.completions.create(
        model="tiny", messages=messages(), max_tokens=10, temperature=0, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_http_image_urls_are_refused(unified_engine: HttpEngine) -> None:
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="http\\(s\\) URLs are refused"):
        api(unified_engine).chat.completions.create(model="tiny", messages=msgs, max_tokens=4)  # type: ignore[arg-type]
    bad_audio = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError, match="input_audio.data is not valid base64"):
        api(unified_engine).chat.completions.create(model="tiny", messages=bad_audio,  # type: ignore[arg-type]
                                                    max_tokens=4)
    mp3 = [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}]}]
    with pytest.raises(openai.BadRequestError, match="WAV only"):
        api(unified_engine).chat.completions.create(model="tiny", messages=mp3, max_tokens=4)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="only read in chat"):
        chat_prompt(msgs)


def test_the_text_only_model_refuses_an_image(http_engine: HttpEngine) -> None:
    client = openai.OpenAI(base_url=http_engine.url, api_key=TOKEN, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError,
                       match="model gemma-3-270m-q4_k_m.gguf cannot take image input: it is a "
                             "text-only model"):
        client.chat.completions.create(model="gemma", messages=messages(), max_tokens=4)  # type: ignore[arg-type]


def test_the_openai_backend_forwards_images_and_audio(unified_engine: HttpEngine) -> None:
    """The language server's `openai` backend turns the markers of a Gemma 4 chat prompt into
    OpenAI content parts: through `engine --http` the answer is the socket's."""
    from gemma_lsp.openai_backend import OpenAIBackend, chat_messages, with_media

    image, clip = tu.png(40, 30, 5), tu.wav(0.2, rate=8000)
    prompt = ("<|turn>user\nWhat is in <|image|> and what is said in <|audio|>?<turn|>\n"
              "<|turn>model\n")
    media = [{"kind": "image", "data": image}, {"kind": "audio", "data": clip}]
    msgs = chat_messages(prompt)
    assert msgs == [{"role": "user", "content": "What is in <|image|> and what is said in "
                                                "<|audio|>?"}]
    parts = with_media(msgs, media)[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "input_audio", "text"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    backend = OpenAIBackend(unified_engine.url, "tiny", TOKEN, 120)
    stream = backend.start(prompt, max_tokens=10, media=media)
    text = ""
    while (piece := stream.next(120)) is not None:
        text += piece
    # the HTTP API renders the same messages with its own chat template: compare with that
    http_msgs = [{"role": "user", "content": parts}]
    assert text == over_socket(unified_engine, http_msgs, 10)
    from gemma_lsp.backend import BackendError

    with pytest.raises(BackendError, match="markers do not match"):
        with_media(msgs, media[:1] + media[:1])
