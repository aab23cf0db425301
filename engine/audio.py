"""Audio for Gemma 4 unified: read a WAV file, mix to mono, resample to 16 kHz, cut into
640-sample (40 ms) frames, and the encoder-free audio embedder (weightless RMSNorm over the raw
samples of a frame, then one Linear) that turns each frame into one soft token.

WAV is parsed here (RIFF chunks) rather than with the stdlib `wave` module, which refuses
IEEE-float and WAVE_FORMAT_EXTENSIBLE files: PCM 8-bit (unsigned), 16/24/32-bit (signed),
float 32/64-bit, any rate, any channel count (mixed down by averaging). Resampling is
band-limited (FFT: the spectrum cut or zero-padded to the new rate), numpy only.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from engine.config import MediaConfig

SAMPLE_RATE = 16_000
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


@dataclass(frozen=True)
class AudioLimits:
    max_bytes: int = 24 * 1024 * 1024  # the WAV file
    max_seconds: float = 60.0  # 1500 soft tokens


AUDIO_LIMITS = AudioLimits()


@dataclass(frozen=True)
class AudioInput:
    """One clip as soft-token inputs: 16 kHz samples in frames, zero-padded at the end."""

    frames: np.ndarray  # (n, frame) float32

    @property
    def n_tokens(self) -> int:
        return int(self.frames.shape[0])


def read_wav(data: bytes, limits: AudioLimits = AUDIO_LIMITS) -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples in [-1, 1], sample rate). ValueError if malformed."""
    if len(data) > limits.max_bytes:
        raise ValueError(f"audio is {len(data)} bytes; the limit is {limits.max_bytes} bytes "
                         "(max_audio_bytes)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a WAV file (no RIFF/WAVE header); send a .wav recording")
    fmt: tuple[int, int, int, int] | None = None
    samples: bytes | None = None
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = data[at + 8:at + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ValueError("WAV fmt chunk is truncated")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == _EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]  # the sub-format GUID's first field
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            samples = body
        at += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt is None or samples is None:
        raise ValueError("WAV file lacks a fmt or data chunk")
    tag, channels, rate, bits = fmt
    if channels < 1 or rate < 1000 or rate > 384_000:
        raise ValueError(f"WAV file has {channels} channels at {rate} Hz: not audio we can read")
    width = bits // 8
    if tag == _PCM and bits in (8, 16, 24, 32):
        usable = len(samples) - len(samples) % (width * channels)
        raw = np.frombuffer(samples[:usable], dtype=np.uint8)
        if bits == 8:
            x = (raw.astype(np.float32) - 128.0) / 128.0  # unsigned 8-bit
        elif bits == 24:
            b = raw.reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            v = np.where(v >= 1 << 23, v - (1 << 24), v)
            x = v.astype(np.float32) / np.float32(1 << 23)
        else:
            ints = raw.view("<i2" if bits == 16 else "<i4")
            x = ints.astype(np.float32) / np.float32(1 << (bits - 1))
    elif tag == _FLOAT and bits in (32, 64):
        usable = len(samples) - len(samples) % (width * channels)
        x = np.frombuffer(samples[:usable], dtype="<f4" if bits == 32 else "<f8").astype(
            np.float32)
        x = np.nan_to_num(np.clip(x, -1.0, 1.0))
    else:
        raise ValueError(f"WAV encoding {tag} with {bits}-bit samples is not supported (PCM "
                         "8/16/24/32-bit or float 32/64-bit)")
    mono = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)  # (N,) channels mixed down
    seconds = len(mono) / rate
    if seconds > limits.max_seconds:
        raise ValueError(f"audio is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s "
                         "(max_audio_seconds)")
    if len(mono) == 0:
        raise ValueError("WAV file holds no samples")
    return mono, int(rate)


def resample(x: np.ndarray, rate: int, to: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of mono `x` from `rate` to `to` Hz (FFT method)."""
    if rate == to:
        return x.astype(np.float32)
    n = len(x)
    m = max(1, int(round(n * to / rate)))
    spectrum = np.fft.rfft(x.astype(np.float64))  # (n//2 + 1,)
    out = np.zeros(m // 2 + 1, dtype=np.complex128)  # (m//2 + 1,)
    keep = min(len(spectrum), len(out))
    out[:keep] = spectrum[:keep]
    if m < n and m % 2 == 0:
        out[-1] = out[-1].real  # the new Nyquist bin of a real signal is real
    return (np.fft.irfft(out, m) * (m / n)).astype(np.float32)  # (m,)


def to_frames(x: np.ndarray, frame: int) -> np.ndarray:
    """(N,) -> (ceil(N / frame), frame), the last frame zero-padded."""
    n = -(-len(x) // frame)
    out = np.zeros(n * frame, dtype=np.float32)  # (n * frame,)
    out[: len(x)] = x
    return out.reshape(n, frame)


def prepare_audio(data: bytes, media: MediaConfig,
                  limits: AudioLimits = AUDIO_LIMITS) -> AudioInput:
    """WAV bytes -> 16 kHz frames of `media.audio_frame` samples."""
    mono, rate = read_wav(data, limits)
    return AudioInput(to_frames(resample(mono, rate), media.audio_frame))


# --------------------------------------------------------------------------- the embedder


@dataclass(frozen=True)
class AudioWeights:
    w_proj: np.ndarray  # (d, frame)

    @classmethod
    def from_packed(cls, packed: Mapping[str, np.ndarray]) -> AudioWeights | None:
        return cls(packed["audio.w_proj"]) if "audio.w_proj" in packed else None


def expected_shapes(media: MediaConfig, d_model: int) -> dict[str, tuple[int, ...]]:
    return {"audio.w_proj": (d_model, media.audio_frame)}


def embed_audio(aw: AudioWeights, frames: np.ndarray, eps: float) -> np.ndarray:
    """Frames (n, frame) -> soft tokens (n, d): weightless RMSNorm, then the projection."""
    h = frames / np.sqrt(np.mean(frames * frames, axis=-1, keepdims=True) + np.float32(eps))
    return np.ascontiguousarray(h @ aw.w_proj.T, dtype=np.float32)  # (n, d)
