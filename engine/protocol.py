"""The engine's wire protocol: message dataclasses and length-prefixed msgpack framing.

This is the only `engine` module the language server imports: stdlib + msgpack, no numpy.
A frame is a 4-byte big-endian length followed by a msgpack map with a "type" key. Every
request carries a client-chosen integer `id`; replies echo it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024 * 1024  # a 20 MB document as UTF-8 plus headroom
MAX_PROMPT_BYTES = 16 * 1024 * 1024  # checked before anything tokenizes a prompt
MAX_NEW_TOKENS = 1 << 20  # far beyond any model context: a sanity bound, not a policy
MAX_PRIORITY = 1 << 20
MAX_LOGPROBS = 20
MAX_STOPS = 64
MAX_STOP_BYTES = 1024
MAX_MEDIA = 16  # images / audio clips in one Generate
MAX_MEDIA_BYTES = 48 * 1024 * 1024  # their encoded files together
# the weight types a Hugging Face checkpoint can be quantized to (`--quant`, `engine.quant`;
# engine.kernels.blocks makes them); a GGUF keeps its own
QUANT_CHOICES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "bf16", "f32")
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """A malformed or unknown message in a whole frame: the stream is still in step.

    `req_id` is the request's id when the frame carried a readable one (the error reply
    echoes it, so the client's wait for that request ends), else 0.
    """

    def __init__(self, message: str, req_id: int = 0) -> None:
        super().__init__(message)
        self.req_id = req_id


class FrameError(ProtocolError):
    """An oversized or truncated frame: the stream is out of step and must be closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


# Error codes carried by `Error.code`.
E_BAD_REQUEST = "bad_request"
E_VERSION = "version_mismatch"
E_CANCELLED = "cancelled"
E_SUPERSEDED = "superseded"
E_TOO_LONG = "prompt_too_long"
E_DEADLINE = "deadline"
E_INTERNAL = "internal"
E_SHUTTING_DOWN = "shutting_down"


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


# ----------------------------------------------------------------------------- requests


@dataclass
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    version: int = PROTOCOL_VERSION
    client: str = ""


@dataclass
class Generate(Message):
    """Complete `prompt` (text; the engine tokenizes and adds BOS). Streams Token, then Done."""

    TYPE: ClassVar[str] = "generate"
    id: int = 0
    prompt: str = ""
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    priority: int = 0  # 0 = interactive completion (first); larger = later (explain, refactor)
    doc: str = ""  # a newer request for the same non-empty doc supersedes older ones
    deadline_ms: float = 0.0  # wall-clock budget from arrival; 0 = none
    logprobs: int = 0  # alternatives per token to report (0 = just the token's own logprob)
    # images / audio for `<|image|>` / `<|audio|>` markers in the prompt, in order:
    # {"kind": "image" | "audio", "data": encoded file bytes, "max_soft_tokens": int (images)}
    media: list[dict[str, Any]] = field(default_factory=list)
    kind: str = ""  # what the request is for (completion, refactor, docstring, chat...): stats
    speculate: bool = True  # let the engine draft and verify several tokens per step
    grammar: str = ""  # constrain the output to this llguidance grammar (engine.grammar)


@dataclass
class Warm(Message):
    """Prefill `prompt` into the prompt cache at the lowest priority; replies Done."""

    TYPE: ClassVar[str] = "warm"
    id: int = 0
    prompt: str = ""
    doc: str = ""


@dataclass
class Score(Message):
    """How likely is each continuation of ``prompt``? (next-edit candidates). The reply is a
    ScoreReply; tokens every continuation starts with count as 0 in all of them."""

    TYPE: ClassVar[str] = "score"
    id: int = 0
    prompt: str = ""
    continuations: list[str] = field(default_factory=list)
    priority: int = 0
    doc: str = ""  # a newer score for the same non-empty doc supersedes older ones


@dataclass
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    id: int = 0  # the request to cancel


@dataclass
class Status(Message):
    TYPE: ClassVar[str] = "status"
    id: int = 0


@dataclass
class Shutdown(Message):
    TYPE: ClassVar[str] = "shutdown"
    id: int = 0


# ----------------------------------------------------------------------------- replies


@dataclass
class HelloReply(Message):
    TYPE: ClassVar[str] = "hello_reply"
    version: int = PROTOCOL_VERSION
    model: str = ""
    pid: int = 0


@dataclass
class Token(Message):
    TYPE: ClassVar[str] = "token"
    id: int = 0
    token_id: int = 0
    text: str = ""  # newly completed text (may be "" while a character is incomplete)
    logprob: float = 0.0
    top: list[list[float]] = field(default_factory=list)  # [[id, logprob], ...]


@dataclass
class Done(Message):
    TYPE: ClassVar[str] = "done"
    id: int = 0
    reason: str = ""  # stop, stop_string, length, context, warmed
    text: str = ""
    tail: str = ""  # text released only at the end (not in any Token)
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose K/V came from the prompt cache
    evaluated_tokens: int = 0  # prompt tokens actually run through the model
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    first_token_ms: float = 0.0  # from arrival to the first token
    decode_ms: float = 0.0
    n_tokens: int = 0


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    id: int = 0
    code: str = E_INTERNAL
    message: str = ""


@dataclass
class ScoreReply(Message):
    TYPE: ClassVar[str] = "score_reply"
    id: int = 0
    # per continuation: each token's log-probability and where (characters into the
    # continuation) the token ends
    logprobs: list[list[float]] = field(default_factory=list)
    ends: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evaluated_tokens: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    id: int = 0
    info: dict[str, Any] = field(default_factory=dict)


MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Hello, Generate, Warm, Score, Cancel, Status, Shutdown, HelloReply, Token, Done,
              Error, ScoreReply, StatusReply)
}


# ----------------------------------------------------------------------------- encoding


def encode(msg: Message) -> bytes:
    """Message -> one frame (length prefix + msgpack)."""
    body = dataclasses.asdict(msg)
    body["type"] = msg.TYPE
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"{msg.TYPE} message is {len(data)} bytes; the limit is {MAX_FRAME}")
    return _LEN.pack(len(data)) + data


def decode(data: bytes) -> Message:
    """msgpack body (without the length prefix) -> Message; ProtocolError if malformed."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"malformed msgpack frame: {e}") from e
    if not isinstance(body, dict):
        raise ProtocolError("a frame must hold a map")
    kind = body.pop("type", None)
    rid = body.get("id", 0)
    req_id = rid if isinstance(rid, int) and not isinstance(rid, bool) else 0
    cls = MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}", req_id)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise ProtocolError(f"{kind}: unknown field(s) {sorted(unknown)}", req_id)
    try:
        msg = cls(**body)
    except TypeError as e:
        raise ProtocolError(f"{kind}: {e}", req_id) from e
    try:
        validate(msg)
    except ProtocolError as e:
        raise ProtocolError(str(e), req_id) from None
    return msg


def validate(msg: Message) -> None:
    """ProtocolError (a ValueError) naming the first bad field and value of a message.

    `decode` runs it on every frame; the scheduler runs it again on what in-process callers
    (the HTTP API) build, so every path into the engine is checked the same way.
    """
    _check_types(msg)
    _check_ranges(msg)


_SCALARS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str}


def _check_types(msg: Message) -> None:
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        t = str(f.type)
        if t == "int | None":
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
        elif t in ("int", "float"):
            ok = isinstance(value, _SCALARS[t]) and not isinstance(value, bool)
        elif t == "str":
            ok = isinstance(value, str)
        elif t == "bool":
            ok = isinstance(value, bool)
        elif t.startswith("list"):
            ok = isinstance(value, list)
        elif t.startswith("dict"):
            ok = isinstance(value, dict)
        else:
            ok = True
        if not ok:
            raise ProtocolError(f"{msg.TYPE}.{f.name}: bad value {value!r} (want {t})")
    if isinstance(msg, Generate | Warm) and not all(isinstance(s, str) for s in
                                                    getattr(msg, "stop", [])):
        raise ProtocolError(f"{msg.TYPE}.stop: every stop must be a string")
    if isinstance(msg, Score) and not all(isinstance(c, str) for c in msg.continuations):
        raise ProtocolError("score.continuations: every continuation must be a string")
    if isinstance(msg, Generate):
        _check_media(msg.media)


def _check_media(media: list[Any]) -> None:
    """Bounded: at most MAX_MEDIA items of MAX_MEDIA_BYTES together, each a kind + bytes."""
    if len(media) > MAX_MEDIA:
        raise ProtocolError(f"generate.media: {len(media)} items; the limit is {MAX_MEDIA}")
    total = 0
    for i, item in enumerate(media):
        if (not isinstance(item, dict) or item.get("kind") not in ("image", "audio")
                or not isinstance(item.get("data"), bytes)):
            raise ProtocolError(f"generate.media[{i}] must be {{kind: image|audio, data: bytes}}")
        total += len(item["data"])
    if total > MAX_MEDIA_BYTES:
        raise ProtocolError(f"generate.media: {total} bytes; the limit is {MAX_MEDIA_BYTES}")


def _check_ranges(msg: Message) -> None:
    """Values a well-typed request may still get wrong, named with the bad value."""
    def bad(name: str, value: object, want: str) -> ProtocolError:
        return ProtocolError(f"{msg.TYPE}.{name}: {value!r} is out of range (want {want})")

    if isinstance(msg, Generate | Warm | Score):
        size = _utf8_len(msg.prompt)
        if size > MAX_PROMPT_BYTES:
            raise ProtocolError(f"{msg.TYPE}.prompt: {size} bytes exceeds the "
                                f"{MAX_PROMPT_BYTES}-byte limit on a prompt")
    if isinstance(msg, Score) and not 0 <= msg.priority <= MAX_PRIORITY:
        raise bad("priority", msg.priority, f"0..{MAX_PRIORITY}")
    if not isinstance(msg, Generate):
        return
    if not 0 <= msg.max_tokens <= MAX_NEW_TOKENS:
        raise bad("max_tokens", msg.max_tokens, f"0..{MAX_NEW_TOKENS}")
    if not (math.isfinite(msg.temperature) and msg.temperature >= 0):
        raise bad("temperature", msg.temperature, "a finite number >= 0")
    if msg.top_k < 0:
        raise bad("top_k", msg.top_k, ">= 0")
    if not (math.isfinite(msg.top_p) and 0 < msg.top_p <= 1):
        raise bad("top_p", msg.top_p, "0 < top_p <= 1")
    if msg.seed is not None and not 0 <= msg.seed < 1 << 64:
        raise bad("seed", msg.seed, "0 <= seed < 2**64, or none")
    if not 0 <= msg.priority <= MAX_PRIORITY:
        raise bad("priority", msg.priority, f"0..{MAX_PRIORITY}")
    if not (math.isfinite(msg.deadline_ms) and msg.deadline_ms >= 0):
        raise bad("deadline_ms", msg.deadline_ms, "a finite number >= 0 (0 = none)")
    if not 0 <= msg.logprobs <= MAX_LOGPROBS:
        raise bad("logprobs", msg.logprobs, f"0..{MAX_LOGPROBS}")
    if len(msg.stop) > MAX_STOPS:
        raise bad("stop", f"{len(msg.stop)} strings", f"at most {MAX_STOPS}")
    for s in msg.stop:
        if _utf8_len(s) > MAX_STOP_BYTES:
            raise bad("stop", s[:40] + "...", f"strings of at most {MAX_STOP_BYTES} bytes")


def _utf8_len(text: str) -> int:
    """UTF-8 size without building the encoding (a 60 MB str costs no second 60 MB)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def read_frame(sock: socket.socket) -> Message | None:
    """Read one message; None on a clean close; ProtocolError on a bad or truncated frame."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise FrameError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exact(sock, n)
    if body is None:
        raise FrameError(f"connection closed inside a {n}-byte frame")
    return decode(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise FrameError(f"connection closed after {len(buf)} of {n} bytes")
            return None
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------------------- locations


def runtime_dir() -> Path:
    """Where the socket and lock live: `$GEMMA_LSP_RUNTIME_DIR`, else XDG runtime dir, else /tmp."""
    env = os.environ.get("GEMMA_LSP_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "gemma-lsp"
    return Path(f"/tmp/gemma-lsp-{os.getuid()}")


def socket_path() -> Path:
    return runtime_dir() / "engine.sock"


def _uid() -> int:
    return os.getuid()


def check_private_dir(d: Path) -> None:
    """ValueError unless `d` is a real directory owned by this user with mode 0700: anyone
    else who can write there could put their own socket in it and read our code (both the
    engine, before it listens, and the client, before it connects, check)."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise ValueError(f"{d} does not exist") from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != _uid() or mode & 0o077:
        what = ("a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                if not stat.S_ISDIR(st.st_mode) else f"mode {mode:04o}, owner uid {st.st_uid}")
        raise ValueError(
            f"refusing the engine's runtime directory {d}: it must be a directory owned by you "
            f"(uid {_uid()}) with mode 0700, and it is {what}; another user could be "
            f"listening there. Remove it (or chmod 700 it if it is yours), or set "
            f"GEMMA_LSP_RUNTIME_DIR / XDG_RUNTIME_DIR to a private directory")


def ensure_runtime_dir(d: Path) -> None:
    """Create `d` (mode 0700, whatever the umask) if it is missing, then `check_private_dir`."""
    if not os.path.lexists(d):
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)
        except FileExistsError:
            pass  # someone else made it meanwhile: the check below decides
    check_private_dir(d)


def check_socket_owner(path: Path) -> None:
    """ValueError unless `path` (if it exists) is a socket owned by this user."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != _uid():
        raise ValueError(f"refusing {path}: not a socket owned by you (uid {st.st_uid})")


# ----------------------------------------------------------------------------- start-up status


def status_path(sock: Path) -> Path:
    """Where the engine listening on `sock` reports its start-up (JSON: pid, state of
    starting / ready / failed / stopped, message, fraction)."""
    return sock.with_name(sock.name + ".status")


def read_status(sock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(status_path(sock).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
