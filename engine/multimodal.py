"""Prompts with images and audio: placeholders -> soft-token spans, their prompt-cache keys,
and the rules that keep an image's bidirectional block whole.

A prompt names where each medium goes with a marker (`<|image|>` / `<|audio|>`, as Gemma 4's
chat template renders content items), in the order the media are given. Each image becomes
`<|image>` + n soft tokens + `<image|>`, each clip `<|audio>` + n + `<audio|>`. The sequence
handed to the model and to the K/V and prompt caches holds, at a soft token, not the
placeholder id but a negative key id derived from a hash of the medium's content: the same
screenshot asked about twice has the same keys (its K/V is reused), a different one never
matches, and a persisted cache stays valid across restarts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.audio import (
    AUDIO_LIMITS,
    AudioInput,
    AudioLimits,
    AudioWeights,
    embed_audio,
    prepare_audio,
)
from engine.config import MediaConfig, ModelConfig
from engine.vision import (
    DEFAULT_SOFT_TOKENS,
    IMAGE_LIMITS,
    ImageInput,
    ImageLimits,
    VisionWeights,
    embed_image,
    prepare_image,
)

IMAGE_MARKER = "<|image|>"
AUDIO_MARKER = "<|audio|>"
MAX_MEDIA = 16  # media items in one request
_MARKERS = re.compile(re.escape(IMAGE_MARKER) + "|" + re.escape(AUDIO_MARKER))
_KEY_SPACE = (1 << 62) - 1


@dataclass(frozen=True)
class SoftSpan:
    """Soft tokens at positions start..start+n: an image's blocks or an audio clip's frames."""

    start: int
    kind: str  # "image" or "audio"
    image: ImageInput | None = None
    audio: AudioInput | None = None

    @property
    def n(self) -> int:
        return self.image.n_tokens if self.image is not None else (
            self.audio.n_tokens if self.audio is not None else 0)

    @property
    def end(self) -> int:
        return self.start + self.n

    @property
    def bidirectional(self) -> bool:
        """Image soft tokens attend each other both ways; audio stays causal."""
        return self.kind == "image"

    def embed(self, media: MediaConfig, vision: VisionWeights | None,
              audio: AudioWeights | None, a: int, b: int) -> np.ndarray:
        """Soft-token embeddings (b - a, d) for absolute positions a..b inside the span."""
        if self.image is not None:
            assert vision is not None, "image span without vision weights"
            rows = embed_image(vision, self.image, media.vision_eps)  # (n, d)
            return rows[a - self.start : b - self.start]
        assert self.audio is not None and audio is not None, "audio span without audio weights"
        frames = self.audio.frames[a - self.start : b - self.start]  # (b - a, frame)
        return embed_audio(audio, frames, media.audio_eps)  # (b - a, d)


@dataclass(frozen=True)
class MediaPrompt:
    ids: np.ndarray  # (n,) int64: token ids, negative content keys at soft tokens
    spans: tuple[SoftSpan, ...]


# --------------------------------------------------------------------------- requests


def check_media(media: Any) -> list[dict[str, Any]]:
    """The wire form: a list of {"kind": "image"|"audio", "data": bytes, "max_soft_tokens"?}."""
    if not isinstance(media, list):
        raise ValueError("media must be a list")
    if len(media) > MAX_MEDIA:
        raise ValueError(f"{len(media)} media items; the limit is {MAX_MEDIA} a request")
    for i, item in enumerate(media):
        if not isinstance(item, dict) or item.get("kind") not in ("image", "audio"):
            raise ValueError(f"media[{i}] must be a map with kind 'image' or 'audio'")
        if not isinstance(item.get("data"), bytes | bytearray):
            raise ValueError(f"media[{i}].data must be bytes (the encoded file)")
        budget = item.get("max_soft_tokens", DEFAULT_SOFT_TOKENS)
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise ValueError(f"media[{i}].max_soft_tokens must be an integer, got {budget!r}")
        unknown = set(item) - {"kind", "data", "max_soft_tokens"}
        if unknown:
            raise ValueError(f"media[{i}]: unknown field(s) {sorted(unknown)}")
    return media


def refusal(config: ModelConfig, model_name: str, kind: str) -> str | None:
    """Why this model cannot take `kind` ("image" / "audio"), or None if it can."""
    media = config.media
    if kind == "image" and (media is None or not media.vision):
        what = "a vision embedder" if media is not None else "any image or audio input"
    elif kind == "audio" and (media is None or not media.audio):
        what = "an audio embedder" if media is not None else "any image or audio input"
    else:
        return None
    family = "a text-only model" if media is None else "a Gemma 4 unified model without it"
    return (f"model {model_name} cannot take {kind} input: it is {family} ({config.arch}) and "
            f"lacks {what}; load a Gemma 4 unified checkpoint with a {kind}_config, or use "
            f"engine.backend \"openai\" with a server whose model reads {kind}s")


def build_prompt(config: ModelConfig, tokenizer: Any, model_name: str, prompt: str,
                 media: Sequence[dict[str, Any]],
                 image_limits: ImageLimits = IMAGE_LIMITS,
                 audio_limits: AudioLimits = AUDIO_LIMITS) -> MediaPrompt:
    """Tokenize `prompt`, putting each medium's soft tokens at its marker (in order)."""
    check_media(list(media))
    for item in media:
        reason = refusal(config, model_name, item["kind"])
        if reason is not None:
            raise ValueError(reason)
    assert config.media is not None
    mc = config.media
    markers = [m.group(0) for m in _MARKERS.finditer(prompt)]
    want = ["image" if m == IMAGE_MARKER else "audio" for m in markers]
    have = [str(item["kind"]) for item in media]
    if want != have:
        raise ValueError(f"the prompt's media markers ({', '.join(want) or 'none'}) do not match "
                         f"the media sent ({', '.join(have) or 'none'}): put one {IMAGE_MARKER} "
                         f"or {AUDIO_MARKER} in the prompt where each goes, in order")
    texts = _MARKERS.split(prompt)  # len(media) + 1 pieces
    ids: list[int] = list(tokenizer.encode(texts[0], add_bos=True))
    keys: list[np.ndarray] = []
    spans: list[SoftSpan] = []
    for item, text in zip(media, texts[1:], strict=True):
        data = bytes(item["data"])
        if item["kind"] == "image":
            image = prepare_image(data, mc, int(item.get("max_soft_tokens", DEFAULT_SOFT_TOKENS)),
                                  image_limits)
            ids.append(mc.boi_token_id)
            span = SoftSpan(len(ids), "image", image=image)
            digest = _digest(b"image", image.pixels, image.positions)
            close = mc.eoi_token_id
        else:
            clip = prepare_audio(data, mc, audio_limits)
            ids.append(mc.boa_token_id)
            span = SoftSpan(len(ids), "audio", audio=clip)
            digest = _digest(b"audio", clip.frames)
            close = mc.eoa_token_id
        spans.append(span)
        keys.append(key_ids(digest, span.n))
        ids.extend([-1] * span.n)  # filled with the content keys below
        ids.append(close)
        ids.extend(tokenizer.encode(text, add_bos=False))
    out = np.asarray(ids, dtype=np.int64)
    for span, key in zip(spans, keys, strict=True):
        out[span.start : span.end] = key
    return MediaPrompt(out, tuple(spans))


def _digest(kind: bytes, *arrays: np.ndarray) -> bytes:
    h = hashlib.sha256(kind)
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def key_ids(digest: bytes, n: int) -> np.ndarray:
    """n distinct negative ids derived from a content hash (never a real token id)."""
    base = int.from_bytes(digest[:8], "little") & _KEY_SPACE
    return -1 - (base + np.arange(n, dtype=np.int64)) % _KEY_SPACE  # (n,)


# --------------------------------------------------------------------------- block rules


def safe_prefix(spans: Sequence[SoftSpan], n: int) -> int:
    """The longest reusable prefix <= n: an image block's K/V depends on the whole block,
    so a prefix may not end inside one."""
    for s in spans:
        if s.bidirectional and s.start < n < s.end:
            return s.start
    return n


def chunk_end(spans: Sequence[SoftSpan], start: int, end: int) -> int:
    """Where a prefill chunk [start, end) should stop so that no image block is split: before
    the block if the chunk has anything else, else after the whole block."""
    for s in spans:
        if s.bidirectional and s.start < end < s.end:
            return s.start if s.start > start else s.end
    return end


def blocks_in(spans: Sequence[SoftSpan], start: int, end: int) -> list[tuple[int, int]]:
    """The bidirectional blocks (first, end) among positions start..end (all inside it)."""
    out = []
    for s in spans:
        if s.bidirectional and s.start < end and s.end > start:
            assert start <= s.start and s.end <= end, "an image block was split across chunks"
            out.append((s.start, s.end))
    return out
