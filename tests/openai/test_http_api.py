"""`gemma-lsp engine --http`: the OpenAI-compatible API of the resident engine, driven by the
official `openai` package (streaming and not) against a real engine process."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.parse

import openai
import pytest

from engine.http_api import ApiError, chat_prompt, parse_bind
from engine.protocol import Done, Token
from gemma_lsp.engine_client import EngineClient
from tests.openai.conftest import TOKEN, HttpEngine

PROMPT = "def fibonacci(n):\n"


def api(engine: HttpEngine, key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.url, api_key=key, max_retries=0, timeout=120)


def engine_greedy(engine: HttpEngine, prompt: str, max_tokens: int) -> str:
    """What the engine itself says for `prompt` over its socket (the editors' path)."""
    client = EngineClient(socket_path=engine.sock, autostart=False)
    try:
        handle = client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
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


def test_models_lists_the_loaded_model(http_engine: HttpEngine) -> None:
    ids = [m.id for m in api(http_engine).models.list()]
    assert ids == ["gemma-3-270m-q4_k_m.gguf"]


def test_completions_equal_the_engines_greedy_output(http_engine: HttpEngine) -> None:
    want = engine_greedy(http_engine, PROMPT, 24)
    res = api(http_engine).completions.create(model="gemma", prompt=PROMPT, max_tokens=24,
                                              temperature=0)
    assert res.choices[0].text == want and want.strip()
    assert res.choices[0].finish_reason in ("length", "stop")
    assert res.usage is not None and res.usage.prompt_tokens > 3
    streamed = api(http_engine).completions.create(model="gemma", prompt=PROMPT, max_tokens=24,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_chat_completions_use_the_gemma_chat_template(http_engine: HttpEngine) -> None:
    messages = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Name a colour."}]
    want = engine_greedy(http_engine, chat_prompt(messages), 12)
    res = api(http_engine).chat.completions.create(model="gemma", messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=12, temperature=0)
    assert res.choices[0].message.content == want
    assert res.choices[0].message.role == "assistant"
    chunks = list(api(http_engine).chat.completions.create(
        model="gemma", messages=messages, max_tokens=12, temperature=0, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_prompt_folds_the_system_message_into_the_first_turn() -> None:
    text = chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert text == ("<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA"
                    "<end_of_turn>\n<start_of_turn>user\nV<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ApiError, match="images and audio are only read in chat messages"):
        chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_a_wrong_token_is_401(http_engine: HttpEngine) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        api(http_engine, key="wrong").models.list()
    assert e.value.status_code == 401


def test_bad_requests_are_400_naming_the_field(http_engine: HttpEngine) -> None:
    c = api(http_engine)
    for kwargs, field in (({"n": 2}, "'n'"), ({"temperature": 7}, "'temperature'"),
                          ({"max_tokens": -1}, "'max_tokens'")):
        with pytest.raises(openai.BadRequestError, match=field):
            c.completions.create(model="gemma", prompt="x", **kwargs)  # type: ignore[call-overload]
    with pytest.raises(openai.BadRequestError, match="'messages'"):
        c.chat.completions.create(model="gemma", messages=[])
    # not JSON at all
    u = urllib.parse.urlsplit(http_engine.url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port)
    conn.request("POST", "/v1/completions", body=b"{nope",
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 400 and "not valid JSON" in json.loads(resp.read())["error"]["message"]
    conn.close()
    # and it keeps serving
    assert api(http_engine).completions.create(model="g", prompt=PROMPT, max_tokens=2).choices


def test_a_client_that_goes_away_stops_its_generation(http_engine: HttpEngine) -> None:
    u = urllib.parse.urlsplit(http_engine.url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2000, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    client = EngineClient(socket_path=http_engine.sock, autostart=False)
    try:
        assert client.status()["queue"]  # 2,000 tokens to go
        resp.close()  # the response owns the socket (Connection: close)
        conn.close()
        for _ in range(100):
            status = client.status()
            if not status.get("queue"):
                break
            time.sleep(0.1)
        assert not status.get("queue"), status
    finally:
        client.close()


def test_remote_binds_need_the_explicit_flag() -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        parse_bind("0.0.0.0:8080", allow_remote=False)
    assert parse_bind("0.0.0.0:8080", allow_remote=True) == ("0.0.0.0", 8080)
    assert parse_bind(":8080", allow_remote=False) == ("127.0.0.1", 8080)
    out = subprocess.run([sys.executable, "-m", "gemma_lsp", "engine", "--http", "10.1.2.3:80"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--http-allow-remote" in out.stderr
