"""The resident engine as an OpenAI-compatible HTTP server (`gemma-lsp engine --http`).

`GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (streamed as SSE or
not) run on the same scheduler and prompt cache as the editors' requests, so Continue, Aider
or OpenCode can share the one resident model. Loopback only unless told otherwise; an
optional bearer token. Errors are OpenAI-shaped: `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine import grammar as G
from engine import protocol as P
from engine import tools as T

log = logging.getLogger("gemma-lsp.engine.http")

MAX_BODY = 32 * 1024 * 1024  # room for a base64 screenshot or a minute of WAV
HTTP_PRIORITY = 5  # after keystroke completions, before background warming
_ids = itertools.count(1 << 40)  # request ids that cannot collide with socket clients'


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class HttpOptions:
    host: str
    port: int
    token: str | None = None
    allow_remote: bool = False
    request_timeout_s: float = 10.0  # to send a whole request (or to start the next one)
    max_connections: int = 64

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError(f"request timeout must be > 0 s, got {self.request_timeout_s}")
        if self.max_connections < 1:
            raise ValueError(f"max connections must be >= 1, got {self.max_connections}")


def read_token_file(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace dropped); ValueError naming the path
    if it is unreadable, empty, or readable by other users."""
    import os
    import stat

    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--http-token-file {path}: cannot read it ({e})") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ValueError(f"--http-token-file {path}: other users can read it (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"--http-token-file {path}: want one token without spaces")
    return token


def parse_bind(value: str, allow_remote: bool) -> tuple[str, int]:
    """'HOST:PORT' (or ':PORT', loopback) -> (host, port); refuses non-loopback hosts unless
    `allow_remote`."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--http wants HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(
                f"--http host must be an IP address or localhost, got {host!r}") from None
    if not loopback and not allow_remote:
        raise ValueError(f"--http {value}: {host} is not a loopback address; anyone who can "
                         "reach it could use the model (add --http-allow-remote to mean it)")
    return host, int(port)


# ----------------------------------------------------------------------------- request bodies


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any,
           check: Callable[[Any], bool] = lambda v: True, expect: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:
        ok = False
    else:
        ok = isinstance(value, kind) and check(value)
    if not ok:
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"'{name}' must be {expect or getattr(kind, '__name__', kind)}, "
                       f"got {value!r}", param=name)
    return value


def sampling_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The Generate fields shared by both endpoints, validated."""
    n = _field(body, "n", int, 1, lambda v: v == 1, "1 (one choice per request)")
    assert n == 1
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 16
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'stop' must be a string or up to 16 "
                       f"non-empty strings, got {stop!r}", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "max_tokens": _field({"max_tokens": max_tokens}, "max_tokens", int, 256,
                             lambda v: 0 <= v <= 32768, "an integer from 0 to 32768"),
        "temperature": float(_field(body, "temperature", (int, float), 1.0,
                                    lambda v: 0 <= v <= 2, "a number from 0 to 2")),
        "top_p": float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1,
                              "a number in (0, 1]")),
        "top_k": _field(body, "top_k", int, 0, lambda v: v >= 0, "a non-negative integer"),
        "seed": _field(body, "seed", int, None, lambda v: 0 <= v < 1 << 63,
                       "an integer from 0 to 2**63-1"),
        "stop": list(stop or []),
    }


_DETAIL_TOKENS = {"low": 70, "auto": 280, "high": 560}  # image_url.detail -> soft tokens


def content_parts(content: list[Any], where: str, media: list[dict[str, Any]] | None) -> str:
    """OpenAI content parts -> text with a `<|image|>` / `<|audio|>` marker where each image
    (`image_url`, data: URLs only) or clip (`input_audio`, base64 WAV) goes; the decoded
    files are appended to `media`. Nothing is fetched: http(s) URLs are refused."""
    import base64
    import binascii

    from engine.multimodal import AUDIO_MARKER, IMAGE_MARKER

    def bad(message: str) -> ApiError:
        return ApiError(HTTPStatus.BAD_REQUEST, f"{where}: {message}", param=where)

    def b64(data: Any, what: str) -> bytes:
        if not isinstance(data, str):
            raise bad(f"{what} must be a base64 string")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{what} is not valid base64") from None

    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(str(part.get("text", "")))
            continue
        if kind not in ("image_url", "input_audio"):
            raise bad(f"content part type {kind!r} is not supported (text, image_url, "
                      "input_audio)")
        if media is None:
            raise bad("images and audio are only read in chat messages")
        if kind == "image_url":
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad("image_url.url must be a string")
            if not url.startswith("data:"):
                raise bad("image_url must be a data: URL (data:image/png;base64,...); http(s) "
                          "URLs are refused: this server fetches nothing, nothing leaves the "
                          "machine")
            head, sep, payload = url.partition(",")
            if not sep or not head.endswith(";base64"):
                raise bad("image_url data: URL must be base64 (data:image/...;base64,...)")
            detail = spec.get("detail", "auto") if isinstance(spec, dict) else "auto"
            if detail not in _DETAIL_TOKENS:
                raise bad(f"image_url.detail must be low, auto or high, got {detail!r}")
            media.append({"kind": "image", "data": b64(payload, "image_url data"),
                          "max_soft_tokens": _DETAIL_TOKENS[detail]})
            parts.append(IMAGE_MARKER)
        else:
            spec = part.get("input_audio")
            if not isinstance(spec, dict) or spec.get("format", "wav") != "wav":
                raise bad("input_audio must be {data: base64, format: \"wav\"} (WAV only)")
            media.append({"kind": "audio", "data": b64(spec.get("data"), "input_audio.data")})
            parts.append(AUDIO_MARKER)
    return "".join(parts)


def message_text(i: int, content: Any, media: list[dict[str, Any]] | None = None) -> str:
    """A message's content as text: content parts become text with a marker where each image
    or clip goes (its file appended to `media`; refused when `media` is None)."""
    if isinstance(content, list):
        content = content_parts(content, f"messages[{i}].content", media)
    if not isinstance(content, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{i}].content must be text",
                       param=f"messages[{i}].content")
    return content


@dataclass(frozen=True)
class ChatPlan:
    """A chat request's prompt and what its reply must be: tool calls, a schema, or text."""

    prompt: str
    grammar: str
    tools: T.ToolPlan
    family: str


def plan_chat(body: dict[str, Any], arch: str, tok: Any,
              media: list[dict[str, Any]] | None = None) -> ChatPlan:
    """Prompt and grammar for a chat request: tools rendered in the model family's format,
    `tool_choice` / `response_format` as a grammar (engine.grammar). 400s name the field."""
    family = T.family_of(arch)
    try:
        plan = T.parse_tools(body)
        schema = T.response_schema(body)
        messages = body.get("messages")
        if plan.active:
            why = T.cannot_call_tools(arch, lambda t: tok.hf.token_to_id(t) is not None)
            if why:
                raise ApiError(HTTPStatus.BAD_REQUEST, why, "tools_unsupported", "tools")
        uses_tools = plan.tools or (isinstance(messages, list) and any(
            isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
            for m in messages))
        if uses_tools or family == "gemma4":
            prompt = T.render(T.parse_messages(
                messages, lambda i, c: message_text(i, c, media)), plan, family)
        else:
            prompt = chat_prompt(messages, media)
    except T.RequestError as e:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(e), param=e.param) from None

    def tok_id(piece: str) -> int:
        i = tok.hf.token_to_id(piece)
        assert i is not None, piece  # cannot_call_tools checked the vocabulary
        return int(i)

    try:
        grammar = T.reply_grammar(plan, schema, family, tok_id) or ""
    except G.GrammarError as e:
        param = "response_format" if not plan.active else "tools"
        raise ApiError(HTTPStatus.BAD_REQUEST, f"{param}: {e}", "invalid_schema",
                       param) from None
    return ChatPlan(prompt, grammar, plan, family)


def chat_prompt(messages: Any, media: list[dict[str, Any]] | None = None) -> str:
    """Gemma's chat template: system text joins the first user turn; the model turn is open.
    Images and audio in content parts go to `media` (refused when it is None)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list",
                       param="messages")
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user",
                                                             "assistant"):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{i}] needs a role of system, "
                           "user or assistant", param=f"messages[{i}].role")
        content = message_text(i, m.get("content"), media)
        if m["role"] in ("system", "developer"):
            system.append(content)
        else:
            turns.append(("model" if m["role"] == "assistant" else "user", content))
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    if system:
        turns[0] = ("user", "\n\n".join(system) + ("\n\n" + turns[0][1] if turns[0][1] else ""))
    text = "".join(f"<start_of_turn>{role}\n{content}<end_of_turn>\n" for role, content in turns)
    return text + "<start_of_turn>model\n"


# ----------------------------------------------------------------------------- the server


class _Reply:
    """A scheduler client for one HTTP request: messages land in a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[P.Message] = queue.Queue()

    def send(self, msg: P.Message) -> None:
        self.queue.put(msg)


class ClientGone(Exception):
    """The HTTP client closed its connection while its answer was being made."""


POLL_S = 0.25  # how often a request waiting for the engine checks that its client is there


def _events(reply: _Reply, timeout: float,
            gone: Callable[[], bool] = lambda: False) -> Iterator[P.Token | P.Done]:
    checked = time.monotonic()
    while True:
        waited = 0.0
        while True:
            try:
                msg = reply.queue.get(timeout=POLL_S)
                break
            except queue.Empty:
                waited += POLL_S
                checked = time.monotonic()
                if gone():
                    raise ClientGone() from None
                if waited >= timeout:
                    raise ApiError(HTTPStatus.GATEWAY_TIMEOUT, f"no progress in {timeout:.0f}s",
                                   "timeout") from None
        # tokens that keep coming (fast decoding, speculation) must not hide a closed client
        if time.monotonic() - checked >= POLL_S:
            checked = time.monotonic()
            if gone():
                raise ClientGone()
        if isinstance(msg, P.Error):
            status = (HTTPStatus.BAD_REQUEST if msg.code in (P.E_BAD_REQUEST, P.E_TOO_LONG)
                      else HTTPStatus.SERVICE_UNAVAILABLE if msg.code == P.E_SHUTTING_DOWN
                      else HTTPStatus.INTERNAL_SERVER_ERROR)
            raise ApiError(status, msg.message, msg.code)
        assert isinstance(msg, P.Token | P.Done)
        yield msg
        if isinstance(msg, P.Done):
            return


def _finish_reason(done: P.Done) -> str:
    return "length" if done.reason in ("length", "context") else "stop"


class _ToolReply:
    """A reply that may hold tool calls: collects ids/text, releases text known not to be a
    call (Gemma 3 streams plain answers as they come), parses the calls at the end."""

    def __init__(self, plan: ChatPlan, tok: Any) -> None:
        self.plan, self.tok = plan, tok
        self.ids: list[int] = []
        self.text = ""
        self.released = 0  # characters of text already streamed as content
        self.plain = False  # decided: not a call

    def push(self, piece: str) -> str:
        self.text += piece
        if not self.plain and self.plan.family == "gemma3" and self.text.strip() and \
                not T.might_be_call(self.text):
            self.plain = True
        if self.plain:
            out, self.released = self.text[self.released:], len(self.text)
            return out
        return ""

    def parse(self, text: str) -> tuple[str | None, list[T.ToolCall]]:
        raw = self.tok.decode(self.ids) if self.plan.family == "gemma4" else text
        return T.parse_reply(raw, self.plan.tools, self.plan.family)

    def finish(self) -> tuple[str | None, list[T.ToolCall]]:
        if self.plain:
            return None, []
        content, calls = self.parse(self.text)
        if not calls:
            return self.text[self.released:], []
        return content, calls


class Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    _body_read = False  # this request's body is consumed (or it has none)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.info("http %s - %s", self.address_string(), fmt % args)

    # -- connection

    def handle_one_request(self) -> None:
        self._body_read = False
        self.server.arm(self.connection)  # the whole request must arrive in time
        try:
            super().handle_one_request()
        finally:
            self.server.disarm(self.connection)

    def _request_read(self) -> None:
        """Line, headers and body are in: the time limit no longer applies."""
        self._body_read = True
        self.server.disarm(self.connection)

    def _client_gone(self) -> bool:
        """Whether the client closed its end (a pipelined next request is not that)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -- plumbing

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if not self._body_read and self.headers.get("Content-Length", "0").strip() not in (
                "", "0"):
            # the body is still unread: it must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        kind = ("authentication_error" if e.status == HTTPStatus.UNAUTHORIZED
                else "invalid_request_error" if e.status < 500 else "server_error")
        self._json(e.status, {"error": {"message": str(e), "type": kind, "code": e.code,
                                        "param": e.param}})

    def _authorized(self) -> None:
        token = self.server.opts.token
        if not token:
            return
        got = self.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                           "invalid_api_key")

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if length <= 0 or length > MAX_BODY:
            raise ApiError(HTTPStatus.BAD_REQUEST if length <= 0 else
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"a JSON body of 1 to {MAX_BODY} bytes is needed, got {length}")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise ClientGone()
        self._request_read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _route(self, method: str) -> None:
        self.server.touch()
        if method != "POST":
            self._request_read()
        try:
            if self.headers.get("Transfer-Encoding"):
                raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length "
                               "(chunked bodies are not supported)")
            self._authorized()
            path = self.path.split("?")[0].rstrip("/")
            if method == "GET" and path in ("/v1/models", "/models"):
                self._json(HTTPStatus.OK, {"object": "list", "data": self.server.model_cards()})
            elif method == "POST" and path in ("/v1/completions", "/completions"):
                self._complete(self._body(), chat=False)
            elif method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
                self._complete(self._body(), chat=True)
            else:
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {method} {path}", "not_found")
        except ApiError as e:
            self._error(e)
        except ClientGone:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # every failure becomes an error reply
            log.exception("http request failed")
            self._error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}",
                                 "internal"))

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    # -- completions

    def _complete(self, body: dict[str, Any], chat: bool) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(HTTPStatus.BAD_REQUEST, "'model' must be a string", param="model")
        raw: Any = None
        media: list[dict[str, Any]] = []
        plan: ChatPlan | None = None
        if chat:
            model_ = self.server.scheduler.model
            plan = plan_chat(body, model_.config.arch, model_.tokenizer, media)
            raw = plan.prompt
        else:
            raw = body.get("prompt")
            if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
                raw = raw[0]
            if not isinstance(raw, str) or not raw:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'prompt' must be a non-empty string",
                               param="prompt")
        prompt = str(raw)
        fields = sampling_fields(body)
        stream = _field(body, "stream", bool, False)
        reply = _Reply()
        req_id = next(_ids)
        sched = self.server.scheduler
        sched.submit(reply, P.Generate(id=req_id, prompt=prompt, priority=HTTP_PRIORITY,
                                       media=media, kind="chat" if chat else "completion",
                                       grammar=plan.grammar if plan else "", **fields))
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = self.server.model_name
        events = _events(reply, self.server.timeout_s, self._client_gone)
        try:
            if plan is not None and plan.tools.active:
                calls = _ToolReply(plan, self.server.scheduler.model.tokenizer)
                if stream:
                    self._stream(events, cid, created, name, chat, calls)
                else:
                    self._whole(events, cid, created, name, chat, calls)
            elif stream:
                self._stream(events, cid, created, name, chat)
            else:
                self._whole(events, cid, created, name, chat)
        finally:
            sched.cancel(reply, req_id)  # a client that went away stops the generation

    def _whole(self, events: Iterator[P.Token | P.Done], cid: str, created: int, name: str,
               chat: bool, calls: _ToolReply | None = None) -> None:
        text, n = "", 0
        done = None
        for msg in events:
            if isinstance(msg, P.Token):
                text += msg.text
                n += 1
                if calls is not None:
                    calls.ids.append(msg.token_id)
            else:
                done = msg
                text += msg.tail
        assert done is not None
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(done),
                                  "logprobs": None}
        if calls is not None:
            content, found = calls.parse(text)
            choice["message"] = {"role": "assistant", "content": content}
            if found:
                choice["message"]["tool_calls"] = [c.openai() for c in found]
                if done.reason != "length":
                    choice["finish_reason"] = "tool_calls"
        elif chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._json(HTTPStatus.OK, {
            "id": cid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": name, "choices": [choice],
            "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": n,
                      "total_tokens": done.prompt_tokens + n},
        })

    def _stream(self, events: Iterator[P.Token | P.Done], cid: str, created: int, name: str,
                chat: bool, calls: _ToolReply | None = None) -> None:
        first = next(events)  # errors before the first token are still a plain error reply
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False,
                  tool_calls: list[dict[str, Any]] | None = None) -> None:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                if tool_calls is not None:
                    delta["tool_calls"] = tool_calls
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
            data = {"id": cid, "object": obj, "created": created, "model": name,
                    "choices": [choice]}
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            chunk("", None, role=True)
        for msg in itertools.chain([first], events):
            if calls is not None:  # text may turn out to be tool calls: held back until known
                if isinstance(msg, P.Token):
                    calls.ids.append(msg.token_id)
                released = calls.push(msg.text if isinstance(msg, P.Token) else msg.tail)
                if released:
                    chunk(released, None)
                if isinstance(msg, P.Done):
                    content, found = calls.finish()
                    if content:
                        chunk(content, None)
                    for k, call in enumerate(found):  # name first, then the arguments
                        head = call.openai(k)
                        head["function"] = {"name": call.name, "arguments": ""}
                        chunk(None, None, tool_calls=[head])
                        chunk(None, None, tool_calls=[{"index": k, "function": {
                            "arguments": call.arguments}}])
                    chunk(None, "tool_calls" if found and msg.reason != "length"
                          else _finish_reason(msg))
            elif isinstance(msg, P.Token):
                if msg.text:
                    chunk(msg.text, None)
            else:
                if msg.tail:
                    chunk(msg.tail, None)
                chunk(None, _finish_reason(msg))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def do_OPTIONS(self) -> None:  # noqa: N802 - some clients probe
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Allow", "GET, POST, OPTIONS")
        self.send_header("Content-Length", "0")
        self.end_headers()


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of connections waits to be accepted (and counted)

    def __init__(self, opts: HttpOptions, scheduler: Any, model_name: str,
                 touch: Callable[[], None] = lambda: None, timeout_s: float = 600.0) -> None:
        self.opts = opts
        self.scheduler = scheduler
        self.model_name = model_name
        self.touch = touch
        self.timeout_s = timeout_s
        self.created = int(time.time())
        self._deadlines: dict[socket.socket, float] = {}  # connection -> must have sent by
        self._open = 0
        self._conn_lock = threading.Lock()
        super().__init__((opts.host, opts.port), Handler)

    # -- the connection limit and the request timeout

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conn_lock:
            full = self._open >= self.opts.max_connections
            if not full:
                self._open += 1
        if full:
            log.warning("http: %d connections open; refusing %s", self._open, client_address)
            body = json.dumps({"error": {"message": f"too many connections (limit "
                                         f"{self.opts.max_connections})", "type": "server_error",
                                         "code": "too_many_connections", "param": None}})
            try:
                request.settimeout(1.0)
                request.sendall(f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                f"application/json\r\nContent-Length: {len(body)}\r\n"
                                f"Connection: close\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            with self._conn_lock:
                self._open -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self.disarm(request)
            with self._conn_lock:
                self._open -= 1

    def arm(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._deadlines[conn] = time.monotonic() + self.opts.request_timeout_s

    def disarm(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._deadlines.pop(conn, None)

    def _reap(self) -> None:
        """Close connections that did not send their request in time (idle or slow)."""
        while True:
            time.sleep(min(0.5, self.opts.request_timeout_s / 4))
            now = time.monotonic()
            with self._conn_lock:
                late = [c for c, t in self._deadlines.items() if t < now]
                for c in late:
                    del self._deadlines[c]
            for c in late:
                try:
                    c.shutdown(socket.SHUT_RDWR)  # its handler's read ends; the thread exits
                except OSError:
                    pass

    def connections(self) -> int:
        with self._conn_lock:
            return self._open

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "gemma-lsp"}

    def model_cards(self) -> list[dict[str, Any]]:
        """The loaded model, then the draft model speculative decoding uses, if one is loaded
        (the scheduler's `draft_model_name`)."""
        cards = [self.model_card()]
        draft = getattr(self.scheduler, "draft_model_name", None)
        if isinstance(draft, str) and draft:
            cards.append({"id": draft, "object": "model", "created": self.created,
                          "owned_by": "gemma-lsp", "role": "draft"})
        return cards

    def start(self) -> threading.Thread:
        threading.Thread(target=self._reap, name="http-reaper", daemon=True).start()
        thread = threading.Thread(target=self.serve_forever, name="http", daemon=True)
        thread.start()
        return thread
