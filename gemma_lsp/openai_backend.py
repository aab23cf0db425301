"""A `Backend` that sends the server's requests to an OpenAI-compatible server (Ollama,
llama-server, LiteRT-LM, or `gemma-lsp engine --http`) instead of the built-in engine.

Completions go to `/v1/completions` with the prompt the server built (FIM included);
instruction prompts, which are in Gemma's chat form, go to `/v1/chat/completions` as messages.
Both stream (SSE); cancelling closes the connection, which stops the work in those servers.
Standard library only: the language server process never loads numpy or an HTTP framework.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import urllib.parse
from typing import Any

from gemma_lsp.backend import BackendError, Finish, Scores

MAX_STOP = 4  # what the OpenAI API accepts; the rest are applied here
_TURN = re.compile(r"<start_of_turn>(user|model)\n(.*?)<end_of_turn>\n?", re.DOTALL)
_OPEN_MODEL = "<start_of_turn>model\n"
# Gemma 4's turn markers (the multimodal commands' prompts)
_TURN4 = re.compile(r"<\|turn>(user|model)\n(.*?)<turn\|>\n?", re.DOTALL)
_OPEN_MODEL4 = "<|turn>model\n"
_MEDIA_MARKER = re.compile(r"<\|image\|>|<\|audio\|>")


def chat_messages(prompt: str) -> list[dict[str, str]] | None:
    """Messages for a prompt in Gemma's chat form (user/model turns ending with an open model
    turn; Gemma 3's or Gemma 4's markers), or None for a plain completion prompt."""
    text = prompt.removeprefix("<bos>")
    turn, open_model = _TURN, _OPEN_MODEL
    if text.startswith("<|turn>"):
        turn, open_model = _TURN4, _OPEN_MODEL4
    elif not text.startswith("<start_of_turn>"):
        return None
    if not text.endswith(open_model):
        return None
    body = text[: -len(open_model)]
    messages, at = [], 0
    for m in turn.finditer(body):
        if m.start() != at:
            return None
        messages.append({"role": "assistant" if m.group(1) == "model" else "user",
                         "content": m.group(2)})
        at = m.end()
    return messages if messages and at == len(body) else None


def with_media(messages: list[dict[str, Any]], media: list[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """Put each image / clip where its marker is, as OpenAI content parts (image_url data
    URL, input_audio WAV): what Ollama, llama-server and OpenAI accept."""
    import base64

    items = iter(media)
    out = []
    for msg in messages:
        pieces = _MEDIA_MARKER.split(msg["content"])
        markers = _MEDIA_MARKER.findall(msg["content"])
        if not markers:
            out.append(msg)
            continue
        parts: list[dict[str, Any]] = []
        for text, marker in zip(pieces, [*markers, None], strict=True):
            if text:
                parts.append({"type": "text", "text": text})
            if marker is None:
                continue
            item = next(items, None)
            if item is None or item["kind"] != ("image" if marker == "<|image|>" else "audio"):
                raise BackendError("the prompt's media markers do not match the media sent")
            data = base64.b64encode(item["data"]).decode()
            if item["kind"] == "image":
                parts.append({"type": "image_url", "image_url": {
                    "url": f"data:{_mime(item['data'])};base64,{data}"}})
            else:
                parts.append({"type": "input_audio",
                              "input_audio": {"data": data, "format": "wav"}})
        out.append({"role": msg["role"], "content": parts})
    if next(items, None) is not None:
        raise BackendError("more media were sent than the prompt has markers for")
    return out


def _mime(data: bytes) -> str:
    for magic, mime in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"),
                        (b"GIF8", "image/gif")):
        if data.startswith(magic):
            return mime
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


class _SSEStream:
    """Text pieces from a streamed (SSE) completion; `cancel` closes the connection."""

    def __init__(self, conn: http.client.HTTPConnection, sock: socket.socket | None,
                 resp: http.client.HTTPResponse, chat: bool, stop: list[str], url: str) -> None:
        self._conn, self._resp, self._chat, self._stop, self._url = conn, resp, chat, stop, url
        self._sock = sock  # the response owns it once the server says Connection: close
        self._lock = threading.Lock()
        self._ended = False
        self._text = ""  # for the stop strings the server was not given
        self._sent = 0
        self.finish: Finish | None = None

    def next(self, timeout: float | None = None) -> str | None:
        while not self._ended:
            try:
                line = self._resp.readline()
            except (OSError, http.client.HTTPException, ValueError) as e:
                if self._ended:
                    return None  # cancelled: the read was cut short on purpose
                self._end("error")
                raise BackendError(f"{self._url}: the stream broke off ({e})") from e
            if not line:
                self._end("stop")
                return None
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # comments, event names, keep-alives
            data = line[5:].strip()
            if data == b"[DONE]":
                self._end(self.finish.reason if self.finish else "stop")
                return None
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if "error" in obj:
                self._end("error")
                raise BackendError(f"{self._url}: {_message(obj)}")
            piece = self._piece(obj)
            if piece:
                return piece
        return None

    def _piece(self, obj: dict[str, Any]) -> str:
        choices = obj.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        if self._chat:
            piece = (choice.get("delta") or {}).get("content") or ""
        else:
            piece = choice.get("text") or ""
        if choice.get("finish_reason"):
            self.finish = Finish(reason=str(choice["finish_reason"]))
        self._text += piece
        cut = min((i for s in self._stop if (i := self._text.find(s)) >= 0), default=-1)
        if cut >= 0:
            out = self._text[self._sent:cut]
            self.cancel()
            self.finish = Finish(reason="stop_string")
            return out
        self._sent = len(self._text)
        return str(piece)

    def _end(self, reason: str) -> None:
        self._ended = True
        if self.finish is None:
            self.finish = Finish(reason=reason)
        self._close()

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in readline
            except OSError:
                pass
        self._resp.close()
        self._conn.close()

    def cancel(self) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            self.finish = self.finish or Finish(reason="cancelled")
        self._close()


def _message(obj: Any) -> str:
    """The message of an OpenAI-style (or Ollama-style) error body."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(obj)


class OpenAIBackend:
    """An OpenAI-compatible server at `url` (the base, e.g. http://127.0.0.1:8080/v1)."""

    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None,
                 timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"engine.url must be an http(s) URL, got {url!r}")
        self.url = url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self._key = api_key
        self.timeout_s = timeout_s
        self._configured_model = model_name
        self.model_name = model_name or ""

    # -- HTTP

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout_s)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None
              ) -> tuple[http.client.HTTPConnection, socket.socket | None,
                         http.client.HTTPResponse]:
        headers = {"Accept": "text/event-stream, application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        conn = self._connect()
        try:
            conn.request(method, self._base + path, body=data, headers=headers)
            sock = conn.sock
            resp = conn.getresponse()
        except ConnectionRefusedError:
            conn.close()
            raise BackendError(f"no OpenAI-compatible server at {self.url} (connection "
                               "refused): start it, or change engine.url") from None
        except TimeoutError:
            conn.close()
            raise BackendError(f"{self.url} did not answer in {self.timeout_s:g}s") from None
        except OSError as e:
            conn.close()
            raise BackendError(f"cannot reach {self.url}: {e}") from None
        if resp.status != 200:
            raw = resp.read(65536)
            conn.close()
            try:
                detail = _message(json.loads(raw))
            except ValueError:
                detail = raw.decode(errors="replace").strip()[:200]
            if resp.status in (401, 403):
                raise BackendError(f"{self.url} refused the API key (HTTP {resp.status}): "
                                   f"{detail}; set engine.apiKey")
            if resp.status == 404:
                raise BackendError(f"{self.url}{path}: not found (HTTP 404): {detail}; is "
                                   f"model {self.model_name!r} pulled/loaded there?")
            raise BackendError(f"{self.url}{path}: HTTP {resp.status}: {detail}")
        return conn, sock, resp

    def _model(self) -> str:
        if not self.model_name:
            ids = self._model_ids()
            if not ids:
                raise BackendError(f"{self.url} lists no models: set engine.modelName")
            self.model_name = ids[0]
        return self.model_name

    def _model_ids(self) -> list[str]:
        conn, _, resp = self._send("GET", "/models")
        try:
            data = json.loads(resp.read())
        except ValueError as e:
            raise BackendError(f"{self.url}/models: not JSON ({e})") from e
        finally:
            conn.close()
        return [str(m.get("id")) for m in data.get("data", []) if isinstance(m, dict)]

    # -- Backend

    def start(self, prompt: str, *, max_tokens: int, temperature: float = 0.0,
              stop: list[str] | None = None, doc: str = "", priority: int = 0,
              seed: int | None = None, media: list[dict[str, Any]] | None = None,
              kind: str = "") -> _SSEStream:
        stop = [s for s in (stop or []) if s]
        body: dict[str, Any] = {"model": self._model(), "max_tokens": max_tokens,
                                "temperature": temperature, "stream": True}
        if stop:
            body["stop"] = stop[:MAX_STOP]
        if seed is not None:
            body["seed"] = seed
        messages = chat_messages(prompt)
        if media and messages is None:
            raise BackendError("images and audio need a chat prompt (a chat model)")
        if messages is not None:
            body["messages"] = with_media(messages, media) if media else messages
            path = "/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/completions"
        conn, sock, resp = self._send("POST", path, body)
        return _SSEStream(conn, sock, resp, messages is not None, stop[MAX_STOP:], self.url)

    def warm(self, prompt: str, doc: str) -> None:
        """Nothing to do: these servers keep their own prompt cache of the last request."""

    def score(self, prompt: str, continuations: list[str], *, doc: str = "") -> Scores:
        raise BackendError("next-edit suggestions need the built-in engine: an OpenAI-compatible "
                           "server does not report the log-probabilities of given text")

    def status(self) -> dict[str, Any]:
        ids = self._model_ids()
        model = self._configured_model or (ids[0] if ids else "")
        return {"backend": "openai", "url": self.url, "model": model,
                "model_available": model in ids, "models": ids[:20]}

    def restart(self) -> None:
        """An external server is not ours to restart."""

    def close(self) -> None:
        pass
